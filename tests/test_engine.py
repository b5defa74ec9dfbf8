"""The lane engine (_core/lane.pyx): FUSE requests in, NVMe commands on the
controller's lane queue, FUSE replies out.  Driven here as the lane thread
drives it (offer, reap), from trio's thread, with a SOCK_SEQPACKET pair
standing in for /dev/fuse: each reply the engine writes is one message.
The real mount is in test_mount.py."""
import contextlib
import errno
import os
import socket
import struct

import pytest
import trio

from nvmefs import _core
from nvmefs.controller import open_controller
from nvmefs.fusefs import NvmeFS
from nvmefs.transport import ModelTransport

FUSE_READ, FUSE_WRITE, FUSE_INTERRUPT = 15, 16, 36
DECLINED, TAKEN, ANSWERED = _core.LANE_DECLINED, _core.LANE_TAKEN, _core.LANE_ANSWERED
KiB, MiB = 1 << 10, 1 << 20


def header(opcode, unique, body_len):
    # fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, padding
    return struct.pack("<IIQQIIII", 40 + body_len, opcode, unique, 0, 0, 0, 0, 0)


def read_req(unique, fh, off, size):
    body = struct.pack("<QQIIQII", fh, off, size, 0, 0, 0, 0)      # fuse_read_in
    return header(FUSE_READ, unique, len(body)) + body


def write_req(unique, fh, off, data):
    body = struct.pack("<QQIIQII", fh, off, len(data), 0, 0, 0, 0) + data    # fuse_write_in + data
    return header(FUSE_WRITE, unique, len(body)) + body


def interrupt_req(unique, target):
    body = struct.pack("<Q", target)
    return header(FUSE_INTERRUPT, unique, len(body)) + body


def same(got, want):
    """Byte equality with a short message (pytest's own diff of random
    megabytes takes minutes)."""
    got, want = bytes(got), bytes(want)
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise AssertionError(f"{len(got)} bytes vs {len(want)} expected, first difference at {at}")
    return True


class Fuse:
    """The /dev/fuse side: collects replies by request id, each exactly once."""

    def __init__(self, engine):
        self.engine = engine
        self.kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.kernel.setblocking(False)
        self._ours = ours
        engine.bind(ours.fileno())
        self.got = {}

    def close(self):
        self.kernel.close()
        self._ours.close()

    def collect(self):
        while True:
            try:
                msg = self.kernel.recv(4 * MiB)
            except BlockingIOError:
                return
            length, err, unique = struct.unpack_from("<IiQ", msg)
            assert length == len(msg), "reply length field"
            assert unique not in self.got, f"request {unique} answered twice"
            self.got[unique] = (-err, msg[16:])

    async def wait(self, *uniques, timeout=10):
        """Reap and collect until every one of ``uniques`` is answered."""
        with trio.fail_after(timeout):
            while True:
                self.engine.poll()
                self.collect()
                if all(u in self.got for u in uniques):
                    return [self.got[u] for u in uniques]
                await trio.sleep(0.001)

    async def written(self, unique, timeout=10):
        err, body = (await self.wait(unique, timeout=timeout))[0]
        assert err == 0, os.strerror(err)
        return struct.unpack("<II", body)[0]

    async def data(self, unique):
        err, body = (await self.wait(unique))[0]
        assert err == 0, os.strerror(err)
        return body


@contextlib.asynccontextmanager
async def engine_fs(namespaces=((16 * MiB, 4096),), buffers=48, queue_entries=256, model_kw=None, **ctrl_kw):
    """A controller with its lane queue owned by an NvmeFS engine, serving
    (task nursery set): (controller, namespace, fs, fuse, fh)."""
    t = ModelTransport(namespaces=namespaces, arena_size=256 * MiB, **(model_kw or {}))
    try:
        async with open_controller(t, io_queues=1, lane_queue=True, queue_entries=queue_entries,
                                   **ctrl_kw) as c, trio.open_nursery() as nursery:
            fs = NvmeFS(c)
            fs.nursery = nursery
            assert fs.start_engine(buffers=buffers)
            fuse = Fuse(fs.engine)
            try:
                yield c, c.namespaces[1], fs, fuse, 2
            finally:
                fs.nursery = None
                fuse.close()
    finally:
        t.close()


async def test_requests_are_all_at_the_controller_at_once_and_answered_once():
    """32 writes offered before any reap are 32 commands in flight (the
    lane thread used to serve one at a time), each answered once; reads
    of any byte window come back exact."""
    async with engine_fs() as (c, ns, fs, fuse, fh):
        data = os.urandom(32 * 4 * KiB)
        for i in range(32):
            assert fs.engine.offer_request(write_req(i + 1, fh, i * 4 * KiB, data[i * 4 * KiB:(i + 1) * 4 * KiB])) \
                == TAKEN
        assert fs.engine.in_flight == 32
        assert c.lane_q.qp.outstanding == 32
        for i in range(32):
            assert await fuse.written(i + 1) == 4 * KiB
        windows = [(0, len(data)), (100, 5000), (4095, 2), (12 * KiB + 7, 40 * KiB)]
        for k, (off, size) in enumerate(windows):
            assert fs.engine.offer_request(read_req(100 + k, fh, off, size)) == TAKEN
        for k, (off, size) in enumerate(windows):
            assert same(await fuse.data(100 + k), data[off:off + size])
        # the trio side sees the same bytes
        assert same(await ns.read(0, 32), data)
        st = fs.engine.stats()
        assert st["writes"] == 32 and st["reads"] == 4 and st["max_in_flight"] >= 32, st
        assert st["in_flight"] == 0 and st["handed_over"] == 0, st
        assert fs.engine.mtime_ns(ns.nsid) > 0


async def test_a_write_is_sent_from_inside_its_request():
    """Zero copy: the command's data pointer is the receive buffer, 80
    bytes in (after fuse_in_header and fuse_write_in), not a bounce chunk."""
    async with engine_fs(model_kw={"sgl": "off"}) as (c, ns, fs, fuse, fh):
        qp = c.lane_q.qp
        data = os.urandom(64 * KiB)
        slot = qp.sq_tail
        assert fs.engine.offer_request(write_req(1, fh, 0, data)) == TAKEN
        sqe = qp.sq_entry(slot)
        prp1 = struct.unpack_from("<Q", sqe, 24)[0]
        assert prp1 & 0xFFF == 80, hex(prp1)
        assert await fuse.written(1) == len(data)
        assert same(await ns.read(0, 16), data)


async def test_requests_larger_than_mdts_are_split():
    """MDTS 8 KiB (mdts=1): a 64 KiB write is 8 commands, a 64 KiB read
    likewise, answered once when the last completes."""
    async with engine_fs(model_kw={"mdts": 1}) as (c, ns, fs, fuse, fh):
        assert c.max_transfer == 8 * KiB
        data = os.urandom(64 * KiB)
        before = c.lane_q.qp.submitted
        assert fs.engine.offer_request(write_req(1, fh, 8 * KiB, data)) == TAKEN
        assert c.lane_q.qp.submitted - before == 8
        assert await fuse.written(1) == len(data)
        assert fs.engine.offer_request(read_req(2, fh, 8 * KiB + 3, len(data) - 3)) == TAKEN
        assert same(await fuse.data(2), data[3:])
        assert fs.engine.stats()["split"] == 2


async def test_a_full_submission_queue_makes_requests_wait_in_order():
    """A lane queue of 4 entries holds 3 commands: the rest wait for SQ
    room (never overwritten, never reordered) and all complete."""
    async with engine_fs(queue_entries=4) as (c, ns, fs, fuse, fh):
        blocks = [os.urandom(4 * KiB) for _ in range(12)]
        for i, b in enumerate(blocks):
            assert fs.engine.offer_request(write_req(i + 1, fh, i * 4 * KiB, b)) == TAKEN
        assert c.lane_q.qp.outstanding == 3
        st = fs.engine.stats()
        assert st["sq_waits"] >= 1 and st["in_flight"] == 12, st
        for i in range(12):
            assert await fuse.written(i + 1) == 4 * KiB
        assert same(await ns.read(0, 12), b"".join(blocks))


async def test_what_the_engine_declines_and_answers_itself():
    async with engine_fs(namespaces=((16 * MiB, 512),)) as (c, ns, fs, fuse, fh):
        e = fs.engine
        end = ns.size
        assert e.offer_request(write_req(1, fh, 100, b"x" * 512)) == DECLINED       # unaligned: RMW
        assert e.offer_request(write_req(2, fh, 0, b"x" * 100)) == DECLINED         # partial LBA
        assert e.offer_request(write_req(3, fh, end - 512, b"x" * 1024)) == DECLINED  # past the end
        assert e.offer_request(write_req(4, 99, 0, b"x" * 512)) == DECLINED         # no such namespace
        assert e.offer_request(read_req(5, 1, 0, 512)) == DECLINED                  # the directory
        assert e.offer_request(read_req(6, fh, 0, 2 * MiB)) == DECLINED             # larger than a buffer
        assert e.offer_request(read_req(7, fh, end, 4096)) == ANSWERED              # at the end: empty
        assert e.offer_request(read_req(8, fh, end - 10, 4096)) == TAKEN            # cut at the end
        assert await fuse.wait(7, 8) == [(0, b""), (0, bytes(10))]
        assert e.stats()["declined"] == 6 and e.stats()["empty_reads"] == 1
        assert e.stats()["in_flight"] == 0


async def test_receive_buffers_run_out_and_come_back():
    async with engine_fs(buffers=4) as (c, ns, fs, fuse, fh):
        c.transport.model.inject(0x01, action="delay", delay_ms=50, count=0)
        for i in range(4):
            assert fs.engine.offer_request(write_req(i + 1, fh, i * 4096, bytes(4096))) == TAKEN
        assert fs.engine.offer_request(read_req(9, fh, 0, 4096)) is None      # every buffer in flight
        assert fs.engine.stats()["buffer_waits"] == 1
        await fuse.wait(1, 2, 3, 4)
        c.transport.model.clear_faults()
        assert fs.engine.offer_request(read_req(9, fh, 0, 4096)) == TAKEN
        await fuse.data(9)


async def test_a_write_in_flight_holds_its_range():
    """Against the trio side's read-modify-writes and fallocates: while a
    lane write is at the controller its LBAs are held; a trio task parked
    for them is woken when it ends.  A lane write over a range trio holds
    is declined (pyfuse3's write() then waits for it)."""
    async with engine_fs() as (c, ns, fs, fuse, fh):
        lock = fs._lock(ns)
        c.transport.model.inject(0x01, action="delay", delay_ms=100)
        assert fs.engine.offer_request(write_req(1, fh, 8192, os.urandom(8192))) == TAKEN
        assert lock.held == [(2, 4)]
        assert not lock.try_acquire(3, 5)
        woke = trio.Event()

        async def waiter():
            await lock.acquire(3, 5)
            woke.set()
        fs.nursery.start_soon(waiter)
        await trio.sleep(0.01)
        assert lock.core.waiters == 1 and not woke.is_set()
        assert await fuse.written(1) == 8192
        with trio.fail_after(5):
            await woke.wait()
        assert lock.held == [(3, 5)]
        # trio holds 3..5: a lane write there is declined, beside it taken
        assert fs.engine.offer_request(write_req(2, fh, 4 * 4096, bytes(4096))) == DECLINED
        assert fs.engine.offer_request(write_req(3, fh, 5 * 4096, bytes(4096))) == TAKEN
        assert await fuse.written(3) == 4096
        lock.release(3, 5)
        assert lock.held == []
        assert fs.engine.stats()["range_busy"] == 1


async def test_interrupts_of_requests_in_flight_are_swallowed():
    async with engine_fs() as (c, ns, fs, fuse, fh):
        c.transport.model.inject(0x02, action="delay", delay_ms=50)
        assert fs.engine.offer_request(read_req(7, fh, 0, 4096)) == TAKEN
        assert fs.engine.offer_request(interrupt_req(8, 7)) == ANSWERED      # needs no answer
        assert fs.engine.offer_request(interrupt_req(9, 1234)) == DECLINED   # libfuse's business
        await fuse.data(7)
        fuse.collect()
        assert 8 not in fuse.got and 9 not in fuse.got


async def test_failed_commands_go_through_the_retry_rules():
    """A media error on a read: EIO for that request only, counted and
    logged with its status, not resubmitted; a retryable status on a
    write: resubmitted on the general path and answered as written."""
    async with engine_fs(retries=2) as (c, ns, fs, fuse, fh):
        model = c.transport.model
        data = os.urandom(4096)
        assert fs.engine.offer_request(write_req(1, fh, 0, data)) == TAKEN
        await fuse.written(1)
        model.inject(0x02, lba_start=0, lba_end=0, action="fail", sct=2, sc=0x81, dnr=True)
        assert fs.engine.offer_request(read_req(2, fh, 0, 4096)) == TAKEN
        assert (await fuse.wait(2))[0] == (errno.EIO, b"")
        assert c.errors_by_status == {"UNRECOVERED_READ_ERROR": 1} and fs.errors == 1
        assert fs.engine.offer_request(read_req(3, fh, 0, 4096)) == TAKEN      # the next one works
        assert same(await fuse.data(3), data)
        model.inject(0x01, action="fail", sct=0, sc=0x06, dnr=False)
        assert fs.engine.offer_request(write_req(4, fh, 4096, data)) == TAKEN
        assert await fuse.written(4) == 4096
        assert ns.retried == 1 and fs._lock(ns).held == []
        assert same(await ns.read(1, 1), data)
        assert fs.engine.stats()["handed_over"] == 2


async def test_commands_lost_to_a_reset_are_resubmitted():
    """A reset takes the lane queue away with commands on it: the
    requests are answered from the general path once the controller is
    back, the engine serves on the new lane queue, and the buffers the
    old controller could still have written come back only then."""
    async with engine_fs() as (c, ns, fs, fuse, fh):
        data = os.urandom(8192)
        c.transport.model.inject(0x01, action="delay", delay_ms=2000)
        assert fs.engine.offer_request(write_req(1, fh, 0, data)) == TAKEN
        assert fs.engine.offer_request(read_req(2, fh, 1 << 20, 4096)) == TAKEN
        old = c.lane_q
        c.transport.model.clear_faults()
        await c.reset("test")
        assert c.lane_q is not old and old.dead
        st = fs.engine.stats()
        assert st["lost_to_reset"] == 2 and st["attached"] and st["in_flight"] == 0, st
        assert await fuse.written(1) == 8192
        assert (await fuse.wait(2))[0] == (0, bytes(4096))
        assert same(await ns.read(0, 2), data)
        assert fs._lock(ns).held == []
        assert fs.engine.offer_request(read_req(3, fh, 0, 8192)) == TAKEN
        assert same(await fuse.data(3), data)


async def test_a_lane_command_that_never_completes_is_aborted():
    """The watchdog sees lane commands too: past the timeout it aborts the
    command; the abort's status is resubmittable, so the request is
    answered from the general path."""
    async with engine_fs(timeout=0.3) as (c, ns, fs, fuse, fh):
        c.transport.model.inject(0x02, action="drop")
        assert fs.engine.offer_request(read_req(1, fh, 0, 4096)) == TAKEN
        err, body = (await fuse.wait(1, timeout=20))[0]
        assert err == 0 and body == bytes(4096)
        assert c.errors_by_status.get("ABORT_REQUESTED") == 1, c.errors_by_status
        assert fs.engine.stats()["handed_over"] == 1


async def test_a_handover_trio_cannot_take_is_answered_eio_and_releases_the_range():
    async with engine_fs() as (c, ns, fs, fuse, fh):
        c.transport.model.inject(0x01, action="fail", sct=2, sc=0x80, dnr=True)

        class Gone:
            def run_sync_soon(self, fn, *args):
                raise trio.RunFinishedError("run finished")
        fs.token = Gone()
        assert fs.engine.offer_request(write_req(1, fh, 0, bytes(4096))) == TAKEN
        assert (await fuse.wait(1))[0] == (errno.EIO, b"")
        assert fs._lock(ns).held == []


async def test_a_lane_timeout_that_finds_a_reset_under_way_leaves_it_to_the_reset():
    """The watchdog reported a lane command, and by the time its timeout
    task runs a reset has begun: the reset's detach hands the request over,
    the task must not treat the command as a bring-up failure (it crashed
    the controller's nursery)."""
    from nvmefs.controller import _LaneCommand
    async with engine_fs() as (c, ns, fs, fuse, fh):
        c.transport.model.inject(0x02, action="delay", delay_ms=100)
        assert fs.engine.offer_request(read_req(1, fh, 0, 4096)) == TAKEN
        [(cid, opcode)] = fs.engine.expired(0)         # as the watchdog sees it
        ready, c.ready = c.ready, trio.Event()
        await c._on_timeout(c.lane_q, _LaneCommand(fs, cid, opcode))
        c.ready = ready
        assert (await fuse.wait(1))[0] == (0, bytes(4096))


async def test_every_command_of_a_split_request_is_watched_from_its_own_submission():
    """One command at a time (a 2-entry queue), 8 KiB pieces: the first
    piece is dropped, times out and is aborted; only then do the others go
    in, and a later one is dropped too.  It has its own deadline (it once
    inherited the request's, already reported, and hung for ever)."""
    async with engine_fs(model_kw={"mdts": 1}, queue_entries=2, timeout=0.3) as (c, ns, fs, fuse, fh):
        model = c.transport.model
        data = os.urandom(64 * KiB)
        model.inject(0x01, lba_start=16, lba_end=16, action="drop")           # piece 0
        model.inject(0x01, lba_start=16 + 12, lba_end=16 + 12, action="drop")  # piece 6
        assert fs.engine.offer_request(write_req(1, fh, 16 * 4096, data)) == TAKEN
        assert await fuse.written(1, timeout=30) == len(data)
        assert model.stats()["admin_commands"].get(0x08) == 2        # both pieces aborted
        assert same(await ns.read(16, 16), data)


async def test_interrupts_of_handed_over_requests_are_swallowed_too():
    async with engine_fs() as (c, ns, fs, fuse, fh):
        c.transport.model.inject(0x01, action="fail", sct=0, sc=0x06, dnr=False)    # retryable
        assert fs.engine.offer_request(write_req(5, fh, 0, bytes(4096))) == TAKEN
        with trio.fail_after(5):
            while fs.engine.stats()["handed_over"] == 0:     # no checkpoint: the task cannot run yet
                fs.engine.poll()
        assert fs.engine.offer_request(interrupt_req(6, 5)) == ANSWERED
        assert await fuse.written(5) == 4096
        assert fs.engine.offer_request(interrupt_req(7, 5)) == DECLINED     # answered: not ours any more


async def test_no_lane_queue_means_no_owner():
    t = ModelTransport(namespaces=((16 * MiB, 4096),), arena_size=256 * MiB)
    try:
        async with open_controller(t, io_queues=1) as c:        # lane_queue not asked for
            fs = NvmeFS(c)
            assert not fs.start_engine() and fs.engine is None and c.lane_owner is None
    finally:
        t.close()


async def test_a_handover_after_the_shutdown_began_is_answered_eintr_and_releases_the_range():
    async with engine_fs() as (c, ns, fs, fuse, fh):
        c.transport.model.inject(0x01, action="fail", sct=0, sc=0x06, dnr=False)
        assert fs.engine.offer_request(write_req(1, fh, 0, bytes(4096))) == TAKEN
        with trio.fail_after(5):
            while fs.engine.stats()["handed_over"] == 0:     # the task start is queued, not run
                fs.engine.poll()
        nursery, fs.nursery = fs.nursery, None
        assert (await fuse.wait(1))[0] == (errno.EINTR, b"")
        fs.nursery = nursery
        assert fs._lock(ns).held == []
