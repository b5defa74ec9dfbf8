# The trio namespace API's single-command fast path, in C.
#
# Namespace._command's first attempt asks: is there an idle I/O queue, and
# can one polled command on it (QueuePair.poll_one) serve this request?
# Written in Python that question cost more than the command (about 2 us of
# attribute lookups and calls around a 2 us round trip), so it lives here.
# The Python objects it reads (Controller, IoQueue, BouncePool, Namespace)
# stay the source of truth; nothing is cached across calls.

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE

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
