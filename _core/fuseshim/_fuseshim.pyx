# cython: language_level=3
"""Python's handle on the FUSE shim (shim.h): arming the mount's session,
the routing of pyfuse3's replies, and the forwarder the lanes call."""
from libc.stdint cimport uint64_t, uintptr_t

cdef extern from "shim.h" nogil:
    int nvmefs_shim_arm(unsigned max_write, unsigned max_background)
    int nvmefs_shim_session_fd()
    int nvmefs_shim_route_replies()
    void nvmefs_shim_disarm()
    int nvmefs_shim_sessions()
    int nvmefs_forward(const void *req, size_t len, int reply_fd)
    int nvmefs_forwarded(uint64_t unique)
    void nvmefs_forward_end()
    void nvmefs_forward_close()
    void nvmefs_forward_stats(unsigned long *out)
    void nvmefs_forward_want_uring(void (*hook)(void *, int) noexcept nogil, void *ctx)
    int nvmefs_forward_uring_offered()

import os as _os


def arm(unsigned max_write, unsigned max_background):
    """Before pyfuse3.init(): the session it creates is the lanes' (see
    shim.h)."""
    cdef int rc = nvmefs_shim_arm(max_write, max_background)
    if rc < 0:
        raise OSError(-rc, f"cannot create the queue of requests to pyfuse3: {_os.strerror(-rc)}")


def session_fd():
    """The mount's own /dev/fuse fd, which the lanes clone (-1: none)."""
    return nvmefs_shim_session_fd()


def route_replies():
    """After pyfuse3.init(): pyfuse3's replies go to each request's channel."""
    cdef int rc = nvmefs_shim_route_replies()
    if rc < 0:
        raise OSError(-rc, f"libfuse refused custom I/O for the session: {_os.strerror(-rc)}")


def sessions():
    """Sessions the fuse_session_new() wrapper made (0: it never ran, e.g.
    libfuse was bound before this module loaded)."""
    return nvmefs_shim_sessions()


def forwarder():
    """(forward, forwarded): the C functions LaneSet.set_forwarder() takes."""
    return <uintptr_t>&nvmefs_forward, <uintptr_t>&nvmefs_forwarded


def want_uring(uintptr_t hook, uintptr_t ctx):
    """Ask for FUSE over io_uring in the FUSE_INIT answer if the kernel
    offers it; ``hook(ctx, ok)`` (LaneSet.uring_hook()) runs once the answer
    is written.  0, 0: never ask."""
    nvmefs_forward_want_uring(<void (*)(void *, int) noexcept nogil>hook, <void *>ctx)


def uring_offered():
    """Whether the kernel's FUSE_INIT offered io_uring."""
    return bool(nvmefs_forward_uring_offered())


def end():
    """Every lane has ended: pyfuse3's loop ends once it has taken the
    requests still queued."""
    nvmefs_forward_end()


def close():
    """After pyfuse3.close(): drop what is left and forget the session."""
    nvmefs_forward_close()
    nvmefs_shim_disarm()


def stats():
    cdef unsigned long out[3]
    nvmefs_forward_stats(out)
    return {"forwarded": out[0], "replies_routed": out[1], "replies_unrouted": out[2]}
