"""FUSE over io_uring as the lanes' transport: that the kernel really
switches to the rings, that a request arrives on the ring of its caller's
CPU, the fallbacks (the feature off, a REGISTER the kernel refuses), and
that killing the daemon under load on the rings leaves nothing stuck.
The e2e set (dd, fio verify, buffered, ext4 on loop, signals, kill -9) runs
on both transports in test_mount.py (the fuse_transport fixture)."""
import os
import shutil
import subprocess
import time

import pytest

from conftest import enable_uring, require, require_root_fuse
from mounthelp import mounted, output, run_cli, sh, start_daemon, stats, stop, wait_for_mount
from nvmefs.lanes import possible_cpus

MiB = 1 << 20


@pytest.fixture(autouse=True)
def prerequisites():
    require_root_fuse()


def daemon_line(proc, needle, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        out, err = output(proc)
        for line in (out + err).splitlines():
            if needle in line:
                return line
        assert time.monotonic() < deadline and proc.poll() is None, (needle, out, err)
        time.sleep(0.05)


def d_state_processes():
    """Processes in uninterruptible sleep (a FUSE request nobody answers)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if fields[0] == "D":
            out.append((int(pid), comm))
    return out


def test_requests_arrive_on_the_ring_of_their_callers_cpu(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    mnt, img = str(tmp_path / "mnt"), str(tmp_path / "img")
    with enable_uring("Y"), mounted(mnt, img, "--size", "16M", "--fuse-transport", "uring") as proc:
        daemon_line(proc, "FUSE over io_uring)")
        st = stats(mnt)["lanes"]
        assert st["fuse_transport"] == "io_uring"
        assert all(ln["ring_entries_registered"] == ln["ring_entries"] > 0 for ln in st["lanes"])
        dev = os.path.join(mnt, "nvme0n1")
        sh("dd", "if=/dev/urandom", f"of={dev}", "bs=64k", "count=16", "oflag=direct", "conv=notrunc", "status=none")
        for cpu in cpus:
            before = stats(mnt)["lanes"]
            r = subprocess.run(["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=200", "iflag=direct",
                                "status=none"], preexec_fn=lambda c=cpu: os.sched_setaffinity(0, {c}),
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            after = stats(mnt)["lanes"]
            reads = {a["qid"]: a["reads"] - b["reads"] for a, b in zip(after["rings"], before["rings"])}
            assert reads == {q: (200 if q == cpu else 0) for q in reads}, reads
            # nothing of it came by read() on /dev/fuse (only FORGET and INTERRUPT may)
            dev_reads = [(a["received"] - a["ring_requests"]) - (b["received"] - b["ring_requests"])
                         for a, b in zip(after["lanes"], before["lanes"])]
            assert dev_reads == [0] * len(dev_reads), dev_reads
            lane = {r_["qid"]: r_["lane"] for r_ in after["rings"]}[cpu]
            served = [a["reads"] - b["reads"] for a, b in zip(after["lanes"], before["lanes"])]
            assert served == [200 if i == lane else 0 for i in range(len(served))], served


def test_one_lane_serves_every_cpus_ring(tmp_path):
    """--lanes 1 on a machine of several CPUs: the lane registers entries on
    every CPU's queue (else every request would wait)."""
    mnt, img = str(tmp_path / "mnt"), str(tmp_path / "img")
    with enable_uring("Y"), mounted(mnt, img, "--size", "16M", "--lanes", "1") as proc:
        daemon_line(proc, "FUSE over io_uring)")
        st = stats(mnt)["lanes"]
        assert st["fuse_transport"] == "io_uring"
        assert {r["lane"] for r in st["rings"]} == {0}
        assert [r["qid"] for r in st["rings"]] == possible_cpus()
        data = os.urandom(4 * MiB)
        with open(os.path.join(mnt, "nvme0n1"), "r+b", buffering=0) as f:
            f.write(data)
            f.seek(0)
            assert f.read(len(data)) == data


def test_off_in_the_kernel_means_dev_fuse_and_one_line(tmp_path):
    mnt, img = str(tmp_path / "mnt"), str(tmp_path / "img")
    with enable_uring("N"):
        with mounted(mnt, img, "--size", "16M") as proc:
            line = daemon_line(proc, "enable_uring = N")
            assert "serving /dev/fuse" in line
            st = stats(mnt)["lanes"]
            assert st["fuse_transport"] == "/dev/fuse" and st["rings"] == []
            sh("dd", "if=/dev/zero", f"of={mnt}/nvme0n1", "bs=1M", "count=4", "oflag=direct", "conv=notrunc",
               "status=none")
        os.rmdir(mnt)
        os.makedirs(mnt)
        r = run_cli("mount", mnt, "--image", str(tmp_path / "other"), "--fuse-transport", "uring")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--enable-uring" in r.stderr, r.stderr
        assert not os.path.exists(tmp_path / "other") and not os.path.ismount(mnt)


def test_enable_uring_switches_it_on_and_says_so(tmp_path):
    mnt, img = str(tmp_path / "mnt"), str(tmp_path / "img")
    with enable_uring("N"):
        with mounted(mnt, img, "--size", "16M", "--enable-uring") as proc:
            assert "switched on" in daemon_line(proc, "FUSE over io_uring switched on")
            daemon_line(proc, "FUSE over io_uring)")
            assert stats(mnt)["lanes"]["fuse_transport"] == "io_uring"
        with open("/sys/module/fuse/parameters/enable_uring") as f:
            assert f.read().strip() == "Y"


def test_a_refused_register_falls_back_without_a_hang(tmp_path):
    """REGISTER with a payload below max_write: the kernel refuses every
    entry and serves the mount over /dev/fuse, which the lanes still read."""
    mnt, img = str(tmp_path / "mnt"), str(tmp_path / "img")
    env = dict(os.environ, NVMEFS_URING_FAULT="register")
    with enable_uring("Y"), mounted(mnt, img, "--size", "16M", env=env) as proc:
        line = daemon_line(proc, "refused the io_uring entries")
        assert "(Invalid argument)" in line and "serving /dev/fuse" in line
        data = os.urandom(2 * MiB)
        r = subprocess.run(["dd", f"of={mnt}/nvme0n1", "bs=1M", "oflag=direct", "conv=notrunc", "status=none"],
                           input=data, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        with open(f"{mnt}/nvme0n1", "rb") as f:
            assert f.read(len(data)) == data
        st = stats(mnt)["lanes"]
        assert st["fuse_transport"] == "/dev/fuse"
        assert all(ln["register_errors"] == ln["ring_entries"] and ln["ring_requests"] == 0
                   for ln in st["lanes"])


def test_uring_wanted_and_refused_is_an_error_and_no_mount(tmp_path):
    """--fuse-transport uring when the kernel refuses the entries: one line,
    exit 1, the mount gone, the image closed cleanly."""
    mnt, img = str(tmp_path / "mnt"), str(tmp_path / "img")
    os.makedirs(mnt)
    env = dict(os.environ, NVMEFS_URING_FAULT="register")
    with enable_uring("Y"):
        r = run_cli("mount", mnt, "--image", img, "--size", "16M", "--fuse-transport", "uring", env=env,
                    timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert [ln for ln in r.stderr.splitlines() if "error" in ln] == [
        "nvmefs: error: --fuse-transport uring: the kernel refused the io_uring entries (Invalid argument)"]
    assert not os.path.ismount(mnt) and os.listdir(mnt) == []
    from nvmefs.image import read_image_header
    assert read_image_header(img)["clean"]


def test_kill_9_under_fio_on_the_rings_leaves_nothing_stuck(tmp_path):
    require(shutil.which("fio"), "fio")
    mnt, img = str(tmp_path / "mnt"), str(tmp_path / "img")
    os.makedirs(mnt)
    with enable_uring("Y"):
        proc = start_daemon("mount", mnt, "--image", img, "--size", "64M")
        fio = None
        try:
            wait_for_mount(proc, mnt)
            daemon_line(proc, "FUSE over io_uring)")
            fio = subprocess.Popen(["fio", "--name=t", f"--filename={mnt}/nvme0n1", "--ioengine=libaio",
                                    "--iodepth=32", "--direct=1", "--rw=randrw", "--bs=4k", "--size=64M",
                                    "--time_based", "--runtime=60"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 60
            while sum(r["requests"] for r in stats(mnt)["lanes"]["rings"]) < 2000:
                assert fio.poll() is None and time.monotonic() < deadline, fio.communicate()
                time.sleep(0.01)
            proc.kill()
            proc.wait(timeout=30)
            # every request fio had on the rings ends (ECONNABORTED), none sleeps in D
            fio.communicate(timeout=60)
            assert fio.returncode != 0
            assert [p for p in d_state_processes() if p[1] in ("fio", "python3", "python")] == []
            # the dead connection's mount goes, not lazily: nothing holds it (no EBUSY)
            r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
        finally:
            if fio is not None and fio.poll() is None:
                fio.kill()
            stop(proc, mnt)
    assert not os.path.ismount(mnt)
    with mounted(mnt, img) as again:
        assert stats(mnt)["lanes"]["errors"] == 0
        assert again.poll() is None
