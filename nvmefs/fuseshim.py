"""Loads the fallocate shim (``nvmefs._fuseshim``) into the process's global
symbol scope, so that pyfuse3's call of libfuse's fuse_session_new() goes
through the wrapper that adds a fallocate operation and the direct lane's
read and write handlers (see
_core/fuseshim/session_hook.h for why pyfuse3 needs that).

Import this before pyfuse3 calls pyfuse3.init(); importing it first of all
also covers a pyfuse3 built with immediate binding (-z now).
"""
import logging
import os
import sys
import threading

import trio

_flags = sys.getdlopenflags()
sys.setdlopenflags(_flags | os.RTLD_GLOBAL)
try:
    from nvmefs import _fuseshim
except ImportError:         # an optional extension: the build may have skipped it
    _fuseshim = None
finally:
    sys.setdlopenflags(_flags)

if _fuseshim is not None:
    from nvmefs._fuseshim import (TAKEN, arm_lane_thread, lane_close, lane_sessions, lane_thread_stats,
                                  lane_threaded, reply_buf, reply_err, reply_write, sessions_hooked,
                                  set_engine, set_fallocate_handler, set_lane)
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

    def arm_lane_thread(on):
        pass

    def lane_threaded():
        return False

    def lane_close():
        pass

    def set_engine(engine):
        pass

    def lane_thread_stats():
        return {}


log = logging.getLogger("nvmefs.fuse")


class LaneThread:
    """The thread that reads /dev/fuse for a session created with
    arm_lane_thread(True) (see _core/fuseshim/session_hook.c): it answers
    the reads and writes the direct lane takes without any trio scheduling
    and hands every other request to pyfuse3's loop.  start() and stop()
    run in the trio thread."""

    def __init__(self):
        self.thread = None
        self.result = None
        self._instrument = None

    def start(self):
        self._instrument = _fuseshim.WorldLock()
        trio.lowlevel.add_instrument(self._instrument)
        _fuseshim.world_acquire()       # held from here on, except in I/O waits
        thread = threading.Thread(target=self._run, name="nvmefs-lane", daemon=True)
        try:
            thread.start()
        except BaseException:
            trio.lowlevel.remove_instrument(self._instrument)
            _fuseshim.world_release()
            raise
        self.thread = thread

    def _run(self):
        try:
            self.result = _fuseshim.lane_loop()
        except BaseException as exc:     # not expected: keep it for stop()
            self.result = exc
        if self.result:
            log.error("the lane thread stopped reading /dev/fuse: %r", self.result)

    def stop(self):
        """Ends the thread (at once if it already left its loop because the
        mount went away).  Idempotent."""
        if self.thread is None:
            return
        _fuseshim.lane_stop()
        # the thread may be waiting for the world lock to finish a request
        _fuseshim.world_release()
        try:
            self.thread.join()
        finally:
            _fuseshim.world_acquire()
            trio.lowlevel.remove_instrument(self._instrument)
            _fuseshim.world_release()
            self.thread = None
