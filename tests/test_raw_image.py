"""Raw disk images and block devices behind the software controller: one
namespace over the whole of it, checked byte for byte against the
original, never rewritten with a header; the bad cases get one clear line."""
import json
import os
import shutil

import pytest

from conftest import require
from lanehelp import same
from mounthelp import mounted, read_only_copy, run_cli, sh
from nvmefs.controller import ADM_FORMAT, open_controller
from nvmefs.errors import NvmeError
from nvmefs.transport import ModelTransport

MiB = 1 << 20
FIRST = b"first bytes are the user's"


def test_a_raw_image_is_served_as_it_is_and_written_in_place(root_fuse, tmp_path):
    raw = tmp_path / "disk.raw"
    ref = bytearray(os.urandom(8 * MiB + 512))      # not a multiple of 4 KiB: 512-byte LBAs serve it all
    raw.write_bytes(ref)
    mnt = str(tmp_path / "mnt")
    with mounted(mnt, str(raw)):
        dev = os.path.join(mnt, "nvme0n1")
        assert os.path.getsize(dev) == len(ref)
        with open(dev, "rb") as f:
            assert same(f.read(), bytes(ref))
        with open(dev, "r+b", buffering=0) as f:
            f.seek(0)
            f.write(FIRST)                             # where an nvmefs header would be
            f.seek(5 * MiB + 3)
            f.write(b"x" * 70000)
        ref[0:len(FIRST)] = FIRST
        ref[5 * MiB + 3:5 * MiB + 3 + 70000] = b"x" * 70000
        st = json.loads(os.getxattr(mnt, "user.nvmefs.stats"))
        assert "(raw)" in st["transport"], st["transport"]
    assert same(raw.read_bytes(), bytes(ref))


def test_a_block_device_with_4k_lbas(root_fuse, tmp_path):
    require(shutil.which("losetup"), "losetup (package util-linux)")
    back = tmp_path / "back.raw"
    ref = bytearray(os.urandom(16 * MiB))
    back.write_bytes(ref)
    loop = sh("losetup", "-f", "--show", str(back)).strip()
    try:
        mnt = str(tmp_path / "mnt")
        with mounted(mnt, loop, "--lba-size", "4096"):
            dev = os.path.join(mnt, "nvme0n1")
            assert os.path.getsize(dev) == len(ref)
            assert os.stat(dev).st_blksize == 4096
            fd = os.open(dev, os.O_RDWR)
            try:
                assert same(os.pread(fd, len(ref), 0), bytes(ref))
                os.pwrite(fd, b"\x5a" * 10000, 3 * MiB + 100)    # unaligned: read-modify-write
                ref[3 * MiB + 100:3 * MiB + 10100] = b"\x5a" * 10000
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        sh("losetup", "-d", loop)
    assert same(back.read_bytes(), bytes(ref))


def test_create_image_raw_and_its_errors(root_fuse, tmp_path):
    raw = tmp_path / "new.raw"
    r = run_cli("create-image", str(raw), "--raw", "--size", "4M")
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(raw) == 4 * MiB and raw.read_bytes() == bytes(4 * MiB)
    r = run_cli("list", "--image", str(raw), "--json")
    assert r.returncode == 0, r.stderr
    assert [(x["lba_size"], x["lbas"]) for x in json.loads(r.stdout)] == [(512, 8192)]
    assert raw.read_bytes() == bytes(4 * MiB), "an admin command wrote to the raw image"

    def bad(args, needle):
        r = run_cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and needle in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr

    bad(["create-image", str(tmp_path / "two.raw"), "--raw", "--namespaces", "2"], "one namespace")
    assert not os.path.exists(tmp_path / "two.raw")
    bad(["create-image", str(raw), "--raw"], "already exists")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tiny = tmp_path / "tiny.raw"
    tiny.write_bytes(b"\1" * 1000)
    bad(["mount", str(mnt), "--image", str(tiny)], "too small")
    assert tiny.read_bytes() == b"\1" * 1000
    with read_only_copy(raw, tmp_path, "disk.raw") as ro_raw:
        bad(["mount", str(mnt), "--image", ro_raw], "not writable")
    assert not os.path.ismount(mnt)


async def test_format_on_a_raw_image_erases_but_keeps_its_lba_size(tmp_path):
    raw = tmp_path / "fmt.raw"
    raw.write_bytes(b"\xee" * (2 * MiB))
    t = ModelTransport(str(raw), create=False, arena_size=64 * MiB)
    try:
        assert t.model.raw
        async with open_controller(t, io_queues=1) as c:
            ns = c.namespaces[1]
            assert (ns.lba_size, ns.nlbas) == (512, 4096)
            assert await ns.read(0, 1) == b"\xee" * 512
            with pytest.raises(NvmeError) as e:
                await c.admin(ADM_FORMAT, nsid=1, cdw10=1)              # to 4 KiB LBAs
            assert e.value.name == "INVALID_FORMAT"
            await c.admin(ADM_FORMAT, nsid=1, cdw10=1 << 9)             # 512 B, user data erase
            assert await ns.read(0, 4096) == bytes(2 * MiB)
    finally:
        t.close()
    assert raw.read_bytes() == bytes(2 * MiB)


def test_a_mounted_block_device_is_refused(root_fuse, tmp_path):
    require(shutil.which("losetup"), "losetup (package util-linux)")
    require(shutil.which("mkfs.ext4"), "mkfs.ext4 (package e2fsprogs)")
    back = tmp_path / "fs.raw"
    back.write_bytes(bytes(16 * MiB))
    loop = sh("losetup", "-f", "--show", str(back)).strip()
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        sh("mkfs.ext4", "-q", loop)
        sh("mount", loop, str(fsdir))
        try:
            r = run_cli("mount", str(mnt), "--image", loop)
            lines = r.stderr.strip().splitlines()
            assert r.returncode != 0 and len(lines) == 1 and "in use" in lines[0], r.stderr
            assert not os.path.ismount(mnt)
        finally:
            sh("umount", str(fsdir))
    finally:
        sh("losetup", "-d", loop)
