"""NVMe over TCP against a real target: Linux nvmet-tcp in the TCP lab's
guest (tests/tcp_lab.py; one boot per session).  Discovery, connections
with one and several I/O queues, in-capsule and R2T writes, reads ending
with a response capsule and with C2HData SUCCESS, digests, MDTS splitting,
the FUSE mount (dd, fio verify, ext4 on a loop device + fsck + remount), a
connection cut while fio verifies, the loss timeout, and the one-line
errors of a wrong subsystem, a refused host and an unreachable address."""
import json
import os
import shutil
import subprocess
import time

import pytest
import trio

from conftest import require, require_root_fuse
from mounthelp import ROOT, ext4_check, ext4_fill, output, run_cli, sh, start_daemon, stats, stop, wait_for_mount

from nvmefs.controller import open_controller
from nvmefs.tcp import TcpTransport

MiB = 1 << 20


def url(t, nqn=None):
    return f"nvme-tcp://{t.host}:{t.port}/{nqn or t.subnqn}"


def run(fn, t, io_queues=1, ctrl=None, **opts):
    """``fn(controller, transport)`` on a controller reached over TCP."""
    async def main():
        tr = TcpTransport(url(t), **opts)
        try:
            async with open_controller(tr, io_queues=io_queues, **(ctrl or {})) as c:
                return await fn(c, tr)
        finally:
            tr.close()
    return trio.run(main)


def conn_stats(tr):
    return {c["qid"]: c for c in tr.stats()["connections"]}


def test_discovery(nvmet_target):
    t = nvmet_target
    r = run_cli("discover", "-t", "tcp", "-a", t.host, "-s", str(t.port), "-o", "json")
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout)["records"]
    subs = {e["subnqn"]: e for e in recs}
    assert subs[t.subnqn]["subtype"] == "nvme subsystem" and subs[t.subnqn]["trtype"] == "tcp"
    assert subs[t.subnqn]["trsvcid"] == "4420"
    # a host not allowed on the restricted subsystem is not shown it; the allowed one is
    assert t.restricted_nqn not in subs
    r = run_cli("discover", "-a", t.host, "-s", str(t.port), "--hostnqn", t.allowed_hostnqn)
    assert r.returncode == 0 and t.restricted_nqn in r.stdout, r.stdout
    assert f"--device nvme-tcp://{t.host}:{t.port}/" in r.stdout


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "digests"])
@pytest.mark.parametrize("queues", [1, 3])
def test_io_over_one_and_several_queues(nvmet_target, queues, digests):
    """Each I/O queue is its own connection; in-capsule (<= 16 KiB) and R2T
    writes, reads, with digests on and off, all bytes back."""
    async def body(c, tr):
        ns = c.namespaces[1]
        assert ns.lba_size == 512 and ns.size == nvmet_target.namespace_size
        blobs = [(lba, os.urandom(n)) for lba, n in ((0, 4096), (64, 16384), (256, 65536), (2048, MiB))]
        async with trio.open_nursery() as nursery:
            for lba, data in blobs:
                nursery.start_soon(ns.write, lba, data)
        for lba, data in blobs:
            assert bytes(await ns.read(lba, len(data) // 512)) == data
        st = conn_stats(tr)
        assert sorted(st) == list(range(queues + 1))
        io = [st[q] for q in range(1, queues + 1)]
        assert sum(s["incapsule_writes"] for s in io) == 2, (c.resets, tr.stats())   # 4 KiB and 16 KiB
        assert sum(s["r2t"] for s in io) >= 2                     # 64 KiB and 1 MiB
        assert all(s["failed"] is None and s["local_errors"] == 0 for s in st.values())
        assert tr.stats()["hdr_digest"] is digests
        return True
    assert run(body, nvmet_target, io_queues=queues, hdr_digest=digests, data_digest=digests)


@pytest.mark.parametrize("sqflow", [False, True], ids=["capsule-resp", "data-success"])
def test_reads_end_with_response_or_success_flag(nvmet_target, sqflow):
    """nvmet ends a read with C2HData SUCCESS (no response capsule) when SQ
    flow control is disabled at Connect, else with a CapsuleResp."""
    async def body(c, tr):
        ns = c.namespaces[1]
        data = os.urandom(8192)
        await ns.write(100, data)
        for _ in range(4):
            assert bytes(await ns.read(100, 16)) == data
        return conn_stats(tr)[1]
    st = run(body, nvmet_target, disable_sqflow=sqflow)
    assert (st["c2h_success"] >= 4) if sqflow else (st["c2h_success"] == 0), st


def test_large_io_is_split_at_the_transfer_limit(nvmet_target):
    """nvmet reports MDTS 0 (no limit); with a 64 KiB cap a 1 MiB write and
    read are 16 commands each, and the data is whole."""
    async def body(c, tr):
        ns = c.namespaces[1]
        q = c.io_qs[0].qp
        before = q.stats()["submitted"]
        data = os.urandom(MiB)
        await ns.write(4096, data)
        back = bytes(await ns.read(4096, MiB // 512))
        return back == data, q.stats()["submitted"] - before
    same, n = run(body, nvmet_target, ctrl={"max_transfer": 64 << 10})
    assert same and n == 32


def test_one_line_errors(nvmet_target, tmp_path):
    t = nvmet_target
    cases = [
        (url(t, "nqn.2024-01.io.nvmefs:nothing"), [], "has no subsystem nqn.2024-01.io.nvmefs:nothing"),
        (url(t, t.restricted_nqn), [], "does not allow host"),
        (f"nvme-tcp://127.0.0.1:{_closed_port()}/{t.subnqn}", [], "connection refused"),
    ]
    for dev, extra, text in cases:
        for verb in (["id-ctrl", "--device", dev], ["mount", str(tmp_path), "--device", dev]):
            r = run_cli(*verb, *extra, timeout=60)
            assert r.returncode == 1 and text in r.stderr, (verb, r.returncode, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.ismount(tmp_path)
    r = run_cli("id-ctrl", "--device", "nvme-tcp://hostonly")
    assert r.returncode == 2 and "expected nvme-tcp://HOST[:PORT]/SUBNQN" in r.stderr
    # the allowed host gets in
    r = run_cli("id-ctrl", "--device", url(t, t.restricted_nqn), "--hostnqn", t.allowed_hostnqn, "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["subnqn"] == t.restricted_nqn


def test_admin_verbs(nvmet_target):
    """The admin verbs on a controller reached over TCP (nothing mounted)."""
    dev = url(nvmet_target)
    for verb, want in ((["list"], "nvme0n1"), (["id-ns", "-n", "1"], "lba_size : 512"),
                       (["smart-log"], "critical_warning"), (["error-log"], ""),
                       (["get-feature", "-f", "7"], "get-feature:0x07"), (["list-ns"], "0x1")):
        r = run_cli(*verb, "--device", dev, timeout=60)
        assert r.returncode == 0 and want in r.stdout, (verb, r.stdout, r.stderr)
    r = run_cli("id-ctrl", "--device", dev, "-o", "json", "--hdr-digest", "--data-digest")
    assert r.returncode == 0 and json.loads(r.stdout)["subnqn"] == nvmet_target.subnqn


def _closed_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- the FUSE mount over TCP -------------------------------------------------------

class Mount:
    def __init__(self, mnt, t, *extra):
        self.mnt = str(mnt)
        os.makedirs(self.mnt, exist_ok=True)
        self.proc = start_daemon("mount", self.mnt, "--device", url(t), *extra)

    def __enter__(self):
        try:
            wait_for_mount(self.proc, self.mnt, timeout=60)
        except BaseException:
            stop(self.proc, self.mnt)
            raise
        return self

    def __exit__(self, *exc):
        rc = stop(self.proc, self.mnt)
        if exc[0] is None:
            assert rc == 0, f"nvmefs exited with {rc}:\n{output(self.proc)[1]}"


def fio(*args, timeout=600):
    r = subprocess.run(["fio", *args, "--output-format=json"], capture_output=True, text=True, timeout=timeout)
    res = json.loads(r.stdout[r.stdout.index("{"):]) if "{" in r.stdout else None
    return r.returncode, res, r.stderr


@pytest.fixture
def prerequisites():
    require_root_fuse()
    require(shutil.which("fio"), "fio")


def test_mount_dd_fio_and_ext4(nvmet_target, tmp_path, prerequisites):
    t = nvmet_target
    mnt = tmp_path / "mnt"
    fsmnt = tmp_path / "ext4"
    fsmnt.mkdir()
    with Mount(mnt, t, "--lanes", "2"):
        dev = os.path.join(mnt, "nvme0n1")
        assert os.stat(dev).st_size == t.namespace_size
        src = os.urandom(3 * MiB + 4096)
        (tmp_path / "src").write_bytes(src)
        sh("dd", f"if={tmp_path / 'src'}", f"of={dev}", "bs=1M", "oflag=direct", "conv=notrunc,fsync")
        with open(dev, "rb") as f:
            assert f.read(len(src)) == src
        rc, res, err = fio("--name=verify", f"--filename={dev}", "--ioengine=libaio", "--iodepth=16",
                           "--direct=1", "--rw=randwrite", "--bsrange=512-64k", "--ba=512", "--size=8M",
                           "--offset=16M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                           "--verify_state_save=0")
        assert rc == 0 and res["jobs"][0]["error"] == 0, err
        st = stats(mnt)
        assert st["transport"] == url(t)
        conns = st["transport_stats"]["connections"]
        assert len(conns) == 1 + 1 + 2 and sum(c["r2t"] for c in conns) > 0    # admin, trio, 2 lanes
        r = run_cli("stats", str(mnt))
        assert r.returncode == 0 and "nvme-tcp: association live, 1 made, 0 lost" in r.stdout, r.stdout
        # a target serves several controllers: a verb naming the device makes
        # its own association; with --mount it runs on the mount's controller
        r = run_cli("id-ctrl", "--device", url(t), "-o", "json")
        assert r.returncode == 0 and json.loads(r.stdout)["cntlid"] != st["transport_stats"]["cntlid"], r.stderr
        r = run_cli("id-ctrl", "--mount", str(mnt), "-o", "json")
        assert r.returncode == 0 and json.loads(r.stdout)["cntlid"] == st["transport_stats"]["cntlid"], r.stderr
        want = ext4_fill(dev, fsmnt, os.path.join(ROOT, "nvmefs"),
                         shutil.ignore_patterns("*.so", "__pycache__"))
    with Mount(mnt, t, "--lanes", "1"):
        ext4_check(os.path.join(mnt, "nvme0n1"), fsmnt, want)


def test_connection_cut_mid_fio_is_survived(nvmet_target, tmp_path, prerequisites):
    """The target drops every connection of the subsystem (its port link is
    removed, then restored 3 s later) while fio writes and verifies: the
    driver reconnects, resubmits, and fio sees no error and no mismatch."""
    t = nvmet_target
    mnt = tmp_path / "mnt"
    with Mount(mnt, t, "--lanes", "2", "--reconnect-delay", "1", "--ctrl-loss-tmo", "60"):
        dev = os.path.join(mnt, "nvme0n1")
        fio_proc = subprocess.Popen(
            ["fio", "--name=cut", f"--filename={dev}", "--ioengine=libaio", "--iodepth=8", "--direct=1",
             "--rw=randwrite", "--bs=4k", "--size=12M", "--verify=crc32c", "--verify_fatal=1",
             "--do_verify=1", "--verify_state_save=0", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while sum(ln["writes"] for ln in stats(mnt)["lanes"]["lanes"]) < 200:
                assert fio_proc.poll() is None and time.monotonic() < deadline, "fio did not get going"
                time.sleep(0.1)
            t.drop_port()
            time.sleep(3)
            t.restore_port()
            out, err = fio_proc.communicate(timeout=300)
        finally:
            if fio_proc.poll() is None:
                fio_proc.kill()
        res = json.loads(out[out.index("{"):])
        assert fio_proc.returncode == 0 and res["jobs"][0]["error"] == 0, err
        st = stats(mnt)
        ts = st["transport_stats"]
        assert ts["connection_losses"] >= 1 and ts["associations"] >= 2, ts
        assert st["resets"] >= 1 and st["ready"]
        assert sum(ln["errors"] for ln in st["lanes"]["lanes"]) == 0


def test_loss_timeout_fails_requests_and_the_mount_lives(nvmet_target, tmp_path, prerequisites):
    """With the subsystem gone for longer than --ctrl-loss-tmo, requests end
    with EIO (not a hang); the mount still answers and unmounts cleanly."""
    t = nvmet_target
    mnt = tmp_path / "mnt"
    try:
        with Mount(mnt, t, "--lanes", "1", "--reconnect-delay", "1", "--ctrl-loss-tmo", "4",
                   "--keep-alive-tmo", "2"):
            dev = os.path.join(mnt, "nvme0n1")
            with open(dev, "rb", buffering=0) as f:
                assert len(f.read(4096)) == 4096
            t.drop_port()
            start = time.monotonic()
            fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
            try:
                buf = bytearray(4096)
                with pytest.raises(OSError) as exc:
                    # the first reads may still be answered before the cut is seen
                    for _ in range(1000):
                        os.preadv(fd, [memoryview(buf)], 0)
                        time.sleep(0.05)
                assert exc.value.errno == 5
            finally:
                try:
                    os.close(fd)
                except OSError as e:       # FLUSH at close fails the same way
                    assert e.errno == 5
            assert time.monotonic() - start < 60
            assert os.path.ismount(mnt)
            ts = stats(mnt)["transport_stats"]
            assert ts["state"] == "failed", ts
    finally:
        t.restore_port()


def test_a_target_that_stops_answering_is_reconnected(nvmet_target, tmp_path, prerequisites):
    """The target's machine freezes for 5 s (its QEMU process stopped):
    Keep Alive (KATO 2 s) goes unanswered, the driver drops the association
    and reconnects once the target is back; a read issued during the freeze
    completes afterwards with the data written before it, and the file
    closes cleanly.  (The read runs in a thread: forking while the guest is
    stopped was seen to stall the forking process.)"""
    import mmap
    import signal
    import threading
    t = nvmet_target
    mnt = tmp_path / "mnt"
    with Mount(mnt, t, "--lanes", "1", "--keep-alive-tmo", "2", "--reconnect-delay", "1",
               "--ctrl-loss-tmo", "60") as m:
        dev = os.path.join(mnt, "nvme0n1")
        data = mmap.mmap(-1, MiB)
        data.write(os.urandom(MiB))
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        res = {}

        def reader():
            back = mmap.mmap(-1, MiB)
            try:
                res["n"] = os.preadv(fd, [back], 40 * MiB)
                res["same"] = back[:] == data[:]
            except OSError as exc:
                res["error"] = exc
        try:
            assert os.pwritev(fd, [data], 40 * MiB) == MiB
            os.kill(t.proc.pid, signal.SIGSTOP)
            try:
                th = threading.Thread(target=reader)
                th.start()
                time.sleep(5)
            finally:
                os.kill(t.proc.pid, signal.SIGCONT)
            th.join(120)
            assert res == {"n": MiB, "same": True}, res
        finally:
            os.close(fd)
        ts = stats(mnt)["transport_stats"]
        assert ts["connection_losses"] >= 1 and ts["associations"] >= 2 and ts["state"] == "live", ts
        assert "answer" in output(m.proc)[1]
