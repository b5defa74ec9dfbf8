# The single-command fast path's bookkeeping, and the FUSE direct lane, in C.
#
# Namespace._command's first attempt and the FUSE frontend's direct lane
# (nvmefs/fusefs.py) both ask: is there an idle I/O queue, and can one
# polled command on it (QueuePair.poll_one) serve this request?  Written in
# Python that question cost more than the command (about 2 us of attribute
# lookups and calls around a 2 us round trip, several times that with cold
# caches in the FUSE daemon), so it lives here.  The Python objects it
# reads (Controller, IoQueue, BouncePool, Namespace, NvmeFS) stay the
# source of truth; nothing is cached across calls.

import threading

from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_AS_STRING

DEF FP_READ = 0x02
DEF FP_WRITE = 0x01
DEF FP_MAX_NLB = 1 << 16


cdef object fp_idle_queue(object ctrl, size_t nbytes):
    """The next I/O queue if one polled command of ``nbytes`` may use it:
    controller up, hybrid polling on, nothing in flight, a free bounce chunk
    big enough.  The round robin moves only when the queue is taken (else
    the general path's pick_queue() would skip a queue every time)."""
    cdef QueuePair qp
    if ctrl.closed or not ctrl.ready.is_set():
        return None
    io_qs = ctrl.io_qs
    cdef Py_ssize_t n = len(io_qs)
    if n == 0:
        return None
    cdef Py_ssize_t i = (<Py_ssize_t>ctrl._rr + 1) % n
    q = io_qs[i]
    qp = q.qp
    if not q.spin_ns or q.polled or q.dead or qp.cids.free_count != qp.cids.depth:
        return None
    ctrl._rr = i
    bounce = q.bounce
    if nbytes > <size_t>bounce.chunk or nbytes > <size_t>ctrl.max_transfer or not bounce.free:
        return None
    return q


cdef object fp_first(object ctrl, uint32_t nsid, uint32_t lba_size, int opcode, uint64_t lba, size_t nbytes,
                     uint32_t cdw12, object data_out, bint windowed, size_t skip, size_t size):
    """One polled command on an idle queue: (queue, chunks, result), or
    None when no queue is idle.

    ``result`` is what QueuePair.poll_read/poll_write/poll_one return.
    ``chunks`` is None when the command completed inside the poll and its
    data is already out of the bounce chunk (a windowed read's bytes, a
    write): the chunk is back in the pool.  Otherwise it is [chunk], taken
    from the pool, for the caller to give back."""
    cdef QueuePair qp
    cdef DmaBuffer buf
    cdef Py_buffer src
    cdef long long rc
    cdef size_t off
    cdef list free
    q = fp_idle_queue(ctrl, nbytes)
    if q is None:
        return None
    bounce = q.bounce
    free = bounce.free
    chunk = free.pop()
    off = <size_t>chunk * <size_t>bounce.chunk
    qp = q.qp
    buf = bounce.buf
    spin_ns = q.spin_ns
    try:
        if opcode == FP_WRITE:
            PyObject_GetBuffer(data_out, &src, PyBUF_SIMPLE)
            try:
                rc = qp.poll_write(nsid, lba, cdw12, lba_size, buf, off, <const uint8_t *>src.buf,
                                     <size_t>src.len, spin_ns)
            finally:
                PyBuffer_Release(&src)
            done = rc >= 0 and not rc & 0xFFFF
            result = rc
        elif windowed:
            result = qp.poll_read(nsid, lba, cdw12, lba_size, buf, off, <uint32_t>nbytes, skip, size,
                                    spin_ns)
            done = type(result) is bytes
        else:
            result = qp.poll_one(FP_READ, nsid, lba, cdw12, buf.iova + off, <uint32_t>nbytes, True, spin_ns)
            done = False
    except BaseException:
        free.append(chunk)          # refused before submission
        raise
    if done:
        # Back without waking bounce waiters: there are none, since the
        # pool was not empty (fp_idle_queue) and nothing else ran meanwhile.
        free.append(chunk)
        q.fast_path += 1
        return q, None, result
    # in flight, failed, or its data still in the chunk: the chunk is taken
    return q, [chunk], result


def fast_first(ctrl, ns, int opcode, uint64_t lba, size_t nbytes, uint32_t cdw12, data_out, window):
    """Namespace._command's first attempt: see fp_first().  ``window``:
    (skip, size) for a read that wants those bytes back, else None."""
    if window is None:
        return fp_first(ctrl, ns.nsid, ns.lba_size, opcode, lba, nbytes, cdw12, data_out, False, 0, 0)
    return fp_first(ctrl, ns.nsid, ns.lba_size, opcode, lba, nbytes, cdw12, data_out, True,
                    window[0], window[1])


cdef void fp_unwind(tuple pending, object lock, uint64_t first, uint64_t count) noexcept:
    """The lane submitted a command but could not hand it to a task (an
    exception on the way; the shim then answers EIO): leave the command to
    complete on its own without leaking its range or its chunk.  Wakes trio
    tasks: only in trio's thread (see lane_unwind_from())."""
    q, chunks, rc = pending
    try:
        if type(rc) is not int:         # adopted: the completion gives the chunk back
            rc.abandoned = True
            rc.chunks = list(chunks)
            q.listen(rc)                # ... once the completion task takes it
        elif rc >= 0:                   # completed with an error: nothing touches the chunk
            q.bounce.give(chunks)
        # else still in flight and not adopted: the chunk stays out of the
        # pool rather than be reused under DMA
    except BaseException:
        pass
    if lock is not None:
        try:
            lock.release(first, first + count)
        except BaseException:
            pass


cdef object fp_queue(object ctrl, object ns, int opcode, uint64_t lba, size_t nbytes, uint32_t cdw12,
                     object data_out, object now):
    """Submit one command on the next I/O queue whatever is in flight there,
    without polling, and adopt it at once: (queue, chunks, slot), or None
    when that cannot be done right now (no bounce chunks, a full SQ, the
    controller down).  For the lane's requests that one polled command on
    an idle queue cannot serve; a task waits for the slot."""
    cdef list free
    if ctrl.closed or not ctrl.ready.is_set():
        return None
    q = ctrl.pick_queue()
    # a polled queue's completion task is woken by a trio event: only
    # trio's thread may submit there
    if q.polled or q.dead:
        return None
    bounce = q.bounce
    if bounce.lot:
        return None         # tasks wait for bounce memory there: no jumping ahead of them
    chunks = bounce.try_take(nbytes)
    if chunks is None:
        return None
    free = bounce.free
    try:
        if data_out is not None:
            bounce.copy_in(chunks, data_out)
        cid = q.qp.submit_command(opcode, nsid=ns.nsid, cdw10=<uint32_t>lba, cdw11=<uint32_t>(lba >> 32),
                                  cdw12=cdw12, segments=bounce.segments(chunks, nbytes),
                                  is_read=opcode == FP_READ)
    except BaseException as exc:
        # straight back: nobody can be parked for chunks the pool had free
        # (and waking a waiter is trio's thread's business)
        free.extend(chunks)
        from nvmefs.errors import QueueBusy
        if isinstance(exc, QueueBusy):
            return None
        raise
    return ns._fast_adopt((q, chunks, -1 - <long long>cid), opcode, now)


def bounce_gather(DmaBuffer buf, size_t chunk, list chunks, size_t skip, size_t size):
    """Bytes [skip, skip+size) of data laid out over bounce ``chunks`` (each
    ``chunk`` bytes of ``buf``), in one copy."""
    cdef size_t pos = 0, c, n, take, at
    cdef Py_ssize_t i
    if size > <size_t>len(chunks) * chunk or skip > <size_t>len(chunks) * chunk - size:
        raise ValueError("bounce_gather: window outside the chunks")
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char *dst = PyBytes_AS_STRING(out)
    at = skip
    for i in range(len(chunks)):
        if pos == size:
            break
        if at >= chunk:
            at -= chunk
            continue
        c = <size_t>chunks[i]
        if (c + 1) * chunk > buf.size:
            raise ValueError("bounce_gather: chunk outside the buffer")
        take = min(chunk - at, size - pos)
        memcpy(dst + pos, <char *>buf.vaddr + c * chunk + at, take)
        pos += take
        at = 0
    return out


def lane_unwind(tuple pending, lock, uint64_t first, uint64_t count):
    """fp_unwind() for NvmeFS._lane_spawn: a task the lane asked for could
    not be started."""
    fp_unwind(pending, lock, first, count)


cdef void lane_unwind_from(object fs, tuple pending, object lock, uint64_t first, uint64_t count) noexcept:
    """fp_unwind() from wherever the lane runs: releasing a range, giving
    chunks back and listening for a completion wake trio tasks, which only
    trio's thread may do.  With trio gone there is nobody left to wake,
    and the command's chunk and range stay out (the mount is ending)."""
    try:
        if threading.get_ident() == fs.trio_thread:
            fp_unwind(pending, lock, first, count)
        else:
            fs.token.run_sync_soon(lane_unwind, pending, lock, first, count)
    except BaseException:
        pass


cdef object fp_now_ns():
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef class DirectLane:
    """The FUSE direct lane (see nvmefs/fusefs.py, NvmeFS): read() and
    write() run inside libfuse's dispatch, through nvmefs._fuseshim: in the
    lane thread holding the world lock, or in trio's thread.  Either way no
    trio task runs meanwhile, but nothing here may need trio's run context
    (task starts go through the trio token).  Each returns None (declined:
    pyfuse3's handler gets the request), the reply (bytes, or the count
    written), or ``taken``: the command failed, outlived the poll or was
    queued, and a task (NvmeFS._lane_read_task/_lane_write_task) finishes
    it and answers."""
    cdef object fs
    cdef object taken
    cdef dict counts

    def __init__(self, fs, taken):
        self.fs = fs
        self.taken = taken
        self.counts = fs.lane

    cdef object start(self, object ns, int opcode, uint64_t first, uint64_t nbytes, uint32_t cdw12,
                      object data, bint windowed, size_t skip, size_t size):
        """One polled command on an idle queue (fp_first), else one queued
        behind what is in flight (fp_queue); None when neither can be had."""
        fs = self.fs
        pending = fp_first(fs.ctrl, ns.nsid, <uint32_t>ns.lba_size, opcode, first, nbytes, cdw12, data,
                           windowed, skip, size)
        if pending is None:
            pending = fp_queue(fs.ctrl, ns, opcode, first, nbytes, cdw12, data, fs.clock.current_time())
            if pending is not None:
                self.counts["queued"] += 1
        return pending

    def read(self, req, uint64_t fh, uint64_t off, uint64_t size):
        cdef uint64_t bs, first, count, nbytes, skip
        fs = self.fs
        ctrl = fs.ctrl
        ns = ctrl.namespaces.get(fh - 1)
        if ns is None or fs.nursery is None or size == 0 or off + size > <uint64_t>ns.size:
            return None
        bs = ns.lba_size
        first = off // bs
        count = (off + size + bs - 1) // bs - first
        nbytes = count * bs
        if count > FP_MAX_NLB or nbytes > <uint64_t>ctrl.max_transfer:
            return None
        skip = off - first * bs
        pending = self.start(ns, FP_READ, first, nbytes, <uint32_t>(count - 1), None, True, skip, size)
        if pending is None:
            return None
        if (<tuple>pending)[1] is None:
            self.counts["read"] += 1
            return (<tuple>pending)[2]
        try:
            # adopted at once, before any other task could reap the
            # completion and find no slot for it
            pending = ns._fast_adopt(pending, FP_READ, fs.clock.current_time())
            # run_sync_soon, not start_soon: this may be the lane thread
            fs.token.run_sync_soon(fs._lane_spawn, fs._lane_read_task,
                                   (req, ns, first, count, skip, size, pending), None, 0, 0)
        except BaseException:
            lane_unwind_from(fs, pending, None, 0, 0)
            raise
        return self.taken

    def write(self, req, uint64_t fh, uint64_t off, data):
        cdef uint64_t bs, first, count, n
        fs = self.fs
        ctrl = fs.ctrl
        ns = ctrl.namespaces.get(fh - 1)
        n = len(data)
        if ns is None or fs.nursery is None or n == 0 or off + n > <uint64_t>ns.size:
            return None
        bs = ns.lba_size
        if off % bs or n % bs or n > <uint64_t>ctrl.max_transfer or n // bs > FP_MAX_NLB:
            return None
        first = off // bs
        count = n // bs
        lock = fs._lock(ns)
        if not lock._free(first, first + count):
            return None         # a read-modify-write, fallocate or write there is in flight: queue behind it
        pending = self.start(ns, FP_WRITE, first, n, <uint32_t>(count - 1), data, False, 0, 0)
        if pending is None:
            return None
        fs.mtime[fh] = fp_now_ns()
        if (<tuple>pending)[1] is None:
            self.counts["write"] += 1
            return n
        # still in flight, failed or queued: from here the write holds its
        # range like any other until it ends (the lock was free and nothing
        # else ran since: this cannot fail)
        lock.try_acquire(first, first + count)
        try:
            pending = ns._fast_adopt(pending, FP_WRITE, fs.clock.current_time())
            fs.token.run_sync_soon(fs._lane_spawn, fs._lane_write_task,
                                   (req, ns, off, bytes(data), lock, pending), lock, first, count)
        except BaseException:
            lane_unwind_from(fs, pending, lock, first, count)
            raise
        return self.taken
