"""The trio async namespace API: read, write, flush, write_zeroes,
deallocate, compare.

Transfers larger than the controller's MDTS are split and the pieces are
issued concurrently (on different queues).  Data is copied through the
queue's bounce pool unless the caller passes an arena DmaBuffer (zero copy).
Retryable statuses are retried a bounded number of times; commands lost to a
controller reset are resubmitted once the controller is back.
"""
import logging
import struct

import trio

from nvmefs import _core
from nvmefs.errors import ControllerError, NvmeError
from nvmefs.queue import ControllerReset

log = logging.getLogger("nvmefs.namespace")

IO_FLUSH, IO_WRITE, IO_READ, IO_COMPARE, IO_WRITE_ZEROES, IO_DSM = 0x00, 0x01, 0x02, 0x05, 0x08, 0x09
FUA = 1 << 30
DEAC = 1 << 25
MAX_NLB = 1 << 16          # NLB is a 16-bit 0-based field
ONCS_DSM, ONCS_WRITE_ZEROES = 1 << 2, 1 << 3


class Namespace:
    def __init__(self, ctrl, nsid, info):
        self.ctrl = ctrl
        self.nsid = nsid
        self.retried = 0
        self.update(info)

    def update(self, info):
        self.info = info
        self.lba_size = info["lba_size"]
        self.nlbas = info["nsze"]
        self.size = self.nlbas * self.lba_size

    def supports(self, oncs_bit):
        return bool(self.ctrl.id_ctrl.get("oncs", 0) & oncs_bit)

    @property
    def deallocate_reads_zero(self):
        """DLFEAT bits 2:0 = 001b: a deallocated block reads as zeroes, so
        Dataset Management deallocate is a valid way to punch a hole."""
        return self.info.get("dlfeat", 0) & 0x7 == 0x1

    def __repr__(self):
        return f"<Namespace {self.nsid}: {self.nlbas} x {self.lba_size} B>"

    # -- plumbing ------------------------------------------------------------------

    def _check_range(self, lba, count):
        if lba < 0 or count < 0 or lba + count > self.nlbas:
            raise ValueError(f"LBA range {lba}+{count} outside namespace {self.nsid} ({self.nlbas} LBAs)")

    async def _command(self, opcode, *, lba=None, nbytes=0, data_out=None, data_in=None, window=None,
                       pending=None, **cmd):
        """One command with bounce/zero-copy data, retries and reset handling.
        ``window``: (skip, size) for a read whose caller wants those bytes of
        the data back (returned) instead of a buffer filled.  ``pending``:
        (queue, chunks, rc) of a first attempt a caller already made through
        _core.fast_first() (its rc may be the slot _fast_adopt() made of it)."""
        ctrl = self.ctrl
        attempt = 0
        is_read = data_in is not None or window is not None
        buf = data_out if data_out is not None else data_in
        fast = (nbytes and opcode in (IO_READ, IO_WRITE)
                and not isinstance(buf, (_core.DmaBuffer, _SubBuffer)))
        while True:
            if pending is None:
                if not ctrl.ready.is_set():
                    await ctrl.ready.wait()
                if ctrl.closed:
                    raise ControllerError("controller is closed")
            q = None
            chunks = None
            try:
                if pending is None and fast:
                    pending = _core.fast_first(ctrl, self, opcode, lba, nbytes, cmd["cdw12"], data_out, window)
                if pending is not None:
                    (q, chunks, rc), pending = pending, None
                    return await self._fast_finish(q, chunks, rc, opcode, lba, nbytes, data_in, window)
                q = ctrl.pick_queue()
                if nbytes:
                    if isinstance(buf, (_core.DmaBuffer, _SubBuffer)):
                        cmd["segments"] = [(buf.iova, nbytes)]
                    else:
                        chunks = q.bounce.try_take(nbytes) or await q.bounce.take(nbytes)
                        cmd["segments"] = q.bounce.segments(chunks, nbytes)
                        if data_out is not None:
                            q.bounce.copy_in(chunks, data_out)
                    cmd["is_read"] = is_read
                result = await ctrl.execute(q, opcode, nsid=self.nsid, lba=lba, chunks=chunks, **cmd)
                if chunks is not None and is_read and q.dead:
                    # as in _fast_finish: the bounce pool went with a reset
                    raise ControllerReset(f"queue {q.qid} was torn down")
                if window is not None:
                    tmp = bytearray(nbytes)
                    q.bounce.copy_out(chunks, tmp, nbytes)
                    return memoryview(tmp)[window[0]:window[0] + window[1]]
                if chunks is not None and data_in is not None:
                    q.bounce.copy_out(chunks, data_in, nbytes)
                return result
            except ControllerReset as exc:
                attempt += 1
                if attempt > ctrl.retries + 1:
                    raise ControllerError(f"namespace {self.nsid}: command lost to {attempt} "
                                          f"controller resets ({exc})") from None
                self.retried += 1
            except NvmeError as exc:
                attempt += 1
                if not _resubmit(exc) or attempt > ctrl.retries:
                    raise
                self.retried += 1
                log.info("retrying after %s (attempt %d)", exc, attempt)
                await trio.sleep(0.001 * (1 << attempt))
            finally:
                if chunks:      # emptied when handed to an abandoned command
                    q.bounce.give(chunks)

    # -- the single-command fast path ---------------------------------------------
    #
    # One bounce chunk and one native call (QueuePair.poll_read/poll_write/
    # poll_one: submit, ring, poll the CQ) on an I/O queue with nothing in
    # flight: no slot, no event, no scheduling round.  The choice of queue
    # and the call are _core.fast_first() (fastpath.pyx).  A command still in
    # flight when polling gives up is adopted and waited for like any other.
    # Errors and resets leave through _command's retry rules, as on the
    # general path.

    def _fast_adopt(self, pending, opcode):
        """A first attempt still in flight becomes (queue, chunks, slot):
        waited for like any submitted command."""
        q, chunks, rc = pending
        if type(rc) is int and rc < 0:
            return q, chunks, q.adopt(-1 - rc, opcode, trio.current_time() + self.ctrl.timeout)
        return pending

    async def _fast_finish(self, q, chunks, rc, opcode, lba, nbytes, data_in, window):
        if chunks is None:
            # completed inside the poll, its data already out of the bounce
            # pool (fast_first): only the checkpoint is left
            await q.fast_checkpoint()
            return rc if type(rc) is bytes else None
        ctrl = self.ctrl
        bounce = q.bounce
        off = chunks[0] * bounce.chunk
        if type(rc) is int and rc >= 0:
            if rc & 0xFFFF:
                raise ctrl.status_error(rc & 0xFFFF, opcode, rc >> 16, q.qid, self.nsid, lba)
            polled = True
        else:
            # still in flight when polling gave up: wait for it as usual
            slot = rc if type(rc) is not int else self._fast_adopt((q, chunks, rc), opcode)[2]
            await ctrl.finish(q, slot, opcode, self.nsid, lba, chunks)
            polled = False
            if q.dead:
                # completed, but a reset tore the queue and its bounce pool
                # down before we ran: the data is gone, read it again
                raise ControllerReset(f"queue {q.qid} was torn down")
        # the data leaves the bounce chunk before any checkpoint: a reset
        # there would take the pool away
        result = None
        if opcode == IO_READ:
            if window is not None:
                result = bytes(bounce.view[off + window[0]:off + window[0] + window[1]])
            else:
                data_in[:nbytes] = bounce.view[off:off + nbytes]
        bounce.give(chunks)
        chunks.clear()
        if polled:
            q.fast_path += 1
            await q.fast_checkpoint()
        return result

    def _pieces(self, lba, count):
        per = max(1, min(self.ctrl.max_transfer // self.lba_size, MAX_NLB))
        while count:
            n = min(per, count)
            yield lba, n
            lba += n
            count -= n

    async def _split(self, lba, count, fn):
        if count * self.lba_size <= self.ctrl.max_transfer and count <= MAX_NLB:
            await fn(lba, count, 0)
            return
        pieces = list(self._pieces(lba, count))
        async with trio.open_nursery() as nursery:
            off = 0
            for plba, n in pieces:
                nursery.start_soon(fn, plba, n, off)
                off += n * self.lba_size

    # -- the API -------------------------------------------------------------------

    async def read(self, lba, count, buf=None):
        """Read ``count`` LBAs into ``buf`` (any writable buffer, or a
        DmaBuffer for zero copy); returns the buffer (a new bytearray when
        none is given)."""
        self._check_range(lba, count)
        nbytes = count * self.lba_size
        if buf is None:
            buf = bytearray(nbytes)
        if len(memoryview(buf).cast("B")) < nbytes:
            raise ValueError(f"buffer of {len(memoryview(buf).cast('B'))} bytes for {nbytes} bytes of data")
        zero_copy = isinstance(buf, _core.DmaBuffer)
        view = memoryview(buf).cast("B") if not zero_copy else None

        async def piece(plba, n, off):
            size = n * self.lba_size
            if zero_copy:
                sub = _SubBuffer(buf, off)
                await self._command(IO_READ, lba=plba, nbytes=size, data_in=sub,
                                    cdw10=plba & 0xFFFFFFFF, cdw11=plba >> 32, cdw12=n - 1)
            else:
                await self._command(IO_READ, lba=plba, nbytes=size, data_in=view[off:off + size],
                                    cdw10=plba & 0xFFFFFFFF, cdw11=plba >> 32, cdw12=n - 1)

        await self._split(lba, count, piece)
        return buf

    async def read_window(self, lba, count, skip, size):
        """Bytes [skip, skip + size) of the ``count`` LBAs at ``lba``, as a
        bytes-like object: the FUSE read path, which on the fast path copies
        once, from DMA memory straight into the reply."""
        self._check_range(lba, count)
        nbytes = count * self.lba_size
        if skip < 0 or size < 0 or skip + size > nbytes:
            raise ValueError(f"window {skip}+{size} outside {nbytes} bytes")
        if nbytes <= self.ctrl.max_transfer and count <= MAX_NLB:
            # the fast path's first attempt inline (the FUSE read path's
            # common case: no keyword arguments, no retry loop); anything
            # but plain success continues in _command as its first attempt
            pending = _core.fast_first(self.ctrl, self, IO_READ, lba, nbytes, count - 1, None, (skip, size))
            if pending is not None and pending[1] is None:
                await pending[0].fast_checkpoint()
                return pending[2]
            return await self._command(IO_READ, lba=lba, nbytes=nbytes, window=(skip, size), pending=pending,
                                       cdw10=lba & 0xFFFFFFFF, cdw11=lba >> 32, cdw12=count - 1)
        buf = await self.read(lba, count)
        return memoryview(buf)[skip:skip + size]

    async def write(self, lba, data, *, fua=False):
        """Write ``data`` (a multiple of the LBA size) at ``lba``."""
        zero_copy = isinstance(data, _core.DmaBuffer)
        view = memoryview(data).cast("B") if not zero_copy else None
        nbytes = data.size if zero_copy else len(view)
        if nbytes % self.lba_size:
            raise ValueError(f"write of {nbytes} bytes is not a multiple of the LBA size {self.lba_size}")
        count = nbytes // self.lba_size
        self._check_range(lba, count)
        cdw12_flags = FUA if fua else 0
        if not zero_copy and count <= MAX_NLB:
            # the fast path's first attempt inline, as in read_window()
            cdw12 = (count - 1) | cdw12_flags
            pending = _core.fast_first(self.ctrl, self, IO_WRITE, lba, nbytes, cdw12, view, None)
            if pending is not None:
                if pending[1] is None:
                    await pending[0].fast_checkpoint()
                else:
                    await self._command(IO_WRITE, lba=lba, nbytes=nbytes, data_out=view, pending=pending,
                                        cdw10=lba & 0xFFFFFFFF, cdw11=lba >> 32, cdw12=cdw12)
                return

        async def piece(plba, n, off):
            size = n * self.lba_size
            out = _SubBuffer(data, off) if zero_copy else view[off:off + size]
            await self._command(IO_WRITE, lba=plba, nbytes=size, data_out=out,
                                cdw10=plba & 0xFFFFFFFF, cdw11=plba >> 32,
                                cdw12=(n - 1) | (FUA if fua else 0))

        await self._split(lba, count, piece)

    async def flush(self):
        await self._command(IO_FLUSH)

    async def write_zeroes(self, lba, count, *, deallocate=False):
        self._check_range(lba, count)
        most = MAX_NLB
        limit = self.ctrl.nvm_limits.get("write_zeroes_bytes")
        if limit:
            most = max(1, min(most, limit // self.lba_size))     # WZSL
        for plba, n in _ranges_by(lba, count, most):
            await self._command(IO_WRITE_ZEROES, lba=plba, cdw10=plba & 0xFFFFFFFF, cdw11=plba >> 32,
                                cdw12=(n - 1) | (DEAC if deallocate else 0))

    async def deallocate(self, ranges):
        """Dataset Management deallocate of [(lba, count), ...]; reads of
        deallocated blocks return zeroes on controllers that say so."""
        lim = self.ctrl.nvm_limits
        per_range = min(0xFFFFFFFF, lim.get("dsm_range_lbas", 0xFFFFFFFF))          # DMRSL
        per_cmd_ranges = min(256, lim.get("dsm_ranges", 256))                       # DMRL
        per_cmd_lbas = lim.get("dsm_lbas", 0)                                       # DMSL
        if per_cmd_lbas:
            per_range = min(per_range, per_cmd_lbas)
        flat = []
        for lba, count in ranges:
            self._check_range(lba, count)
            flat += list(_ranges_by(lba, count, per_range))
        group, total = [], 0
        for r in flat + [None]:
            if group and (r is None or len(group) == per_cmd_ranges
                          or (per_cmd_lbas and total + r[1] > per_cmd_lbas)):
                payload = b"".join(struct.pack("<IIQ", 0, n, lba) for lba, n in group)
                await self._command(IO_DSM, nbytes=len(payload), data_out=payload,
                                    cdw10=len(group) - 1, cdw11=1 << 2)
                group, total = [], 0
            if r is not None:
                group.append(r)
                total += r[1]

    async def compare(self, lba, data):
        """True when the media holds ``data`` at ``lba`` (NVMe Compare)."""
        view = memoryview(data).cast("B")
        if len(view) % self.lba_size:
            raise ValueError("compare length is not a multiple of the LBA size")
        count = len(view) // self.lba_size
        self._check_range(lba, count)
        try:
            for plba, n in self._pieces(lba, count):
                off = (plba - lba) * self.lba_size
                await self._command(IO_COMPARE, lba=plba, nbytes=n * self.lba_size,
                                    data_out=view[off:off + n * self.lba_size],
                                    cdw10=plba & 0xFFFFFFFF, cdw11=plba >> 32, cdw12=n - 1)
        except NvmeError as exc:
            if exc.name == "COMPARE_FAILURE":
                return False
            raise
        return True


def _resubmit(exc):
    """Whether a command that ended with ``exc`` is worth submitting again:
    a retryable status, or an Abort Requested without DNR (the host aborts
    only commands that timed out; Linux resubmits those)."""
    return exc.retryable or (exc.name == "ABORT_REQUESTED" and not exc.dnr)


def _ranges_by(lba, count, most):
    while count:
        n = min(most, count)
        yield lba, n
        lba += n
        count -= n


class _SubBuffer:
    """A window of a DmaBuffer for zero-copy split transfers (quacks like one
    for Namespace._command: ``iova``; the data never moves)."""
    __slots__ = ("iova",)

    def __init__(self, buf, off):
        self.iova = buf.iova + off
