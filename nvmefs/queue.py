"""Trio side of a queue pair: submission with back-pressure, completion
delivery from the queue's interrupt eventfd (or polling), and a bounce pool.

One IoQueue belongs to the trio thread that created it; the Cython queue
pair underneath needs no lock because nothing else touches it (brief,
defect 3).  Each in-flight command has exactly one slot, indexed by its
tracker (the CID's index bits): the slot is where its completion lands
(defect 5).
"""
import logging
import os

import trio

from nvmefs import _core
from nvmefs.errors import ControllerError, QueueBusy

log = logging.getLogger("nvmefs.queue")


class ControllerReset(Exception):
    """Internal: the command was lost to a controller reset; callers resubmit."""


class _Slot:
    __slots__ = ("event", "status", "dw0", "dw1", "cid", "opcode", "deadline", "error", "aborting",
                 "timed_out", "abandoned", "chunks", "listened")

    def __init__(self, opcode, deadline):
        self.event = trio.Event()
        self.status = None
        self.dw0 = self.dw1 = 0
        self.cid = None
        self.opcode = opcode
        self.deadline = float("inf") if deadline is None else deadline
        self.error = None
        self.aborting = False
        self.timed_out = False
        self.abandoned = False     # its waiter was cancelled
        self.chunks = None         # bounce chunks to return once the controller is done
        self.listened = False      # counted in IoQueue.waiting until it completes


class BouncePool:
    """Page-aligned DMA chunks a queue copies caller buffers through.  One
    arena allocation at queue creation; the I/O path only takes and returns
    chunk indices, and waits when the pool is empty."""

    def __init__(self, arena, chunk, count):
        self.chunk = chunk
        self.buf = arena.alloc(chunk * count)
        self.view = memoryview(self.buf)
        self.free = list(range(count - 1, -1, -1))
        self.lot = trio.lowlevel.ParkingLot()
        self.waits = 0

    def try_take(self, nbytes):
        """Chunks for ``nbytes`` if enough are free right now, else None."""
        n = -(-nbytes // self.chunk) or 1
        if len(self.free) >= n:
            return [self.free.pop() for _ in range(n)]
        return None

    async def take(self, nbytes):
        n = max(1, -(-nbytes // self.chunk))
        if n > self.capacity():
            raise ValueError(f"transfer of {nbytes} bytes exceeds the bounce pool")
        while len(self.free) < n:
            self.waits += 1
            await self.lot.park()
        return [self.free.pop() for _ in range(n)]

    def capacity(self):
        return self.buf.size // self.chunk

    def give(self, chunks):
        self.free.extend(chunks)
        if self.lot:
            self.lot.unpark_all()

    def segments(self, chunks, nbytes):
        segs, left = [], nbytes
        for c in chunks:
            n = min(self.chunk, left)
            segs.append((self.buf.iova + c * self.chunk, n))
            left -= n
        return segs

    def copy_in(self, chunks, src):
        src = memoryview(src).cast("B")
        pos = 0
        for c in chunks:
            n = min(self.chunk, len(src) - pos)
            self.view[c * self.chunk:c * self.chunk + n] = src[pos:pos + n]
            pos += n

    def copy_out(self, chunks, dst, nbytes):
        dst = memoryview(dst).cast("B")
        pos = 0
        for c in chunks:
            n = min(self.chunk, nbytes - pos)
            dst[pos:pos + n] = self.view[c * self.chunk:c * self.chunk + n]
            pos += n

    def close(self):
        self.view.release()
        self.buf.free()


class IoQueue:
    """A queue pair plus what trio needs to use it.  Created by Controller."""

    def __init__(self, transport, qid, entries, *, max_transfer, sgls, polled=False,
                 bounce_chunk=128 << 10, bounce_bytes=16 << 20, max_sgl_segments=256, spin_ns=0):
        self.transport = transport
        self.qid = qid
        self.qp = _core.QueuePair(transport.arena, transport.regs, qid, entries,
                                  dstrd=(transport.read64(0) >> 32) & 0xF,
                                  max_transfer=max_transfer, max_sgl_segments=max_sgl_segments)
        self.qp.sgls = sgls
        self.qp.sgl_only = transport.fabrics
        transport.attach(self.qp)
        self.polled = polled
        self.fd = None if polled else transport.irq_fd(qid)
        self.mask = (1 << self.qp.cids.index_bits) - 1
        self.slots = [None] * self.qp.depth
        self.space = trio.lowlevel.ParkingLot()
        self.kick = trio.Event()
        self.bounce = BouncePool(transport.arena, bounce_chunk, max(1, bounce_bytes // bounce_chunk)) \
            if qid and bounce_bytes else None
        self.owner = "trio"        # the queue owner's name (Controller._bring_up)
        self.busy_waits = 0
        self.dead = False
        self.cancel_scope = None
        self.finished = trio.Event()   # the completion task has left wait_readable
        self.interrupts = 0
        self.spin_ns = spin_ns
        self.spun = 0
        self.fast = 0
        self.fast_path = 0         # commands completed inside QueuePair.poll_one
        # commands whose completion the completion task must take (their
        # waiters park, or were cancelled); 0 while commands are only spun on
        self.waiting = 0

    # -- completion side ---------------------------------------------------------

    def _deliver(self):
        got = self.qp.reap()
        for _user, cid, status, dw0, dw1 in got:
            i = cid & self.mask
            slot = self.slots[i]
            self.slots[i] = None
            if slot is None:       # the core already dropped stale ids; this would be a bug
                log.error("queue %d: completion for cid %d with no waiter", self.qid, cid)
                continue
            if slot.listened:
                slot.listened = False
                self.waiting -= 1
            slot.status, slot.dw0, slot.dw1 = status, dw0, dw1
            slot.event.set()
            if slot.chunks:
                self.bounce.give(slot.chunks)
                slot.chunks = None
        if got and self.space:
            self.space.unpark_all()
        return len(got)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        """The queue's completion task: waits on the interrupt eventfd (never
        blocking the trio thread), or polls while commands are in flight."""
        with trio.CancelScope() as scope:
            self.cancel_scope = scope
            task_status.started()
            try:
                await self._loop()
            finally:
                self.finished.set()

    async def _loop(self):
        while True:
            if self.polled:
                if self.qp.outstanding == 0:
                    self.kick = trio.Event()
                    await self.kick.wait()
                if not self._deliver():
                    await trio.sleep(0)
                continue
            if not self.waiting:
                # Every command in flight is being polled (spin), or there is
                # none.  Listening now would cost a scheduling round per
                # command for completions the poller already took; the
                # eventfd keeps counting meanwhile (at worst one spurious
                # wake-up later).
                self.kick = trio.Event()
                await self.kick.wait()
                continue
            await trio.lowlevel.wait_readable(self.fd)
            try:
                os.read(self.fd, 8)
            except BlockingIOError:
                pass
            self.interrupts += 1
            self._deliver()

    # -- submission side ---------------------------------------------------------

    async def submit(self, opcode, *, deadline, **cmd):
        """Place a command and return its slot (await slot.event).  Waits for
        SQ space and free command ids instead of failing (defects 1, 2)."""
        while True:
            if self.dead:
                raise ControllerReset(f"queue {self.qid} was torn down")
            try:
                cid = self.qp.submit_command(opcode, **cmd)
                break
            except QueueBusy:
                self.busy_waits += 1
                # completions may already sit in the CQ: take them before sleeping
                if not self._deliver():
                    await self.space.park()
        slot = _Slot(opcode, deadline)
        slot.cid = cid
        self.slots[cid & self.mask] = slot
        if self.polled:
            self.kick.set()
        return slot

    def adopt(self, cid, opcode, deadline):
        """A fast-path command that was still in flight when polling gave up:
        from now on it is waited for like any submitted command."""
        slot = _Slot(opcode, deadline)
        slot.cid = cid
        self.slots[cid & self.mask] = slot
        return slot

    async def fast_checkpoint(self):
        # a command that completed while polled took no scheduling round: let
        # every 16th yield, so that a task issuing back-to-back commands
        # cannot starve the others
        self.fast += 1
        if self.fast & 15:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            await trio.lowlevel.checkpoint()

    def listen(self, slot):
        """``slot``'s waiter is about to park: the completion task must take
        its completion from the interrupt."""
        if not slot.listened:
            slot.listened = True
            self.waiting += 1
            self.kick.set()

    def spin(self, slot):
        """Hybrid polling: when nothing else in this trio thread can run, wait
        for ``slot``'s completion by watching the CQ phase bit for up to
        spin_ns instead of sleeping in epoll -- on a VM a thread wake-up costs
        tens of microseconds, more than a fast command takes."""
        # only when this is the queue's one command: deeper queues batch
        # completions through the interrupt, and nobody else waits on us long
        if (self.spin_ns and self.qp.outstanding == 1 and not slot.event.is_set()
                and self.qp.spin_for_completion(self.spin_ns)):
            self.spun += 1
            self._deliver()

    def outstanding_slots(self):
        return [s for s in self.slots if s is not None]

    def fail_all(self, exc):
        """Controller reset: every waiter gets ``exc``; the queue is dead."""
        self.dead = True
        for i, slot in enumerate(self.slots):
            if slot is not None:
                self.slots[i] = None
                self._fail(slot, exc)
        self.space.unpark_all()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    def _fail(self, slot, exc):
        if slot.listened:
            slot.listened = False
            self.waiting -= 1
        slot.error = exc
        slot.event.set()
        # the controller was disabled (or gave up on the command): no more DMA
        if slot.chunks:
            self.bounce.give(slot.chunks)
            slot.chunks = None

    def fail_slot(self, slot, exc):
        """Give up on one command (bring-up timeout).  Its tracker stays
        allocated: the controller never answered, so its id is not reused."""
        i = slot.cid & self.mask
        if self.slots[i] is slot:
            self.slots[i] = None
        self._fail(slot, exc)

    def stats(self):
        s = self.qp.stats()
        s["owner"] = self.owner
        s["busy_waits"] = self.busy_waits
        s["interrupts"] = self.interrupts
        s["polled_completions"] = self.spun + self.fast_path
        s["fast_path"] = self.fast_path
        if self.bounce is not None:
            s["bounce_waits"] = self.bounce.waits
        return s

    def close(self):
        if self.bounce is not None:
            self.bounce.close()


class TrioQueues:
    """trio's own I/O queues, as a queue owner of the controller
    (controller.py): the namespace API submits to them from trio's thread,
    round robin, and each one's completion task delivers to its slots."""

    name = "trio"

    def __init__(self, count, bounce_bytes):
        self.wants = count
        self.bounce_bytes = bounce_bytes
        self.queues = []
        self.rr = 0

    async def attach(self, ctrl, queues):
        for q in queues:
            await ctrl.nursery.start(q.run)
        self.queues = queues

    async def quiesce(self):
        """Nothing to do: trio submits nothing while a reset runs (the
        controller's ready event is clear), and its completion tasks only
        deliver."""

    def detach(self, exc):
        """The controller was disabled: every waiter gets ``exc`` and
        resubmits once the controller is back."""
        for q in self.queues:
            q.fail_all(exc)

    async def fail(self, dma_unsafe=False):
        """The controller is gone for good (or shut down)."""
        for q in self.queues:
            q.fail_all(ControllerError("the controller is gone"))

    def pick(self):
        self.rr = (self.rr + 1) % len(self.queues)
        return self.queues[self.rr]


class HandedQueues:
    """A queue owner that only takes its queues: for code that drives the
    queue pairs itself from its own native threads (bench/ioworker.py, the
    tests of that loop).  Around a reset it has nothing to park; its user
    must not submit while one runs (the bench never resets)."""

    name = "handed"
    bounce_bytes = 0

    def __init__(self, count):
        self.wants = count
        self.queues = []

    async def attach(self, ctrl, queues):
        self.queues = queues

    async def quiesce(self):
        pass

    def detach(self, exc):
        self.queues = []

    async def fail(self, dma_unsafe=False):
        self.queues = []
