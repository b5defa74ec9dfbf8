"""Loads the FUSE shim (``nvmefs._fuseshim``, _core/fuseshim/shim.h) into
the process's global symbol scope, so that pyfuse3's calls of libfuse's
fuse_session_new(), fuse_session_fd() and fuse_session_receive_buf() resolve
to it: pyfuse3 then serves the requests the lanes forward instead of
reading /dev/fuse itself.

Import this before pyfuse3 binds libfuse (first of all also covers a
pyfuse3 built with immediate binding, -z now).
"""
import os
import sys

_flags = sys.getdlopenflags()
sys.setdlopenflags(_flags | os.RTLD_GLOBAL)
try:
    from nvmefs._fuseshim import (arm, close, end, forwarder, route_replies, session_fd, sessions, stats,
                                  uring_offered, want_uring)
finally:
    sys.setdlopenflags(_flags)

__all__ = ["arm", "close", "end", "forwarder", "route_replies", "session_fd", "sessions", "stats",
           "uring_offered", "want_uring"]
