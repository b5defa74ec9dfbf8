#!/usr/bin/env python3
"""fio matrix against three FUSE-exported files, side by side, in one run:

  nvmefs   the nvmefs mount (built-in controller on a sparse image)
  memfs    bench/memfs.py: a bytearray behind pyfuse3 -- the ceiling of a
           pyfuse3 frontend with no driver underneath
  qsd      qemu-storage-daemon's FUSE export of a raw image on tmpfs

Rows: randread/randwrite 4 KiB at QD1 (psync) and QD32 (libaio), sequential
1 MiB read/write at QD8 (libaio), all O_DIRECT.  Prints IOPS, MiB/s and mean
latency per target and the ratios nvmefs/memfs and nvmefs/qsd; writes JSON
and a PNG bar chart.  Also samples the nvmefs daemon's RSS (psutil) during
the run; the nvmefs image is a 1 TiB sparse file.

    python bench/fio_bench.py [--runtime 5] [--repeat 3] [--rows QD1] [--size 1G] [--out bench/results]
"""
import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ROWS = [
    # name, rw, bs, engine, depth
    ("randread 4k QD1", "randread", "4k", "psync", 1),
    ("randwrite 4k QD1", "randwrite", "4k", "psync", 1),
    ("randread 4k QD32", "randread", "4k", "libaio", 32),
    ("randwrite 4k QD32", "randwrite", "4k", "libaio", 32),
    ("read 1M QD8", "read", "1M", "libaio", 8),
    ("write 1M QD8", "write", "1M", "libaio", 8),
]


def wait_file(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise SystemExit(f"{path} did not appear")


@contextlib.contextmanager
def daemon(argv, path, umount):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_file(path, proc)
        yield proc
    finally:
        subprocess.run(umount, capture_output=True)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_fio(path, row, runtime, size):
    name, rw, bs, engine, depth = row
    cmd = ["fio", "--name=b", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--ioengine={engine}",
           f"--iodepth={depth}", "--direct=1", f"--size={size}", f"--runtime={runtime}", "--time_based",
           "--output-format=json", "--randrepeat=0", "--norandommap"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 4 + 120)
    if out.returncode:
        raise SystemExit(f"fio failed on {path} ({name}): {out.stderr}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / (1 << 20),
            "lat_us": side["lat_ns"]["mean"] / 1000.0}


class RssSampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio row (default 5)")
    ap.add_argument("--size", default="1G", help="region fio uses in each file (default 1G)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for JSON and PNG")
    ap.add_argument("--targets", default="nvmefs,memfs,qsd")
    ap.add_argument("--repeat", type=int, default=2, help="runs per row and target; the best counts (default 2)")
    ap.add_argument("--rows", default="", help="only rows whose name contains this (e.g. QD1)")
    ap.add_argument("--mount-args", default="", help="extra arguments for `nvmefs mount`")
    ap.add_argument("--image-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where nvmefs's 1 TiB sparse image lives (default /dev/shm: the same tmpfs "
                         "as qemu-storage-daemon's raw image, so both back onto the same medium)")
    args = ap.parse_args(argv)
    rows = [r for r in ROWS if args.rows in r[0]]
    if not rows:
        raise SystemExit(f"no row matches {args.rows!r}")
    size_bytes = 1 << 30 if args.size.upper() == "1G" else int(args.size)
    targets = args.targets.split(",")
    for tool in ("fio", "fusermount3") + (("qemu-storage-daemon",) if "qsd" in targets else ()):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (make bench installs fio, fuse3 and qemu-system-common)")
    os.makedirs(args.out, exist_ok=True)
    results = {t: {} for t in targets}
    rss_peak = None
    paths, sampler = {}, None
    with tempfile.TemporaryDirectory(prefix="nvmefs-bench-") as tmp, contextlib.ExitStack() as stack:
        # All targets stay mounted for the whole run and each row runs them
        # back to back, best of --repeat: on a shared, noisy machine the
        # ratios then compare runs that were close in time.
        for target in targets:
            if target == "nvmefs":
                mnt = os.path.join(tmp, "nvmefs")
                os.mkdir(mnt)
                path = os.path.join(mnt, "nvme0n1")
                image_dir = tempfile.mkdtemp(prefix="nvmefs-bench-", dir=args.image_dir)
                stack.callback(shutil.rmtree, image_dir, ignore_errors=True)
                ctx = daemon([sys.executable, "-m", "nvmefs", "mount", mnt, "--image",
                              os.path.join(image_dir, "tib.img"), "--size", "1T", *args.mount_args.split()],
                             path, ["fusermount3", "-u", mnt])
            elif target == "memfs":
                mnt = os.path.join(tmp, "memfs")
                os.mkdir(mnt)
                path = os.path.join(mnt, "data")
                ctx = daemon([sys.executable, os.path.join(HERE, "memfs.py"), mnt, str(size_bytes)], path,
                             ["fusermount3", "-u", mnt])
            else:
                raw = tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="nvmefs-qsd-", delete=False).name
                stack.callback(os.unlink, raw)
                os.truncate(raw, size_bytes)
                path = os.path.join(tmp, "qsd.img")
                open(path, "w").close()
                ctx = daemon(["qemu-storage-daemon",
                              "--blockdev", f"driver=file,node-name=f0,filename={raw},cache.direct=off",
                              "--blockdev", "driver=raw,node-name=r0,file=f0",
                              "--export", f"type=fuse,id=e0,node-name=r0,mountpoint={path},writable=on"],
                             path, ["fusermount3", "-u", path])
            proc = stack.enter_context(ctx)
            if target == "qsd":
                # the export is ready when the file takes the image's size
                deadline = time.monotonic() + 30
                while os.path.getsize(path) != size_bytes and time.monotonic() < deadline:
                    time.sleep(0.05)
            if target == "nvmefs":
                sampler = RssSampler(proc.pid)
                sampler.start()
            paths[target] = path
        for row in rows:
            for _ in range(args.repeat):
                for target in targets:
                    r = run_fio(paths[target], row, args.runtime, args.size)
                    best = results[target].get(row[0])
                    if best is None or r["iops"] > best["iops"]:
                        results[target][row[0]] = r
                    print(f"{target:<7} {row[0]:<18} {r['iops']:>10.0f} IOPS {r['mib_s']:>9.1f} MiB/s "
                          f"{r['lat_us']:>9.1f} us", flush=True)
        if sampler:
            sampler.stop.set()
            sampler.join()
            rss_peak = sampler.peak

    print()
    hdr = f"{'row':<18}" + "".join(f"{t + ' IOPS':>14}{t + ' MiB/s':>13}{t + ' lat us':>13}" for t in targets)
    ratios = [f"nvmefs/{t}" for t in targets if t != "nvmefs"] if "nvmefs" in targets else []
    print(hdr + "".join(f"{r:>14}" for r in ratios))
    table = []
    for row in rows:
        name = row[0]
        line = f"{name:<18}"
        entry = {"row": name}
        for t in targets:
            r = results[t][name]
            line += f"{r['iops']:>14.0f}{r['mib_s']:>13.1f}{r['lat_us']:>13.1f}"
            entry[t] = r
        for rname in ratios:
            other = rname.split("/")[1]
            ratio = results["nvmefs"][name]["iops"] / max(results[other][name]["iops"], 1e-9)
            entry[rname] = ratio
            line += f"{ratio:>14.2f}"
        table.append(entry)
        print(line)
    if rss_peak is not None:
        print(f"\nnvmefs daemon peak RSS on a 1 TiB sparse image: {rss_peak / (1 << 20):.1f} MiB (target <= 150)")
    with open(os.path.join(args.out, "fio_bench.json"), "w") as f:
        json.dump({"runtime_s": args.runtime, "repeat": args.repeat, "rows": table, "nvmefs_peak_rss_bytes": rss_peak}, f, indent=2)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(11, 5))
        width = 0.8 / len(targets)
        for i, t in enumerate(targets):
            ax.bar([k + i * width for k in range(len(rows))], [results[t][r[0]]["iops"] for r in rows],
                   width, label=t)
        ax.set_xticks([k + width * (len(targets) - 1) / 2 for k in range(len(rows))], [r[0] for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("IOPS (log)")
        ax.set_title("fio, O_DIRECT, through FUSE")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "fio_bench.png"), dpi=100)
        print(f"chart: {os.path.join(args.out, 'fio_bench.png')}")
    except ImportError:
        print("matplotlib not installed: no chart (pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
