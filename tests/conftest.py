import contextlib
import os
import struct

import pytest

from nvmefs import _core

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition, what):
    """Skip when a prerequisite is missing -- except under CI, where a missing
    prerequisite is a failure (the brief: never a silent skip in CI)."""
    if condition:
        return
    if CI:
        pytest.fail(f"prerequisite missing under CI: {what}")
    pytest.skip(f"prerequisite missing: {what}")


def require_root_fuse():
    """What a real mount needs: root (loop devices, mount), /dev/fuse, fusermount3."""
    import shutil
    require(os.geteuid() == 0, "root")
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    require(shutil.which("fusermount3"), "fusermount3 (package fuse3)")


@pytest.fixture
def root_fuse():
    require_root_fuse()


URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


@contextlib.contextmanager
def enable_uring(value):
    """The fuse module's enable_uring set to ``value`` ("Y"/"N") for the
    block, and put back after (it is global: every FUSE mount made while it
    is Y may use io_uring)."""
    require(os.path.exists(URING_PARAM), f"FUSE over io_uring in this kernel ({URING_PARAM})")
    with open(URING_PARAM) as f:
        old = f.read().strip()
    with open(URING_PARAM, "w") as f:
        f.write(value)
    try:
        yield
    finally:
        with open(URING_PARAM, "w") as f:
            f.write(old)


@pytest.fixture(params=["dev", "uring"])
def fuse_transport(request):
    """Runs a mount test on each FUSE transport of the lanes: /dev/fuse, and
    io_uring (enable_uring switched on for the test)."""
    import mounthelp
    if request.param == "uring":
        with enable_uring("Y"):
            mounthelp.FUSE_TRANSPORT["value"] = "uring"
            try:
                yield "uring"
            finally:
                mounthelp.FUSE_TRANSPORT["value"] = None
    else:
        mounthelp.FUSE_TRANSPORT["value"] = "dev"
        try:
            yield "dev"
        finally:
            mounthelp.FUSE_TRANSPORT["value"] = None


@pytest.fixture
def arena():
    return _core.DmaArena(64 << 20)


@pytest.fixture
def regs():
    return _core.RegisterFile(0x1000 + 64 * 8)


@pytest.fixture
def transport():
    """The built-in controller on memory: one 16 MiB namespace of 4 KiB LBAs."""
    from nvmefs.transport import ModelTransport
    t = ModelTransport(namespaces=((16 << 20, 4096),), arena_size=64 << 20)
    yield t
    t.close()


class FakeController:
    """A deterministic, single-threaded stand-in for a controller: reads the
    SQ only up to the doorbell the host wrote and posts CQEs with the right
    phase.  Used where tests need exact control of SQHD and completion order."""

    def __init__(self, qp, arena, regs, dstrd=0):
        self.qp, self.arena, self.regs = qp, arena, regs
        self.sq_db = regs.doorbell_offset(qp.qid, False, dstrd)
        self.cq_db = regs.doorbell_offset(qp.qid, True, dstrd)
        self.sq_head = 0
        self.cq_tail = 0
        self.phase = 1
        self.fetched = []

    def fetch(self, limit=None):
        """Consume SQ entries up to the tail doorbell; returns their raw bytes."""
        tail = self.regs.read32(self.sq_db)
        got = []
        while self.sq_head != tail and (limit is None or len(got) < limit):
            got.append(self.arena.read(self.qp.sq_iova + 64 * self.sq_head, 64))
            self.sq_head = (self.sq_head + 1) % self.qp.entries
        self.fetched += got
        return got

    def complete(self, cid, status=0, dw0=0, sqhd=None, sqid=None):
        sqhd = self.sq_head if sqhd is None else sqhd
        sqid = self.qp.qid if sqid is None else sqid
        cqe = struct.pack("<IIHHHH", dw0, 0, sqhd, sqid, cid, (status << 1) | self.phase)
        self.arena.write(self.qp.cq_iova + 16 * self.cq_tail, cqe)
        self.cq_tail += 1
        if self.cq_tail == self.qp.entries:
            self.cq_tail = 0
            self.phase ^= 1

    def cq_head_doorbell(self):
        return self.regs.read32(self.cq_db)


def sqe_cid(raw):
    return struct.unpack_from("<H", raw, 2)[0]


def sqe_dptr(raw):
    return struct.unpack_from("<QQ", raw, 24)


@pytest.fixture
def fake():
    return FakeController


# the NVMe/TCP lab's target (one guest per session), for any test module
from tcp_lab import nvmet_target  # noqa: E402,F401
