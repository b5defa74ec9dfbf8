"""The direct lane (NvmeFS.lane_read / lane_write): what libfuse's dispatch
calls through nvmefs._fuseshim before pyfuse3's handlers.  Called directly
here, with the FUSE replies captured; the real mount is in test_mount.py."""
import contextlib
import errno
import os

import pytest
import trio

from nvmefs import fuseshim
from nvmefs.controller import open_controller
from nvmefs.fusefs import NvmeFS
from racehelp import RangeOrder, apply, new_round, race

MiB = 1 << 20


class Replies:
    """Stands in for libfuse: records how each taken request was answered
    (and that it was answered once)."""

    def __init__(self, monkeypatch):
        self.got = {}
        self.events = {}
        monkeypatch.setattr(fuseshim, "reply_buf", lambda req, data: self._put(req, ("data", bytes(data))))
        monkeypatch.setattr(fuseshim, "reply_write", lambda req, n: self._put(req, ("written", n)))
        monkeypatch.setattr(fuseshim, "reply_err", lambda req, err: self._put(req, ("err", err)))

    def _put(self, req, answer):
        assert req not in self.got, f"request {req} answered twice"
        self.got[req] = answer
        self.event(req).set()

    def event(self, req):
        return self.events.setdefault(req, trio.Event())

    async def wait(self, req):
        with trio.fail_after(10):
            await self.event(req).wait()
        return self.got[req]


@contextlib.asynccontextmanager
async def lane_fs(transport, **controller_kw):
    """A controller and an NvmeFS serving (its task nursery set), as the
    mount has them: (controller, namespace, fs, the namespace's fh)."""
    async with open_controller(transport, **controller_kw) as c, trio.open_nursery() as nursery:
        ns = c.namespaces[1]
        fs = NvmeFS(c)
        fs.nursery = nursery
        yield c, ns, fs, ns.nsid + 1


async def _answer(fs, replies, req, r):
    """What the shim does with a lane handler's return value."""
    if r is fuseshim.TAKEN:
        return await replies.wait(req)
    return None if r is None else ("data", bytes(r)) if not isinstance(r, int) else ("written", r)


async def test_lane_answers_inline_and_declines_what_it_cannot_serve(transport, monkeypatch):
    replies = Replies(monkeypatch)
    async with open_controller(transport, io_queues=2, spin_us=50_000) as c, trio.open_nursery() as nursery:
        ns = c.namespaces[1]
        fs = NvmeFS(c)
        fh = ns.nsid + 1
        data = os.urandom(64 * 1024)
        assert fs.lane_write(1, fh, 8192, memoryview(data)) is None       # no nursery: not serving yet
        fs.nursery = nursery
        fast0 = sum(q.fast_path for q in c.io_qs)
        assert fs.lane_write(2, fh, 8192, memoryview(data)) == len(data)
        # any byte window inside LBAs: one command, the window comes back
        assert fs.lane_read(3, fh, 8192 + 100, 5000) == data[100:5100]
        assert fs.lane_read(4, fh, 8192, len(data)) == data
        assert fs.lane == {"read": 2, "write": 1, "queued": 0, "continued": 0}
        assert sum(q.fast_path for q in c.io_qs) - fast0 == 3
        assert fh in fs.mtime

        # declined: pyfuse3's handlers (read()/write()) serve these
        assert fs.lane_write(5, fh, 8192 + 1, memoryview(data[:4096])) is None     # unaligned
        assert fs.lane_write(6, fh, 8192, memoryview(data[:100])) is None           # partial LBA
        assert fs.lane_write(7, fh, ns.size - 4096, memoryview(data[:8192])) is None  # past the end
        assert fs.lane_read(8, fh, ns.size - 4096, 8192) is None                    # short read
        assert fs.lane_read(10, 99, 0, 4096) is None                                # no such file
        lock = fs._lock(ns)
        assert lock.try_acquire(0, 1)               # a read-modify-write there holds the range
        assert fs.lane_write(11, fh, 0, memoryview(data[:4096])) is None
        lock.release(0, 1)
        assert lock.try_acquire(1000, 1001)         # ... elsewhere: no ordering to keep
        assert fs.lane_write(16, fh, 0, memoryview(data[:4096])) == 4096
        lock.release(1000, 1001)
        saved = [q.bounce.free[:] for q in c.io_qs]
        for q in c.io_qs:
            q.bounce.free.clear()                   # no bounce memory anywhere
        assert fs.lane_read(14, fh, 0, 4096) is None
        assert fs.lane_write(15, fh, 0, memoryview(data[:4096])) is None
        for q, free in zip(c.io_qs, saved):
            q.bounce.free[:] = free
        assert not replies.got
        assert fs.lane == {"read": 2, "write": 2, "queued": 0, "continued": 0}

        # queued: submitted without polling, behind whatever is in flight,
        # and answered by a task -- requests larger than a bounce chunk ...
        big = c.io_qs[0].bounce.chunk + 4096
        whole = data[:4096] + bytes(4096) + data + bytes(big)
        assert fs.lane_read(9, fh, 100, big) is fuseshim.TAKEN
        assert await replies.wait(9) == ("data", whole[100:100 + big])
        # ... and any request while every queue has a command in flight
        flushes = [await q.submit(0x00, deadline=trio.current_time() + 5, nsid=1) for q in c.io_qs]
        assert fs.lane_read(12, fh, 8192, 4096) is fuseshim.TAKEN
        assert fs.lane_write(13, fh, 0, memoryview(data[:4096])) is fuseshim.TAKEN
        assert await replies.wait(12) == ("data", data[:4096])
        assert await replies.wait(13) == ("written", 4096)
        for q, slot in zip(c.io_qs, flushes):
            await c.finish(q, slot, 0x00)
        assert fs.lane == {"read": 2, "write": 2, "queued": 3, "continued": 3}
        assert await fs.read(fh, 8192, len(data)) == data
        assert await fs.read(fh, 0, 4096) == data[:4096]


async def test_lane_hands_slow_commands_to_a_task_which_answers_once(transport, monkeypatch):
    replies = Replies(monkeypatch)
    async with lane_fs(transport, io_queues=1, spin_us=50) as (c, ns, fs, fh):
        q = c.io_qs[0]
        data = os.urandom(8192)
        transport.model.inject(0x01, action="delay", delay_ms=50)
        assert fs.lane_write(1, fh, 4096, memoryview(data)) is fuseshim.TAKEN
        # in flight: the write holds its range, so a read-modify-write of
        # these LBAs waits for it
        assert fs._lock(ns).held == [(1, 3)]
        assert fs.lane_write(2, fh, 8192, memoryview(data[:4096])) is None     # overlaps it
        assert await replies.wait(1) == ("written", 8192)
        assert fs._lock(ns).held == []
        transport.model.inject(0x02, action="delay", delay_ms=50)
        assert fs.lane_read(3, fh, 4096 + 10, 8000) is fuseshim.TAKEN
        assert await replies.wait(3) == ("data", data[10:8010])
        assert fs.lane["continued"] == 2
        assert q.qp.outstanding == 0 and q.waiting == 0 and len(q.bounce.free) == q.bounce.capacity()


async def test_lane_errors_follow_the_retry_rules_and_fail_only_their_request(transport, monkeypatch):
    replies = Replies(monkeypatch)
    async with lane_fs(transport, io_queues=1, spin_us=50_000, retries=2) as (c, ns, fs, fh):
        data = os.urandom(4096)
        assert fs.lane_write(1, fh, 0, memoryview(data)) == 4096
        # media error: EIO for this read, counted and logged once, no resubmission
        qp = c.io_qs[0].qp
        before = qp.submitted
        transport.model.inject(0x02, lba_start=0, lba_end=0, action="fail", sct=2, sc=0x81, dnr=True)
        assert fs.lane_read(2, fh, 0, 4096) is fuseshim.TAKEN
        assert await replies.wait(2) == ("err", errno.EIO)
        assert qp.submitted - before == 1
        assert c.errors_by_status == {"UNRECOVERED_READ_ERROR": 1} and fs.errors == 1
        assert fs.lane_read(3, fh, 0, 4096) == data        # the next read works
        # retryable: the task resubmits (attempt 1 was the lane's) and succeeds
        transport.model.inject(0x01, action="fail", sct=0, sc=0x06, dnr=False)
        assert fs.lane_write(4, fh, 4096, memoryview(data)) is fuseshim.TAKEN
        assert await replies.wait(4) == ("written", 4096)
        assert ns.retried == 1
        # retryable forever: the cap (retries=2) counts the lane's attempt
        before = qp.submitted
        transport.model.inject(0x01, action="fail", sct=0, sc=0x06, dnr=False, count=0)
        assert fs.lane_write(5, fh, 4096, memoryview(data)) is fuseshim.TAKEN
        assert await replies.wait(5) == ("err", errno.EIO)
        assert qp.submitted - before == 3
        assert fs._lock(ns).held == []


async def test_lane_writes_serialise_with_read_modify_writes_and_fallocate(transport, monkeypatch):
    """Aligned writes through the lane racing with unaligned writes (read-
    modify-write), punch holes and zero ranges over a few LBAs.  A short
    spin makes many lane commands outlive the poll and continue in tasks,
    which then hold their range, others complete inside it.  The result must equal the operations
    applied one by one in the order they took effect: no read-modify-write
    may write back bytes a lane write replaced meanwhile."""
    replies = Replies(monkeypatch)
    region = 32 * 1024
    async with lane_fs(transport, io_queues=2, spin_us=1) as (c, ns, fs, fh):
        # the lane alternates queues: on one its commands nearly always
        # outlive the poll, on the other they nearly always complete in it
        c.io_qs[1].spin_ns = 2_000_000
        rec = RangeOrder(fs._lock(ns))
        modes = set()

        # at least 8 rounds, more (up to 40) until lane writes have gone
        # every way: inline only when the fast queue is idle at that moment
        for seed in range(40):
            if seed >= 8 and modes == {"inline", "taken", "declined"}:
                break
            rng, start = await new_round(fs, fh, rec, seed, region)
            ops = []
            for i in range(48):
                kind = rng.choice(["lane", "lane", "write", "punch", "zero"])
                if kind == "lane":
                    off = rng.randrange(0, region // 4096 - 2) * 4096
                    n = rng.randrange(1, 3) * 4096
                else:
                    off = rng.randrange(0, region - 6000)
                    n = rng.randrange(1, 6000)
                ops.append((kind, off, n, bytes([i + 1]) * n if kind in ("lane", "write") else None))
            # staggered starts: lane writes arrive while other operations
            # are in the middle of their commands, not only all at once
            delays = [rng.random() * 0.003 for _ in ops]

            async def run(i):
                await trio.sleep(delays[i])
                rec.op_of[trio.lowlevel.current_task()] = i
                kind, off, n, data = ops[i]
                if kind == "lane":
                    rec.current = i
                    try:
                        r = fs.lane_write(1000 * seed + i, fh, off, memoryview(data))
                    finally:
                        rec.current = None
                    if r == n:
                        rec.took(i)                 # took effect inside the call: nothing overlapped
                        modes.add("inline")
                    elif r is fuseshim.TAKEN:
                        modes.add("taken")          # recorded by try_acquire
                        assert await replies.wait(1000 * seed + i) == ("written", n)
                    else:
                        assert r is None
                        modes.add("declined")       # as pyfuse3 would: the general path
                        assert await fs.write(fh, off, data) == n
                else:
                    await apply(fs, fh, ops[i])

            await race(fs, fh, start, ops, rec, run)
        # the race exercised every way a lane write can go
        assert modes == {"inline", "taken", "declined"}, modes


async def test_lane_adopts_a_taken_command_before_anyone_can_reap_it(transport, monkeypatch):
    """The completion of a command that outlived the poll may be reaped by
    another task (a submitter finding the queue busy, spin(), the interrupt
    loop) before the lane's task first runs: its slot must already exist."""
    import time
    replies = Replies(monkeypatch)
    async with lane_fs(transport, io_queues=1, spin_us=50) as (c, ns, fs, fh):
        q = c.io_qs[0]
        transport.model.inject(0x02, action="delay", delay_ms=20)
        assert fs.lane_read(1, fh, 0, 4096) is fuseshim.TAKEN
        time.sleep(0.1)                 # the completion lands before the lane's task runs
        assert q._deliver() == 1
        assert (await replies.wait(1)) == ("data", bytes(4096))


async def test_lane_commands_taken_across_a_reset_and_a_shutdown(transport, monkeypatch):
    replies = Replies(monkeypatch)
    async with trio.open_nursery() as nursery:
        async with open_controller(transport, io_queues=1, spin_us=50, timeout=0.5) as c:
            ns = c.namespaces[1]
            fs = NvmeFS(c)
            fs.nursery = nursery
            fh = ns.nsid + 1
            data = os.urandom(8192)
            await fs.write(fh, 0, data)
            # lost by the controller: the watchdog aborts, resets, and the
            # task reads again on the new queues
            transport.model.inject(0x02, action="drop")
            assert fs.lane_read(1, fh, 0, 8192) is fuseshim.TAKEN
            assert await replies.wait(1) == ("data", data)
            q = c.io_qs[0]
            assert q.qp.outstanding == 0 and len(q.bounce.free) == q.bounce.capacity()
            # in flight when the controller shuts down: answered once, with an error
            transport.model.inject(0x01, action="delay", delay_ms=300)
            assert fs.lane_write(2, fh, 0, memoryview(bytes(4096))) is fuseshim.TAKEN
        assert (await replies.wait(2))[0] == "err"
        assert fs.lane_read(3, fh, 0, 4096) is None         # a closed controller: declined
        assert fs._lock(ns).held == []


async def test_lane_that_cannot_start_its_task_leaks_nothing(transport, monkeypatch):
    class Closed:
        def start_soon(self, *a):
            raise RuntimeError("Nursery is closed to new arrivals")

    replies = Replies(monkeypatch)
    async with open_controller(transport, io_queues=1, spin_us=50) as c:
        ns = c.namespaces[1]
        fs = NvmeFS(c)
        fs.nursery = Closed()
        fh = ns.nsid + 1
        q = c.io_qs[0]
        transport.model.inject(0x01, action="delay", delay_ms=30)
        # the task is started from trio's thread (the lane may run in its
        # own): that is where the failure is seen and answered
        assert fs.lane_write(1, fh, 0, memoryview(bytes(4096))) is fuseshim.TAKEN
        assert await replies.wait(1) == ("err", errno.EIO)
        assert fs._lock(ns).held == []

        async def pool_whole():                     # the completion gives the chunk back
            with trio.fail_after(5):
                while q.qp.outstanding or len(q.bounce.free) != q.bounce.capacity():
                    await trio.sleep(0.01)
        await pool_whole()
        transport.model.inject(0x02, action="fail", sct=2, sc=0x81, dnr=True)
        # failed inside the poll, or after it
        assert fs.lane_read(2, fh, 0, 4096) is fuseshim.TAKEN
        assert await replies.wait(2) == ("err", errno.EIO)
        await pool_whole()
        transport.model.inject(0x02, action="delay", delay_ms=30)
        assert fs.lane_read(3, fh, 0, 4096) is fuseshim.TAKEN
        fs.nursery = None       # the shutdown began before trio's thread could start the task
        assert await replies.wait(3) == ("err", errno.EINTR)
        await pool_whole()


@pytest.mark.skipif(fuseshim._fuseshim is None, reason="nvmefs._fuseshim is not built")
async def test_world_lock_keeps_the_lane_thread_out_while_trio_runs():
    """The lane thread dispatches only while the trio thread waits for I/O
    (fuseshim.LaneThread's WorldLock instrument), whatever the GIL does:
    without the lock, a thread would run between two bytecodes of a task
    (every 5 ms switch interval) and see its half-done work."""
    import threading
    import time
    from nvmefs import _fuseshim

    state = {"busy": False, "seen_busy": 0, "entries": 0, "stop": False}

    def lane():
        while not state["stop"]:
            _fuseshim.world_lane_acquire()
            try:
                state["entries"] += 1
                state["seen_busy"] += state["busy"]
            finally:
                _fuseshim.world_lane_release()
            time.sleep(0.0005)

    inst = _fuseshim.WorldLock()
    trio.lowlevel.add_instrument(inst)
    _fuseshim.world_acquire()
    t = threading.Thread(target=lane)
    t.start()
    try:
        for _ in range(3):
            state["busy"] = True            # a task's half-done step ...
            end = time.perf_counter() + 0.1
            while time.perf_counter() < end:
                pass                        # ... 20 switch intervals long, no I/O wait
            state["busy"] = False
            before = state["entries"]
            await trio.sleep(0.05)          # an I/O wait: the lane gets in
            assert state["entries"] > before
        assert state["seen_busy"] == 0
    finally:
        state["stop"] = True
        _fuseshim.world_release()
        t.join()
        _fuseshim.world_acquire()
        trio.lowlevel.remove_instrument(inst)
        _fuseshim.world_release()


class _FailingOnce:
    """A trio token whose first run_sync_soon fails as after the end of
    the run; later calls go through."""

    def __init__(self, token):
        self.token = token
        self.failed = False

    def run_sync_soon(self, fn, *args):
        if not self.failed:
            self.failed = True
            raise trio.RunFinishedError("run finished")
        self.token.run_sync_soon(fn, *args)


@pytest.mark.skipif(fuseshim._fuseshim is None, reason="nvmefs._fuseshim is not built")
async def test_lane_off_the_trio_thread_reaches_trio_only_through_its_token(transport, monkeypatch):
    """What the lane thread does: DirectLane called from another thread
    holding the world lock.  Anything that needs trio's run context there
    (a task start, a deadline, waking a waiter) raises, and for the unwind
    path would leave a completion nobody listens for."""
    from nvmefs import _fuseshim

    replies = Replies(monkeypatch)
    inst = _fuseshim.WorldLock()
    trio.lowlevel.add_instrument(inst)
    _fuseshim.world_acquire()
    try:
        async with lane_fs(transport, io_queues=1, spin_us=50) as (c, ns, fs, fh):
            q = c.io_qs[0]

            def locked(fn, *args):
                _fuseshim.world_lane_acquire()
                try:
                    return fn(*args)
                finally:
                    _fuseshim.world_lane_release()

            async def lane(fn, *args):
                return await trio.to_thread.run_sync(locked, fn, *args)

            async def pool_whole():
                with trio.fail_after(5):
                    while q.qp.outstanding or len(q.bounce.free) != q.bounce.capacity():
                        await trio.sleep(0.01)

            data = os.urandom(8192)
            # inline, unless the controller's thread had gone to sleep and
            # took longer than the 50 us spin to wake (seen on a loaded VM)
            r = await lane(fs.lane_write, 1, fh, 4096, memoryview(data))
            assert r == 8192 or r is fuseshim.TAKEN and await replies.wait(1) == ("written", 8192)
            transport.model.inject(0x02, action="delay", delay_ms=30)
            assert await lane(fs.lane_read, 2, fh, 4096, 8192) is fuseshim.TAKEN       # outlived the poll
            assert await replies.wait(2) == ("data", data)
            big = 2 * q.bounce.chunk
            assert await lane(fs.lane_read, 3, fh, 0, big) is fuseshim.TAKEN           # queued
            assert (await replies.wait(3))[1][4096:4096 + 8192] == data
            transport.model.inject(0x01, action="fail", sct=2, sc=0x81, dnr=True)
            assert await lane(fs.lane_write, 4, fh, 0, memoryview(data[:4096])) is fuseshim.TAKEN
            assert await replies.wait(4) == ("err", errno.EIO)
            assert fs._lock(ns).held == []
            await pool_whole()
            # the task cannot be asked for: the shim answers EIO, and the
            # command is left to its completion, unwound in trio's thread
            monkeypatch.setattr(fs, "token", _FailingOnce(fs.token))
            transport.model.inject(0x01, action="delay", delay_ms=30)
            with pytest.raises(trio.RunFinishedError):
                await lane(fs.lane_write, 5, fh, 0, memoryview(data[:4096]))
            await pool_whole()
            assert fs._lock(ns).held == []
            assert 5 not in replies.got
    finally:
        _fuseshim.world_release()
        trio.lowlevel.remove_instrument(inst)
