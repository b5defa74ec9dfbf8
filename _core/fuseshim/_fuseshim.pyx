# cython: language_level=3
"""Glue between the fuse_session_new wrapper (session_hook.c) and Python: the
fallocate callback calls a registered Python handler, which answers later
through reply_err() (libfuse requests may be answered from any task); the
read and write callbacks offer each request to the direct lane first."""
from cpython.buffer cimport PyBUF_READ, PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.errno cimport EIO, EOPNOTSUPP
from libc.limits cimport INT_MIN
from libc.stdint cimport uintptr_t
from libc.stdlib cimport abort

cdef extern from "session_hook.h" nogil:
    ctypedef void* fuse_req_t
    ctypedef unsigned long fuse_ino_t
    ctypedef long off_t
    struct fuse_file_info:
        unsigned long fh
    enum: FUSE_BUF_IS_FD
    struct fuse_buf:
        size_t size
        int flags
        void *mem
    struct fuse_bufvec:
        size_t count
        size_t idx
        size_t off
        fuse_buf buf[1]
    ctypedef void (*nvmefs_fallocate_fn)(fuse_req_t, fuse_ino_t, int, off_t, off_t, fuse_file_info *)
    ctypedef void (*nvmefs_read_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, fuse_file_info *)
    ctypedef void (*nvmefs_write_buf_fn)(fuse_req_t, fuse_ino_t, fuse_bufvec *, off_t, fuse_file_info *)
    void nvmefs_fuse_set_fallocate(nvmefs_fallocate_fn fn)
    void nvmefs_fuse_set_io(nvmefs_read_fn read, nvmefs_write_buf_fn write_buf)
    void nvmefs_fuse_orig_read(fuse_req_t, fuse_ino_t, size_t, off_t, fuse_file_info *)
    void nvmefs_fuse_orig_write_buf(fuse_req_t, fuse_ino_t, fuse_bufvec *, off_t, fuse_file_info *)
    int nvmefs_fuse_sessions_hooked()
    int nvmefs_fuse_lane_sessions()
    void nvmefs_lane_arm(int on)
    int nvmefs_lane_threaded()
    int nvmefs_lane_loop()
    void nvmefs_lane_stop()
    void nvmefs_lane_close()
    int nvmefs_lane_decline()
    void nvmefs_lane_stats(unsigned long *out)
    void nvmefs_lane_set_engine(void *e)
    void nvmefs_world_trio_acquire()
    void nvmefs_world_trio_release()
    void nvmefs_world_lane_acquire()
    void nvmefs_world_lane_release()
    void fuse_reply_none(fuse_req_t req)
    int fuse_reply_err(fuse_req_t req, int err)
    int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size)
    int fuse_reply_write(fuse_req_t req, size_t count)

cdef object _handler = None
cdef object _lane_read = None
cdef object _lane_write = None


class _Taken:
    __slots__ = ()

    def __repr__(self):
        return "TAKEN"


# what a lane handler returns when it took the request and will answer it
# itself, later, through reply_buf()/reply_write()/reply_err()
TAKEN = _Taken()
cdef object _TAKEN = TAKEN


cdef void _lane_failed(fuse_req_t req, str what) noexcept:
    # the lane raised instead of answering or taking the request: answer it
    # here, exactly once, and only then log (which could itself fail)
    fuse_reply_err(req, EIO)
    try:
        import logging
        logging.getLogger("nvmefs.fuse").exception("direct lane %s failed", what)
    except BaseException:
        pass


# libfuse's replies return 0 or -errno: INT_MIN alone signals an exception
cdef int _reply_data(fuse_req_t req, object data) except? INT_MIN:
    cdef Py_buffer view
    if type(data) is bytes:
        return fuse_reply_buf(req, PyBytes_AS_STRING(data), <size_t>PyBytes_GET_SIZE(data))
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return fuse_reply_buf(req, <const char *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)


cdef void _on_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info *fi) noexcept with gil:
    # called inside fuse_session_process_buf(): in pyfuse3's trio thread, or
    # in the lane thread holding the world lock; either way nothing else
    # touches the driver meanwhile, so the lane may use it directly
    handler = _lane_read
    if handler is not None and fi != NULL:
        try:
            r = handler(<uintptr_t>req, fi.fh, off, size)
        except BaseException:
            _lane_failed(req, "read")
            return
        if r is _TAKEN:
            return
        if r is not None:
            try:
                _reply_data(req, r)
            except BaseException:
                # not a buffer: nothing was sent
                _lane_failed(req, "read")
            return
    if nvmefs_lane_decline():
        # in the lane thread: the request goes to pyfuse3's loop as it came
        # from /dev/fuse, and libfuse makes a new one of it there
        fuse_reply_none(req)
    else:
        nvmefs_fuse_orig_read(req, ino, size, off, fi)


cdef void _on_write_buf(fuse_req_t req, fuse_ino_t ino, fuse_bufvec *bufv, off_t off,
                        fuse_file_info *fi) noexcept with gil:
    cdef char *mem
    cdef size_t n
    handler = _lane_write
    # only data that libfuse already holds in memory (no splice from the
    # device's pipe): the lane copies it straight into DMA memory
    if (handler is not None and fi != NULL and bufv.count == 1 and bufv.idx == 0
            and not (bufv.buf[0].flags & FUSE_BUF_IS_FD) and bufv.off <= bufv.buf[0].size):
        mem = <char *>bufv.buf[0].mem + bufv.off
        n = bufv.buf[0].size - bufv.off
        try:
            # valid only during this call: a lane that keeps the data copies it
            data = PyMemoryView_FromMemory(mem, n, PyBUF_READ)
        except BaseException:
            _lane_failed(req, "write")
            return
        failed = False
        try:
            r = handler(<uintptr_t>req, fi.fh, off, data)
        except BaseException:
            failed = True
        try:
            data.release()
        except BaseException:
            # an export of libfuse's buffer outlived the call, and libfuse
            # reuses that buffer for the next request: no safe way on
            abort()
        if failed:
            _lane_failed(req, "write")
            return
        if r is _TAKEN:
            return
        if r is not None:
            try:
                n = <size_t>r
            except BaseException:
                _lane_failed(req, "write")
                return
            fuse_reply_write(req, n)
            return
    if nvmefs_lane_decline():
        fuse_reply_none(req)
    else:
        nvmefs_fuse_orig_write_buf(req, ino, bufv, off, fi)


cdef void _on_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                        fuse_file_info *fi) noexcept with gil:
    # pyfuse3 calls fuse_session_process_buf() holding the GIL, in its trio
    # thread, so the handler may start a trio task directly
    fh = fi.fh if fi != NULL else ino
    if _handler is None:
        fuse_reply_err(req, EOPNOTSUPP)
        return
    try:
        _handler(<uintptr_t>req, ino, mode, offset, length, fh)
    except BaseException:
        # the handler did not take the request: answer it here, exactly once
        import logging
        logging.getLogger("nvmefs.fuse").exception("fallocate handler failed")
        fuse_reply_err(req, EIO)


# registered at import, before any session exists: the wrapper only adds
# the operations to sessions created after this
nvmefs_fuse_set_fallocate(_on_fallocate)
nvmefs_fuse_set_io(_on_read, _on_write_buf)


def set_fallocate_handler(handler):
    """``handler(req, ino, mode, offset, length, fh)`` must arrange for
    exactly one reply_err(req, errno_or_0) or raise (then EIO is sent).
    None: every fallocate gets EOPNOTSUPP."""
    global _handler
    _handler = handler


def set_lane(read, write):
    """The direct lane: ``read(req, fh, off, size)`` and ``write(req, fh,
    off, data)`` run inside libfuse's dispatch for every read and write.
    Each returns None (pyfuse3's handler then gets the request), the reply
    (bytes-like data, or the byte count written), or TAKEN (it answers
    later, exactly once).  ``data`` is valid only during the call.
    None, None: every request goes to pyfuse3."""
    global _lane_read, _lane_write
    _lane_read, _lane_write = read, write


def reply_buf(uintptr_t req, data):
    """Answer a read the lane took."""
    return _reply_data(<fuse_req_t>req, data)


def reply_write(uintptr_t req, size_t count):
    """Answer a write the lane took."""
    return fuse_reply_write(<fuse_req_t>req, count)


def reply_err(uintptr_t req, int err):
    """Answer a fallocate request (0 for success), or a lane's request with
    an errno."""
    return fuse_reply_err(<fuse_req_t>req, err)


def sessions_hooked():
    """How many FUSE sessions got the fallocate operation (0: the wrapper
    was not reached, e.g. libfuse was bound before this module loaded)."""
    return nvmefs_fuse_sessions_hooked()


def lane_sessions():
    """How many FUSE sessions send reads and writes to the direct lane."""
    return nvmefs_fuse_lane_sessions()



# -- the lane thread (session_hook.c) --------------------------------------------

def arm_lane_thread(bint on):
    """Before pyfuse3.init(): the session it creates gets the lane thread
    (lane_threaded() says whether it did)."""
    nvmefs_lane_arm(on)


def lane_threaded():
    """True while a session exists whose /dev/fuse the lane thread reads."""
    return bool(nvmefs_lane_threaded())


def set_engine(engine):
    """The lane engine (nvmefs._core.LaneEngine) the lane thread drives, or
    None.  Before pyfuse3.init(): the session's FUSE_INIT then keeps
    max_write within the engine's receive buffers.  The caller keeps the
    engine alive until set_engine(None)."""
    nvmefs_lane_set_engine(<void *><uintptr_t>(engine.api_address if engine is not None else 0))


def lane_loop():
    """The lane thread's body: reads /dev/fuse until unmounted (0) or
    lane_stop(); a negative errno on failure.  Call from a Python thread
    (the handlers it dispatches take the GIL) while the trio thread runs
    a WorldLock instrument."""
    cdef int rc
    with nogil:
        rc = nvmefs_lane_loop()
    return rc


def lane_stop():
    nvmefs_lane_stop()


def lane_close():
    """Once the lane thread and pyfuse3's loop have ended."""
    nvmefs_lane_close()


def lane_thread_stats():
    cdef unsigned long out[4]
    nvmefs_lane_stats(out)
    return {"received": out[0], "answered": out[1], "declined": out[2], "to_pyfuse3": out[3]}


def world_acquire():
    """The trio thread takes the world lock back (after waiting for I/O)."""
    with nogil:
        nvmefs_world_trio_acquire()


def world_release():
    nvmefs_world_trio_release()


def world_lane_acquire():
    """What the lane thread does around a dispatch (for tests)."""
    with nogil:
        nvmefs_world_lane_acquire()


def world_lane_release():
    nvmefs_world_lane_release()


cdef class WorldLock:
    """A trio Instrument: the trio thread holds the world lock except while
    it waits for I/O, which is when the lane thread may dispatch.  Install
    with trio.lowlevel.add_instrument() and take the lock (world_acquire())
    in the same step."""

    def before_io_wait(self, timeout):
        nvmefs_world_trio_release()

    def after_io_wait(self, timeout):
        with nogil:
            nvmefs_world_trio_acquire()
