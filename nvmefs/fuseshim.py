"""Loads the fallocate shim (``nvmefs._fuseshim``) into the process's global
symbol scope, so that pyfuse3's call of libfuse's fuse_session_new() goes
through the wrapper that adds a fallocate operation and the direct lane's
read and write handlers (see
_core/fuseshim/session_hook.h for why pyfuse3 needs that).

Import this before pyfuse3 calls pyfuse3.init(); importing it first of all
also covers a pyfuse3 built with immediate binding (-z now).
"""
import os
import sys

_flags = sys.getdlopenflags()
sys.setdlopenflags(_flags | os.RTLD_GLOBAL)
try:
    from nvmefs import _fuseshim
except ImportError:         # an optional extension: the build may have skipped it
    _fuseshim = None
finally:
    sys.setdlopenflags(_flags)

if _fuseshim is not None:
    set_fallocate_handler = _fuseshim.set_fallocate_handler
    set_lane = _fuseshim.set_lane
    reply_err = _fuseshim.reply_err
    reply_buf = _fuseshim.reply_buf
    reply_write = _fuseshim.reply_write
    sessions_hooked = _fuseshim.sessions_hooked
    lane_sessions = _fuseshim.lane_sessions
    TAKEN = _fuseshim.TAKEN
else:
    TAKEN = object()

    def set_fallocate_handler(handler):
        pass

    def set_lane(read, write):
        pass

    def reply_buf(req, data):
        raise RuntimeError("nvmefs._fuseshim is not built")

    reply_write = reply_buf

    def reply_err(req, err):
        raise RuntimeError("nvmefs._fuseshim is not built")

    def sessions_hooked():
        return 0

    lane_sessions = sessions_hooked
