"""The lanes (_core/lane.pyx, lane_io.pyx, nvmefs/lanes.py): FUSE requests
in, NVMe commands on each lane's own queue pair, FUSE replies out, with
real lane threads reading sockets that stand in for /dev/fuse
(lanehelp.py).  Counters checked here are exact; nothing depends on
timing.  The real mount is in test_mount.py."""
import errno
import os
import random
import struct
import threading

import pytest
import trio

from lanehelp import (FUSE_GETATTR, FUSE_WRITE, KEEP, MiB, KiB, NODE, PUNCH, ZERO, fallocate_req, flush_req, fsync_req, header,
                      interrupt_req, lanes_rig, read_req, same, write_req)
from nvmefs import _core

IO_FLUSH, IO_WRITE, IO_READ, IO_WRITE_ZEROES, IO_DSM = 0x00, 0x01, 0x02, 0x08, 0x09


def io_commands(rig, opcode):
    return rig.model.stats()["io_commands"].get(opcode, 0)


async def test_requests_are_all_at_the_controller_at_once_and_answered_once():
    """32 writes sent before the lane can answer any are 32 commands in
    flight together (the model holds them: delay), each answered once;
    reads of any byte window come back exact."""
    async with lanes_rig() as rig:
        data = os.urandom(32 * 4 * KiB)
        rig.model.inject(IO_WRITE, action="delay", delay_ms=300, count=32)
        uniques = [rig.send(0, write_req, i * 4 * KiB, data[i * 4 * KiB:(i + 1) * 4 * KiB]) for i in range(32)]
        got = await rig.wait(*uniques)
        assert [err for err, _ in got] == [0] * 32
        assert [struct.unpack("<II", body)[0] for _, body in got] == [4 * KiB] * 32
        st = rig.stats()[0]
        assert st["max_in_flight"] == 32 and st["writes"] == 32 and st["commands"] == 32, st
        windows = [(0, len(data)), (100, 5000), (4095, 2), (12 * KiB + 7, 40 * KiB)]
        for off, size in windows:
            assert same(await rig.read(off, size), data[off:off + size])
        assert rig.stats()[0]["in_flight"] == 0


async def test_a_write_is_sent_from_inside_its_request_and_large_ones_are_split():
    """An aligned write's command points at the data 80 bytes into the
    request (no copy); a request larger than MDTS is several commands."""
    async with lanes_rig(model_kw={"mdts": 5}) as rig:      # 128 KiB per command
        data = os.urandom(MiB)
        assert await rig.write(0, data) == MiB
        st = rig.stats()[0]
        assert st["commands"] == 8 and st["split"] == 1 and st["rmw"] == 0, st
        assert same(await rig.read(0, MiB), data)
        assert rig.stats()[0]["commands"] == 16


async def test_unaligned_writes_read_modify_write_the_edge_lbas():
    """Byte-aligned and 512-aligned writes on 4 KiB LBAs, inside one LBA and
    across several: each reads back exact and leaves its neighbours alone."""
    async with lanes_rig() as rig:
        ref = bytearray(os.urandom(MiB))
        await rig.write(0, ref)
        rnd = random.Random(5)
        cases = [(1000, 5), (4095, 2), (512, 4096), (4096 * 3 + 17, 3 * 4096 + 100), (8192, 1000),
                 (0, 4097)] + [(rnd.randrange(MiB - 70000), rnd.randrange(1, 70000)) for _ in range(40)]
        for off, n in cases:
            chunk = os.urandom(n)
            assert await rig.write(off, chunk) == n
            ref[off:off + n] = chunk
        assert same(await rig.read(0, MiB), ref)
        assert rig.stats()[0]["rmw"] == len(cases)


async def test_writes_that_share_an_lba_never_lose_each_other():
    """Writes of disjoint bytes of the same LBAs, all in flight at once on
    two lanes: without the range lock a read-modify-write would put one
    write's old bytes back over the other's."""
    async with lanes_rig(cpus=(0, 1)) as rig:
        await rig.write(0, bytes(64 * KiB))
        # the first writes stay at the controller for a while, so their
        # neighbours must meet the range lock whatever the scheduling
        rig.model.inject(IO_WRITE, action="delay", delay_ms=50, count=4)
        ref = bytearray(64 * KiB)
        rnd = random.Random(9)
        for _ in range(20):
            uniques = []
            pos = 0
            while pos < 64 * KiB - 1:
                n = rnd.randrange(1, 3000)
                n = min(n, 64 * KiB - pos)
                chunk = bytes([rnd.randrange(1, 256)]) * n
                ref[pos:pos + n] = chunk
                uniques.append(rig.send(len(uniques) % 2, write_req, pos, chunk))
                pos += n
            got = await rig.wait(*uniques)
            assert all(err == 0 for err, _ in got)
        assert same(await rig.read(0, 64 * KiB), ref)
        assert rig.total("range_waits") > 0


async def test_overlapping_writes_run_in_arrival_order():
    """A write that overlaps one in flight waits for it (instead of being
    declined, or overtaking it): the later one's bytes win."""
    async with lanes_rig() as rig:
        rig.model.inject(IO_WRITE, action="delay", delay_ms=200, count=1)
        a = rig.send(0, write_req, 0, b"a" * 8192)
        b = rig.send(0, write_req, 100, b"b" * 50)          # read-modify-write inside a's range
        c = rig.send(0, write_req, 4096, b"c" * 4096)       # aligned, overlaps a too
        assert [err for err, _ in await rig.wait(a, b, c)] == [0, 0, 0]
        want = bytearray(b"a" * 8192)
        want[100:150] = b"b" * 50
        want[4096:8192] = b"c" * 4096
        assert same(await rig.read(0, 8192), want)
        assert rig.stats()[0]["range_waits"] == 2


async def test_writes_past_the_end_and_reads_at_it():
    async with lanes_rig(namespaces=((1 * MiB, 512),)) as rig:
        end = MiB
        assert await rig.write(end - 3, b"xyz!") == 3       # cut at the end, as a block device does
        err, _ = await rig.call(0, write_req, end, b"x")
        assert err == errno.ENOSPC
        assert await rig.read(end - 3, 100) == b"xyz"
        assert await rig.read(end, 100) == b""
        assert await rig.read(end + 4096, 100) == b""
        assert rig.stats()[0]["empty_reads"] == 2


@pytest.mark.parametrize("oncs,dlfeat,via", [
    (0x0C, 0x09, IO_WRITE_ZEROES),
    (0x04, 0x01, IO_DSM),
    (0x04, 0x00, IO_WRITE),          # deallocate promises nothing: zeroes are written
    (0x00, 0x00, IO_WRITE),
])
async def test_fallocate_by_controller_support(oncs, dlfeat, via):
    """PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE through the command the
    controller supports, partial edge LBAs by read-modify-write; refused
    modes EOPNOTSUPP, growth ENOSPC."""
    async with lanes_rig() as rig:
        rig.ctrl.id_ctrl["oncs"] = oncs
        rig.ns.info["dlfeat"] = dlfeat
        await rig.retable()
        data = bytearray(os.urandom(4 * MiB))
        await rig.write(0, data[:MiB])
        for k in range(1, 4):
            await rig.write(k * MiB, data[k * MiB:(k + 1) * MiB])
        before = {op: io_commands(rig, op) for op in (IO_READ, IO_WRITE, IO_WRITE_ZEROES, IO_DSM)}
        err, _ = await rig.call(0, fallocate_req, 100, 3 * 4096, PUNCH | KEEP)     # edges in LBAs 0 and 3
        assert err == 0
        data[100:100 + 3 * 4096] = bytes(3 * 4096)
        after = {op: io_commands(rig, op) - before[op] for op in before}
        assert after[IO_READ] == 2, after             # the two partial LBAs read back
        if via == IO_WRITE:
            assert after[IO_WRITE] == 3, after        # two edges and the zero buffer for LBAs 1-2
        else:
            assert after[via] == 1 and after[IO_WRITE] == 2, after
        err, _ = await rig.call(0, fallocate_req, MiB, 64 * KiB + 1, ZERO)
        assert err == 0
        data[MiB:MiB + 64 * KiB + 1] = bytes(64 * KiB + 1)
        err, _ = await rig.call(0, fallocate_req, 2 * MiB + 7, 13, PUNCH | KEEP)    # inside one LBA
        assert err == 0
        data[2 * MiB + 7:2 * MiB + 20] = bytes(13)
        assert same(await rig.read_all(0, 4 * MiB - 4096), data[:4 * MiB - 4096])
        assert (await rig.call(0, fallocate_req, 0, 4096, 0))[0] == errno.EOPNOTSUPP
        assert (await rig.call(0, fallocate_req, 0, 4096, KEEP))[0] == errno.EOPNOTSUPP
        assert (await rig.call(0, fallocate_req, rig.ns.size - 4096, 8192, ZERO))[0] == errno.ENOSPC
        # past the end with KEEP_SIZE: cut at the end
        assert (await rig.call(0, fallocate_req, rig.ns.size - 4096, 8192, ZERO | KEEP))[0] == 0
        assert rig.stats()[0]["fallocates"] == 4


async def test_flush_and_fsync_are_nvme_flushes():
    async with lanes_rig() as rig:
        before = io_commands(rig, IO_FLUSH)
        assert (await rig.call(0, flush_req))[0] == 0
        assert (await rig.call(0, fsync_req))[0] == 0
        # the root directory has nothing to flush
        assert (await rig.call(0, flush_req, nodeid=1))[0] == 0
        assert io_commands(rig, IO_FLUSH) - before == 2
        assert rig.stats()[0]["flushes"] == 3


async def test_a_failed_command_fails_only_its_request():
    """An unrecovered read error with DNR: that read gets EIO, is not
    retried, and is reported with its decoded status; the next request
    succeeds, and so does the same read once the fault is gone."""
    async with lanes_rig() as rig:
        await rig.write(0, b"\x42" * 8192)
        rig.model.inject(IO_READ, lba_start=0, lba_end=0, action="fail", sct=2, sc=0x81, dnr=True)
        err, _ = await rig.call(0, read_req, 0, 4096)
        assert err == errno.EIO
        assert await rig.read(4096, 4096) == b"\x42" * 4096
        assert await rig.read(0, 4096) == b"\x42" * 4096
        st = rig.stats()[0]
        assert st["errors"] == 1 and st["retries"] == 0, st
        with trio.fail_after(5):
            while not rig.lanes.stats()["recent_errors"]:
                await trio.sleep(0.01)
        (e,) = rig.lanes.stats()["recent_errors"]
        assert e["status"] == "UNRECOVERED_READ_ERROR" and e["op"] == "read" and e["lba"] == 0, e
        assert rig.ctrl.errors_by_status == {"UNRECOVERED_READ_ERROR": 1}


async def test_a_retryable_status_is_retried_in_the_lane():
    """Namespace Not Ready without DNR is transient: the lane submits the
    command again after a delay and the request succeeds; with DNR it is
    not retried."""
    async with lanes_rig() as rig:
        await rig.write(0, b"\x07" * 4096)
        rig.model.inject(IO_READ, action="fail", sct=0, sc=0x82, count=2)
        assert await rig.read(0, 4096) == b"\x07" * 4096
        st = rig.stats()[0]
        assert st["retries"] == 2 and st["errors"] == 0, st
        rig.model.inject(IO_READ, action="fail", sct=0, sc=0x82, dnr=True)
        assert (await rig.call(0, read_req, 0, 4096))[0] == errno.EIO
        # at most `retries` (3) more attempts, then EIO
        rig.model.inject(IO_WRITE, action="fail", sct=0, sc=0x82, count=0)
        assert (await rig.call(0, write_req, 0, b"z" * 4096))[0] == errno.EIO
        st = rig.stats()[0]
        assert st["retries"] == 2 + 3 and st["errors"] == 2, st
        rig.model.clear_faults()
        assert await rig.read(0, 4096) == b"\x07" * 4096


async def test_a_reset_loses_and_duplicates_nothing():
    """Reads, aligned writes and unaligned writes whose commands the
    controller holds when it is reset start their phase again on the new
    queue pairs: each is answered exactly once, reads with the data they
    asked for, and every write lands (two lanes, disjoint regions)."""
    async with lanes_rig(cpus=(0, 1)) as rig:
        ref = bytearray(os.urandom(MiB))
        await rig.write(0, ref)
        rig.model.inject(IO_READ, action="drop", count=0)
        rig.model.inject(IO_WRITE, action="drop", count=0)
        reads, writes = [], []
        for i in range(36):
            base = i * 24 * KiB
            if i % 3 == 0:
                reads.append((base + 100, 9000, rig.send(i % 2, read_req, base + 100, 9000)))
            else:
                off, n = (base, 8192) if i % 3 == 1 else (base + 11, 5001)
                chunk = os.urandom(n)
                writes.append((off, chunk, rig.send(i % 2, write_req, off, chunk)))
        with trio.fail_after(10):
            # 12 reads and 12 aligned writes at the controller, the 12
            # unaligned ones reading their edges (reads too)
            while rig.model.stats()["held"] < 36:
                await trio.sleep(0.01)
        rig.model.clear_faults()
        await rig.ctrl.reset("test", rig.ctrl.generation)
        for off, size, u in reads:
            ((err, body),) = await rig.wait(u)
            assert err == 0 and same(body, ref[off:off + size])
        got = await rig.wait(*[u for _, _, u in writes])
        assert [err for err, _ in got] == [0] * len(writes)
        for off, chunk, _ in writes:
            ref[off:off + len(chunk)] = chunk
        assert same(await rig.read(0, MiB), ref)
        assert rig.total("lost_to_reset") == 36
        assert rig.total("writes") == 1 + len(writes) and rig.total("errors") == 0
        assert rig.ctrl.resets == 1


async def test_a_command_that_never_completes_is_aborted_then_resubmitted():
    """The model drops one read: the lane reports it past the timeout, the
    controller aborts it (the model then completes it Abort Requested),
    and the lane's retry rule resubmits it: the read succeeds."""
    async with lanes_rig(timeout=0.5) as rig:
        await rig.write(0, b"\x33" * 4096)
        rig.model.inject(IO_READ, action="drop", count=1)
        assert await rig.read(0, 4096) == b"\x33" * 4096
        st = rig.stats()[0]
        assert st["timeouts"] == 1 and st["retries"] == 1 and st["errors"] == 0, st
        assert rig.model.stats()["aborts"] == 1
        assert rig.ctrl.resets == 0


async def test_a_controller_that_stops_answering_is_reset():
    async with lanes_rig(timeout=0.3) as rig:
        await rig.write(0, b"\x44" * 4096)
        rig.model.hang(True)
        u = rig.send(0, read_req, 0, 4096)
        # the hang ends with the reset (CC.EN 1 -> 0)
        ((err, body),) = await rig.wait(u, timeout=30)
        assert err == 0 and body == b"\x44" * 4096
        assert rig.ctrl.resets >= 1


async def test_a_dead_controller_answers_eio_and_the_lanes_stay():
    """The controller goes fatal and its bring-up fails for good: every
    request held and every later one gets EIO; the lanes keep answering."""
    async with lanes_rig(cpus=(0, 1)) as rig:
        rig.model.inject(IO_READ, action="drop", count=0)
        uniques = [rig.send(i % 2, read_req, i * 4096, 4096) for i in range(8)]
        with trio.fail_after(10):
            while rig.model.stats()["held"] < 8:
                await trio.sleep(0.01)
        rig.model.inject(0x05, admin=True, action="fail", sct=1, sc=2, dnr=True, count=0)
        rig.model.set_fatal()
        got = await rig.wait(*uniques, timeout=30)
        assert [err for err, _ in got] == [errno.EIO] * 8
        assert (await rig.call(1, write_req, 0, b"x" * 4096))[0] == errno.EIO
        assert (await rig.call(0, flush_req))[0] == errno.EIO
        assert all(st["failed"] for st in rig.stats())


async def test_more_requests_than_buffers_wait_and_are_all_answered():
    """Requests beyond a lane's DMA buffers are read into the spare and
    wait for a buffer (the backlog): none is dropped or refused."""
    async with lanes_rig() as rig:
        per = rig.lanes.set.buffers_per_lane
        rig.model.inject(IO_WRITE, action="delay", delay_ms=300, count=0)
        n = per + 20
        uniques = [rig.send(0, write_req, i * 4096, bytes([i % 250 + 1]) * 4096) for i in range(n)]
        got = await rig.wait(*uniques)
        assert [err for err, _ in got] == [0] * n
        rig.model.clear_faults()
        data = await rig.read(0, n * 4096)
        assert all(data[i * 4096] == i % 250 + 1 for i in range(n))
        assert rig.stats()[0]["buffer_waits"] >= 20


async def test_a_request_is_served_by_the_lane_of_its_callers_cpu():
    """A request whose caller is pinned to CPU 1 but that lane 0 read is
    handed to lane 1 (and answered on lane 0's channel); an unpinned
    caller's stays where it was read."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    async with lanes_rig(cpus=(0, 1)) as rig:
        await rig.write(0, b"\x55" * 8192)
        ready, done = threading.Event(), threading.Event()
        tid = []

        def pinned():
            os.sched_setaffinity(0, {1})
            tid.append(threading.get_native_id())
            ready.set()
            done.wait(30)
        t = threading.Thread(target=pinned)
        t.start()
        try:
            ready.wait(10)
            before = rig.stats()
            for i in range(10):
                err, body = await rig.call(0, read_req, 0, 4096, pid=tid[0])
                assert err == 0 and body == b"\x55" * 4096
            after = rig.stats()
            assert after[1]["reads"] - before[1]["reads"] == 10
            assert after[0]["reads"] - before[0]["reads"] == 0
            assert after[0]["handed_out"] - before[0]["handed_out"] == 10
            assert after[1]["handed_in"] - before[1]["handed_in"] == 10
            for i in range(10):
                err, body = await rig.call(0, read_req, 4096, 4096, pid=threading.get_native_id())
                assert err == 0
            assert rig.stats()[0]["reads"] - after[0]["reads"] == 10
        finally:
            done.set()
            t.join()


async def test_more_lanes_than_cpus():
    async with lanes_rig(cpus=(0, 1, 0)) as rig:
        assert rig.lanes.count == 3
        data = os.urandom(3 * 64 * KiB)
        for lane in range(3):
            assert await rig.write(lane * 64 * KiB, data[lane * 64 * KiB:(lane + 1) * 64 * KiB], lane=lane) \
                == 64 * KiB
        for lane in range(3):
            assert same(await rig.read(0, len(data), lane=lane), data)
        assert [st["writes"] for st in rig.stats()] == [1, 1, 1]


async def test_non_data_requests_and_interrupts():
    """Without a forwarder (no pyfuse3 here), a non-data request is answered
    ENOSYS; an interrupt of a lane's own request is dropped (the request is
    answered when its command completes)."""
    async with lanes_rig() as rig:
        err, _ = await rig.call(0, lambda u: header(FUSE_GETATTR, u, 16) + bytes(16))
        assert err == errno.ENOSYS
        rig.model.inject(IO_READ, action="delay", delay_ms=200)
        u = rig.send(0, read_req, 0, 4096)
        rig.channels[0].send(interrupt_req(u | 1, u))
        ((err, body),) = await rig.wait(u)
        assert err == 0 and len(body) == 4096
        assert rig.stats()[0]["interrupts"] == 1
        assert rig.channels[0].got.keys() >= {u} and (u | 1) not in rig.channels[0].got


async def test_stop_answers_everything_in_flight():
    """stop(): a lane stops reading, answers what it holds (here: writes the
    model completes late), and ends."""
    async with lanes_rig(cpus=(0, 1)) as rig:
        rig.model.inject(IO_WRITE, action="delay", delay_ms=300, count=0)
        uniques = [rig.send(i % 2, write_req, i * 4096, b"s" * 4096) for i in range(16)]
        with trio.fail_after(10):
            while rig.total("in_flight") < 16:
                await trio.sleep(0.005)
        await rig.lanes.stop()
        for ch in rig.channels:
            ch.collect()
        got = {**rig.channels[0].got, **rig.channels[1].got}
        assert [got[u][0] for u in uniques] == [0] * 16
        assert not any(st["running"] for st in rig.stats())


def test_range_set_orders_and_wakes():
    rs = _core.RangeSet(4, 2)
    assert rs.try_acquire(0, 10, 0)
    assert not rs.try_acquire(5, 6, 1)           # lane 1 now waits
    assert rs.try_acquire(10, 20, 1)             # adjacent: no overlap
    assert rs.release(0, 10) == [1]              # lane 1 is woken
    assert rs.held == [(10, 20)]
    with pytest.raises(ValueError):
        rs.release(0, 10)


async def test_getxattr_of_a_name_the_mount_lacks_is_answered_in_the_lane():
    """The kernel asks security.capability before every write through the
    writeback cache: ENODATA from the lane, not a trip to pyfuse3; a
    user.nvmefs.* name still goes there (here: no forwarder, ENOSYS)."""
    def getxattr(name):
        body = struct.pack("<II", 0, 0) + name + b"\0"          # fuse_getxattr_in + name
        return lambda u: header(22, u, len(body)) + body
    async with lanes_rig() as rig:
        err, _ = await rig.call(0, getxattr(b"security.capability"))
        assert err == errno.ENODATA
        err, _ = await rig.call(0, getxattr(b"user.other"))
        assert err == errno.ENODATA
        err, _ = await rig.call(0, getxattr(b"user.nvmefs.stats"))
        assert err == errno.ENOSYS
        assert rig.stats()[0]["xattr_none"] == 2


async def test_a_writeback_write_past_the_end_is_written_to_the_end_then_fails():
    """A write from the page cache (FUSE_WRITE_CACHE) that runs past the end
    writes what fits and answers ENOSPC, so that fsync() reports the lost
    part; the same write from a caller is a short write."""
    def wb_write(u, off, data):
        body = struct.pack("<QQIIQII", NODE, off, len(data), 1, 0, 0, 0) + data
        return header(FUSE_WRITE, u, len(body)) + body
    async with lanes_rig() as rig:
        end = 16 * MiB
        err, _ = await rig.call(0, wb_write, end - 4096, b"\x11" * 8192)
        assert err == errno.ENOSPC
        assert same(await rig.read(end - 4096, 4096), b"\x11" * 4096)
        err, body = await rig.call(0, write_req, end - 4096, b"\x22" * 8192)
        assert err == 0 and struct.unpack("<II", body)[0] == 4096
