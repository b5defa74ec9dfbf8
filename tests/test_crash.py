"""Crash consistency: kill -9 of the daemon while a writer fsyncs every few
writes.  After a remount every fsync'd block reads back, no LBA is torn
(each is some complete write of it, or never written), and the image
records the unsafe shutdown."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import require_root_fuse
from mounthelp import mounted, run_cli, start_daemon, wait_for_mount

MiB = 1 << 20
LBA, BLOCK, BLOCKS = 512, 4096, 4096          # 16 MiB of 4 KiB blocks, 8 LBAs each

# Writes random 4 KiB blocks with O_DIRECT; each 512-byte LBA carries
# (block, generation, lba index) and a CRC of the rest, so a torn or mixed
# block shows.  After every FSYNC_EVERY writes it fsyncs the device file,
# then records every block written since as durable (log on local disk,
# itself fsync'd).  It stops at the first error: the daemon is gone.
WRITER = r"""
import mmap, os, random, struct, sys, zlib
dev, log_path, every = sys.argv[1], sys.argv[2], int(sys.argv[3])
LBA, BLOCK, BLOCKS = 512, 4096, 4096
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
log = open(log_path, "a")
buf = mmap.mmap(-1, BLOCK)
gen, pending, rnd = {}, [], random.Random(7)
print("ready", flush=True)
try:
    while True:
        b = rnd.randrange(BLOCKS)
        g = gen.get(b, 0) + 1
        for k in range(BLOCK // LBA):
            body = struct.pack("<IIII", b, g, k, rnd.getrandbits(32)) + os.urandom(LBA - 20)
            buf[k * LBA:(k + 1) * LBA] = body + struct.pack("<I", zlib.crc32(body))
        os.pwrite(fd, buf, b * BLOCK)
        gen[b] = g
        pending.append((b, g))
        if len(pending) >= every:
            os.fsync(fd)
            log.write("".join(f"{b} {g}\n" for b, g in pending))
            log.flush()
            os.fsync(log.fileno())
            pending = []
except OSError:
    pass
"""


@pytest.fixture(autouse=True)
def prerequisites():
    require_root_fuse()


def unsafe_shutdowns(img):
    r = run_cli("smart-log", "--image", img, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["unsafe_shutdowns"]


def check_lbas(data, durable):
    """Every LBA a complete record of its own block and position (or zero);
    every durable block at least as new as recorded, all its LBAs from one
    write."""
    import struct
    import zlib
    seen = {}
    for off in range(0, len(data), LBA):
        lba = data[off:off + LBA]
        if lba == bytes(LBA):
            continue
        body, crc = lba[:-4], struct.unpack("<I", lba[-4:])[0]
        assert zlib.crc32(body) == crc, f"torn LBA at byte {off}"
        b, g, k, tag = struct.unpack_from("<IIII", body)
        assert (b, k) == divmod(off // LBA, BLOCK // LBA), f"LBA at byte {off} holds block {b} part {k}"
        seen.setdefault(b, set()).add((g, tag))
    for b, parts in seen.items():
        gens = {g for g, _ in parts}
        assert len(gens) == 1, f"block {b} mixes writes {sorted(gens)}"
    for b, g in durable.items():
        assert b in seen, f"fsync'd block {b} (write {g}) is gone"
        assert next(iter(seen[b]))[0] >= g, f"block {b}: write {g} was fsync'd, found an older one"


def test_kill_9_during_fsyncing_writes_loses_nothing_fsyncd(tmp_path):
    mnt, img, log = str(tmp_path / "mnt"), str(tmp_path / "crash.img"), str(tmp_path / "durable.log")
    assert run_cli("create-image", img, "--size", "16M").returncode == 0
    before = unsafe_shutdowns(img)
    os.makedirs(mnt)
    daemon = start_daemon("mount", mnt, "--image", img)
    writer = None
    try:
        wait_for_mount(daemon, mnt)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, os.path.join(mnt, "nvme0n1"), log, "8"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
        deadline = time.monotonic() + 60
        while (not os.path.exists(log) or os.path.getsize(log) < 20000) and time.monotonic() < deadline:
            assert writer.poll() is None, writer.stderr.read()
            time.sleep(0.05)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=30)
        writer.wait(timeout=60)
        assert writer.returncode == 0, writer.stderr.read()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
    durable = {}
    with open(log) as f:
        for line in f:
            b, g = map(int, line.split())
            durable[b] = max(durable.get(b, 0), g)
    assert len(durable) > 100, f"only {len(durable)} blocks fsync'd before the kill"
    with mounted(mnt, img):
        with open(os.path.join(mnt, "nvme0n1"), "rb") as f:
            data = f.read(BLOCKS * BLOCK)
    check_lbas(data, durable)
    # opened while still marked in use: SMART counts the unsafe shutdown
    assert unsafe_shutdowns(img) == before + 1
    # and a clean unmount is not one
    with mounted(mnt, img):
        pass
    assert unsafe_shutdowns(img) == before + 1


def test_the_check_sees_a_torn_block_a_lost_one_and_an_old_one():
    import struct
    import zlib

    def block(b, g):
        out = b""
        for k in range(BLOCK // LBA):
            body = struct.pack("<IIII", b, g, k, g * 31 + k) + bytes(LBA - 20)
            out += body + struct.pack("<I", zlib.crc32(body))
        return out
    disk = bytearray(8 * BLOCK)
    disk[BLOCK:2 * BLOCK] = block(1, 2)
    check_lbas(bytes(disk), {1: 2})
    with pytest.raises(AssertionError, match="older"):
        check_lbas(bytes(disk), {1: 3})
    with pytest.raises(AssertionError, match="gone"):
        check_lbas(bytes(disk), {2: 1})
    mixed = bytearray(disk)
    mixed[BLOCK + LBA:BLOCK + 2 * LBA] = block(1, 3)[LBA:2 * LBA]
    with pytest.raises(AssertionError, match="mixes"):
        check_lbas(bytes(mixed), {1: 2})
    torn = bytearray(disk)
    torn[BLOCK + 100] ^= 1
    with pytest.raises(AssertionError, match="torn"):
        check_lbas(bytes(torn), {})
