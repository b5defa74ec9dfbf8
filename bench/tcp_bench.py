#!/usr/bin/env python3
"""NVMe over TCP against the TCP lab's Linux nvmet-tcp target (a TCG guest,
tests/tcp_lab.py), in one run:

1. queue level (controller, queues, namespace API; no FUSE): 4 KiB random
   reads at QD1 and QD32 -- IOPS, mean and p99 latency, and the host CPU
   our side spends per read (µs of process CPU time per I/O: trio, the
   queue pair and the connection's thread together);
2. the fio matrix on the FUSE mount of the same namespace, and the
   daemon's CPU per I/O;
3. the same fio rows from the guest kernel's own nvme-tcp host connected to
   the same target (fio runs inside the guest on /dev/nvmeXnY);
4. inside the guest, over the guest's own loopback (the kernel host's
   path, without QEMU's user-mode network between): our queue-level loop
   beside fio on the kernel host's block device, 4 KiB random reads at QD1
   and QD32 -- the like-for-like transport comparison.

The target runs under TCG emulation (a 4 KiB read takes hundreds of µs),
so absolute figures mean nothing; what this reports is ratios within the
run and our CPU cost per I/O, which does not depend on the target's speed.

    python bench/tcp_bench.py [--seconds 5] [--json FILE] [--no-kernel]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

ROWS = [  # name, rw, bs, iodepth
    ("randread 4k QD1", "randread", "4k", 1),
    ("randread 4k QD32", "randread", "4k", 32),
    ("randwrite 4k QD1", "randwrite", "4k", 1),
    ("randwrite 4k QD32", "randwrite", "4k", 32),
    ("read 1M QD4", "read", "1M", 4),
    ("write 1M QD4", "write", "1M", 4),
]


def fio_args(rw, bs, qd, seconds, size="48M"):
    return ["--name=b", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--ioengine=libaio", "--direct=1",
            f"--size={size}", "--time_based", f"--runtime={seconds}", "--ramp_time=1", "--norandommap",
            "--randrepeat=0", "--group_reporting"]


def fio_summary(res):
    job = res["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / (1 << 20),
            "lat_us": side["clat_ns"]["mean"] / 1000, "ios": side["total_ios"]}


def queue_level(url, seconds):
    import trio
    from queue_bench import loop
    from nvmefs.controller import open_controller
    from nvmefs.tcp import TcpTransport

    rows = []

    async def main():
        t = TcpTransport(url)
        try:
            async with open_controller(t, io_queues=1, bounce_bytes=8 << 20) as c:
                ns = c.namespaces[1]
                await ns.write(0, bytes(1 << 20))
                for qd in (1, 32):
                    cpu0 = time.process_time()
                    row = await loop(ns, qd, 4096, seconds)
                    row["cpu_us_per_io"] = (time.process_time() - cpu0) / max(row["ops"], 1) * 1e6
                    rows.append(row)
        finally:
            t.close()
    trio.run(main)
    return rows


def mount_rows(url, seconds):
    import psutil
    mnt = tempfile.mkdtemp(prefix="nvmefs-tcp-bench-")
    proc = subprocess.Popen([sys.executable, "-m", "nvmefs", "mount", mnt, "--device", url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    out = {}
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mount failed: {proc.stdout.read() if proc.poll() is not None else 'timeout'}")
            time.sleep(0.1)
        dev = os.path.join(mnt, "nvme0n1")
        ps = psutil.Process(proc.pid)
        for name, rw, bs, qd in ROWS:
            cpu0 = sum(ps.cpu_times()[:2])
            r = subprocess.run(["fio", f"--filename={dev}", *fio_args(rw, bs, qd, seconds),
                                "--output-format=json"], capture_output=True, text=True, timeout=seconds + 120)
            res = json.loads(r.stdout[r.stdout.index("{"):])
            row = fio_summary(res)
            row["daemon_cpu_us_per_io"] = (sum(ps.cpu_times()[:2]) - cpu0) / max(row["ios"], 1) * 1e6
            out[name] = row
    finally:
        subprocess.run(["fusermount3", "-u", mnt])
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.rmdir(mnt)
    return out


def kernel_rows(target, seconds):
    out = {}
    for name, rw, bs, qd in ROWS:
        res = target.kernel_fio(fio_args(rw, bs, qd, seconds), timeout=seconds + 240)
        out[name] = fio_summary(res)
    return out


def in_guest(target, seconds):
    """Our queue-level loop and the kernel host's fio, both in the guest."""
    import json as _json
    url = f"nvme-tcp://127.0.0.1:4420/{target.subnqn}"
    status, out = target.guest_run([os.path.join(ROOT, ".venv", "bin", "python"), "bench/queue_bench.py",
                                    "--device", url, "--qd", "1,32", "--seconds", str(seconds),
                                    "--json", "/tmp/q.json"], cwd=ROOT, timeout=600)
    if status:
        raise SystemExit(f"queue_bench in the guest failed ({status}):\n{out[-3000:]}")
    ours = {r["qd"]: r for r in _json.loads(target.check("cat /host/tmp/q.json"))["rows"]}
    kernel = {}
    for qd in (1, 32):
        res = target.kernel_fio(fio_args("randread", "4k", qd, int(seconds)), timeout=seconds + 240)
        kernel[qd] = fio_summary(res)
    return ours, kernel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--no-kernel", action="store_true", help="skip the guest kernel's nvme-tcp host")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if not shutil.which("fio"):
        raise SystemExit("fio is needed (apt-get install fio)")
    import tcp_lab
    secs = int(args.seconds)
    with tcp_lab.Target(log=lambda m: None) as t:
        url = f"nvme-tcp://{t.host}:{t.port}/{t.subnqn}"
        t0 = time.monotonic()
        q = queue_level(url, args.seconds)
        m = mount_rows(url, secs)
        k = {} if args.no_kernel else kernel_rows(t, secs)
        g = ({}, {}) if args.no_kernel else in_guest(t, args.seconds)
        took = time.monotonic() - t0
    print("queue level, 4 KiB random reads (controller + namespace API, no FUSE)")
    print(f"  {'QD':>4} {'IOPS':>9} {'mean µs':>9} {'p99 µs':>9} {'host CPU µs/IO':>15}")
    for r in q:
        print(f"  {r['qd']:>4} {r['iops']:>9.0f} {r['mean_lat_us']:>9.0f} {r['p99_lat_us']:>9.0f} "
              f"{r['cpu_us_per_io']:>15.1f}")
    print("\nfio on the mount vs the guest kernel's nvme-tcp host (same target, same run)")
    print(f"  {'row':<20} {'nvmefs':>12} {'kernel':>12} {'ratio':>7} {'nvmefs lat µs':>14} "
          f"{'daemon CPU µs/IO':>17}")
    for name, *_ in ROWS:
        ours = m[name]
        theirs = k.get(name)
        unit = "MiB/s" if "1M" in name else "IOPS"
        a = ours["mib_s"] if unit == "MiB/s" else ours["iops"]
        b = (theirs["mib_s"] if unit == "MiB/s" else theirs["iops"]) if theirs else None
        print(f"  {name:<20} {a:>8.0f} {unit:<4}{(f'{b:>8.0f} {unit:<4}' if b else '         n/a')}"
              f"{(f'{a / b:>6.2f}x' if b else '      -')} {ours['lat_us']:>14.0f} "
              f"{ours['daemon_cpu_us_per_io']:>17.1f}")
    if g[0]:
        print("\ninside the guest, over its loopback: nvmefs queue level vs the kernel's nvme-tcp host (fio)")
        print(f"  {'row':<20} {'nvmefs':>10} {'kernel':>10} {'ratio':>7} {'nvmefs CPU µs/IO':>17}")
        for qd in (1, 32):
            a, b = g[0][qd], g[1][qd]
            print(f"  {'randread 4k QD' + str(qd):<20} {a['iops']:>10.0f} {b['iops']:>10.0f} "
                  f"{a['iops'] / b['iops']:>6.2f}x {a['cpu_us_per_io']:>17.1f}")
    print(f"\n(target under TCG emulation; {took:.0f} s; ratios and CPU per I/O are the figures)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"queue": q, "mount": m, "kernel": k, "guest": {"nvmefs": g[0], "kernel": g[1]}}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
