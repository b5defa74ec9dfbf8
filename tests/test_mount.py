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

from conftest import require
from mounthelp import mounted, nvmefs_cmd, run_cli, stop, wait_for_mount, ROOT

MiB = 1 << 20


@pytest.fixture(autouse=True)
def prerequisites():
    require(os.geteuid() == 0, "root")
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    require(shutil.which("fusermount3"), "fusermount3 (package fuse3)")


@pytest.fixture
def paths(tmp_path):
    return str(tmp_path / "mnt"), str(tmp_path / "disk.img")


def sh(*cmd, timeout=300):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


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


LANE_MODES = {"lane-engine": [], "lane-thread": ["--no-lane-queue"], "lane-in-pyfuse3": ["--no-lane-thread"],
              "no-direct-lane": ["--no-direct-lane"]}


@pytest.mark.parametrize("mode", LANE_MODES)
def test_direct_lane_serves_aligned_io_and_can_be_turned_off(paths, tmp_path, mode):
    """O_DIRECT LBA-aligned reads and writes are answered by the lane
    thread that reads /dev/fuse: by default through the lane engine on its
    own queue, with --no-lane-queue through the direct lane inside libfuse's
    dispatch, as also with --no-lane-thread in pyfuse3's loop; everything
    else, and everything with --no-direct-lane, goes through pyfuse3's
    handlers; the bytes are the same either way."""
    mnt, img = paths
    lane = mode in ("lane-thread", "lane-in-pyfuse3")
    with mounted(mnt, img, "--size", "64M", "--lba-size", "4096", *LANE_MODES[mode]):
        dev = os.path.join(mnt, "nvme0n1")
        src = tmp_path / "src"
        src.write_bytes(os.urandom(4 * MiB))
        sh("dd", f"if={src}", f"of={dev}", "bs=4k", "oflag=direct", "conv=notrunc", "status=none")
        with open(dev, "r+b", buffering=0) as f:       # unaligned: read-modify-write in pyfuse3's path
            f.seek(4096 * 7 + 5)
            f.write(b"lane")
        want = bytearray(src.read_bytes())
        want[4096 * 7 + 5:4096 * 7 + 9] = b"lane"
        out = tmp_path / "out"
        sh("dd", f"if={dev}", f"of={out}", "bs=4k", "count=1024", "iflag=direct", "status=none")
        assert out.read_bytes() == want
        # requests larger than a bounce chunk: queued by the lane, answered by a task
        big = tmp_path / "big"
        big.write_bytes(os.urandom(2 * MiB))
        sh("dd", f"if={big}", f"of={dev}", "bs=256k", "seek=8", "oflag=direct", "conv=notrunc", "status=none")
        out2 = tmp_path / "out2"
        sh("dd", f"if={dev}", f"of={out2}", "bs=256k", "skip=8", "count=8", "iflag=direct", "status=none")
        assert out2.read_bytes() == big.read_bytes()
        # an odd window inside LBAs: one command, the window comes back
        with open(dev, "rb", buffering=0) as f:
            f.seek(4096 * 3 + 100)
            assert f.read(5000) == want[4096 * 3 + 100:4096 * 3 + 5100]
        stats = json.loads(os.getxattr(mnt, "user.nvmefs.stats"))
        st = stats["direct_lane"]
        eng = st.pop("engine")
        if mode == "lane-engine":
            # 1024 + 8 writes and 1024 + 8 + 1 reads, every one submitted as
            # read; only the unaligned write was declined (to pyfuse3)
            assert eng["writes"] >= 1032 and eng["reads"] >= 1033 and eng["declined"] >= 1, eng
            assert eng["handed_over"] == 0 and eng["in_flight"] == 0, eng
            assert eng["bytes_written"] == 4 * MiB + 2 * MiB, eng
            lane_q = [q for q in stats["queues"] if q.get("lane")]
            assert len(lane_q) == 1 and lane_q[0]["completed"] == eng["commands"], stats["queues"]
            assert st["read"] + st["write"] + st["continued"] == 0, st     # DirectLane is off
        else:
            assert eng is None
        if lane:
            # each of the 2049 aligned requests found an idle queue (dd is QD1):
            # answered inline, or continued in a task when the poll gave up
            # (how many of each depends on how loaded the host is)
            assert st["on"] and st["read"] + st["write"] + st["continued"] >= 2049, st
            assert st["queued"] >= 16 and st["continued"] >= st["queued"], st
        elif mode == "no-direct-lane":
            assert st == {"read": 0, "write": 0, "queued": 0, "continued": 0, "on": False, "thread": None}
        th = st["thread"]
        if mode in ("lane-thread", "lane-engine"):
            # every request was read by the thread: answered there or handed
            # on (lookups, opens, the unaligned write the lane declined, ...)
            # (give or take an asynchronous RELEASE read but not yet handed on)
            assert 0 <= th["received"] - (th["answered"] + th["to_pyfuse3"]) <= 2, th
            assert th["answered"] >= 2049 and th["declined"] >= 1 and th["to_pyfuse3"] > th["declined"], th
        else:
            assert th is None
        r = run_cli("stats", mnt)
        assert r.returncode == 0
        assert ("direct lane:" in r.stdout) == (mode != "lane-engine")
        assert ("lane thread:" in r.stdout) == (mode in ("lane-thread", "lane-engine"))
        assert ("lane engine:" in r.stdout) == (mode == "lane-engine")


def test_fio_verify(paths):
    require(shutil.which("fio"), "fio")
    mnt, img = paths
    with mounted(mnt, img, "--size", "256M"):
        dev = os.path.join(mnt, "nvme0n1")
        out = sh("fio", "--name=verify", f"--filename={dev}", "--ioengine=libaio", "--iodepth=16",
                 "--direct=1", "--rw=randwrite", "--bsrange=512-64k", "--size=32M", "--numjobs=2",
                 "--offset_increment=64M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                 "--verify_state_save=0", "--output-format=json", timeout=600)
        res = json.loads(out[out.index("{"):])
        for job in res["jobs"]:
            assert job["error"] == 0
            assert job["write"]["io_bytes"] > 0
        # the lane engine had the requests of both jobs at the controller
        # together, not one at a time, and answered every one of them itself
        eng = json.loads(os.getxattr(mnt, "user.nvmefs.stats"))["direct_lane"]["engine"]
        assert eng["max_in_flight"] >= 8 and eng["handed_over"] == 0 and eng["in_flight"] == 0, eng


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


def test_statfs_reports_the_namespaces(paths):
    mnt, img = paths
    with mounted(mnt, img, "--size", "64M", "--namespaces", "2"):
        st = os.statvfs(mnt)
        assert st.f_blocks * st.f_frsize == 64 * MiB
        assert st.f_bfree == st.f_bavail == 0          # fixed-size files: nothing to allocate
        assert st.f_files == 3 and st.f_namemax == 255


def test_signals_during_shutdown_leave_the_image_intact(paths):
    """Signals while the daemon unmounts, flushes and exits are ignored:
    exit 0, clean shutdown, synced data intact, image mountable."""
    mnt, img = paths
    os.makedirs(mnt)
    synced = os.urandom(MiB)
    proc = subprocess.Popen(nvmefs_cmd("mount", mnt, "--image", img, "--size", "64M"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = None
    try:
        wait_for_mount(proc, mnt)
        dev = os.path.join(mnt, "nvme0n1")
        fd = os.open(dev, os.O_WRONLY)
        os.pwrite(fd, synced, 0)
        os.fsync(fd)
        os.close(fd)
        # keep requests in flight while the signals arrive
        writer = subprocess.Popen(["dd", "if=/dev/urandom", f"of={dev}", "bs=64k", "seek=32",
                                   "count=400", "conv=notrunc", "oflag=direct", "status=none"],
                                  stderr=subprocess.DEVNULL)
        time.sleep(0.3)
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
    finally:
        if writer is not None:
            writer.wait(timeout=60)
        stop(proc, mnt)
    out, err = proc.communicate()
    assert rc == 0, err
    assert "shut down cleanly" in out
    with mounted(mnt, img):
        with open(os.path.join(mnt, "nvme0n1"), "rb") as f:
            assert f.read(MiB) == synced


def tree_sums(root):
    sums = {}
    for d, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                sums[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return sums


def test_losetup_mkfs_ext4_fsck_and_reopen(paths, tmp_path):
    require(shutil.which("losetup") and shutil.which("mkfs.ext4"), "losetup and mkfs.ext4")
    mnt, img = paths
    fsmnt = tmp_path / "ext4"
    fsmnt.mkdir()
    tree = os.path.join(ROOT, "nvmefs")
    with mounted(mnt, img, "--size", "128M"):
        loop = sh("losetup", "--find", "--show", "--direct-io=on", os.path.join(mnt, "nvme0n1")).strip()
        try:
            sh("mkfs.ext4", "-q", "-F", loop)
            sh("mount", loop, str(fsmnt))
            try:
                shutil.copytree(tree, fsmnt / "tree", ignore=shutil.ignore_patterns("*.so"))
                want = tree_sums(fsmnt / "tree")
            finally:
                sh("umount", str(fsmnt))
            sh("e2fsck", "-fn", loop)
        finally:
            subprocess.run(["losetup", "-d", loop])
    with mounted(mnt, img):
        loop = sh("losetup", "--find", "--show", "-r", os.path.join(mnt, "nvme0n1")).strip()
        try:
            sh("mount", "-o", "ro", loop, str(fsmnt))
            try:
                assert tree_sums(fsmnt / "tree") == want
            finally:
                sh("umount", str(fsmnt))
        finally:
            subprocess.run(["losetup", "-d", loop])


def test_fsync_survives_kill_9(paths):
    mnt, img = paths
    data = os.urandom(MiB)
    os.makedirs(mnt)
    proc = subprocess.Popen(nvmefs_cmd("mount", mnt, "--image", img, "--size", "64M"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


@pytest.mark.parametrize("reader", ["lane-engine", "lane-thread", "pyfuse3-loop"])
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "fusermount"])
def test_clean_exit_on_signal_or_unmount(paths, how, reader):
    """Whoever reads /dev/fuse: the lane thread has to stop (signals) or
    notice the unmount and end pyfuse3's loop with it (fusermount)."""
    mnt, img = paths
    os.makedirs(mnt)
    extra = {"lane-engine": [], "lane-thread": ["--no-lane-queue"], "pyfuse3-loop": ["--no-lane-thread"]}[reader]
    proc = subprocess.Popen(nvmefs_cmd("mount", mnt, "--image", img, "--size", "16M", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_mount(proc, mnt)
        with open(os.path.join(mnt, "nvme0n1"), "r+b") as f:
            f.write(b"signal" * 100)
        fd = os.open(os.path.join(mnt, "nvme0n1"), os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 8192)
            buf.write(b"direct" * 1365)
            assert os.pwritev(fd, [buf], 8192) == 8192      # aligned: the lane's
        finally:
            os.close(fd)
    finally:
        rc = stop(proc, mnt, how=how)
    out, err = proc.communicate()
    assert rc == 0, err
    assert "shut down cleanly" in out
    assert not os.path.ismount(mnt)
    with mounted(mnt, img):
        with open(os.path.join(mnt, "nvme0n1"), "rb") as f:
            assert f.read(600) == b"signal" * 100
            f.seek(8192)
            assert f.read(8190) == b"direct" * 1365


def test_fault_injection_through_the_mount(paths):
    mnt, img = paths
    with mounted(mnt, img, "--size", "16M", env={**os.environ, "NVMEFS_FAULT_INJECTION": "1"}):
        dev = os.path.join(mnt, "nvme0n1")
        with open(dev, "r+b") as f:
            f.write(b"\x42" * 8192)
        os.setxattr(mnt, "user.nvmefs.inject", json.dumps(
            {"opcode": 2, "lba_start": 0, "lba_end": 15, "action": "fail", "sct": 2, "sc": 0x81,
             "dnr": True}).encode())
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 4096)
            lane = json.loads(os.getxattr(mnt, "user.nvmefs.stats"))["direct_lane"]
            with pytest.raises(OSError) as ei:
                os.preadv(fd, [buf], 0)
            assert ei.value.errno == 5
            # the failed read was the direct lane's, answered by its task
            after = json.loads(os.getxattr(mnt, "user.nvmefs.stats"))["direct_lane"]
            assert after["continued"] == lane["continued"] + 1 and after["read"] == lane["read"]
            assert os.preadv(fd, [buf], 0) == 4096 and buf[:4] == b"\x42" * 4
        finally:
            os.close(fd)
        os.setxattr(mnt, "user.nvmefs.inject", b'{"fatal": true}')
        time.sleep(1.5)
        with open(dev, "rb") as f:
            assert f.read(4) == b"\x42" * 4
        stats = json.loads(os.getxattr(mnt, "user.nvmefs.stats"))
        assert stats["resets"] >= 1
        assert stats["errors_by_status"].get("UNRECOVERED_READ_ERROR") == 1
        r = run_cli("stats", mnt)
        assert r.returncode == 0 and "resets" in r.stdout


def test_the_mount_keeps_answering_while_every_lane_buffer_is_stuck(paths):
    """Reads the controller never completes hold all 48 of the lane
    engine's receive buffers, and more wait behind them: stats, lookups and
    the reads beyond 48 still reach pyfuse3 (the lane thread used to stop
    reading /dev/fuse until a buffer came back).  Then the controller dies
    for good: every read gets EIO, the mount keeps answering, and it
    unmounts cleanly."""
    import threading
    mnt, img = paths
    with mounted(mnt, img, "--size", "16M", env={**os.environ, "NVMEFS_FAULT_INJECTION": "1"}):
        dev = os.path.join(mnt, "nvme0n1")

        def stats():
            # in a child that a hang cannot take down with the test
            r = subprocess.run([sys.executable, "-c", "import os, sys; sys.stdout.buffer.write("
                                f"os.getxattr({mnt!r}, 'user.nvmefs.stats'))"],
                               capture_output=True, timeout=20)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        os.setxattr(mnt, "user.nvmefs.inject", json.dumps({"opcode": 2, "action": "drop", "count": 0}).encode())
        errors, closes = [], []

        def reader(i):
            import mmap
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
        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(56)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while stats()["direct_lane"]["engine"]["in_flight"] < 48:
            assert time.monotonic() < deadline, stats()["direct_lane"]
            time.sleep(0.1)
        assert sorted(os.listdir(mnt)) == ["nvme0n1"]
        # the controller dies, and will not come back: its bring-up fails
        os.setxattr(mnt, "user.nvmefs.inject", json.dumps(
            {"opcode": 5, "admin": True, "action": "fail", "sct": 1, "sc": 2, "dnr": True, "count": 0}).encode())
        os.setxattr(mnt, "user.nvmefs.inject", b'{"fatal": true}')
        for t in threads:
            t.join(timeout=60)
        assert errors == [errno_mod.EIO] * 56, errors
        assert closes == [errno_mod.EIO] * 56, closes
        st = stats()
        assert st["direct_lane"]["engine"]["lost_to_reset"] == 48, st["direct_lane"]
        assert sorted(os.listdir(mnt)) == ["nvme0n1"]
        with pytest.raises(OSError) as ei:
            with open(dev, "rb") as f:
                f.read(4096)
        assert ei.value.errno == errno_mod.EIO


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
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(b"\0" * 8192)
    bad(["mount", mnt, "--image", str(garbage)], "garbage.img")
    # a read-only image: on a read-only bind mount, which binds root too
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(img, ro / "disk.img")
    sh("mount", "--bind", str(ro), str(ro))
    try:
        sh("mount", "-o", "remount,ro,bind", str(ro))
        bad(["mount", mnt, "--image", str(ro / "disk.img")], "not writable")
    finally:
        sh("umount", str(ro))
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
        stats = json.loads(os.getxattr(mnt, "user.nvmefs.stats"))["fallocate"]
        assert stats == {"punch": 3, "zero": 3, "refused": 2, "hooked": True}

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
