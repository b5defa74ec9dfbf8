"""The ``nvmefs`` command: subcommands shaped like nvme-cli where they overlap."""
import argparse
import errno
import json
import logging
import os
import sys

from nvmefs import __version__
from nvmefs.admin import FEATURES
from nvmefs.errors import ConnectFailed, UsageError, os_text, unwrap
from nvmefs.mounts import fuse_mounts
from nvmefs.tcp_url import is_tcp, tcp_options

# the mount's root attributes (nvmefs/fusefs.py)
STATS_XATTR = "user.nvmefs.stats"
ADMIN_XATTR = "user.nvmefs.admin"

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text):
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in SIZE_UNITS and not t[-1:].isdigit() else ""
    num = t[:-1] if unit else t
    try:
        value = int(float(num) * SIZE_UNITS[unit])
    except (ValueError, OverflowError):   # "inf" and "1e400" overflow int()
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 1G, 512M, 1073741824)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, not {text!r}")
    return value


def positive(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def number_range(kind, lo, hi):
    """An argparse type: ``kind`` (int or float) of ``text`` within lo..hi."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text} is outside {lo}..{hi}")
        return v
    return parse


def float_range(lo, hi):
    return number_range(float, lo, hi)


def int_range(lo, hi):
    return number_range(int, lo, hi)


def emit(args, data, table):
    if getattr(args, "output", "normal") == "json":
        print(json.dumps(data, indent=2))
    else:
        print(table(data))


def kv_table(d):
    w = max((len(k) for k in d), default=0)
    return "\n".join(f"{k:<{w}} : {v}" for k, v in d.items())


# -- commands that talk to a controller -------------------------------------------------

class BusyImage(UsageError):
    """The image or device is held by another controller (a mount's, mostly)."""


def with_controller(args, fn):
    """Open the image's (or device's) controller, run ``fn(ctrl)`` (async),
    shut down."""
    import trio

    from nvmefs.controller import open_controller
    from nvmefs.image import check_image, default_image
    from nvmefs.transport import ModelTransport

    if getattr(args, "device", None):
        from nvmefs.transport import open_transport
        try:
            t = open_transport(args.device, tcp_options=tcp_options(args))
        except (OSError, ValueError) as exc:
            if is_tcp(args.device) and isinstance(exc, OSError):
                raise ConnectFailed(f"cannot connect to {args.device}: {os_text(exc)}") from None
            # held by another process (a mount's controller), not merely unbound or not viable
            held = getattr(exc, "errno", None) == errno.EBUSY and "in use" in str(exc)
            raise (BusyImage if held else UsageError)(f"cannot open device {args.device}: {exc}") from None
    else:
        image = args.image or default_image()
        check_image(image, 0, 512, create=False)
        try:
            t = ModelTransport(image, create=False)
        except (OSError, ValueError) as exc:
            cls = BusyImage if getattr(exc, "errno", None) == errno.EBUSY else UsageError
            raise cls(f"cannot open image {image}: {exc}") from None

    async def main():
        async with open_controller(t, io_queues=1) as ctrl:
            return await fn(ctrl)
    try:
        return trio.run(main)
    finally:
        t.close()


def nvmefs_mounts():
    """Mountpoints of running nvmefs mounts."""
    return [point for point, fstype, _dev in fuse_mounts() if fstype == "fuse.nvmefs"]


def mount_serving(args):
    """The mountpoint of the running mount whose controller is the one
    ``args`` names (its image or device), or None."""
    from nvmefs.image import default_image
    if is_tcp(getattr(args, "device", None)):
        from nvmefs.tcp_url import canonical_url
        want = ("nvme-tcp", canonical_url(args.device).removeprefix("nvme-tcp:"))
    elif getattr(args, "device", None):
        want = ("vfio", args.device.removeprefix("vfio:"))
    else:
        want = ("model", os.path.realpath(args.image or default_image()))
    for mnt in nvmefs_mounts():
        try:
            name = json.loads(os.getxattr(mnt, STATS_XATTR))["transport"]
        except (OSError, ValueError, KeyError):
            continue
        kind, _, where = name.partition(":")
        where = where.removesuffix(" (raw)")
        if (kind, os.path.realpath(where) if kind == "model" else where) == want:
            return mnt
    return None


def via_mount(mountpoint, name, params, force=False):
    """Hand admin verb ``name`` to the mount at ``mountpoint``; its result."""
    if os.path.realpath(mountpoint) not in [os.path.realpath(m) for m in nvmefs_mounts()]:
        # never set the attribute on whatever else is there
        raise UsageError(f"{mountpoint} is not a running nvmefs mount")
    req = json.dumps({"verb": name, "args": params, "force": force}).encode()
    try:
        os.setxattr(mountpoint, ADMIN_XATTR, req)
        res = json.loads(os.getxattr(mountpoint, ADMIN_XATTR))
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise UsageError(f"{mountpoint}: only the mount's owner or root may run admin commands "
                             f"on it") from None
        raise UsageError(f"{mountpoint} is not a running nvmefs mount ({exc.strerror})") from None
    if not res["ok"]:
        raise (UsageError if res.get("usage") else AdminError)(res["error"])
    return res["result"]


class AdminError(Exception):
    """The mount ran the command and it failed (exit status 1)."""


def run_verb(args, name, **params):
    """Admin verb ``name`` (nvmefs/admin.py) on the controller ``args``
    names: through the running mount that holds it (``--mount``, or the
    mount found serving the image or device), else on a controller brought
    up here for the command."""
    from nvmefs.admin import VERBS
    force = getattr(args, "force", False)
    if getattr(args, "mount", None):
        return via_mount(os.path.abspath(args.mount), name, params, force)
    try:
        return with_controller(args, lambda c: VERBS[name](c, **params))
    except BusyImage as exc:
        mnt = mount_serving(args)
        if mnt is None:
            raise UsageError(f"{exc} (not by a mount found in /proc/self/mounts: "
                             f"pass --mount MOUNTPOINT)") from None
        return via_mount(mnt, name, params, force)


def cmd_id_ctrl(args):
    d = run_verb(args, "id-ctrl")
    emit(args, d, lambda d: kv_table({k: (hex(v) if isinstance(v, int) and k in ("vid", "ssvid", "ver", "oacs",
                                                                                  "oaes", "oncs", "sgls") else v)
                                      for k, v in d.items()}))
    return 0


def cmd_id_ns(args):
    d = run_verb(args, "id-ns", namespace_id=args.namespace_id)
    emit(args, d, lambda d: kv_table({**{k: v for k, v in d.items() if k != "lbafs"},
                                      **{f"lbaf {i}": f"ms:{f['ms']} lbads:{f['lbads']} rp:{f['rp']}"
                                         + (" (in use)" if i == d["format"] else "")
                                         for i, f in enumerate(d["lbafs"])}}))
    return 0


def cmd_list(args):
    rows = run_verb(args, "list")

    def table(rows):
        out = [f"{'Node':<10} {'SN':<16} {'Model':<28} {'Namespace':>9} {'Size':>12} {'Format':>8}"]
        for r in rows:
            out.append(f"{r['name']:<10} {r['serial']:<16} {r['model'][:28]:<28} {r['nsid']:>9} "
                       f"{human(r['size']):>12} {r['lba_size']:>6} B")
        return "\n".join(out)
    emit(args, rows, table)
    return 0


def cmd_list_ns(args):
    rows = run_verb(args, "list-ns", all=args.all)
    emit(args, rows, lambda rows: "\n".join(
        f"[{i:>4}]:{r['nsid']:#x}  {human(r['size'])}, {r['lba_size']}-byte LBAs"
        + ("" if r["attached"] else ", not attached") for i, r in enumerate(rows)) or "no namespaces")
    return 0


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def cmd_smart_log(args):
    emit(args, run_verb(args, "smart-log"), kv_table)
    return 0


def cmd_error_log(args):
    def table(rows):
        if not rows:
            return "no error log entries"
        out = [f"{'count':>6} {'sqid':>5} {'cid':>6} {'status':<28} {'lba':>12} {'nsid':>5}"]
        for r in rows:
            out.append(f"{r['error_count']:>6} {r['sqid']:>5} {r['cid']:>6} {r['status_name']:<28} "
                       f"{r['lba']:>12} {r['nsid']:>5}")
        return "\n".join(out)
    emit(args, run_verb(args, "error-log"), table)
    return 0


def cmd_get_feature(args):
    fid = FEATURES.get(args.feature_id)
    if fid is None:
        try:
            fid = int(args.feature_id, 0)
        except ValueError:
            raise UsageError(f"unknown feature {args.feature_id!r} (names: {', '.join(FEATURES)})") from None
    emit(args, run_verb(args, "get-feature", feature_id=fid),
         lambda d: f"get-feature:0x{d['feature']:02x}, Current value:0x{d['value']:08x}")
    return 0


def cmd_format(args):
    from nvmefs.progress import Progress
    label = (f"formatting nvme0n{args.namespace_id} to {args.lba_size}-byte LBAs"
             + (" with user data erase" if args.erase else ""))
    import threading
    done = threading.Event()
    with Progress(label) as bar:
        ticker = threading.Thread(target=lambda: [bar.render() for _ in iter(lambda: done.wait(0.2), True)],
                                  daemon=True)
        ticker.start()
        try:
            d = run_verb(args, "format", namespace_id=args.namespace_id, lba_size=args.lba_size,
                         erase=args.erase)
        finally:
            done.set()
            ticker.join()
    emit(args, d, lambda d: "format complete")
    return 0


def cmd_create_ns(args):
    if args.nsze_si is not None:
        if args.nsze is not None:
            raise UsageError("give --nsze or --nsze-si, not both")
        if args.nsze_si % args.block_size:
            raise UsageError(f"--nsze-si {args.nsze_si} is not a multiple of the {args.block_size}-byte block")
        args.nsze = args.nsze_si // args.block_size
    if args.nsze is None:
        raise UsageError("the namespace size is missing: --nsze BLOCKS or --nsze-si SIZE")
    if args.nsze * args.block_size % 4096:
        raise UsageError(f"{args.nsze} blocks of {args.block_size} bytes is not a whole number of "
                         f"4 KiB blocks (a namespace can be formatted to either LBA size)")
    d = run_verb(args, "create-ns", nsze=args.nsze, ncap=args.ncap, lba_size=args.block_size)
    emit(args, d, lambda d: f"create-ns: Success, created nsid:{d['nsid']}")
    return 0


def cmd_delete_ns(args):
    d = run_verb(args, "delete-ns", namespace_id=args.namespace_id)
    emit(args, d, lambda d: f"delete-ns: Success, deleted nsid:{d['nsid']}")
    return 0


def cmd_attach_ns(args, verb="attach-ns"):
    d = run_verb(args, verb, namespace_id=args.namespace_id, controllers=args.controllers)
    emit(args, d, lambda d: f"{verb}: Success, nsid:{d['nsid']}")
    return 0


def cmd_detach_ns(args):
    return cmd_attach_ns(args, "detach-ns")


def cmd_create_image(args):
    from nvmefs.image import create_image, create_raw_image, read_image_header
    if os.path.exists(args.image):
        raise UsageError(f"{args.image} already exists")
    if args.size % args.lba_size:
        raise UsageError(f"size {args.size} is not a multiple of the LBA size {args.lba_size}")
    if args.raw:
        if args.namespaces != 1:
            raise UsageError("a raw image holds one namespace (--namespaces 1)")
        try:
            create_raw_image(args.image, args.size)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if args.preallocate:
            try:
                fd = os.open(args.image, os.O_RDWR)
                try:
                    os.posix_fallocate(fd, 0, args.size)
                finally:
                    os.close(fd)
            except OSError as exc:
                os.unlink(args.image)
                raise UsageError(f"cannot preallocate {args.image}: {exc.strerror}") from None
        # a raw image has nowhere to keep its LBA size: the mount is told
        hint = f"; mount it with --lba-size {args.lba_size}" if args.lba_size != 512 else ""
        print(f"created {args.image}: raw image of {human(args.size)} "
              f"({'preallocated' if args.preallocate else 'sparse'}){hint}")
        return 0
    per = create_image(args.image, args.size, args.namespaces, args.lba_size, args.capacity)
    if args.preallocate:
        from nvmefs.progress import Progress
        header = read_image_header(args.image)
        step = 64 << 20
        try:
            fd = os.open(args.image, os.O_RDWR)
            try:
                with Progress(f"preallocating {args.image}", total=per * args.namespaces) as bar:
                    for ns in header["namespaces"]:
                        for off in range(0, ns["size"], step):
                            n = min(step, ns["size"] - off)
                            os.posix_fallocate(fd, ns["offset"] + off, n)
                            bar.advance(n)
            finally:
                os.close(fd)
        except OSError as exc:
            os.unlink(args.image)     # a half-allocated image is worse than none
            raise UsageError(f"cannot preallocate {args.image}: {exc.strerror}") from None
    cap = read_image_header(args.image)["capacity"]
    print(f"created {args.image}: {args.namespaces} namespace(s) of {human(per)}, "
          f"{args.lba_size}-byte LBAs ({'preallocated' if args.preallocate else 'sparse'})"
          + (f", {human(cap - per * args.namespaces)} of {human(cap)} left for create-ns"
             if cap > per * args.namespaces + (1 << 20) * args.namespaces else ""))
    return 0


def cmd_stats(args):
    try:
        raw = os.getxattr(args.mountpoint, STATS_XATTR)
    except OSError as exc:
        raise UsageError(f"{args.mountpoint} is not a running nvmefs mount ({exc.strerror})") from None
    d = json.loads(raw)

    def table(d):
        la = d["lanes"]
        out = [f"controller {d['transport']}   resets {d['resets']}   lanes {len(la['lanes'])}   "
               f"FUSE over {la.get('fuse_transport', '/dev/fuse')}   "
               f"errors {la['errors']}   retries {la['retries']}   timeouts {la['timeouts']}"]
        ts = d.get("transport_stats")
        if ts and "connections" in ts:
            out.append(f"nvme-tcp: association {ts['state']}, {ts['associations']} made, "
                       f"{ts['connection_losses']} lost; digests: header {'on' if ts['hdr_digest'] else 'off'}, "
                       f"data {'on' if ts['data_digest'] else 'off'}")
            cols = ("qid", "capsules", "responses", "incapsule_writes", "r2t", "h2c_data", "c2h_data",
                    "c2h_success", "keep_alives", "bytes_out", "bytes_in")
            out.append(" ".join(f"{c:>16}" for c in cols))
            for c in ts["connections"]:
                out.append(" ".join(f"{c.get(k, 0):>16}" for k in cols))
        if la.get("rings"):
            out.append("io_uring queues: " + ", ".join(f"CPU {r['qid']} (lane {r['lane']}) {r['requests']} requests"
                                                      for r in la["rings"]))
        cols = ("qid", "owner", "submitted", "completed", "in_flight", "sq_full_waits", "prp", "sgl", "errors",
                "interrupts")
        out.append(" ".join(f"{c:>13}" for c in cols))
        for q in d["queues"]:
            out.append(" ".join(f"{q.get(c, 0):>13}" for c in cols))
        cols = ("lane", "cpu", "reads", "writes", "rmw", "fallocates", "flushes", "to_pyfuse3", "handed_in",
                "handed_out", "retries", "errors", "lost_to_reset", "in_flight", "max_in_flight")
        out.append(" ".join(f"{c:>13}" for c in cols))
        for ln in la["lanes"]:
            out.append(" ".join(f"{ln.get(c, 0):>13}" for c in cols))
        for e in la.get("recent_errors", []):
            out.append(f"recent error: lane {e['lane']} {e['op']} nvme0n{e['nsid']} LBA {e['lba']}+{e['blocks']}: "
                       f"{e['command']} {e['status']} after {e['attempts']} attempt(s)")
        if d["errors_by_status"]:
            out.append("errors by status: " + ", ".join(f"{k} {v}" for k, v in d["errors_by_status"].items()))
        return "\n".join(out)
    emit(args, d, table)
    return 0


def cmd_selfcheck(args):
    """Exercise the Cython core end to end: queue pairs driven against the
    native echo device, PRP/SGL building, status decoding."""
    from nvmefs import _core, _model

    arena = _core.DmaArena(64 << 20)
    regs = _core.RegisterFile(0x2000)
    qp = _core.QueuePair(arena, regs, 1, 1024)
    dev = _model.EchoDevice(qp)
    dev.start()
    try:
        done, wrong, ns = _model.echo_stress(qp, dev, args.commands, 8, 60.0)
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


def cmd_discover(args):
    from nvmefs.tcp import discover
    try:
        gen, entries = discover(args.traddr, args.trsvcid, hostnqn=args.hostnqn, hostid=args.hostid,
                                hdr_digest=bool(args.hdr_digest), data_digest=bool(args.data_digest))
    except OSError as exc:
        raise ConnectFailed(f"discovery at {args.traddr}:{args.trsvcid} failed: {os_text(exc)}") from None
    if args.output == "json":
        print(json.dumps({"genctr": gen, "records": entries}, indent=2))
        return 0
    print(f"Discovery Log Number of Records {len(entries)}, Generation counter {gen}")
    for i, e in enumerate(entries):
        print(f"=====Discovery Log Entry {i}======")
        for k in ("trtype", "adrfam", "subtype", "treq", "portid", "trsvcid", "subnqn", "traddr"):
            print(f"{k + ':':9}{e[k]}")
    subsystems = [e for e in entries if e["subtype"] == "nvme subsystem"]
    if subsystems:
        e = subsystems[0]
        host = f"[{args.traddr}]" if ":" in args.traddr else args.traddr
        # served on the port that answered this discovery: that port (which
        # may be forwarded), not the number the target knows it by
        same = any(d["subtype"] == "current discovery subsystem" and d["trsvcid"] == e["trsvcid"]
                   for d in entries)
        print(f"mount one with: nvmefs mount MOUNTPOINT --device "
              f"nvme-tcp://{host}:{args.trsvcid if same else e['trsvcid']}/{e['subnqn']}")
    return 0


def cmd_mount(args):
    from nvmefs.mount import run_mount
    return run_mount(args)


class Parser(argparse.ArgumentParser):
    """Malformed arguments get one line on stderr (not the whole usage) and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser():
    ap = Parser(
        prog="nvmefs",
        description="A userspace NVMe driver that exposes each namespace as a file through FUSE. "
                    "Without --image, commands use the default image "
                    "(~/.local/share/nvmefs/nvme0.img), created by the first mount.")
    ap.add_argument("--version", action="version", version=f"nvmefs {__version__}")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def fabrics_opts(p, discovery=False):
        g = p.add_argument_group("NVMe over TCP (nvme-cli's option names)")
        g.add_argument("--hostnqn", metavar="NQN", help="host NQN (default /etc/nvme/hostnqn, else one "
                                                        "derived from the machine id)")
        g.add_argument("--hostid", metavar="UUID", help="host identifier (default /etc/nvme/hostid, "
                                                        "else derived from the machine id)")
        g.add_argument("--hdr-digest", action="store_true", default=None, help="CRC32C header digests")
        g.add_argument("--data-digest", action="store_true", default=None, help="CRC32C data digests")
        if discovery:
            return
        g.add_argument("--nr-io-queues", type=int_range(1, 64), default=None, metavar="N",
                       help="at most N I/O queues, each its own TCP connection (default: as many as "
                            "the queue owners want)")
        g.add_argument("--keep-alive-tmo", type=float_range(1, 3600), default=None, metavar="S",
                       help="keep-alive timeout (default 5 s): Keep Alive every S/2, no answer within S "
                            "means the target is gone")
        g.add_argument("--reconnect-delay", type=float_range(0.1, 3600), default=None, metavar="S",
                       help="after a lost connection, try a new one every S seconds (default 10)")
        g.add_argument("--ctrl-loss-tmo", type=float_range(0, 86400), default=None, metavar="S",
                       help="give up reconnecting (requests then fail with EIO) S seconds after the loss "
                            "(default 600)")
        g.add_argument("--disable-sqflow", action="store_true", default=None,
                       help="ask the target to disable SQ flow control (it may then end reads with "
                            "C2HData SUCCESS instead of a response capsule)")

    def device_opt(p):
        p.add_argument("--device", metavar="DEVICE",
                       help="instead of the built-in controller on --image: vfio:BDF (a PCIe NVMe "
                            "controller bound to vfio-pci, e.g. vfio:0000:03:00.0) or "
                            "nvme-tcp://HOST[:PORT]/SUBNQN (a subsystem of an NVMe/TCP target)")
        fabrics_opts(p)

    def image_opt(p, force=False):
        p.add_argument("--image", metavar="PATH", help="controller image (default: the default image)")
        device_opt(p)
        p.add_argument("--mount", metavar="MOUNTPOINT",
                       help="run it on the controller of the nvmefs mount at MOUNTPOINT (default: the "
                            "running mount of --image or --device, if there is one)")
        if force:
            p.add_argument("--force", action="store_true",
                           help="even if the namespace has files open in the mount (a mounted file "
                                "system, a loop device)")
        p.add_argument("-o", "--output-format", dest="output", choices=("normal", "json"), default="normal",
                       help="output format")
        p.add_argument("--json", dest="output", action="store_const", const="json", help="same as -o json")

    p = sub.add_parser("mount", help="serve every namespace as a file under MOUNTPOINT",
                       description="Mount the controller's namespaces as files nvme0n1, nvme0n2, ... "
                                   "Runs in the foreground until unmounted or interrupted.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    device_opt(p)
    p.add_argument("--image", metavar="PATH", help="sparse image file (created if missing; "
                                                   "default ~/.local/share/nvmefs/nvme0.img)")
    p.add_argument("--size", type=parse_size, default=1 << 30, help="size of a new image (default 1G)")
    p.add_argument("--lba-size", type=int, choices=(512, 4096), default=512, help="LBA size of a new image")
    p.add_argument("--namespaces", type=int_range(0, 16), default=1, metavar="N",
                   help="namespaces in a new image, sharing --size (0: none, create them with create-ns)")
    p.add_argument("--capacity", type=parse_size, default=None, metavar="SIZE",
                   help="NVM capacity of a new image (default: --size); what the namespaces leave is "
                        "room for create-ns")
    p.add_argument("--lanes", type=int_range(1, 1024), default=None, metavar="N",
                   help="lanes, each a thread on its own CPU with its own FUSE channel and NVMe queue pair "
                        "(default: one per CPU this process may run on)")
    p.add_argument("--queue-depth", type=int_range(1, 1023), default=255, metavar="N",
                   help="commands in flight per queue (default 255)")
    p.add_argument("--sgl", choices=("on", "off", "bitbucket"), default="bitbucket",
                   help="controller SGL support (default bitbucket)")
    p.add_argument("--write-cache", choices=("on", "off"), default="on", help="volatile write cache")
    p.add_argument("--mdts", type=int_range(1, 11), default=9,
                   help="controller MDTS exponent: max transfer 2^N x 4 KiB (default 9: 2 MiB)")
    p.add_argument("--polled", action="store_true", help="poll for completions instead of interrupts")
    p.add_argument("--spin-us", type=int_range(0, 100000), default=30, metavar="US",
                   help="hybrid polling: watch the CQ this long before sleeping on the interrupt (default 30)")
    p.add_argument("--model-idle-us", type=int_range(0, 1000000), default=1000, metavar="US",
                   help="built-in controller: busy-poll this long after its last command before "
                        "sleeping (default 1000; a sleeping controller costs a thread wake-up per command)")
    p.add_argument("--page-cache", action="store_true",
                   help="let the kernel page cache serve reads (default: direct I/O)")
    p.add_argument("--fuse-transport", choices=("auto", "uring", "dev"), default="auto",
                   help="how the lanes take FUSE requests: io_uring (Linux 6.14+, enable_uring=Y), "
                        "/dev/fuse, or auto (io_uring where the kernel offers it; default)")
    p.add_argument("--enable-uring", action="store_true",
                   help="as root, switch the kernel's FUSE over io_uring on (fuse module parameter "
                        "enable_uring) before mounting")
    p.add_argument("--uring-depth", type=int_range(1, 1024), default=None, metavar="N",
                   help="io_uring entries per CPU queue (default: the lanes' requests per lane)")
    p.add_argument("-b", "--background", action="store_true", help="run in the background once mounted")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("id-ctrl", help="Identify Controller")
    image_opt(p)
    p.set_defaults(func=cmd_id_ctrl)
    p = sub.add_parser("id-ns", help="Identify Namespace")
    image_opt(p)
    p.add_argument("-n", "--namespace-id", type=positive, default=1)
    p.set_defaults(func=cmd_id_ns)
    p = sub.add_parser("list", help="list namespaces")
    image_opt(p)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("smart-log", help="SMART / Health log")
    image_opt(p)
    p.set_defaults(func=cmd_smart_log)
    p = sub.add_parser("error-log", help="Error Information log")
    image_opt(p)
    p.set_defaults(func=cmd_error_log)
    p = sub.add_parser("get-feature", help="Get Features")
    image_opt(p)
    p.add_argument("-f", "--feature-id", required=True, help=f"number or name ({', '.join(FEATURES)})")
    p.set_defaults(func=cmd_get_feature)
    p = sub.add_parser("format", help="Format NVM (change LBA size, optionally erase)")
    image_opt(p, force=True)
    p.add_argument("-n", "--namespace-id", type=positive, default=1)
    p.add_argument("--lba-size", type=int, choices=(512, 4096), required=True)
    p.add_argument("--erase", action="store_true", help="user data erase (all zeroes)")
    p.set_defaults(func=cmd_format)
    p = sub.add_parser("list-ns", help="active namespace IDs (--all: every allocated one)")
    image_opt(p)
    p.add_argument("-a", "--all", action="store_true", help="allocated namespaces too, attached or not")
    p.set_defaults(func=cmd_list_ns)
    p = sub.add_parser("create-ns", help="Namespace Management: create a namespace (not attached)",
                       description="Create a namespace in the controller's unallocated capacity; "
                                   "attach it with attach-ns to see it.")
    image_opt(p)
    p.add_argument("-s", "--nsze", type=positive, default=None, metavar="BLOCKS", help="size in blocks")
    p.add_argument("--nsze-si", type=parse_size, default=None, metavar="SIZE",
                   help="size in bytes, with a unit (e.g. 512M), instead of --nsze")
    p.add_argument("-c", "--ncap", type=positive, default=None, metavar="BLOCKS",
                   help="capacity in blocks (default and only value supported: --nsze)")
    p.add_argument("-b", "--block-size", type=int, choices=(512, 4096), default=512,
                   help="LBA size (default 512)")
    p.set_defaults(func=cmd_create_ns)
    p = sub.add_parser("delete-ns", help="Namespace Management: delete a namespace and its data")
    image_opt(p, force=True)
    p.add_argument("-n", "--namespace-id", type=lambda t: int(t, 0), required=True,
                   help="NSID (0xffffffff: all of them)")
    p.set_defaults(func=cmd_delete_ns)

    def controllers(text):
        try:
            ids = [int(x, 0) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of controller IDs: {text!r}") from None
        if not ids or any(not 0 <= i <= 0xFFFF for i in ids):
            raise argparse.ArgumentTypeError(f"not a list of controller IDs: {text!r}")
        return ids
    for name, fn, what in (("attach-ns", cmd_attach_ns, "attach a namespace to"),
                           ("detach-ns", cmd_detach_ns, "detach a namespace from")):
        p = sub.add_parser(name, help=f"Namespace Attachment: {what} the controller")
        image_opt(p, force=name == "detach-ns")
        p.add_argument("-n", "--namespace-id", type=positive, required=True)
        p.add_argument("-c", "--controllers", type=controllers, default=None, metavar="ID,...",
                       help="controller IDs (default: this controller)")
        p.set_defaults(func=fn)
    p = sub.add_parser("create-image", help="create a sparse controller image")
    p.add_argument("image", metavar="PATH")
    p.add_argument("--raw", action="store_true",
                   help="a raw disk image (no header, one namespace over the whole file)")
    p.add_argument("--size", type=parse_size, default=1 << 30)
    p.add_argument("--lba-size", type=int, choices=(512, 4096), default=512)
    p.add_argument("--namespaces", type=int_range(0, 16), default=1,
                   help="namespaces sharing --size (default 1; 0: none, create them with create-ns)")
    p.add_argument("--capacity", type=parse_size, default=None, metavar="SIZE",
                   help="NVM capacity (default: --size); what the namespaces leave is room for create-ns")
    p.add_argument("--preallocate", action="store_true",
                   help="allocate every block now (with a progress bar) instead of a sparse file")
    p.set_defaults(func=cmd_create_image)
    p = sub.add_parser("discover", help="list the subsystems an NVMe over Fabrics target offers",
                       description="Connect to the target's discovery controller and print its "
                                   "discovery log (log page 70h).")
    p.add_argument("-t", "--transport", choices=("tcp",), default="tcp")
    p.add_argument("-a", "--traddr", required=True, metavar="HOST", help="the target's address")
    p.add_argument("-s", "--trsvcid", type=int_range(1, 65535), default=8009, metavar="PORT",
                   help="the target's discovery port (default 8009; Linux nvmet often uses 4420)")
    fabrics_opts(p, discovery=True)
    p.add_argument("-o", "--output-format", dest="output", choices=("normal", "json"), default="normal")
    p.add_argument("--json", dest="output", action="store_const", const="json")
    p.set_defaults(func=cmd_discover)
    p = sub.add_parser("stats", help="live per-queue counters of a running mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-o", "--output-format", dest="output", choices=("normal", "json"), default="normal")
    p.add_argument("--json", dest="output", action="store_const", const="json")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("selfcheck", help="exercise the driver core and report")
    p.add_argument("--commands", type=positive, default=200_000, metavar="N",
                   help="commands to round-trip through a queue pair (default 200000)")
    p.set_defaults(func=cmd_selfcheck)
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        format="nvmefs: %(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, never a traceback, for operator errors
        exc = unwrap(exc)
        if isinstance(exc, KeyboardInterrupt):
            return 130
        if isinstance(exc, BaseExceptionGroup):
            exc = "; ".join(str(unwrap(e)) for e in exc.exceptions)
        print(f"nvmefs: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
