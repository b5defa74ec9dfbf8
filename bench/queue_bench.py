#!/usr/bin/env python3
"""Queue-level I/O loop: random reads through the driver (controller,
queues, namespace API; no FUSE) at several queue depths, for the built-in
model on this host and, with --vfio-lab, for QEMU's NVMe controller over
VFIO inside the lab guest (TCG: guest numbers only show that the path
works, they say nothing about speed).

    python bench/queue_bench.py [--qd 1,32] [--bs 4096] [--seconds 3] [--vfio-lab] [--json F]
"""
import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


async def loop(ns, qd, bs, seconds):
    import trio
    lbas = bs // ns.lba_size
    span = min(ns.nlbas, (1 << 30) // ns.lba_size) - lbas
    done, lat = 0, []
    deadline = trio.current_time() + seconds

    async def worker(seed):
        nonlocal done
        rng = random.Random(seed)
        buf = bytearray(bs)
        while trio.current_time() < deadline:
            t0 = time.perf_counter()
            await ns.read(rng.randrange(0, span // lbas) * lbas, lbas, buf)
            lat.append(time.perf_counter() - t0)
            done += 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(qd):
            nursery.start_soon(worker, i)
    wall = time.perf_counter() - t0
    lat.sort()
    return {"qd": qd, "bs": bs, "iops": done / wall, "mean_lat_us": sum(lat) / len(lat) * 1e6,
            "p99_lat_us": lat[int(len(lat) * 0.99)] * 1e6, "ops": done}


def run_local(device, qds, bs, seconds):
    import trio
    from nvmefs.controller import open_controller
    from nvmefs.transport import ModelTransport

    if device.startswith("nvme-tcp:"):
        from nvmefs.transport import open_transport
        t = open_transport(device, tcp_options={"arena_size": 96 << 20})
    elif device.startswith("vfio:"):
        from nvmefs.transport import open_transport
        from nvmefs.vfio import find_nvme_functions
        bdf = device[5:] if device != "vfio:auto" else find_nvme_functions()[0]
        t = open_transport("vfio:" + bdf, arena_size=96 << 20)
    else:
        t = ModelTransport(None, namespaces=((1 << 30, 512),), arena_size=256 << 20)
    rows = []

    async def main():
        async with open_controller(t, io_queues=1, bounce_bytes=8 << 20) as c:
            ns = c.namespaces[1]
            await ns.write(0, bytes(1 << 20))
            for qd in qds:
                cpu0 = time.process_time()
                row = await loop(ns, qd, bs, seconds)
                row["cpu_us_per_io"] = (time.process_time() - cpu0) / max(row["ops"], 1) * 1e6
                rows.append(row)
    try:
        trio.run(main)
    finally:
        t.close()
    return {"transport": t.name, "rows": rows}


def run_in_guest(qds, bs, seconds):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import shlex
    import vfio_lab
    python = os.path.join(ROOT, ".venv", "bin", "python")
    args = ["--device", "vfio:auto", "--qd", ",".join(map(str, qds)), "--bs", str(bs),
            "--seconds", str(seconds), "--json", "$LAB_RW/guest.json"]
    script = (f"cd {shlex.quote(ROOT)} || exit 99\n"
              f"exec {shlex.quote(python)} bench/queue_bench.py {' '.join(args)}\n")
    res = vfio_lab.run_script(script, timeout=300)
    path = os.path.join(res.scratch, "guest.json")
    if res.status != 0 or not os.path.exists(path):
        raise SystemExit(f"guest bench failed (status {res.status}):\n{res.console[-3000:]}")
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="model",
                    help="model (default), vfio:BDF / vfio:auto, or nvme-tcp://HOST:PORT/SUBNQN")
    ap.add_argument("--qd", default="1,8,32", help="queue depths, comma separated")
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--vfio-lab", action="store_true", help="also run over VFIO in the QEMU guest")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    qds = [int(q) for q in args.qd.split(",")]
    results = [run_local(args.device, qds, args.bs, args.seconds)]
    if args.vfio_lab:
        results.append(run_in_guest(qds, args.bs, args.seconds))
    print(f"{'transport':<22} {'QD':>4} {'IOPS':>10} {'mean us':>10} {'p99 us':>10}")
    for r in results:
        for row in r["rows"]:
            print(f"{r['transport']:<22} {row['qd']:>4} {row['iops']:>10.0f} {row['mean_lat_us']:>10.1f} "
                  f"{row['p99_lat_us']:>10.1f}")
    if len(results) > 1:
        print("(the vfio rows run under TCG emulation: a check of the path, not a speed figure)")
    if args.json:
        with open(os.path.expandvars(args.json), "w") as f:
            json.dump(results if len(results) > 1 else results[0], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
