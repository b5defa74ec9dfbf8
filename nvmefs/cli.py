"""The ``nvmefs`` command."""
import argparse
import sys

from nvmefs import __version__


def cmd_selfcheck(args):
    """Exercise the Cython core end to end: queue pairs driven against the
    native echo device, PRP/SGL building, status decoding."""
    from nvmefs import _core

    arena = _core.DmaArena(64 << 20)
    regs = _core.RegisterFile(0x2000)
    qp = _core.QueuePair(arena, regs, 1, 1024)
    dev = _core.EchoDevice(qp)
    dev.start()
    try:
        done, wrong, ns = _core.echo_stress(qp, dev, args.commands, 8, 60.0)
    finally:
        dev.stop()
    ok = done == args.commands and wrong == 0 and dev.torn == 0
    print(f"queue pair: {done}/{args.commands} commands round-tripped, {wrong} mismatched, "
          f"{dev.torn} torn entries, {ns / max(done, 1):.0f} ns/command")
    buf = arena.alloc(8 << 20)
    lists = arena.alloc(8 * 4096)
    prp1, prp2 = _core.build_prp([(buf.iova + 512, (8 << 20) - 4096)], lists)
    print(f"PRP: 8 MiB transfer -> PRP1 0x{prp1:x}, list at 0x{prp2:x} "
          f"({_core.prp_list_pages_needed((8 << 20) - 4096, 512)} chained list pages)")
    sgl1 = _core.build_sgl([(buf.iova + 8192 * k + 4, 1000) for k in range(300)], lists)
    print(f"SGL: 300 scattered segments -> SGL1 type {sgl1[15] >> 4} (segment chain)")
    info = _core.decode_status(_core.make_status(0, 0x80, dnr=True))
    print(f"status: SCT 0 SC 0x80 DNR -> {info.name}, errno {info.errno}, retryable {info.retryable}")
    print("self-check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def build_parser():
    ap = argparse.ArgumentParser(
        prog="nvmefs",
        description="A userspace NVMe driver that exposes each namespace as a file through FUSE.")
    ap.add_argument("--version", action="version", version=f"nvmefs {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("selfcheck", help="exercise the driver core and report")
    p.add_argument("--commands", type=int, default=200_000, metavar="N",
                   help="commands to round-trip through a queue pair (default 200000)")
    p.set_defaults(func=cmd_selfcheck)
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, never a traceback, for operator errors
        print(f"nvmefs: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
