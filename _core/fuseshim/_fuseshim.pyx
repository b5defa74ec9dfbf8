# cython: language_level=3
"""Glue between the fuse_session_new wrapper (fuse_shim.c) and Python: the
fallocate callback calls a registered Python handler, which answers later
through reply_err() (libfuse requests may be answered from any task)."""
from libc.errno cimport EIO, EOPNOTSUPP
from libc.stdint cimport uintptr_t

cdef extern from "fuse_shim.h" nogil:
    ctypedef void* fuse_req_t
    ctypedef unsigned long fuse_ino_t
    ctypedef long off_t
    struct fuse_file_info:
        unsigned long fh
    ctypedef void (*nvmefs_fallocate_fn)(fuse_req_t, fuse_ino_t, int, off_t, off_t, fuse_file_info *)
    void nvmefs_fuse_set_fallocate(nvmefs_fallocate_fn fn)
    int nvmefs_fuse_sessions_hooked()
    int fuse_reply_err(fuse_req_t req, int err)

cdef object _handler = None


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
# the operation to sessions created after this
nvmefs_fuse_set_fallocate(_on_fallocate)


def set_fallocate_handler(handler):
    """``handler(req, ino, mode, offset, length, fh)`` must arrange for
    exactly one reply_err(req, errno_or_0) or raise (then EIO is sent).
    None: every fallocate gets EOPNOTSUPP."""
    global _handler
    _handler = handler


def reply_err(uintptr_t req, int err):
    """Answer a fallocate request: 0 for success, else an errno."""
    return fuse_reply_err(<fuse_req_t>req, err)


def sessions_hooked():
    """How many FUSE sessions got the fallocate operation (0: the wrapper
    was not reached, e.g. libfuse was bound before this module loaded)."""
    return nvmefs_fuse_sessions_hooked()
