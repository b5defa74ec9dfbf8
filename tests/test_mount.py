"""Real mounts: dd, fio, losetup + mkfs.ext4 + e2fsck, durability, faults,
signals and bad input.  Root and /dev/fuse are prerequisites (a failure
under CI, a skip elsewhere)."""
import errno as errno_mod
import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import require, require_root_fuse
from mounthelp import (ext4_check, ext4_fill, mounted, nvmefs_cmd, output, read_only_copy, run_cli, sh,
                       start_daemon, stats, stop, wait_for_mount, ROOT)

MiB = 1 << 20


@pytest.fixture(autouse=True)
def prerequisites():
    require_root_fuse()


@pytest.fixture
def paths(tmp_path):
    return str(tmp_path / "mnt"), str(tmp_path / "disk.img")


@pytest.mark.usefixtures("fuse_transport")
def test_files_sizes_and_dd_roundtrip(paths, tmp_path):
    mnt, img = paths
    with mounted(mnt, img, "--size", "64M", "--namespaces", "2"):
        assert sorted(os.listdir(mnt)) == ["nvme0n1", "nvme0n2"]
        dev = os.path.join(mnt, "nvme0n1")
        st = os.stat(dev)
        assert st.st_size == 32 * MiB and st.st_blksize == 512
        src = tmp_path / "src"
        src.write_bytes(os.urandom(8 * MiB + 1234))
        for bs, flags in (("4k", []), ("64k", ["oflag=direct"]), ("1M", ["oflag=direct"]), ("1000", [])):
            sh("dd", f"if={src}", f"of={dev}", f"bs={bs}", "conv=notrunc", *flags, "status=none")
            out = tmp_path / "out"
            iflag = ["iflag=direct"] if flags and bs != "1000" else []
            sh("dd", f"if={dev}", f"of={out}", f"bs={bs}", f"count={8 * MiB + 1234}",
               "iflag=count_bytes" + (",direct" if iflag else ""), "status=none")
            assert out.read_bytes()[:8 * MiB + 1234] == src.read_bytes(), f"dd bs={bs} {flags}"
        with open(dev, "r+b", buffering=0) as f:   # unaligned write in the middle of an LBA
            f.seek(1000)
            f.write(b"hello")
            f.seek(997)
            assert f.read(11) == src.read_bytes()[997:1000] + b"hello" + src.read_bytes()[1005:1008]
            f.seek(32 * MiB - 2)
            assert f.write(b"xyz") == 2, "a write over the end is cut at the end"
            with pytest.raises(OSError):
                f.truncate(16 * MiB)


def lane_totals(st, key):
    return sum(ln[key] for ln in st["lanes"]["lanes"])


def fio(*args, timeout=600):
    out = sh("fio", *args, "--output-format=json", timeout=timeout)
    res = json.loads(out[out.index("{"):])
    for job in res["jobs"]:
        assert job["error"] == 0, job["jobname"]
    return res


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_the_lanes_serve_every_data_request(paths, tmp_path, lanes):
    """Aligned, unaligned and large reads and writes, and an odd window,
    with one lane, two, and more lanes than CPUs: the bytes come back, and
    the lanes' counters account for every request exactly (with direct
    I/O each read() and write() below is one FUSE request)."""
    mnt, img = paths
    with mounted(mnt, img, "--size", "64M", "--lba-size", "4096", "--lanes", str(lanes)):
        dev = os.path.join(mnt, "nvme0n1")
        src = tmp_path / "src"
        src.write_bytes(os.urandom(4 * MiB))
        sh("dd", f"if={src}", f"of={dev}", "bs=4k", "oflag=direct", "conv=notrunc", "status=none")
        with open(dev, "r+b", buffering=0) as f:       # unaligned: read-modify-write in the lane
            f.seek(4096 * 7 + 5)
            f.write(b"lane")
        want = bytearray(src.read_bytes())
        want[4096 * 7 + 5:4096 * 7 + 9] = b"lane"
        out = tmp_path / "out"
        sh("dd", f"if={dev}", f"of={out}", "bs=4k", "count=1024", "iflag=direct", "status=none")
        assert out.read_bytes() == want
        big = tmp_path / "big"
        big.write_bytes(os.urandom(2 * MiB))
        sh("dd", f"if={big}", f"of={dev}", "bs=256k", "seek=8", "oflag=direct", "conv=notrunc", "status=none")
        out2 = tmp_path / "out2"
        sh("dd", f"if={dev}", f"of={out2}", "bs=256k", "skip=8", "count=8", "iflag=direct", "status=none")
        assert out2.read_bytes() == big.read_bytes()
        with open(dev, "rb", buffering=0) as f:         # an odd window inside LBAs: one command
            f.seek(4096 * 3 + 100)
            assert f.read(5000) == want[4096 * 3 + 100:4096 * 3 + 5100]
        st = stats(mnt)
        la = st["lanes"]
        assert len(la["lanes"]) == lanes and la["errors"] == 0, la
        assert lane_totals(st, "writes") == 1024 + 1 + 8, la
        assert lane_totals(st, "rmw") == 1, la
        assert lane_totals(st, "reads") == 1024 + 8 + 1, la
        assert lane_totals(st, "bytes_written") == 4 * MiB + 4 + 2 * MiB, la
        assert lane_totals(st, "in_flight") == 0, la
        # lookups, opens, getattrs and releases went to pyfuse3
        assert lane_totals(st, "to_pyfuse3") > 0, la
        lane_qs = [q for q in st["queues"] if q["owner"] == "lanes"]
        assert len(lane_qs) == lanes, st["queues"]
        assert sum(q["completed"] for q in lane_qs) == lane_totals(st, "commands"), st["queues"]
        assert st["fuse"]["replies_unrouted"] == 0, st["fuse"]
        r = run_cli("stats", mnt)
        assert r.returncode == 0 and r.stdout.count("\n") >= 4 + lanes, r.stdout


@pytest.mark.usefixtures("fuse_transport")
def test_a_request_is_served_by_the_lane_of_its_cpu(paths, tmp_path):
    """A process pinned to CPU k: its requests are lane k's (the lane that
    read one of them hands it over), and no other lane serves them."""
    cpus = sorted(os.sched_getaffinity(0))
    require(len(cpus) >= 2, "two CPUs")
    mnt, img = paths
    with mounted(mnt, img, "--size", "16M"):
        dev = os.path.join(mnt, "nvme0n1")
        sh("dd", "if=/dev/urandom", f"of={dev}", "bs=64k", "count=16", "oflag=direct", "conv=notrunc", "status=none")
        for k, cpu in enumerate(cpus):
            before = stats(mnt)["lanes"]["lanes"]
            r = subprocess.run(["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=200", "iflag=direct",
                                "status=none"], preexec_fn=lambda c=cpu: os.sched_setaffinity(0, {c}),
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            w = subprocess.run(["dd", "if=/dev/zero", f"of={dev}", "bs=4k", "count=50", "seek=100",
                                "oflag=direct", "conv=notrunc", "status=none"],
                               preexec_fn=lambda c=cpu: os.sched_setaffinity(0, {c}),
                               capture_output=True, text=True, timeout=60)
            assert w.returncode == 0, w.stderr
            after = stats(mnt)["lanes"]["lanes"]
            assert [a["cpu"] for a in after] == cpus
            reads = [a["reads"] - b["reads"] for a, b in zip(after, before)]
            writes = [a["writes"] - b["writes"] for a, b in zip(after, before)]
            assert reads == [200 if i == k else 0 for i in range(len(cpus))], reads
            assert writes == [50 if i == k else 0 for i in range(len(cpus))], writes


def test_dev_fuse_lanes_that_serve_nothing_stop_polling(paths):
    """/dev/fuse wakes every lane polling it for each request.  A QD1
    reader pinned to the first CPU: its lane serves every request and sends
    the others, which serve none, away from /dev/fuse once (they look now
    and then, not once per request, and are not woken again at each of its
    checks).  The data reads back."""
    cpus = sorted(os.sched_getaffinity(0))
    require(len(cpus) >= 2, "two CPUs")
    mnt, img = paths
    n = 6000
    with mounted(mnt, img, "--size", "32M", "--fuse-transport", "dev"):
        dev = os.path.join(mnt, "nvme0n1")
        data = os.urandom(4 * MiB)
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        before = stats(mnt)["lanes"]["lanes"]
        # 4 KiB reads at QD1, O_DIRECT, from the start (the 4 MiB written, then zeroes)
        start = time.monotonic()
        r = subprocess.run(["dd", f"if={dev}", "of=/dev/null", "bs=4k", f"count={n}", "iflag=direct",
                            "status=none"], preexec_fn=lambda: os.sched_setaffinity(0, {cpus[0]}),
                           capture_output=True, text=True, timeout=120)
        took = time.monotonic() - start
        assert r.returncode == 0, r.stderr
        after = stats(mnt)["lanes"]["lanes"]
        reads = [a["reads"] - b["reads"] for a, b in zip(after, before)]
        assert reads == [n] + [0] * (len(cpus) - 1), reads
        for a, b in zip(after[1:], before[1:]):
            assert a["fuse_away"] >= 1, a
            # woken for each request until a check finds it idle (at most
            # two checks, 64), then at each look (< 8 a second); sent away
            # again at every check it would be n / 32 more
            woken = a["sleeps"] - b["sleeps"]
            assert woken < 80 + 10 * took, (woken, took, a)
        got = subprocess.run(["dd", f"if={dev}", "bs=1M", "count=4", "iflag=direct", "status=none"],
                             capture_output=True, timeout=60).stdout
        assert got == data


@pytest.mark.usefixtures("fuse_transport")
def test_fio_verify_aligned_unaligned_and_overlapping(paths):
    """fio verify at QD16 on a 4 KiB-LBA namespace: 512-byte aligned
    writes of 512 B..64 KiB, byte-aligned 1000-byte writes (each shares its
    LBAs with its neighbours, which may be in flight at the same time), and
    two jobs whose regions meet inside an LBA.  0 mismatches."""
    require(shutil.which("fio"), "fio")
    mnt, img = paths
    with mounted(mnt, img, "--size", "128M", "--lba-size", "4096"):
        dev = os.path.join(mnt, "nvme0n1")
        common = [f"--filename={dev}", "--ioengine=libaio", "--iodepth=16", "--direct=1", "--rw=randwrite",
                  "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0"]
        fio("--name=aligned512", *common, "--bsrange=512-64k", "--ba=512", "--size=16M", "--numjobs=2",
            "--offset_increment=20M")
        fio("--name=bytes", *common, "--bs=1000", "--size=4M", "--offset=48M+300", "--numjobs=2",
            "--offset_increment=4194804")
        st = stats(mnt)
        assert st["lanes"]["errors"] == 0 and lane_totals(st, "rmw") > 0, st["lanes"]
        # how many were in flight together is the scheduler's business (a
        # loaded machine can serialise them); test_lanes holds 32 at the
        # controller at once with an injected delay, deterministically
        assert lane_totals(st, "in_flight") == 0


@pytest.mark.usefixtures("fuse_transport")
def test_a_reset_during_fio_verify_loses_and_duplicates_nothing(paths):
    """Controller resets while fio verify keeps every lane busy (the model
    holds each command 20 ms, so some are at the controller at every
    reset): fio sees no error and no mismatch."""
    require(shutil.which("fio"), "fio")
    mnt, img = paths
    env = {**os.environ, "NVMEFS_FAULT_INJECTION": "1"}
    with mounted(mnt, img, "--size", "128M", env=env):
        dev = os.path.join(mnt, "nvme0n1")
        for opcode in (1, 2):
            os.setxattr(mnt, "user.nvmefs.inject", json.dumps(
                {"opcode": opcode, "action": "delay", "delay_ms": 20, "count": 0}).encode())
        job = subprocess.Popen(["fio", "--name=r", f"--filename={dev}", "--ioengine=libaio", "--iodepth=16",
                                "--direct=1", "--rw=randwrite", "--bsrange=512-128k", "--size=32M",
                                "--numjobs=2", "--offset_increment=40M", "--verify=crc32c", "--verify_fatal=1",
                                "--do_verify=1", "--verify_state_save=0", "--output-format=json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(3):
                deadline = time.monotonic() + 60
                while lane_totals(stats(mnt), "in_flight") < 4:
                    assert job.poll() is None and time.monotonic() < deadline, job.communicate()
                    time.sleep(0.01)
                gen = stats(mnt)["generation"]
                os.setxattr(mnt, "user.nvmefs.inject", b'{"reset": true}')
                # the reset runs in the background, and one asked for while
                # another runs is merged into it (as the watchdog's are): the
                # next only once this one has brought the controller back
                deadline = time.monotonic() + 60
                while stats(mnt)["generation"] == gen:
                    assert time.monotonic() < deadline, "the reset did not finish"
                    time.sleep(0.01)
            out, err = job.communicate(timeout=600)
        finally:
            if job.poll() is None:
                job.kill()
        assert job.returncode == 0, err
        res = json.loads(out[out.index("{"):])
        assert all(j["error"] == 0 for j in res["jobs"])
        st = stats(mnt)
        assert st["resets"] == 3 and st["lanes"]["errors"] == 0, st["lanes"]
        assert lane_totals(st, "lost_to_reset") >= 3, st["lanes"]


@pytest.mark.usefixtures("fuse_transport")
def test_page_cache_mode_is_coherent(paths, tmp_path):
    """--page-cache: buffered fio verify, unaligned writes seen by the next
    read through the cache, and a punched hole read back as zeroes."""
    require(shutil.which("fio"), "fio")
    mnt, img = paths
    with mounted(mnt, img, "--size", "64M", "--page-cache"):
        dev = os.path.join(mnt, "nvme0n1")
        out = sh("fio", "--name=verify", f"--filename={dev}", "--ioengine=psync", "--direct=0",
                 "--rw=randwrite", "--bsrange=512-64k", "--size=16M", "--numjobs=2", "--offset_increment=32M",
                 "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
                 "--output-format=json", timeout=600)
        assert all(j["error"] == 0 for j in json.loads(out[out.index("{"):])["jobs"])
        with open(dev, "r+b") as f:
            f.seek(4096)
            before = f.read(8192)              # now in the page cache
            f.seek(4096 + 100)
            f.write(b"cached")
            f.flush()
            f.seek(4096)
            assert f.read(8192) == before[:100] + b"cached" + before[106:]
            assert _fallocate(f.fileno(), PUNCH | KEEP, 4096, 8192) == 0
            f.seek(4096)
            assert f.read(8192) == bytes(8192)
    with mounted(mnt, img):                    # and it reached the device
        with open(os.path.join(mnt, "nvme0n1"), "rb") as f:
            f.seek(4096)
            assert f.read(8192) == bytes(8192)


def _bdi_max_ratio(mnt):
    d = os.stat(mnt).st_dev
    with open(f"/sys/class/bdi/{os.major(d)}:{os.minor(d)}/max_ratio") as f:
        return int(f.read())


@pytest.mark.usefixtures("fuse_transport")
def test_page_cache_gathers_writes_and_fsync_still_flushes(paths, tmp_path):
    """--page-cache negotiates FUSE's writeback cache: 256 buffered 4 KiB
    write() calls reach the lanes as far fewer WRITE requests, and after
    the first none of them asks for security.capability (the mount asked
    for FUSE_HANDLE_KILLPRIV_V2); fsync ends in a Flush, and the data is on
    the device after a remount.  A buffered write past the end is cut at
    the end, and fsync says so (ENOSPC)."""
    mnt, img = paths
    data = os.urandom(MiB)
    with mounted(mnt, img, "--size", "64M", "--page-cache"):
        dev = os.path.join(mnt, "nvme0n1")
        # the mount may hold 10% of the dirty threshold, not FUSE's 1%
        assert _bdi_max_ratio(mnt) == 10
        before = stats(mnt)
        fd = os.open(dev, os.O_RDWR)
        try:
            assert os.pwrite(fd, data[:4096], 8 * MiB) == 4096
            asked = lane_totals(stats(mnt), "xattr_none")
            for k in range(1, 256):
                assert os.pwrite(fd, data[k * 4096:(k + 1) * 4096], 8 * MiB + k * 4096) == 4096
            os.fsync(fd)
            after = stats(mnt)
            writes = lane_totals(after, "writes") - lane_totals(before, "writes")
            assert 1 <= writes <= 64, f"{writes} WRITE requests for 256 write() calls"
            assert lane_totals(after, "xattr_none") == asked, "write() still asks for security.capability"
            assert lane_totals(after, "flushes") > lane_totals(before, "flushes")
            assert os.pwrite(fd, b"xyz", 64 * MiB - 2) == 3       # the page cache takes it all
            with pytest.raises(OSError) as e:
                os.fsync(fd)
            assert e.value.errno == errno_mod.ENOSPC
        finally:
            os.close(fd)
    with mounted(mnt, img):
        assert _bdi_max_ratio(mnt) == 1     # without the page cache, the kernel's
        with open(os.path.join(mnt, "nvme0n1"), "rb") as f:
            f.seek(8 * MiB)
            assert f.read(MiB) == data
            f.seek(64 * MiB - 2)
            assert f.read(10) == b"xy"


def test_statfs_reports_the_namespaces(paths):
    mnt, img = paths
    with mounted(mnt, img, "--size", "64M", "--namespaces", "2"):
        st = os.statvfs(mnt)
        assert st.f_blocks * st.f_frsize == 64 * MiB
        assert st.f_bfree == st.f_bavail == 0          # fixed-size files: nothing to allocate
        assert st.f_files == 3 and st.f_namemax == 255


def test_signals_during_shutdown_leave_the_image_intact(paths, tmp_path):
    """A signal while a dd writes: the mount is detached, the dd finishes
    (exit 0, every byte there after a remount), and further signals through
    the whole shutdown are ignored: exit 0, clean shutdown."""
    mnt, img = paths
    os.makedirs(mnt)
    synced = os.urandom(MiB)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(400 * 64 * 1024))
    proc = start_daemon("mount", mnt, "--image", img, "--size", "64M")
    writer = None
    try:
        wait_for_mount(proc, mnt)
        dev = os.path.join(mnt, "nvme0n1")
        fd = os.open(dev, os.O_WRONLY)
        os.pwrite(fd, synced, 0)
        os.fsync(fd)
        os.close(fd)
        before = lane_totals(stats(mnt), "writes")
        # keep requests in flight while the signals arrive
        writer = subprocess.Popen(["dd", f"if={src}", f"of={dev}", "bs=64k", "seek=32", "conv=notrunc,fsync",
                                   "oflag=direct", "status=none"], stderr=subprocess.PIPE, text=True)
        # dd has the file open once its writes arrive
        deadline = time.monotonic() + 60
        while lane_totals(stats(mnt), "writes") < before + 20:
            assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        # then a stream of signals through the whole shutdown, down to the
        # interpreter's exit
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                proc.send_signal(signal.SIGTERM if int(time.monotonic() * 1000) % 2 else signal.SIGINT)
            except ProcessLookupError:
                break
            time.sleep(0.002)
        rc = proc.wait(timeout=10)
        assert writer.wait(timeout=60) == 0, writer.stderr.read()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        stop(proc, mnt)
    out, err = output(proc)
    assert rc == 0, err
    assert "shut down cleanly" in out
    with mounted(mnt, img):
        with open(os.path.join(mnt, "nvme0n1"), "rb") as f:
            assert f.read(MiB) == synced
            f.seek(32 * 64 * 1024)
            assert f.read(len(src.read_bytes())) == src.read_bytes()


@pytest.mark.usefixtures("fuse_transport")
def test_losetup_mkfs_ext4_fsck_and_reopen(paths, tmp_path):
    require(shutil.which("losetup") and shutil.which("mkfs.ext4"), "losetup and mkfs.ext4")
    mnt, img = paths
    fsmnt = tmp_path / "ext4"
    fsmnt.mkdir()
    tree = os.path.join(ROOT, "nvmefs")
    with mounted(mnt, img, "--size", "128M"):
        want = ext4_fill(os.path.join(mnt, "nvme0n1"), fsmnt, tree, shutil.ignore_patterns("*.so"))
    with mounted(mnt, img):
        ext4_check(os.path.join(mnt, "nvme0n1"), fsmnt, want)


@pytest.mark.usefixtures("fuse_transport")
def test_fsync_survives_kill_9(paths):
    mnt, img = paths
    data = os.urandom(MiB)
    os.makedirs(mnt)
    proc = start_daemon("mount", mnt, "--image", img, "--size", "64M")
    try:
        wait_for_mount(proc, mnt)
        fd = os.open(os.path.join(mnt, "nvme0n1"), os.O_WRONLY)
        os.pwrite(fd, data, 5 * MiB)
        os.fsync(fd)
        proc.kill()
        proc.wait()
        try:
            os.close(fd)
        except OSError:
            pass        # the connection died with the daemon
    finally:
        stop(proc, mnt)
    with mounted(mnt, img):
        with open(os.path.join(mnt, "nvme0n1"), "rb") as f:
            f.seek(5 * MiB)
            assert f.read(MiB) == data


@pytest.mark.usefixtures("fuse_transport")
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "fusermount"])
def test_clean_exit_on_signal_or_unmount(paths, how):
    mnt, img = paths
    os.makedirs(mnt)
    extra = []
    proc = start_daemon("mount", mnt, "--image", img, "--size", "16M", *extra)
    try:
        wait_for_mount(proc, mnt)
        with open(os.path.join(mnt, "nvme0n1"), "r+b") as f:
            f.write(b"signal" * 100)
        fd = os.open(os.path.join(mnt, "nvme0n1"), os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 8192)
            buf.write(b"direct" * 1365)
            assert os.pwritev(fd, [buf], 8192) == 8192
        finally:
            os.close(fd)
    finally:
        rc = stop(proc, mnt, how=how)
    out, err = output(proc)
    assert rc == 0, err
    assert "shut down cleanly" in out
    assert not os.path.ismount(mnt)
    with mounted(mnt, img):
        with open(os.path.join(mnt, "nvme0n1"), "rb") as f:
            assert f.read(600) == b"signal" * 100
            f.seek(8192)
            assert f.read(8190) == b"direct" * 1365


@pytest.mark.usefixtures("fuse_transport")
def test_a_failed_command_fails_only_its_request(paths):
    """An unrecovered read error (DNR) on LBAs 0-15: that read gets EIO,
    the next read of other LBAs and the same read once the fault is gone
    succeed; the error is counted by its decoded name and listed by
    `nvmefs stats`.  A controller fatal status then resets the controller
    and I/O goes on."""
    mnt, img = paths
    with mounted(mnt, img, "--size", "16M", env={**os.environ, "NVMEFS_FAULT_INJECTION": "1"}):
        dev = os.path.join(mnt, "nvme0n1")
        with open(dev, "r+b") as f:
            f.write(b"\x42" * 16384)
        os.setxattr(mnt, "user.nvmefs.inject", json.dumps(
            {"opcode": 2, "lba_start": 0, "lba_end": 15, "action": "fail", "sct": 2, "sc": 0x81,
             "dnr": True}).encode())
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            with pytest.raises(OSError) as ei:
                os.preadv(fd, [buf], 0)
            assert ei.value.errno == errno_mod.EIO
            assert os.preadv(fd, [buf], 8192) == 4096 and buf[:4] == b"\x42" * 4
            assert os.preadv(fd, [buf], 0) == 4096 and buf[:4] == b"\x42" * 4
        finally:
            os.close(fd)
        st = stats(mnt)
        assert st["errors_by_status"] == {"UNRECOVERED_READ_ERROR": 1}, st["errors_by_status"]
        assert st["lanes"]["errors"] == 1 and lane_totals(st, "retries") == 0, st["lanes"]
        (e,) = st["lanes"]["recent_errors"]
        assert e["status"] == "UNRECOVERED_READ_ERROR" and e["lba"] == 0 and e["op"] == "read", e
        r = run_cli("stats", mnt)
        assert r.returncode == 0 and "UNRECOVERED_READ_ERROR" in r.stdout, r.stdout
        os.setxattr(mnt, "user.nvmefs.inject", b'{"fatal": true}')
        deadline = time.monotonic() + 20
        while stats(mnt)["resets"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with open(dev, "rb") as f:
            assert f.read(4) == b"\x42" * 4


def test_the_mount_keeps_answering_while_every_lane_buffer_is_stuck(paths):
    """Reads the controller never completes hold every lane buffer, and
    more wait behind them (the backlog): stats, lookups and listings still
    reach pyfuse3.  Then the controller dies for good: every read gets EIO,
    the mount keeps answering, and it unmounts cleanly."""
    import threading
    mnt, img = paths
    with mounted(mnt, img, "--size", "16M", env={**os.environ, "NVMEFS_FAULT_INJECTION": "1"}):
        dev = os.path.join(mnt, "nvme0n1")

        def child_stats():
            # in a child that a hang cannot take down with the test
            r = subprocess.run([sys.executable, "-c", "import os, sys; sys.stdout.buffer.write("
                                f"os.getxattr({mnt!r}, 'user.nvmefs.stats'))"],
                               capture_output=True, timeout=20)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        buffers = sum(ln["buffers"] for ln in stats(mnt)["lanes"]["lanes"])
        readers = buffers + 16
        os.setxattr(mnt, "user.nvmefs.inject", json.dumps({"opcode": 2, "action": "drop", "count": 0}).encode())
        errors, closes = [], []

        def reader(i):
            fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
            try:
                os.preadv(fd, [mmap.mmap(-1, 4096)], i * 4096)
                errors.append(0)
            except OSError as exc:
                errors.append(exc.errno)
            try:
                os.close(fd)        # FUSE flush -> NVMe Flush: fails on a dead controller too
            except OSError as exc:
                closes.append(exc.errno)
        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(readers)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while True:
            st = child_stats()
            held = lane_totals(st, "in_flight") + lane_totals(st, "backlog")
            if held == readers:
                break
            assert time.monotonic() < deadline, st["lanes"]
            time.sleep(0.1)
        # every buffer is some request's; the ones beyond wait
        assert lane_totals(st, "backlog") >= readers - buffers, st["lanes"]
        assert sorted(os.listdir(mnt)) == ["nvme0n1"]
        # the controller dies, and will not come back: its bring-up fails
        os.setxattr(mnt, "user.nvmefs.inject", json.dumps(
            {"opcode": 5, "admin": True, "action": "fail", "sct": 1, "sc": 2, "dnr": True, "count": 0}).encode())
        os.setxattr(mnt, "user.nvmefs.inject", b'{"fatal": true}')
        for t in threads:
            t.join(timeout=60)
        assert errors == [errno_mod.EIO] * readers, errors
        assert closes == [errno_mod.EIO] * readers, closes
        st = stats(mnt)
        # every buffer's read was at the controller when it went fatal
        assert lane_totals(st, "lost_to_reset") == buffers, st["lanes"]
        assert all(ln["failed"] for ln in st["lanes"]["lanes"])
        assert sorted(os.listdir(mnt)) == ["nvme0n1"]
        with pytest.raises(OSError) as ei:
            with open(dev, "rb") as f:
                f.read(4096)
        assert ei.value.errno == errno_mod.EIO


@pytest.mark.usefixtures("fuse_transport")
def test_sigterm_and_lazy_unmount_while_fio_runs(paths):
    """SIGTERM, and `fusermount3 -u -z`, while fio writes at QD16: fio's
    open file keeps being served, so every write completes without an
    error; the daemon then exits 0, and every block fio wrote verifies after
    a remount. (The verify runs as a second job: fio's own verify phase
    reopens the file by name, which after a lazy detach is no longer the
    mount.)"""
    require(shutil.which("fio"), "fio")
    mnt, img = paths
    os.makedirs(mnt)
    for how, seed in (("SIGTERM", 11), ("lazy", 12)):
        job = ["fio", "--name=t", f"--filename={os.path.join(mnt, 'nvme0n1')}",
               "--ioengine=libaio", "--iodepth=16", "--direct=1", "--rw=randwrite",
               "--bsrange=4k-64k", "--size=24M", f"--randseed={seed}",
               "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
               "--output-format=json"]
        proc = start_daemon("mount", mnt, "--image", img, "--size", "64M")
        writer = None
        try:
            wait_for_mount(proc, mnt)
            writer = subprocess.Popen(job + ["--do_verify=0", "--rate_iops=1000"],  # about 1.5 s
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # fio has the file open once its writes arrive (on a loaded
            # machine it may take a while to start)
            deadline = time.monotonic() + 60
            while lane_totals(stats(mnt), "writes") < 50:
                assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
                time.sleep(0.01)
            if how == "SIGTERM":
                proc.send_signal(signal.SIGTERM)
            else:
                sh("fusermount3", "-u", "-z", mnt)
            out, err = writer.communicate(timeout=300)
            assert writer.returncode == 0, err
            (res,) = json.loads(out[out.index("{"):])["jobs"]
            assert res["error"] == 0
            assert res["write"]["io_bytes"] == 24 * MiB
            assert proc.wait(timeout=60) == 0, (how, output(proc))
        finally:
            if writer is not None and writer.poll() is None:
                writer.kill()
            stop(proc, mnt)
        assert "shut down cleanly" in output(proc)[0]
        assert "ERROR" not in output(proc)[1], output(proc)[1]
        assert not os.path.ismount(mnt) and os.listdir(mnt) == []
        with mounted(mnt, img):
            r = subprocess.run(job + ["--verify_only"], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            (res,) = json.loads(r.stdout[r.stdout.index("{"):])["jobs"]
            assert res["error"] == 0 and res["read"]["io_bytes"] == 24 * MiB


def image_state(img):
    if not os.path.exists(img):
        return None
    with open(img, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.stat(img).st_mtime_ns


def test_bad_input_one_line_nonzero_and_image_untouched(paths, tmp_path):
    mnt, img = paths
    os.makedirs(mnt)
    r = run_cli("create-image", img, "--size", "8M")
    assert r.returncode == 0, r.stderr
    before = image_state(img)

    def bad(args, needle, env=None):
        r = run_cli(*args, env=env)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert image_state(img) == before

    bad(["mount", str(tmp_path / "nope"), "--image", img], "does not exist")
    (tmp_path / "file").write_text("x")
    bad(["mount", str(tmp_path / "file"), "--image", img], "not a directory")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    bad(["mount", str(full), "--image", img], "not empty")
    bad(["mount", mnt, "--image", str(tmp_path / "new.img"), "--size", "1000001"], "multiple of the LBA size")
    assert not os.path.exists(tmp_path / "new.img")
    bad(["mount", mnt, "--image", img], "fusermount3", env={**os.environ, "PATH": "/nonexistent"})
    bad(["mount", mnt, "--size", "12Q"], "invalid size")
    bad(["id-ctrl", "--image", str(tmp_path / "missing.img")], "does not exist")
    # the magic with a header that makes no sense: an error, never taken
    # for a raw image (a file without the magic is one)
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(b"NVMEFSIMG1" + b"\0" * 8182)
    bad(["mount", mnt, "--image", str(garbage)], "unsupported nvmefs image version")
    with read_only_copy(img, tmp_path, "disk.img") as ro_img:
        bad(["mount", mnt, "--image", ro_img], "not writable")
    # already mounted
    with mounted(mnt, img):
        r = run_cli("mount", mnt, "--image", str(tmp_path / "other.img"))
        assert r.returncode != 0 and "busy" in r.stderr
    assert not os.path.exists(tmp_path / "other.img")


def test_cli_admin_commands(paths, tmp_path):
    _mnt, img = paths
    assert run_cli("create-image", img, "--size", "64M", "--namespaces", "2").returncode == 0
    r = run_cli("list", "--image", img, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["name"] for x in rows] == ["nvme0n1", "nvme0n2"]
    for cmd in (["id-ctrl"], ["id-ns", "-n", "2"], ["smart-log"], ["error-log"],
                ["get-feature", "-f", "volatile-write-cache"]):
        r = run_cli(*cmd, "--image", img)
        assert r.returncode == 0, (cmd, r.stderr)
        assert r.stdout.strip()
    r = run_cli("format", "--image", img, "-n", "1", "--lba-size", "4096", "--erase")
    assert r.returncode == 0, r.stderr
    r = run_cli("id-ns", "--image", img, "-n", "1", "--json")
    assert json.loads(r.stdout)["lba_size"] == 4096
    r = run_cli("id-ns", "--image", img, "-n", "9")
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_background_mode_returns_once_mounted(paths):
    mnt, img = paths
    os.makedirs(mnt)
    start = time.monotonic()
    r = subprocess.run(nvmefs_cmd("mount", "-b", mnt, "--image", img, "--size", "16M"), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - start < 30
        assert os.path.ismount(mnt) and "background" in r.stdout
        with open(os.path.join(mnt, "nvme0n1"), "r+b") as f:
            f.write(b"bg" * 256)
    finally:
        subprocess.run(["fusermount3", "-u", mnt], timeout=30)
    deadline = time.monotonic() + 30
    while os.path.ismount(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.ismount(mnt)


def test_bad_options_create_nothing(paths, tmp_path):
    mnt, img = paths
    os.makedirs(mnt)
    for args, needle in ((["--mdts", "99"], "outside"), (["--size", "inf"], "invalid size"),
                         (["--queue-depth", "0"], "outside")):
        r = run_cli("mount", mnt, "--image", img, *args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
        assert not os.path.exists(img)


def test_create_image_preallocate(tmp_path):
    sparse, full = str(tmp_path / "s.img"), str(tmp_path / "f.img")
    assert run_cli("create-image", sparse, "--size", "32M").returncode == 0
    r = run_cli("create-image", full, "--size", "32M", "--preallocate")
    assert r.returncode == 0 and "preallocated" in r.stdout, r.stderr
    assert os.stat(sparse).st_blocks * 512 < 4 * MiB
    assert os.stat(full).st_blocks * 512 >= 32 * MiB
    r = run_cli("list", "--image", full, "--json")
    assert json.loads(r.stdout)[0]["size"] == 32 * MiB


def _fallocate(fd, mode, off, length):
    """fallocate(2) with a mode (os.posix_fallocate has none); returns errno."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return 0 if libc.fallocate(fd, mode, off, length) == 0 else ctypes.get_errno()


KEEP, PUNCH, ZERO = 0x01, 0x02, 0x10


@pytest.mark.parametrize("lba", [512, 4096])
def test_fallocate_punch_hole_and_zero_range(paths, tmp_path, lba):
    mnt, img = paths
    size = 32 * MiB
    data = bytearray(os.urandom(16 * MiB))
    with mounted(mnt, img, "--size", str(size), "--lba-size", str(lba)):
        dev = os.path.join(mnt, "nvme0n1")
        with open(dev, "r+b", buffering=0) as f:
            f.write(data)
            os.fsync(f.fileno())
        blocks_before = os.stat(img).st_blocks
        fd = os.open(dev, os.O_RDWR)
        try:
            # unaligned at both edges: RMW zeroes the edges, the middle is deallocated
            assert _fallocate(fd, PUNCH | KEEP, 1000, 4 * MiB) == 0
            data[1000:1000 + 4 * MiB] = bytes(4 * MiB)
            # inside one LBA, and across two partial LBAs
            assert _fallocate(fd, PUNCH | KEEP, 5 * MiB + 7, 13) == 0
            data[5 * MiB + 7:5 * MiB + 20] = bytes(13)
            assert _fallocate(fd, ZERO | KEEP, 6 * MiB - 10, 20) == 0
            data[6 * MiB - 10:6 * MiB + 10] = bytes(20)
            # Write Zeroes, aligned and not, with and without KEEP_SIZE
            assert _fallocate(fd, ZERO, 8 * MiB, 2 * MiB) == 0
            data[8 * MiB:10 * MiB] = bytes(2 * MiB)
            assert _fallocate(fd, ZERO | KEEP, 11 * MiB + 3, 300000) == 0
            data[11 * MiB + 3:11 * MiB + 300003] = bytes(300000)
            # refused modes answer EOPNOTSUPP each time (never ENOSYS, which
            # would make the kernel stop asking), growth is ENOSPC
            assert _fallocate(fd, 0, 0, 4096) == errno_mod.EOPNOTSUPP
            assert _fallocate(fd, KEEP, 0, 4096) == errno_mod.EOPNOTSUPP
            assert _fallocate(fd, ZERO, size - 4096, 8192) == errno_mod.ENOSPC
            # past the end with KEEP_SIZE: cut at the end, as for a file
            assert _fallocate(fd, PUNCH | KEEP, size - lba, 10 * lba) == 0
            with open(dev, "rb", buffering=0) as f:
                assert f.read(16 * MiB) == bytes(data)
                f.seek(size - lba)
                assert f.read() == bytes(lba)
        finally:
            os.close(fd)
        # the punched range went back to the model's sparse image (DSM
        # deallocate); the host file system punches whole 4 KiB pages only
        assert blocks_before - os.stat(img).st_blocks >= (4 * MiB - 4 * 4096) // 512
        la = stats(mnt)["lanes"]
        assert lane_totals({"lanes": la}, "fallocates") == 6 and la["errors"] == 0, la

        if shutil.which("blkdiscard") and shutil.which("losetup"):
            # the loop driver turns a discard into PUNCH_HOLE on its backing file
            loop = sh("losetup", "--find", "--show", dev).strip()
            try:
                sh("blkdiscard", "-o", str(12 * MiB), "-l", str(MiB), loop)
            finally:
                subprocess.run(["losetup", "-d", loop])
            data[12 * MiB:13 * MiB] = bytes(MiB)
    with mounted(mnt, img):
        with open(os.path.join(mnt, "nvme0n1"), "rb") as f:
            assert f.read(16 * MiB) == bytes(data), "fallocate results did not persist"
