"""Namespaces that come and go under a running mount: `nvmefs create-ns /
attach-ns / detach-ns / delete-ns / format` handed to the mount's controller,
the files appearing and going live, the Asynchronous Event path on its own,
and the bad cases (one line, a non-zero exit, nothing lost)."""
import hashlib
import json
import os
import struct

import pytest
import trio

from mounthelp import mounted, run_cli, sh, stats
from nvmefs.controller import ADM_NS_ATTACH, open_controller
from nvmefs.transport import ModelTransport

MiB = 1 << 20


def cli(*args):
    r = run_cli(*args)
    return r.returncode, r.stdout.strip(), r.stderr.strip()


def ok(*args):
    rc, out, err = cli(*args)
    assert rc == 0, f"nvmefs {' '.join(args)} exited {rc}: {err}"
    return out


def fails(rc_want, *args):
    rc, out, err = cli(*args)
    assert rc == rc_want, f"nvmefs {' '.join(args)} exited {rc}, not {rc_want}: {out} {err}"
    assert len(err.splitlines()) == 1 and err.startswith("nvmefs") and " error: " in err, err
    return err


def digest(path, nbytes):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(nbytes)).hexdigest()


@pytest.fixture
def drive(root_fuse, tmp_path):
    """An image with 16 MiB in namespace 1 and 48 MiB unallocated, mounted."""
    img = str(tmp_path / "img")
    ok("create-image", img, "--size", "16M", "--capacity", "64M")
    mnt = str(tmp_path / "mnt")
    with mounted(mnt, img) as proc:
        yield img, mnt, proc


def test_create_attach_write_detach_delete_on_a_running_mount(drive):
    img, mnt, _proc = drive
    ns1 = os.path.join(mnt, "nvme0n1")
    sh("dd", "if=/dev/urandom", f"of={ns1}", "bs=1M", "count=16", "oflag=direct", "status=none")
    before = digest(ns1, 16 * MiB)

    # the image is held by the mount: the verbs find the mount by its image
    assert ok("create-ns", "--image", img, "--nsze-si", "24M", "-b", "4096") == "create-ns: Success, created nsid:2"
    assert sorted(os.listdir(mnt)) == ["nvme0n1"]              # created, not attached
    rows = json.loads(ok("list-ns", "--image", img, "--all", "-o", "json"))
    assert [(r["nsid"], r["attached"], r["size"]) for r in rows] == [(1, True, 16 * MiB), (2, False, 24 * MiB)]

    assert ok("attach-ns", "--mount", mnt, "-n", "2") == "attach-ns: Success, nsid:2"
    ns2 = os.path.join(mnt, "nvme0n2")
    assert sorted(os.listdir(mnt)) == ["nvme0n1", "nvme0n2"]
    st = os.stat(ns2)
    assert (st.st_size, st.st_blksize) == (24 * MiB, 4096)
    with open(ns2, "rb") as f:
        assert f.read() == bytes(24 * MiB)                     # a new namespace reads zeroes
    sh("dd", "if=/dev/urandom", f"of={ns2}", "bs=1M", "count=24", "oflag=direct", "status=none")
    sh("fio", "--name=v", f"--filename={ns2}", "--rw=randwrite", "--bs=4k", "--size=8M", "--direct=1",
       "--ioengine=libaio", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
       "--output=/dev/null")
    two = digest(ns2, 24 * MiB)
    assert digest(ns1, 16 * MiB) == before                     # namespace 1 untouched
    # one event for the attach: the controller told the driver, which read log 04h
    st = stats(mnt)
    assert st["async_events"] == 1 and st["namespaces"]["nvme0n2"]["size"] == 24 * MiB

    assert ok("detach-ns", "--mount", mnt, "-n", "2") == "detach-ns: Success, nsid:2"
    assert sorted(os.listdir(mnt)) == ["nvme0n1"]
    assert not os.path.exists(ns2)
    assert stats(mnt)["async_events"] == 2
    assert ok("attach-ns", "--image", img, "-n", "2")
    assert digest(ns2, 24 * MiB) == two                        # detached is not deleted
    assert ok("detach-ns", "--image", img, "-n", "2")
    assert ok("delete-ns", "--image", img, "-n", "2") == "delete-ns: Success, deleted nsid:2"
    assert json.loads(ok("list-ns", "--image", img, "--all", "-o", "json"))[-1]["nsid"] == 1
    assert digest(ns1, 16 * MiB) == before


def test_the_table_outlives_the_mount(drive, tmp_path):
    img, mnt, proc = drive
    ok("create-ns", "--image", img, "--nsze-si", "8M")
    ok("create-ns", "--image", img, "--nsze-si", "4M")
    ok("attach-ns", "--image", img, "-n", "3")
    sh("dd", "if=/dev/urandom", f"of={mnt}/nvme0n3", "bs=1M", "count=4", "oflag=direct", "status=none")
    three = digest(f"{mnt}/nvme0n3", 4 * MiB)
    sh("fusermount3", "-u", mnt)
    assert proc.wait(60) == 0
    # not mounted: the same verbs bring a controller up on the image themselves
    rows = json.loads(ok("list-ns", "--image", img, "--all", "-o", "json"))
    assert [(r["nsid"], r["attached"]) for r in rows] == [(1, True), (2, False), (3, True)]
    ok("attach-ns", "--image", img, "-n", "2")
    mnt2 = str(tmp_path / "mnt2")
    with mounted(mnt2, img):
        assert sorted(os.listdir(mnt2)) == ["nvme0n1", "nvme0n2", "nvme0n3"]
        assert digest(f"{mnt2}/nvme0n3", 4 * MiB) == three
        assert os.path.getsize(f"{mnt2}/nvme0n2") == 8 * MiB


def test_in_use_namespaces_are_not_pulled_away(drive):
    img, mnt, _proc = drive
    ns1 = os.path.join(mnt, "nvme0n1")
    with open(ns1, "rb"):
        err = fails(2, "detach-ns", "--image", img, "-n", "1")
        assert "nvme0n1 (1 open file(s)) in use" in err and "--force" in err
        fails(2, "delete-ns", "--image", img, "-n", "1")
        fails(2, "format", "--image", img, "-n", "1", "--lba-size", "4096")
        assert os.listdir(mnt) == ["nvme0n1"]
    loop = sh("losetup", "-f", "--show", "--direct-io=on", ns1).strip()
    try:
        fails(2, "delete-ns", "--image", img, "-n", "0xffffffff")
    finally:
        sh("losetup", "-d", loop)
    assert stats(mnt)["namespaces"]["nvme0n1"]["open_files"] == 0


def test_forced_detach_fails_io_on_open_files(drive):
    img, mnt, _proc = drive
    fd = os.open(os.path.join(mnt, "nvme0n1"), os.O_RDWR | os.O_DIRECT)
    try:
        buf = bytearray(4096)
        assert os.preadv(fd, [buf], 0) == 4096
        ok("detach-ns", "--image", img, "-n", "1", "--force")
        assert os.listdir(mnt) == []
        with pytest.raises(OSError):
            os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
    ok("attach-ns", "--image", img, "-n", "1")
    assert os.listdir(mnt) == ["nvme0n1"]


def test_format_on_a_running_mount_switches_the_lanes(drive):
    img, mnt, _proc = drive
    ns1 = os.path.join(mnt, "nvme0n1")
    assert os.stat(ns1).st_blksize == 512
    ok("format", "--image", img, "-n", "1", "--lba-size", "4096")
    assert os.stat(ns1).st_blksize == 4096
    data = os.urandom(8192)
    fd = os.open(ns1, os.O_RDWR | os.O_DIRECT)
    try:
        buf = bytearray(8192)
        buf[:] = data
        assert os.pwritev(fd, [buf], 4096) == 8192
        out = bytearray(8192)
        assert os.preadv(fd, [out], 4096) == 8192 and out == data
        # the lanes took the new LBA size: a 512-byte write is now a
        # read-modify-write of one 4 KiB block (it was a plain write before)
        rmw = sum(ln["rmw"] for ln in stats(mnt)["lanes"]["lanes"])
        assert os.pwrite(fd, b"\xee" * 512, 4096 + 512) == 512
        assert sum(ln["rmw"] for ln in stats(mnt)["lanes"]["lanes"]) == rmw + 1
        assert os.preadv(fd, [out], 4096) == 8192
        assert out == data[:512] + b"\xee" * 512 + data[1024:]
    finally:
        os.close(fd)
    assert json.loads(ok("id-ns", "--image", img, "-n", "1", "-o", "json"))["lba_size"] == 4096


def test_bad_requests_get_one_line_and_change_nothing(drive, tmp_path):
    img, mnt, _proc = drive
    assert "Insufficient Capacity" in fails(1, "create-ns", "--image", img, "--nsze-si", "49M")
    assert "not a whole number of 4 KiB" in fails(2, "create-ns", "--image", img, "--nsze", "3")
    fails(2, "create-ns", "--image", img)
    assert "INVALID_FIELD" in fails(1, "delete-ns", "--image", img, "-n", "9")
    assert "ALREADY_ATTACHED" in fails(1, "attach-ns", "--image", img, "-n", "1")
    assert "CONTROLLER_LIST_INVALID" in fails(1, "detach-ns", "--image", img, "-n", "1", "-c", "7", "--force")
    assert "does not exist or is not attached" in fails(1, "id-ns", "--image", img, "-n", "5")
    fails(2, "attach-ns", "--image", img, "-n", "1", "-c", "x")
    other = tmp_path / "plain"
    other.mkdir()
    assert "not a running nvmefs mount" in fails(2, "list-ns", "--mount", str(other))
    assert os.listdir(mnt) == ["nvme0n1"]
    rows = json.loads(ok("list-ns", "--image", img, "--all", "-o", "json"))
    assert [(r["nsid"], r["attached"]) for r in rows] == [(1, True)]
    assert stats(mnt)["async_events"] == 0


def test_an_empty_drive(root_fuse, tmp_path):
    img = str(tmp_path / "img")
    assert "0 namespace(s)" in ok("create-image", img, "--size", "32M", "--namespaces", "0")
    mnt = str(tmp_path / "mnt")
    with mounted(mnt, img):
        assert os.listdir(mnt) == []
        ok("create-ns", "--image", img, "--nsze-si", "32M")
        ok("attach-ns", "--image", img, "-n", "1")
        assert os.listdir(mnt) == ["nvme0n1"]
        sh("mkfs.ext4", "-q", "-F", os.path.join(mnt, "nvme0n1"))
        assert "Insufficient Capacity" in fails(1, "create-ns", "--image", img, "--nsze", "8")


def test_an_event_alone_makes_the_driver_rescan(tmp_path):
    """Attachment sent behind the driver's back (execute() skips the effects
    rescan admin() does): only the Asynchronous Event and log 04h can tell
    the driver, and they do."""
    img = str(tmp_path / "img")
    from nvmefs import _model
    _model.create_image(img, ((8 * MiB, 512),), capacity=32 * MiB)

    async def main():
        t = ModelTransport(img, create=False)
        try:
            async with open_controller(t, io_queues=1) as c:
                seen = []
                c.namespace_listeners.append(lambda before, after: seen.append((sorted(before), sorted(after))))
                nsid = await c.create_namespace(2048)
                assert nsid == 2 and sorted(c.namespaces) == [1]
                buf = t.arena.alloc(4096)
                memoryview(buf)[:4] = struct.pack("<HH", 1, c.id_ctrl["cntlid"])
                await c.execute(c.admin_q, ADM_NS_ATTACH, nsid=2, cdw10=0, segments=[(buf.iova, 4096)])
                with trio.fail_after(5):
                    while 2 not in c.namespaces:
                        await trio.sleep(0.005)
                assert c.async_events == 1 and seen[-1] == ([1], [1, 2])
                assert c.namespaces[2].size == 1 * MiB
                await c.namespaces[2].write(0, b"\x5a" * 4096)
                assert bytes(await c.namespaces[2].read(0, 8)) == b"\x5a" * 4096
                # and the event is armed again: a detach behind its back too
                await c.execute(c.admin_q, ADM_NS_ATTACH, nsid=2, cdw10=1, segments=[(buf.iova, 4096)])
                with trio.fail_after(5):
                    while 2 in c.namespaces:
                        await trio.sleep(0.005)
                assert c.async_events == 2
                buf.free()
        finally:
            t.close()
    trio.run(main)
