#!/usr/bin/env python3
"""fio matrix: the nvmefs mount against baselines, side by side, in one run.

Targets (all mounted for the whole run; each row runs them back to back):

  nvmefs      the mount, one lane per CPU (built-in controller, 1 TiB sparse
              image on /dev/shm), taking requests from /dev/fuse
  nvmefs-uring  the same with FUSE over io_uring (the run switches the
              kernel's enable_uring on, and back)
  nvmefs-l1   the same as nvmefs with --lanes 1
  nvmefs-pc   the same with --page-cache (FUSE's writeback cache): the
              buffered row only
  cmemfs-st   bench/cmemfs.c: a C server on plain libfuse 3, low-level API,
              direct_io, memcpy only; single-threaded loop
  cmemfs-mt   the same on libfuse's multithreaded loop with clone_fd
  cmemfs-uring  the same C server built against a libfuse with FUSE over
              io_uring (3.18 or newer: --libfuse-uring PREFIX, where it was
              installed) and run with it on: what the kernel's io_uring
              transport gives a memcpy-only C server on this machine
  qsd         qemu-storage-daemon's FUSE export of a raw image on /dev/shm
  tmpfs       a plain file on /dev/shm, no FUSE (the medium's own speed)

Rows: randread/randwrite 4 KiB at QD1 (psync) and QD32 (libaio), random
4 KiB writes at offset 512 + k*4 KiB (every one unaligned to the LBA), and
sequential 1 MiB read/write at QD8 (libaio), all O_DIRECT; random 4 KiB
buffered writes with an fsync at the end; and, with one fio job pinned to each
CPU, random 4 KiB reads/writes at QD16 and 1 MiB reads at QD4 per job (the
load the kernel's per-CPU io_uring queues are for; reference rows, no floor).

Prints IOPS per target, then the targets of issue 13 as ratios with PASS or
MISS: nvmefs >= 1.0x the best of cmemfs-st/-mt on each row, >= 2x qsd on each
row, unaligned >= 0.8x aligned 4 KiB writes at QD32, and nvmefs (2 lanes here)
>= 1.3x nvmefs-l1 at QD32; and those of issue 14: nvmefs-uring >= 1.5x the
best cmemfs on the 4 KiB rows, >= 1.0x on the 1 MiB rows, >= 1.2x nvmefs at
QD1; with cmemfs-uring, also its own ratio to the best /dev/fuse cmemfs (the
transport's gain for a C server) and nvmefs-uring's to it, for reference.  Writes JSON and a PNG.  Also samples the nvmefs
daemon's memory: anonymous RSS (the daemon's own heap, buffers and queues);
the image's written pages are mapped shared and are the image file's page
cache, not the daemon's.

    python bench/fio_bench.py [--runtime 3] [--repeat 2] [--rows QD32] [--targets nvmefs,cmemfs-st]
"""
import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CMEMFS = os.path.join(HERE, "cmemfs")

ROWS = [
    # name, rw, bs, engine, depth, offset, jobs (0: one per CPU, each pinned there)
    ("randread 4k QD1", "randread", "4k", "psync", 1, 0, 1),
    ("randwrite 4k QD1", "randwrite", "4k", "psync", 1, 0, 1),
    ("randread 4k QD32", "randread", "4k", "libaio", 32, 0, 1),
    ("randwrite 4k QD32", "randwrite", "4k", "libaio", 32, 0, 1),
    ("randwrite 4k QD32 off512", "randwrite", "4k", "libaio", 32, 512, 1),
    ("read 1M QD8", "read", "1M", "libaio", 8, 0, 1),
    ("write 1M QD8", "write", "1M", "libaio", 8, 0, 1),
    # through the page cache, fsync at the end: what --page-cache is for
    ("buffered randwrite 4k", "randwrite", "4k", "psync", 1, 0, 1),
    # one job per CPU: the load the kernel's per-CPU FUSE queues are for (a
    # single job puts its requests on whichever CPU it runs on at the time)
    ("randread 4k QD16 per CPU", "randread", "4k", "libaio", 16, 0, 0),
    ("randwrite 4k QD16 per CPU", "randwrite", "4k", "libaio", 16, 0, 0),
    ("read 1M QD4 per CPU", "read", "1M", "libaio", 4, 0, 0),
]
ALL_TARGETS = ("nvmefs", "nvmefs-uring", "nvmefs-l1", "nvmefs-pc", "cmemfs-st", "cmemfs-mt", "cmemfs-uring",
               "qsd", "tmpfs")
URING_TARGETS = ("nvmefs-uring", "cmemfs-uring")
CMEMFS_URING = os.path.join(HERE, "cmemfs-uring")
URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


def runs_row(target, row):
    """nvmefs-pc (the mount with --page-cache) differs only for buffered I/O."""
    return target != "nvmefs-pc" or row[0].startswith("buffered")


def wait_ready(path, proc, size, timeout=30):
    """The export is ready when its file exists with the expected size (qsd
    mounts over an existing empty file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited early: {proc.communicate()}")
        try:
            if os.path.getsize(path) >= size:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{path} did not appear")


@contextlib.contextmanager
def daemon(argv, path, size, umount, env=None):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    try:
        wait_ready(path, proc, size)
        yield proc
    finally:
        unmounted = subprocess.run(umount, capture_output=True).returncode == 0
        # the FUSE servers exit when unmounted; qemu-storage-daemon keeps
        # running without its export and needs SIGTERM, and so does a
        # server whose mount is still busy (a fio job that outlived a ^C)
        for stop in (None, proc.terminate, proc.kill):
            if stop is None and not unmounted:
                continue
            if stop:
                stop()
            try:
                proc.wait(timeout=2 if stop is None and argv[0].endswith("qemu-storage-daemon") else 30)
                break
            except subprocess.TimeoutExpired:
                pass


def write_param(path, value):
    with open(path, "w") as f:
        f.write(value)


def run_fio(path, row, runtime, size):
    name, rw, bs, engine, depth, offset, jobs = row
    cmd = ["fio", "--name=b", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--ioengine={engine}",
           f"--iodepth={depth}", f"--size={size}", f"--runtime={runtime}", "--time_based",
           "--output-format=json", "--randrepeat=0", "--norandommap"]
    if jobs == 0:
        cpus = sorted(os.sched_getaffinity(0))
        # group_reporting: jobs[0] is then the sum over the jobs
        cmd += [f"--numjobs={len(cpus)}", "--group_reporting", "--cpus_allowed_policy=split",
                "--cpus_allowed=" + ",".join(map(str, cpus))]
    cmd += ["--direct=0", "--end_fsync=1"] if name.startswith("buffered") else ["--direct=1"]
    if offset:
        # the region must stay inside the file: fio would otherwise try
        # to lay the file out again (unlink and create on a FUSE export)
        cmd[cmd.index(f"--size={size}")] = f"--size={size - (1 << 20)}"
        cmd.append(f"--offset={offset}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 4 + 120)
    if out.returncode:
        raise SystemExit(f"fio failed on {path} ({name}): {out.stderr}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / (1 << 20),
            "lat_us": side["lat_ns"]["mean"] / 1000.0}


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("B").rstrip("I")
    try:
        return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise SystemExit(f"--size: cannot read {text!r} (bytes, or with K/M/G)") from None


def rss_anon(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, rss_anon(self.pid))
            except OSError:
                return
            time.sleep(0.1)


def build_cmemfs(out=CMEMFS, prefix=None):
    """bench/cmemfs.c against the system's libfuse, or (``prefix``) against
    the one installed there, found at run time through an rpath."""
    src = CMEMFS + ".c"
    if prefix is None and os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
        return
    env = dict(os.environ)
    extra = []
    if prefix is not None:
        pc = [d for d in (os.path.join(prefix, sub, "pkgconfig") for sub in ("lib", "lib64", "lib/x86_64-linux-gnu"))
              if os.path.exists(os.path.join(d, "fuse3.pc"))]
        if not pc:
            raise SystemExit(f"--libfuse-uring {prefix}: no lib/pkgconfig/fuse3.pc there")
        env["PKG_CONFIG_PATH"] = pc[0]
        extra = [f"-Wl,-rpath,{os.path.dirname(pc[0])}"]
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True,
                           check=True, env=env).stdout.split()
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-o", out, src, *flags, *extra], check=True)


def ring_threads(pid):
    """libfuse names its io_uring queue threads fuse-ring-N."""
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return [n for n in names if n.startswith("fuse-ring")]


def start_target(stack, target, tmp, size_bytes, image_dir, mount_args):
    """Mount one target; returns (path fio uses, daemon process or None)."""
    if target.startswith("nvmefs"):
        mnt = os.path.join(tmp, target)
        os.mkdir(mnt)
        lanes = {"nvmefs-l1": ["--lanes", "1"], "nvmefs-pc": ["--page-cache"],
                 "nvmefs-uring": ["--fuse-transport", "uring"]}.get(target, ["--fuse-transport", "dev"])
        image = os.path.join(image_dir, f"{target}.img")
        path = os.path.join(mnt, "nvme0n1")
        proc = stack.enter_context(daemon(
            [sys.executable, "-m", "nvmefs", "mount", mnt, "--image", image, "--size", "1T", *lanes,
             *mount_args], path, size_bytes, ["fusermount3", "-u", mnt]))
        return path, proc
    if target.startswith("cmemfs"):
        mnt = os.path.join(tmp, target)
        os.mkdir(mnt)
        path = os.path.join(mnt, "data")
        mt = ["--mt"] if target == "cmemfs-mt" else []
        binary = CMEMFS_URING if target == "cmemfs-uring" else CMEMFS
        env = {"FUSE_URING_ENABLE": "1" if target == "cmemfs-uring" else "0"}
        proc = stack.enter_context(daemon([binary, mnt, str(size_bytes), *mt], path, size_bytes,
                                          ["fusermount3", "-u", mnt], env=env))
        if target == "cmemfs-uring":
            # a request, then the rings must be there: else this column
            # would quietly be /dev/fuse
            with open(path, "rb") as f:
                f.read(4096)
            if not ring_threads(proc.pid):
                raise SystemExit("cmemfs-uring: libfuse did not start FUSE over io_uring")
        return path, proc
    if target == "qsd":
        raw = os.path.join(image_dir, "qsd.raw")
        with open(raw, "wb") as f:
            f.truncate(size_bytes)
        path = os.path.join(tmp, "qsd.img")
        open(path, "w").close()
        proc = stack.enter_context(daemon(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=f0,filename={raw},cache.direct=off",
             "--blockdev", "driver=raw,node-name=r0,file=f0",
             "--export", f"type=fuse,id=e0,node-name=r0,mountpoint={path},writable=on"],
            path, size_bytes, ["fusermount3", "-u", path]))
        return path, proc
    if target == "tmpfs":
        path = os.path.join(image_dir, "plain.raw")
        with open(path, "wb") as f:
            f.truncate(size_bytes)
        return path, None
    raise SystemExit(f"unknown target {target!r} (one of {', '.join(ALL_TARGETS)})")


def verdicts(results, rows, targets):
    """The issue's targets, as (text, ratio, floor) for whatever was measured."""
    out = []
    nv = results.get("nvmefs", {})

    def iops(t, r):
        return results[t][r]["iops"]

    cm = [t for t in ("cmemfs-st", "cmemfs-mt") if t in targets]
    data_rows = [r[0] for r in rows if not r[0].startswith("buffered")]
    # the issues' floors are set on the single-job rows; the per-CPU rows
    # are printed for reference
    single = [r[0] for r in rows if not r[0].startswith("buffered") and r[6] == 1]
    for name in single:
        if "nvmefs" not in targets:
            break
        if cm:
            best = max(iops(t, name) for t in cm)
            out.append((f"nvmefs / cmemfs best   {name}", nv[name]["iops"] / best, 1.0))
        if "qsd" in targets:
            out.append((f"nvmefs / qsd           {name}", nv[name]["iops"] / iops("qsd", name), 2.0))
    names = [r[0] for r in rows]
    if "nvmefs" in targets and "randwrite 4k QD32" in names and "randwrite 4k QD32 off512" in names:
        out.append(("nvmefs off512 / aligned randwrite 4k QD32",
                    nv["randwrite 4k QD32 off512"]["iops"] / nv["randwrite 4k QD32"]["iops"], 0.8))
    if "nvmefs-pc" in targets and "nvmefs" in targets and "buffered randwrite 4k" in names:
        out.append(("--page-cache / direct mount, buffered randwrite 4k",
                    results["nvmefs-pc"]["buffered randwrite 4k"]["iops"] / nv["buffered randwrite 4k"]["iops"], 1.0))
    if "nvmefs" in targets and "nvmefs-l1" in targets:
        for name in names:
            if "QD32" in name:
                out.append((f"nvmefs / nvmefs-l1     {name}", nv[name]["iops"] / iops("nvmefs-l1", name), 1.3))
    if "nvmefs-uring" in targets:
        for name in data_rows:
            ur, ref = iops("nvmefs-uring", name), name not in single
            if cm:
                best = max(iops(t, name) for t in cm)
                out.append((f"uring / cmemfs best    {name}", ur / best,
                            None if ref else 1.0 if "1M" in name else 1.5))
            if "nvmefs" in targets and ("QD1" in name.split() or ref):
                out.append((f"uring / nvmefs         {name}", ur / nv[name]["iops"], None if ref else 1.2))
    if "cmemfs-uring" in targets:
        # for reference (no floor): the kernel transport's own gain for a C
        # memcpy server here, and where the lanes stand against libfuse's rings
        for name in data_rows:
            cu = iops("cmemfs-uring", name)
            if cm:
                out.append((f"cmemfs uring / dev     {name}", cu / max(iops(t, name) for t in cm), None))
            if "nvmefs-uring" in targets:
                out.append((f"uring / cmemfs-uring   {name}", iops("nvmefs-uring", name) / cu, None))
    return out


def terminated(signum, frame):
    # SIGTERM (kill, a CI timeout) unwinds like ^C: every target unmounted,
    # the images on /dev/shm removed (left there they hold RAM and shrink
    # the dirty-page limits of the next run), enable_uring put back
    raise SystemExit(128 + signum)


def main(argv=None):
    signal.signal(signal.SIGTERM, terminated)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=3, help="seconds per fio run (default 3)")
    ap.add_argument("--size", default="1G", help="region fio uses in each file (default 1G)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for JSON and PNG")
    ap.add_argument("--targets", default=None, help="comma-separated subset of " + ", ".join(ALL_TARGETS)
                    + " (default: all; cmemfs-uring only with --libfuse-uring)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per row and target; the best counts (default 2)")
    ap.add_argument("--rows", default="", help="only rows whose name contains this (e.g. QD32)")
    ap.add_argument("--mount-args", default="", help="extra arguments for `nvmefs mount`")
    ap.add_argument("--libfuse-uring", metavar="PREFIX", default=None,
                    help="where a libfuse >= 3.18 with io_uring is installed (lib/pkgconfig/fuse3.pc): "
                         "the cmemfs-uring target is built against it")
    ap.add_argument("--image-dir", default="/dev/shm",
                    help="where the images live (default /dev/shm: every target backs onto the same tmpfs)")
    args = ap.parse_args(argv)
    rows = [r for r in ROWS if args.rows in r[0]]
    if not rows:
        raise SystemExit(f"no row matches {args.rows!r}")
    size_bytes = parse_size(args.size)
    targets = args.targets.split(",") if args.targets else \
        [t for t in ALL_TARGETS if t != "cmemfs-uring" or args.libfuse_uring]
    for t in targets:
        if t not in ALL_TARGETS:
            raise SystemExit(f"unknown target {t!r} (one of {', '.join(ALL_TARGETS)})")
    for tool in ("fio", "fusermount3") + (("qemu-storage-daemon",) if "qsd" in targets else ()):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (make bench installs fio, fuse3 and qemu-system-common)")
    if "cmemfs-uring" in targets and args.libfuse_uring is None:
        raise SystemExit("the cmemfs-uring target needs --libfuse-uring PREFIX (a libfuse >= 3.18 installed there)")
    if any(t.startswith("cmemfs") for t in targets):
        build_cmemfs()
    if "cmemfs-uring" in targets:
        build_cmemfs(CMEMFS_URING, args.libfuse_uring)
    uring_was = None
    for t in URING_TARGETS:
        if t in targets and not os.path.exists(URING_PARAM):
            print(f"{t} left out: this kernel has no FUSE over io_uring", flush=True)
            targets.remove(t)
    if any(t in targets for t in URING_TARGETS):
        with open(URING_PARAM) as f:
            uring_was = f.read().strip()
        with open(URING_PARAM, "w") as f:
            f.write("Y")
    os.makedirs(args.out, exist_ok=True)
    results = {t: {} for t in targets}
    rss_peak = None
    paths, sampler = {}, None
    with tempfile.TemporaryDirectory(prefix="nvmefs-bench-") as tmp, contextlib.ExitStack() as stack:
        if uring_was is not None:
            stack.callback(write_param, URING_PARAM, uring_was)
        image_dir = tempfile.mkdtemp(prefix="nvmefs-bench-", dir=args.image_dir)
        stack.callback(shutil.rmtree, image_dir, ignore_errors=True)
        for target in targets:
            paths[target], proc = start_target(stack, target, tmp, size_bytes, image_dir,
                                               args.mount_args.split())
            if target == "nvmefs":
                sampler = RssSampler(proc.pid)
                sampler.start()
        # best of --repeat, targets back to back within a row: on a shared,
        # noisy machine the ratios then compare runs close in time
        for row in rows:
            for _ in range(args.repeat):
                for target in targets:
                    if not runs_row(target, row):
                        continue
                    r = run_fio(paths[target], row, args.runtime, size_bytes)
                    best = results[target].get(row[0])
                    if best is None or r["iops"] > best["iops"]:
                        results[target][row[0]] = r
                    print(f"{target:<10} {row[0]:<27} {r['iops']:>10.0f} IOPS {r['mib_s']:>9.1f} MiB/s "
                          f"{r['lat_us']:>9.1f} us", flush=True)
        if sampler:
            sampler.stop.set()
            sampler.join()
            rss_peak = sampler.peak

    print(f"\nIOPS, best of {args.repeat} x {args.runtime} s (MiB/s for the 1M rows)")
    w = max([11] + [len(t) + 2 for t in targets])
    print(f"{'row':<27}" + "".join(f"{t:>{w}}" for t in targets))
    for row in rows:
        big = row[2] == "1M"
        print(f"{row[0]:<27}" + "".join(
            f"{results[t][row[0]]['mib_s' if big else 'iops']:>{w}.0f}" if row[0] in results[t] else f"{'-':>{w}}"
            for t in targets))
    checks = verdicts(results, rows, targets)
    if checks:
        print("\ntargets")
        for text, ratio, floor in checks:
            verdict = "(reference)" if floor is None else \
                f"(>= {floor:.1f})  {'PASS' if ratio >= floor else 'MISS'}"
            print(f"  {text:<50} {ratio:6.2f}x  {verdict}")
    if rss_peak is not None:
        print(f"\nnvmefs daemon peak anonymous RSS on a 1 TiB sparse image: {rss_peak / (1 << 20):.1f} MiB")
    with open(os.path.join(args.out, "fio_bench.json"), "w") as f:
        json.dump({"runtime_s": args.runtime, "repeat": args.repeat, "cpus": len(os.sched_getaffinity(0)),
                   "results": results,
                   "checks": [{"check": t, "ratio": r, "floor": fl} for t, r, fl in checks],
                   "nvmefs_peak_rss_anon_bytes": rss_peak}, f, indent=2)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(13, 5))
        width = 0.8 / len(targets)
        for i, t in enumerate(targets):
            ax.bar([k + i * width for k in range(len(rows))],
                   [results[t][r[0]]["iops"] if r[0] in results[t] else 0 for r in rows], width, label=t)
        ax.set_xticks([k + width * (len(targets) - 1) / 2 for k in range(len(rows))], [r[0] for r in rows],
                      rotation=15)
        ax.set_yscale("log")
        ax.set_ylabel("IOPS (log)")
        ax.set_title("fio, O_DIRECT")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "fio_bench.png"), dpi=100)
        print(f"chart: {os.path.join(args.out, 'fio_bench.png')}")
    except ImportError:
        print("matplotlib not installed: no chart (pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
