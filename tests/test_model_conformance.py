"""Conformance of the in-process controller model (_model.ControllerModel):
registers, admin and I/O commands with their exact statuses, data pointer
validation, fault injection, shadow doorbells and the image store.

A raw host (model_harness.Host) writes entries and doorbells itself so that
invalid fields can be placed exactly; a few tests drive the model with the
real QueuePair instead.  Every wait has a deadline."""
import os
import select
import struct
import subprocess
import time

import pytest

from nvmefs import _core, _model

from conftest import require

from model_harness import (BIT_BUCKET, CC_READY, DATA, LAST_SEGMENT, PAGE, REG_AQA, REG_ASQ,
                           REG_ACQ, REG_CAP, REG_CC, REG_CSTS, REG_VS, SEGMENT, Host, Ring,
                           Timeout, sgl_desc, sqe, status_of)

NS_SIZE = 64 << 20
NQ = 8

# generic statuses (SCT 0) and command specific ones (SCT 1)
INVALID_OPCODE = (0, 0x01, True)
INVALID_FIELD = (0, 0x02, True)
CID_CONFLICT = (0, 0x03, True)
DATA_XFER = (0, 0x04, False)
ABORT_REQUESTED = (0, 0x07, False)
SQ_DELETED = (0, 0x08, False)
INVALID_NS = (0, 0x0B, True)
SEQUENCE_ERROR = (0, 0x0C, False)
SGL_SEGMENT = (0, 0x0D, True)
SGL_LENGTH = (0, 0x0F, True)
SGL_TYPE = (0, 0x11, True)
PRP_OFFSET = (0, 0x13, True)
LBA_RANGE = (0, 0x80, True)
OK = (0, 0, False)


@pytest.fixture
def make_host(tmp_path):
    """make_host(**ControllerModel kwargs) -> an enabled Host; every model is
    stopped at teardown even when the test fails."""
    models = []

    def make(enable=True, arena_size=64 << 20, **kw):
        if "image" not in kw:
            kw.setdefault("namespaces", ((NS_SIZE, 512),))
        kw.setdefault("max_io_queues", NQ)
        arena = _core.DmaArena(arena_size)
        regs = _core.RegisterFile(_model.model_regs_size(kw["max_io_queues"], kw.get("dstrd", 0)))
        model = _model.ControllerModel(arena, regs, **kw)
        models.append(model)
        model.start()
        host = Host(model, arena, regs, kw.get("dstrd", 0))
        if enable:
            host.enable()
        return host

    yield make
    for m in models:
        m.stop()


@pytest.fixture
def host(make_host):
    h = make_host()
    h.create_io(1)
    return h


def pattern(n, seed=0):
    return bytes((i * 7 + seed * 13 + (i >> 9)) & 0xFF for i in range(n))


# --- registers, enable, reset, shutdown -----------------------------------------------

def test_cap_vs_and_ready(make_host):
    h = make_host(enable=False, mqes=255, timeout_500ms=7, dstrd=1)
    cap = h.regs.read64(REG_CAP)
    assert cap & 0xFFFF == 255
    assert (cap >> 16) & 1 == 1                 # CQR
    assert (cap >> 24) & 0xFF == 7              # TO
    assert (cap >> 32) & 0xF == 1               # DSTRD
    assert (cap >> 37) & 1 == 1                 # CSS: NVM
    assert (cap >> 48) & 0xF == 0 and (cap >> 52) & 0xF == 0   # 4 KiB pages only
    assert h.regs.read32(REG_VS) == 0x00010400
    assert h.regs.read32(REG_CSTS) == 0
    h.enable()
    assert h.regs.read32(REG_CSTS) & 3 == 1
    # doorbells honour the stride: admin SQ tail at 0x1000, CQ head at 0x1008
    assert h.db(0, True) == 0x1008
    assert h.admin(0x06, cdw10=1, prp1=h.alloc(PAGE).iova).status == 0
    h.disable()
    assert h.regs.read32(REG_CSTS) & 1 == 0


@pytest.mark.parametrize("what", ["iosqes", "iocqes", "mps", "css", "aqa", "asq_unaligned"])
def test_enable_with_invalid_configuration_sets_cfs(make_host, what):
    h = make_host(enable=False)
    cc = CC_READY
    admin = Ring(h.arena, 0, 16)
    aqa = (15 << 16) | 15
    asq = admin.sq.iova
    if what == "iosqes":
        cc = (cc & ~(0xF << 16)) | (7 << 16)
    elif what == "iocqes":
        cc = (cc & ~(0xF << 20)) | (3 << 20)
    elif what == "mps":
        cc |= 1 << 7
    elif what == "css":
        cc |= 1 << 4
    elif what == "aqa":
        aqa = 0
    else:
        asq += 64
    h.regs.write32(REG_AQA, aqa)
    h.regs.write64(REG_ASQ, asq)
    h.regs.write64(REG_ACQ, admin.cq.iova)
    h.regs.write32(REG_CC, cc)
    h.model.kick()
    csts = h.wait_csts(2, 2)
    assert csts & 1 == 0
    # a reset (EN 1 -> 0) clears CFS, and a valid enable works
    h.regs.write32(REG_CC, 0)
    h.model.kick()
    h.wait_csts(3, 0)
    h.enable()
    assert h.model.stats()["enable_failures"] == 1


def test_shutdown_reports_complete(host):
    host.write(0, pattern(4096))
    host.regs.write32(REG_CC, CC_READY | (1 << 14))
    host.model.kick()
    host.wait_csts(0xC, 0x8)
    assert host.model.stats()["shutdowns"] == 1
    host.regs.write32(REG_CC, 0)
    host.model.kick()
    host.wait_csts(0xD, 0)          # SHST cleared with SHN, RDY with EN


def test_reset_deletes_io_queues(host):
    host.write(0, pattern(512))
    host.reset()
    c = host.admin(0x01, cdw10=(63 << 16) | 1, cdw11=(1 << 16) | 1, prp1=host.alloc(PAGE).iova)
    assert status_of(c) == (1, 0x00, True)      # CQ 1 is gone
    host.create_io(1)
    c, data = host.read(0, 512)
    assert c.status == 0 and data == pattern(512)
    assert host.model.stats()["resets"] == 1


# --- Identify -------------------------------------------------------------------------

def test_identify_controller(make_host):
    h = make_host(mdts=7, sgl="on", serial="SN42", model_name="Model X", mqes=511)
    d = h.identify(1)
    assert d[4:24] == b"SN42".ljust(20)
    assert d[24:64] == b"Model X".ljust(40)
    assert d[64:72].strip() != b""
    assert d[77] == 7
    assert struct.unpack_from("<I", d, 80)[0] == 0x00010400
    assert struct.unpack_from("<H", d, 256)[0] & 0x102 == 0x102    # OACS Format + DBBUF
    assert d[259] == 3                                               # AERL
    assert d[262] == 63                                              # ELPE
    assert d[512] == 0x66 and d[513] == 0x44
    assert struct.unpack_from("<H", d, 514)[0] == 511
    assert struct.unpack_from("<I", d, 516)[0] == 16                 # NN: every NSID it can allocate
    assert struct.unpack_from("<H", d, 520)[0] & 0xD == 0xD          # ONCS
    assert d[525] & 1 == 1                                           # VWC
    assert struct.unpack_from("<I", d, 536)[0] == 0x1                # SGLS "on"
    assert d[768:768 + 4] == b"nqn."


@pytest.mark.parametrize("sgl, sgls", [("off", 0), ("on", 1), ("bitbucket", 0x10001)])
def test_identify_sgls(make_host, sgl, sgls):
    h = make_host(sgl=sgl, vwc=False)
    d = h.identify(1)
    assert struct.unpack_from("<I", d, 536)[0] == sgls
    assert d[525] == 0


def test_identify_namespace_and_lists(make_host):
    h = make_host(namespaces=((NS_SIZE, 512), (8 << 20, 4096)))
    d = h.identify(0, nsid=1)
    nsze, ncap, nuse = struct.unpack_from("<QQQ", d, 0)
    assert nsze == ncap == nuse == NS_SIZE // 512
    assert d[25] == 1 and d[26] & 0xF == 0
    assert (struct.unpack_from("<I", d, 128)[0] >> 16) & 0xFF == 9
    assert (struct.unpack_from("<I", d, 132)[0] >> 16) & 0xFF == 12
    d = h.identify(0, nsid=2)
    assert struct.unpack_from("<Q", d, 0)[0] == (8 << 20) // 4096 and d[26] & 0xF == 1
    assert struct.unpack_from("<3I", h.identify(2, nsid=0), 0) == (1, 2, 0)
    assert struct.unpack_from("<2I", h.identify(2, nsid=1), 0) == (2, 0)
    buf = h.alloc(PAGE)
    for nsid in (0, 17):
        assert status_of(h.admin(0x06, nsid=nsid, cdw10=0, prp1=buf.iova)) == INVALID_NS
    # an unallocated NSID in 1..NN is inactive: a zeroed structure
    assert h.identify(0, nsid=3) == bytes(4096)
    # FFFFFFFFh: what every namespace shares (the LBA formats), no sizes
    d = h.identify(0, nsid=0xFFFFFFFF)
    assert struct.unpack_from("<Q", d, 0)[0] == 0 and d[25] == 1
    assert (struct.unpack_from("<I", d, 132)[0] >> 16) & 0xFF == 12
    assert status_of(h.admin(0x06, nsid=0xFFFFFFFE, cdw10=2, prp1=buf.iova)) == INVALID_NS
    assert status_of(h.admin(0x06, cdw10=0x55, prp1=buf.iova)) == INVALID_FIELD


def test_identify_into_offset_prp_spanning_two_pages(make_host):
    h = make_host()
    buf = h.alloc(2 * PAGE)
    c = h.admin(0x06, cdw10=1, prp1=buf.iova + 0x100, prp2=buf.iova + PAGE)
    assert c.status == 0
    assert h.arena.read(buf.iova + 0x100 + 4, 20) == b"NVMEFS0000001".ljust(20)


# --- queue management -----------------------------------------------------------------

def test_create_delete_queue_errors(make_host):
    h = make_host(mqes=63)
    mem = h.alloc(PAGE)
    cq = lambda qid, qsize=15, cdw11=0b11, prp1=mem.iova: h.admin(
        0x05, cdw10=(qsize << 16) | qid, cdw11=cdw11, prp1=prp1)
    sq = lambda qid, cqid, qsize=15, cdw11=1, prp1=mem.iova: h.admin(
        0x01, cdw10=(qsize << 16) | qid, cdw11=(cqid << 16) | cdw11, prp1=prp1)
    assert status_of(cq(0)) == (1, 0x01, True)
    assert status_of(cq(NQ + 1)) == (1, 0x01, True)
    assert status_of(cq(1, qsize=0)) == (1, 0x02, True)
    assert status_of(cq(1, qsize=64)) == (1, 0x02, True)
    assert status_of(cq(1, prp1=mem.iova + 64)) == PRP_OFFSET
    assert status_of(cq(1, cdw11=0b10)) == INVALID_FIELD                   # PC=0, CQR=1
    assert status_of(cq(1, cdw11=((NQ + 1) << 16) | 0b11)) == (1, 0x08, True)
    assert status_of(cq(1, prp1=0x1000)) == DATA_XFER                      # not in the arena
    assert cq(1).status == 0
    assert status_of(cq(1)) == (1, 0x01, True)                              # exists
    assert status_of(sq(1, cqid=2)) == (1, 0x00, True)                      # no such CQ
    assert status_of(sq(1, cqid=0)) == (1, 0x00, True)                      # admin CQ
    assert status_of(sq(0, cqid=1)) == (1, 0x01, True)
    assert status_of(sq(1, cqid=1, qsize=0)) == (1, 0x02, True)
    assert status_of(sq(1, cqid=1, qsize=64)) == (1, 0x02, True)
    assert status_of(sq(1, cqid=1, prp1=mem.iova + 8)) == PRP_OFFSET
    assert status_of(sq(1, cqid=1, cdw11=0)) == INVALID_FIELD
    sqmem = h.alloc(PAGE)
    assert sq(1, cqid=1, prp1=sqmem.iova).status == 0
    assert status_of(sq(1, cqid=1, prp1=sqmem.iova)) == (1, 0x01, True)
    assert status_of(h.admin(0x04, cdw10=1)) == (1, 0x0C, False)           # SQ attached
    assert status_of(h.admin(0x00, cdw10=2)) == (1, 0x01, True)
    assert status_of(h.admin(0x00, cdw10=0)) == (1, 0x01, True)
    assert h.admin(0x00, cdw10=1).status == 0
    assert h.admin(0x04, cdw10=1).status == 0
    assert status_of(h.admin(0x04, cdw10=1)) == (1, 0x01, True)
    # one CQ shared by two SQs
    h.create_io(1)
    r2 = Ring(h.arena, 2, 16)
    assert h.admin(0x01, cdw10=(15 << 16) | 2, cdw11=(1 << 16) | 1, prp1=r2.sq.iova).status == 0
    assert status_of(h.admin(0x04, cdw10=1)) == (1, 0x0C, False)


def test_admin_unknown_opcode_sgl_and_fused(make_host):
    h = make_host()
    assert status_of(h.admin(0xC1)) == INVALID_OPCODE
    buf = h.alloc(PAGE)
    c = h.cmd(sqe(0x06, cdw10=1, sgl=sgl_desc(buf.iova, PAGE)))
    assert status_of(c) == INVALID_FIELD
    assert status_of(h.admin(0x06, cdw10=1, prp1=buf.iova, fuse=1)) == INVALID_FIELD


def test_sq_flow_control_and_cq_wrap(make_host):
    # 300 commands through an 8-entry SQ and a 4-entry CQ: the phase flips
    # many times and SQHD frees slots; nothing is lost or duplicated
    h = make_host()
    h.create_io(1, entries=8, cq_entries=4)
    done = []
    sent = 0
    deadline = time.monotonic() + 10
    while len(done) < 300:
        # keep at most 3 outstanding: the CQ can hold size-1 entries
        while sent < 300 and sent - len(done) < 3:
            h.place(1, sqe(0x00, nsid=1))
            sent += 1
        h.ring(1)
        done += h.poll(1)
        assert time.monotonic() < deadline
    assert all(c.status == 0 for c in done)
    assert len({c.cid for c in done[:3]}) == 3


# --- features -------------------------------------------------------------------------

def test_features(make_host):
    h = make_host()
    c = h.admin(0x09, cdw10=0x07, cdw11=(3 << 16) | 3)
    assert c.status == 0 and c.dw0 == ((NQ - 1) << 16) | (NQ - 1)
    assert h.admin(0x0A, cdw10=0x07).dw0 == ((NQ - 1) << 16) | (NQ - 1)
    assert status_of(h.admin(0x09, cdw10=0x07, cdw11=0xFFFF)) == INVALID_FIELD
    assert h.admin(0x0A, cdw10=0x06).dw0 == 1
    assert h.admin(0x09, cdw10=0x06, cdw11=0).status == 0
    assert h.admin(0x0A, cdw10=0x06).dw0 == 0
    assert h.admin(0x0A, cdw10=0x06 | (1 << 8)).dw0 == 1         # default value
    assert h.admin(0x09, cdw10=0x08, cdw11=0x0A04).status == 0
    assert h.admin(0x0A, cdw10=0x08).dw0 == 0x0A04
    assert h.admin(0x09, cdw10=0x0B, cdw11=0x1FF).status == 0
    assert h.admin(0x0A, cdw10=0x0B).dw0 == 0x1FF
    assert status_of(h.admin(0x09, cdw10=0x33)) == INVALID_FIELD
    assert status_of(h.admin(0x0A, cdw10=0x33)) == INVALID_FIELD
    assert status_of(h.admin(0x09, cdw10=0x08 | (1 << 31))) == (1, 0x0D, True)
    h.create_io(1)
    assert status_of(h.admin(0x09, cdw10=0x07, cdw11=0)) == SEQUENCE_ERROR


def test_mandatory_features(make_host):
    """Arbitration, Power Management, Temperature Threshold, Error Recovery,
    Interrupt Vector Configuration, Write Atomicity Normal (NVMe 1.4: all
    mandatory): set, read back, defaults, bad values, NSID scope, reset."""
    h = make_host(namespaces=((NS_SIZE, 512), (NS_SIZE, 512)))
    get = lambda fid, dw11=0, sel=0, nsid=0: h.admin(0x0A, nsid=nsid, cdw10=fid | (sel << 8), cdw11=dw11)
    put = lambda fid, dw11, nsid=0: h.admin(0x09, nsid=nsid, cdw10=fid, cdw11=dw11)
    assert put(0x01, 0x03020107).status == 0 and get(0x01).dw0 == 0x03020107
    assert put(0x02, 0x40).status == 0 and get(0x02).dw0 == 0x40             # WH 2, PS 0
    assert status_of(put(0x02, 0x01)) == INVALID_FIELD                       # PS 1 > NPSS 0
    assert get(0x04).dw0 == 343 and get(0x04, 1 << 20).dw0 == 0              # WCTEMP over, 0 under
    assert put(0x04, 330).status == 0 and put(0x04, (1 << 20) | 260).status == 0
    assert (get(0x04).dw0, get(0x04, 1 << 20).dw0, get(0x04, sel=1).dw0) == (330, 260, 343)
    assert status_of(put(0x04, (1 << 16) | 300)) == INVALID_FIELD            # sensor 1: none
    assert status_of(put(0x04, (2 << 20) | 300)) == INVALID_FIELD            # THSEL reserved
    # Error Recovery is per namespace: an active NSID, or FFFFFFFFh to set them all
    assert put(0x05, 50, nsid=0xFFFFFFFF).status == 0 and put(0x05, 7, nsid=2).status == 0
    assert (get(0x05, nsid=1).dw0, get(0x05, nsid=2).dw0) == (50, 7)
    assert get(0x05, sel=3, nsid=1).dw0 == 0x6                               # changeable, per namespace
    assert status_of(put(0x05, 1 << 16, nsid=1)) == INVALID_FIELD            # DULBE: not supported
    assert status_of(get(0x05)) == INVALID_NS
    assert status_of(get(0x05, nsid=3)) == INVALID_FIELD                     # inactive
    assert status_of(get(0x05, nsid=0xFFFFFFFF)) == INVALID_FIELD
    # the others name no namespace: a Set naming one is refused, a Get ignores it
    assert status_of(put(0x01, 0, nsid=1)) == (1, 0x0F, True)
    assert get(0x06, nsid=2).status == 0 and get(0x06, nsid=0xFFFFFFFF).status == 0
    assert get(0x09, 0).dw0 == 1 << 16                                       # admin vector: never coalesced
    assert put(0x09, (1 << 16) | 3).status == 0 and get(0x09, 3).dw0 == (1 << 16) | 3
    assert get(0x09, 4).dw0 == 4 and put(0x09, 0).status == 0 and get(0x09, 0).dw0 == 1 << 16
    assert status_of(get(0x09, NQ + 1)) == INVALID_FIELD
    assert put(0x0A, 1).status == 0 and get(0x0A).dw0 == 1 and get(0x0A, sel=1).dw0 == 0
    h.reset()
    assert (get(0x01).dw0, get(0x02).dw0, get(0x04).dw0, get(0x05, nsid=2).dw0, get(0x09, 3).dw0,
            get(0x0A).dw0) == (0, 0, 343, 0, 3, 0)


def test_get_log_page_within_mdts(make_host):
    h = make_host(mdts=1)                                  # 8 KiB
    assert h.get_log(0x05, 8192)[0].status == 0            # more than the 4 KiB page: cut short
    c, _ = h.get_log(0x05, 8192 + 4)
    assert status_of(c) == INVALID_FIELD                   # the ask is what MDTS bounds, not the page


def test_vwc_absent_feature_refused(make_host):
    h = make_host(vwc=False)
    assert status_of(h.admin(0x09, cdw10=0x06, cdw11=1)) == INVALID_FIELD


# --- read / write with PRPs and SGLs -----------------------------------------------------

def test_rw_prp_single_two_pages_and_chained_list(make_host):
    h = make_host(mdts=10)
    h.create_io(1)
    # two pages from an offset, then 4 MiB from an offset: PRP list chained over 3 pages
    for slba, n, off in ((0, 4096, 0x200), (100, 4 << 20, 0x400), (20000, 512, 0xE00)):
        data = pattern(n, slba)
        buf = h.alloc(n + PAGE)
        h.arena.write(buf.iova + off, data)
        prp1, prp2 = h.prps(buf.iova + off, n)
        c = h.io(0x01, nsid=1, cdw10=slba, cdw12=n // 512 - 1, prp1=prp1, prp2=prp2)
        assert c.status == 0
        c, back = h.read(slba, n)
        assert c.status == 0 and back == data
    assert _core.prp_list_pages_needed(4 << 20, 0x400) == 3


def test_rw_sgl_segment_chain_and_bit_bucket(make_host):
    h = make_host()
    h.create_io(1)
    data = pattern(64 * 1024, 3)
    h.write(8, data)
    # 300 scattered 4-byte aligned pieces: a chain of Segment lists
    buf = h.alloc(300 * 2 * PAGE)
    segs, total, k = [], 0, 0
    while total < len(data):
        n = min(len(data) - total, 100 + 4 * (k % 50))
        segs.append((buf.iova + 2 * PAGE * k + 4 * (k % 7), n))
        total += n
        k += 1
    assert len(segs) > 256
    sgl1 = h.sgl(segs)
    assert sgl1[15] >> 4 == SEGMENT
    c = h.io(0x02, nsid=1, cdw10=8, cdw12=len(data) // 512 - 1, sgl=sgl1)
    assert c.status == 0
    got = b"".join(h.arena.read(a, n) for a, n in segs)
    assert got == data
    # bit buckets: read 8 KiB, keep the first and last 1 KiB
    out = h.alloc(2 * PAGE)
    sgl1 = h.sgl([(out.iova, 1024), (0, 6144, True), (out.iova + PAGE, 1024)])
    c = h.io(0x02, nsid=1, cdw10=8, cdw12=15, sgl=sgl1)
    assert c.status == 0
    assert h.arena.read(out.iova, 1024) == data[:1024]
    assert h.arena.read(out.iova + PAGE, 1024) == data[7168:8192]
    # SGL write then PRP read
    d2 = pattern(8192, 9)
    h.write(5000, d2, dptr="sgl")
    assert h.read(5000, 8192)[1] == d2


def test_real_queue_pairs_drive_the_model(make_host):
    h = make_host(enable=False)
    arena, regs, model = h.arena, h.regs, h.model
    admin = _core.QueuePair(arena, regs, 0, 16)
    regs.write32(REG_AQA, (15 << 16) | 15)
    regs.write64(REG_ASQ, admin.sq_iova)
    regs.write64(REG_ACQ, admin.cq_iova)
    regs.write32(REG_CC, CC_READY)
    model.kick()
    h.wait_csts(1, 1)

    def run(qp, **kw):
        cid = qp.submit_command(**kw)
        model.kick()
        deadline = time.monotonic() + 3
        while True:
            got = qp.reap()
            if got:
                assert got[0][1] == cid
                return got[0]
            assert time.monotonic() < deadline, "no completion"
            time.sleep(0.0002)

    ident = arena.alloc(PAGE)
    assert run(admin, opc=0x06, cdw10=1, segments=[(ident.iova, PAGE)], dptr="prp")[2] == 0
    sgls = struct.unpack_from("<I", arena.read(ident.iova, PAGE), 536)[0]
    io = _core.QueuePair(arena, regs, 1, 32)
    io.sgls = sgls
    assert run(admin, opc=0x05, cdw10=(31 << 16) | 1, cdw11=(1 << 16) | 3,
               segments=[(io.cq_iova, 32 * 16)], dptr="prp")[2] == 0
    assert run(admin, opc=0x01, cdw10=(31 << 16) | 1, cdw11=(1 << 16) | 1,
               segments=[(io.sq_iova, 32 * 64)], dptr="prp")[2] == 0
    buf = arena.alloc(64 * 1024)
    data = pattern(64 * 1024, 5)
    arena.write(buf.iova, data)
    scattered = [(buf.iova + k * 8192, 4096) for k in range(8)]
    assert run(io, opc=0x01, nsid=1, cdw10=64, cdw12=63, segments=scattered, dptr="prp")[2] == 0
    back = arena.alloc(64 * 1024)
    assert run(io, opc=0x02, nsid=1, cdw10=64, cdw12=63, is_read=True,
               segments=[(back.iova + 4 * k * 1000, 4000 if k < 8 else 768) for k in range(9)],
               dptr="sgl")[2] == 0
    got = b"".join(arena.read(back.iova + 4 * k * 1000, 4000 if k < 8 else 768) for k in range(9))
    assert got == b"".join(arena.read(a, n) for a, n in scattered)
    # an error status reaches the queue pair intact
    st = run(io, opc=0x02, nsid=1, cdw10=NS_SIZE // 512, cdw12=0, is_read=True,
             segments=[(back.iova, 512)], dptr="prp")[2]
    assert _core.decode_status(st).name == "LBA_OUT_OF_RANGE"


# --- data pointer validation --------------------------------------------------------------

def test_prp_validation(host):
    h = host
    buf = h.alloc(4 * PAGE)
    lst = h.alloc(PAGE)
    rd = lambda n, prp1, prp2=0: status_of(h.io(0x02, nsid=1, cdw12=n // 512 - 1, prp1=prp1, prp2=prp2))
    assert rd(512, buf.iova + 2) == PRP_OFFSET                     # PRP1 not dword aligned
    assert rd(8192, buf.iova, buf.iova + PAGE + 8) == PRP_OFFSET    # second page with an offset
    assert rd(4096, buf.iova + 0x100, buf.iova + PAGE) == OK
    h.arena.write(lst.iova, struct.pack("<QQ", buf.iova + PAGE, buf.iova + 2 * PAGE + 0x40))
    assert rd(3 * PAGE, buf.iova, lst.iova) == PRP_OFFSET           # list entry with an offset
    assert rd(3 * PAGE, buf.iova, lst.iova + 4) == PRP_OFFSET       # list pointer not qword aligned
    h.arena.write(lst.iova, struct.pack("<QQ", buf.iova + PAGE, buf.iova + 2 * PAGE))
    assert rd(3 * PAGE, buf.iova, lst.iova) == OK
    # a list starting at an offset in its page: its last slot chains onward
    h.arena.write(lst.iova + PAGE - 8, struct.pack("<Q", buf.iova + PAGE + 0x10))
    assert rd(3 * PAGE, buf.iova, lst.iova + PAGE - 8) == PRP_OFFSET
    # addresses outside the arena: the IOMMU refuses -> Data Transfer Error
    assert rd(512, 0x1000) == DATA_XFER
    assert rd(8192, buf.iova, 0x2000) == DATA_XFER
    h.arena.write(lst.iova, struct.pack("<QQ", buf.iova + PAGE, 0x5000))
    assert rd(3 * PAGE, buf.iova, lst.iova) == DATA_XFER
    assert rd(3 * PAGE, buf.iova, 0x8000) == DATA_XFER
    errs = h.model.stats()["errors"]
    assert errs == 9


def test_sgl_validation(host):
    h = host
    buf = h.alloc(4 * PAGE)
    lst = h.alloc(PAGE)

    def rd(sgl1, n=4096, opc=0x02):
        return status_of(h.io(opc, nsid=1, cdw12=n // 512 - 1, sgl=sgl1))

    def put(*descs, where=lst.iova):
        h.arena.write(where, b"".join(descs))

    assert rd(sgl_desc(buf.iova, 4096)) == OK
    assert rd(sgl_desc(buf.iova, 4096, typ=4)) == SGL_TYPE                 # keyed data block
    assert rd(sgl_desc(buf.iova, 4096, typ=0xF)) == SGL_TYPE
    assert rd(sgl_desc(buf.iova, 4096, subtype=1)) == SGL_TYPE            # offset subtype
    assert rd(sgl_desc(buf.iova, 2048)) == SGL_LENGTH                      # too short
    assert rd(sgl_desc(buf.iova, 8192)) == SGL_LENGTH                      # too long (SGLS bit 18 = 0)
    assert rd(sgl_desc(0x3000, 4096)) == DATA_XFER
    put(sgl_desc(buf.iova, 2048), sgl_desc(buf.iova + PAGE, 2048))
    assert rd(sgl_desc(lst.iova, 32, typ=LAST_SEGMENT)) == OK
    assert rd(sgl_desc(lst.iova, 0, typ=LAST_SEGMENT)) == SGL_SEGMENT
    assert rd(sgl_desc(lst.iova, 24, typ=LAST_SEGMENT)) == SGL_SEGMENT
    assert rd(sgl_desc(lst.iova, 16, typ=LAST_SEGMENT)) == SGL_LENGTH
    assert rd(sgl_desc(0x7000, 32, typ=LAST_SEGMENT)) == DATA_XFER
    # a Last Segment's list holding a segment descriptor
    put(sgl_desc(buf.iova, 2048), sgl_desc(lst.iova + 512, 16, typ=LAST_SEGMENT))
    put(sgl_desc(buf.iova + PAGE, 2048), where=lst.iova + 512)
    assert rd(sgl_desc(lst.iova, 32, typ=LAST_SEGMENT)) == SGL_SEGMENT
    assert rd(sgl_desc(lst.iova, 32, typ=SEGMENT)) == OK                   # the same list under a Segment
    # a segment descriptor that is not the last of its list
    put(sgl_desc(lst.iova + 512, 16, typ=LAST_SEGMENT), sgl_desc(buf.iova, 2048))
    assert rd(sgl_desc(lst.iova, 32, typ=SEGMENT)) == SGL_SEGMENT
    # bit buckets: only on reads, and count toward the length
    put(sgl_desc(buf.iova, 1024), sgl_desc(0, 3072, typ=BIT_BUCKET))
    assert rd(sgl_desc(lst.iova, 32, typ=LAST_SEGMENT)) == OK
    assert rd(sgl_desc(lst.iova, 32, typ=LAST_SEGMENT), opc=0x01) == SGL_TYPE
    # a cyclic chain is cut off
    put(sgl_desc(lst.iova, 16, typ=SEGMENT))
    assert rd(sgl_desc(lst.iova, 16, typ=SEGMENT))[:2] == (0, 0x0E)


def test_sgl_modes(make_host):
    h = make_host(sgl="on")
    h.create_io(1)
    buf = h.alloc(PAGE)
    lst = h.alloc(PAGE)
    h.arena.write(lst.iova, sgl_desc(buf.iova, 512) + sgl_desc(0, 512, typ=BIT_BUCKET))
    c = h.io(0x02, nsid=1, cdw12=1, sgl=sgl_desc(lst.iova, 32, typ=LAST_SEGMENT))
    assert status_of(c) == SGL_TYPE                 # no bit bucket support
    h2 = make_host(sgl="off")
    h2.create_io(1)
    buf = h2.alloc(PAGE)
    assert status_of(h2.io(0x02, nsid=1, sgl=sgl_desc(buf.iova, 512))) == INVALID_FIELD
    assert status_of(h2.io(0x02, nsid=1, prp1=buf.iova, psdt=3)) == INVALID_FIELD


# --- I/O command validation and the other NVM commands -------------------------------------

def test_io_validation(make_host):
    h = make_host(mdts=2)                           # 16 KiB
    h.create_io(1)
    buf = h.alloc(8 * PAGE)
    prp1, prp2 = h.prps(buf.iova, 32768)
    nlba = NS_SIZE // 512
    for nsid in (0, 17, 0xFFFFFFFF):
        assert status_of(h.io(0x02, nsid=nsid, prp1=buf.iova)) == INVALID_NS
    # an inactive NSID (in 1..NN, not attached) is Invalid Field, as QEMU answers
    assert status_of(h.io(0x02, nsid=2, prp1=buf.iova)) == INVALID_FIELD
    assert status_of(h.io(0x02, nsid=1, cdw10=nlba, prp1=buf.iova)) == LBA_RANGE
    assert status_of(h.io(0x01, nsid=1, cdw10=nlba - 1, cdw12=1, prp1=buf.iova)) == LBA_RANGE
    assert status_of(h.io(0x02, nsid=1, cdw10=0xFFFFFFFF, cdw11=0xFFFFFFFF,
                          cdw12=1, prp1=buf.iova)) == LBA_RANGE            # wraps around 2^64
    assert h.io(0x02, nsid=1, cdw10=nlba - 1, prp1=buf.iova).status == 0
    assert status_of(h.io(0x02, nsid=1, cdw12=63, prp1=prp1, prp2=prp2)) == INVALID_FIELD   # > MDTS
    assert h.io(0x02, nsid=1, cdw12=31, prp1=prp1, prp2=prp2).status == 0                 # = MDTS
    assert status_of(h.io(0x7F, nsid=1)) == INVALID_OPCODE
    assert status_of(h.io(0x02, nsid=1, prp1=buf.iova, fuse=1)) == INVALID_FIELD
    # write zeroes is not bound by MDTS
    assert h.io(0x08, nsid=1, cdw10=0, cdw12=1000).status == 0
    assert status_of(h.io(0x08, nsid=1, cdw10=nlba - 10, cdw12=10)) == LBA_RANGE


def test_deallocate_write_zeroes_compare_flush(host):
    h = host
    data = pattern(64 * 512, 1)
    h.write(0, data)
    # Dataset Management: deallocate LBAs 8..15 and 40..47
    ranges = h.alloc(PAGE)
    h.arena.write(ranges.iova, struct.pack("<IIQ", 0, 8, 8) + struct.pack("<IIQ", 0, 8, 40))
    assert h.io(0x09, nsid=1, cdw10=1, cdw11=1 << 2, prp1=ranges.iova).status == 0
    back = h.read(0, len(data))[1]
    want = bytearray(data)
    want[8 * 512:16 * 512] = bytes(8 * 512)
    want[40 * 512:48 * 512] = bytes(8 * 512)
    assert back == bytes(want)
    # a range beyond the namespace fails the whole command
    h.arena.write(ranges.iova, struct.pack("<IIQ", 0, 8, 0) + struct.pack("<IIQ", 0, 8, NS_SIZE // 512 - 4))
    c = h.io(0x09, nsid=1, cdw10=1, cdw11=1 << 2, prp1=ranges.iova)
    assert status_of(c) == LBA_RANGE
    assert h.read(0, 512)[1] == data[:512]
    # attributes without AD change nothing
    assert h.io(0x09, nsid=1, cdw10=0, cdw11=1, prp1=ranges.iova).status == 0
    # Write Zeroes, with and without deallocation
    assert h.io(0x08, nsid=1, cdw10=20, cdw12=3).status == 0
    assert h.io(0x08, nsid=1, cdw10=30, cdw12=1 | (1 << 25)).status == 0
    back = h.read(0, len(data))[1]
    want[20 * 512:24 * 512] = bytes(4 * 512)
    want[30 * 512:32 * 512] = bytes(2 * 512)
    assert back == bytes(want)
    # Compare
    buf = h.alloc(PAGE)
    h.arena.write(buf.iova, data[:1024])
    assert h.io(0x05, nsid=1, cdw10=0, cdw12=1, prp1=buf.iova).status == 0
    h.arena.write(buf.iova + 1000, b"\xEE")
    assert status_of(h.io(0x05, nsid=1, cdw10=0, cdw12=1, prp1=buf.iova)) == (2, 0x85, True)
    # Flush, also to every namespace
    assert h.io(0x00, nsid=1).status == 0
    assert h.io(0x00, nsid=0xFFFFFFFF).status == 0
    assert status_of(h.io(0x00, nsid=17)) == INVALID_NS
    # FUA write
    assert h.write(100, pattern(512, 4), fua=True).status == 0
    assert h.read(100, 512)[1] == pattern(512, 4)


def test_format_changes_lba_size_and_erases(host):
    h = host
    h.write(0, pattern(8192, 2))
    assert status_of(h.admin(0x80, nsid=1, cdw10=2)) == (1, 0x0A, True)
    assert status_of(h.admin(0x80, nsid=1, cdw10=1 | (1 << 5))) == (1, 0x0A, True)   # PI
    assert status_of(h.admin(0x80, nsid=1, cdw10=1 | (2 << 9))) == INVALID_FIELD       # crypto erase
    assert status_of(h.admin(0x80, nsid=7, cdw10=1)) == INVALID_FIELD      # inactive
    assert status_of(h.admin(0x80, nsid=17, cdw10=1)) == INVALID_NS        # beyond NN
    # LBA format 1 without erase: the bytes stay, the block size changes
    assert h.admin(0x80, nsid=1, cdw10=1).status == 0
    d = h.identify(0, nsid=1)
    assert struct.unpack_from("<Q", d, 0)[0] == NS_SIZE // 4096 and d[26] & 0xF == 1
    c, back = h.read(1, 4096, lba=4096)
    assert c.status == 0 and back == pattern(8192, 2)[4096:]
    assert status_of(h.io(0x02, nsid=1, cdw10=NS_SIZE // 4096, prp1=h.alloc(PAGE).iova)) == LBA_RANGE
    # back to 512 with a user data erase
    assert h.admin(0x80, nsid=1, cdw10=0 | (1 << 9)).status == 0
    assert struct.unpack_from("<Q", h.identify(0, nsid=1), 0)[0] == NS_SIZE // 512
    assert h.read(0, 8192)[1] == bytes(8192)


# --- log pages ------------------------------------------------------------------------

def test_smart_log_counters(host):
    h = host
    c, before = h.get_log(0x02, 512)
    assert c.status == 0
    u = lambda raw, off: int.from_bytes(raw[off:off + 16], "little")
    assert 290 <= struct.unpack_from("<H", before, 1)[0] <= 310
    assert u(before, 112) >= 1                              # power cycles
    for i in range(3):
        h.write(i * 1000, pattern(600 * 512, i))           # 3 x 300 KiB written
    h.read(0, 4096)
    c, after = h.get_log(0x02, 512)
    assert u(after, 80) - u(before, 80) == 3               # host write commands
    assert u(after, 64) - u(before, 64) == 1               # host read commands
    assert u(after, 48) == 2                                # 1800 units of 512 B -> 2 (rounded up)
    assert u(after, 32) == 1
    h.io(0x02, nsid=9, prp1=h.alloc(PAGE).iova)
    c, last = h.get_log(0x02, 512)
    assert u(last, 176) == u(after, 176) + 1               # error log entries
    assert status_of(h.get_log(0x02, 512, nsid=5)[0]) == INVALID_NS


def test_error_log_entries_newest_first(host):
    h = host
    buf = h.alloc(PAGE)
    c1 = h.io(0x02, nsid=1, cdw10=NS_SIZE // 512 + 5, prp1=buf.iova)
    c2 = h.io(0x02, nsid=40, cdw10=77, prp1=buf.iova)
    c, log = h.get_log(0x01, 4096)
    assert c.status == 0
    e0, e1 = log[:64], log[64:128]
    count0, sqid0, cid0, st0, _loc0, lba0, nsid0 = struct.unpack_from("<QHHHHQI", e0)
    count1, sqid1, cid1, st1, _loc1, lba1, nsid1 = struct.unpack_from("<QHHHHQI", e1)
    assert count0 == count1 + 1
    assert (sqid0, cid0, nsid0, lba0) == (1, c2.cid, 40, 77)
    assert (sqid1, cid1, nsid1, lba1) == (1, c1.cid, 1, NS_SIZE // 512 + 5)
    assert _core.decode_status(st0).name == "INVALID_NAMESPACE_OR_FORMAT"
    assert _core.decode_status(st1).name == "LBA_OUT_OF_RANGE"
    # NUMD and offset select a part of the log
    c, part = h.get_log(0x01, 64, offset=64)
    assert c.status == 0 and part == e1
    assert status_of(h.get_log(0x01, 64, offset=4096)[0]) == INVALID_FIELD
    assert status_of(h.get_log(0x01, 64, offset=2)[0]) == INVALID_FIELD
    assert status_of(h.get_log(0x42, 64)[0]) == (1, 0x09, True)
    c, fw = h.get_log(0x03, 512)
    assert c.status == 0 and fw[0] == 1 and fw[8:11] == b"1.0"


# --- asynchronous events, abort, CID conflicts ------------------------------------------

def test_async_events_limit_and_invalid_doorbell(host):
    h = host
    cids = [h.submit(0, sqe(0x0C)) for _ in range(4)]
    h.expect_none(0, 0.05)
    c = h.admin(0x0C)
    assert status_of(c) == (1, 0x05, False)
    # a doorbell write to a queue that does not exist: error event, info 0
    h.regs.write32(h.db(5, False), 3)
    h.model.kick()
    (ev,) = h.wait(0)
    assert ev.cid in cids and ev.status == 0
    used = [ev.cid]
    assert ev.dw0 & 7 == 0 and (ev.dw0 >> 8) & 0xFF == 0x00 and (ev.dw0 >> 16) & 0xFF == 1
    assert h.model.stats()["invalid_doorbell_writes"] == 1
    # a tail beyond the SQ is ignored; its event waits until the error log is read
    h.regs.write32(h.db(1, False), 1000)
    h.model.kick()
    h.expect_none(0, 0.05)
    h.regs.write32(h.db(1, False), h.rings[1].tail)
    assert h.get_log(0x01, 64)[0].status == 0       # RAE=0 unmasks error events
    h.regs.write32(h.db(1, False), 2000)
    h.model.kick()
    (ev,) = h.wait(0)
    assert (ev.dw0 >> 8) & 0xFF == 0x01             # invalid doorbell write value
    used.append(ev.cid)
    h.regs.write32(h.db(1, False), h.rings[1].tail)
    # the queue still works
    assert h.write(0, pattern(512)).status == 0
    # aborting an outstanding AER
    left = [cid for cid in cids if cid not in used]
    c = h.admin(0x08, cdw10=(left[0] << 16) | 0)
    got = h.wait(0, 1)
    assert c.dw0 & 1 == 0
    assert got[0].cid == left[0] and status_of(got[0]) == ABORT_REQUESTED


def test_abort_dropped_command_and_cid_conflict(host):
    h = host
    h.model.inject(0x02, action="drop")
    buf = h.alloc(PAGE)
    cid = h.submit(1, sqe(0x02, nsid=1, prp1=buf.iova))
    h.expect_none(1, 0.05)
    assert h.model.stats()["held"] == 1
    # the same CID while the dropped command is outstanding
    h.submit(1, sqe(0x00, nsid=1), cid=cid)
    (c,) = h.wait(1)
    assert c.cid == cid and status_of(c) == CID_CONFLICT
    # Abort: not-held command -> DW0 bit 0 = 1; the dropped one completes with Abort Requested
    assert h.admin(0x08, cdw10=(0x7777 << 16) | 1).dw0 & 1 == 1
    c = h.admin(0x08, cdw10=(cid << 16) | 1)
    assert c.status == 0 and c.dw0 & 1 == 0
    (a,) = h.wait(1)
    assert a.cid == cid and status_of(a) == ABORT_REQUESTED
    assert h.model.stats()["aborted"] == 1 and h.model.stats()["held"] == 0
    assert h.read(0, 512)[0].status == 0


def test_delete_sq_aborts_held_commands(host):
    h = host
    h.model.inject(0x02, action="drop")
    cid = h.submit(1, sqe(0x02, nsid=1, prp1=h.alloc(PAGE).iova))
    h.expect_none(1, 0.05)
    assert h.admin(0x00, cdw10=1).status == 0
    (c,) = h.wait(1)
    assert c.cid == cid and status_of(c) == SQ_DELETED


# --- fault injection ----------------------------------------------------------------

def test_inject_fail_nth_and_count(host):
    h = host
    rid = h.model.inject(0x01, nth=2, count=2, sct=2, sc=0x80, dnr=True)
    assert isinstance(rid, int)
    res = [status_of(h.write(k, pattern(512, k))) for k in range(5)]
    assert res == [OK, (2, 0x80, True), (2, 0x80, True), OK, OK]
    assert h.model.faults() == []
    # a failed write transferred nothing
    assert h.read(1, 512)[1] == bytes(512)
    st = h.model.stats()
    assert st["injected_failures"] == 2 and st["media_errors"] == 2
    c, log = h.get_log(0x01, 64)
    assert _core.decode_status(struct.unpack_from("<H", log, 12)[0]).name == "WRITE_FAULT"
    # LBA and namespace filters, admin commands, clear_faults
    h.model.inject(0x02, lba_start=100, lba_end=199, count=0, sc=0x06)
    assert h.read(50, 512)[0].status == 0
    assert status_of(h.read(150, 512)[0]) == (0, 0x06, False)
    assert status_of(h.read(199, 1024)[0]) == (0, 0x06, False)
    assert status_of(h.read(98, 2048)[0]) == (0, 0x06, False)     # overlaps 100
    h.model.clear_faults()
    assert h.read(150, 512)[0].status == 0
    h.model.inject(0x06, admin=True, sc=0x04)
    assert status_of(h.admin(0x06, cdw10=1, prp1=h.alloc(PAGE).iova)) == DATA_XFER
    assert h.admin(0x06, cdw10=1, prp1=h.alloc(PAGE).iova).status == 0
    with pytest.raises(ValueError):
        h.model.inject(0x01, action="explode")


def test_inject_delay(host):
    h = host
    h.model.inject(0x01, action="delay", delay_ms=150)
    buf = h.alloc(PAGE)
    h.arena.write(buf.iova, pattern(512, 6))
    t0 = time.monotonic()
    cid = h.submit(1, sqe(0x01, nsid=1, cdw10=3, prp1=buf.iova))
    # executed at fetch, only the completion is held: a read behind it
    # already sees the data
    c, data = h.read(3, 512)
    assert c.status == 0 and data == pattern(512, 6)
    assert time.monotonic() - t0 < 0.14
    (c,) = h.wait(1, timeout=2)
    assert c.cid == cid and c.status == 0
    assert time.monotonic() - t0 >= 0.14
    assert h.model.stats()["injected_delays"] == 1


def test_fatal_and_reset(host):
    h = host
    h.model.set_fatal()
    assert h.regs.read32(REG_CSTS) & 2
    buf = h.alloc(PAGE)
    h.submit(1, sqe(0x02, nsid=1, prp1=buf.iova))
    h.expect_none(1, 0.1)
    h.reset()
    assert h.regs.read32(REG_CSTS) & 3 == 1
    h.create_io(1)
    assert h.read(0, 512)[0].status == 0


def test_hang_resume_and_reset(host):
    h = host
    h.model.hang(True)
    cid = h.submit(1, sqe(0x00, nsid=1))
    h.expect_none(1, 0.1)
    assert h.regs.read32(REG_CSTS) & 1 == 1        # registers still answer
    h.model.hang(False)
    (c,) = h.wait(1)
    assert c.cid == cid
    h.model.hang(True)
    h.submit(1, sqe(0x00, nsid=1))
    h.expect_none(1, 0.05)
    h.reset()                                      # EN 1 -> 0 ends the hang
    assert not h.model.stats()["hung"]
    h.create_io(1)
    assert h.read(0, 512)[0].status == 0


# --- interrupts, idle and kick --------------------------------------------------------------

def test_interrupt_eventfds(make_host):
    h = make_host()
    admin_fd = h.model.irq_fd(0)
    os.read(admin_fd, 8) if select.select([admin_fd], [], [], 0)[0] else None
    h.create_io(1, iv=3)
    h.create_io(2, ien=False, iv=4)
    for fd in (h.model.irq_fd(3), h.model.irq_fd(4)):
        assert not select.select([fd], [], [], 0)[0]
    h.write(0, pattern(512), qid=1)
    assert select.select([h.model.irq_fd(3)], [], [], 1.0)[0]
    assert struct.unpack("<Q", os.read(h.model.irq_fd(3), 8))[0] >= 1
    h.write(0, pattern(512), qid=2)
    assert not select.select([h.model.irq_fd(4)], [], [], 0.05)[0]
    assert select.select([admin_fd], [], [], 0)[0]
    with pytest.raises(ValueError):
        h.model.irq_fd(NQ + 1)


def test_idle_flag_and_kick(host):
    h = host
    addr, kick_fd = h.model.notifier()
    assert addr != 0 and kick_fd >= 0
    deadline = time.monotonic() + 2
    while not h.model.idle:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    # a doorbell plus kick is served well within the 50 ms sleep
    t0 = time.monotonic()
    for _ in range(5):
        time.sleep(0.002)
        h.submit(1, sqe(0x00, nsid=1))
        h.wait(1)
    assert (time.monotonic() - t0) / 5 < 0.03
    # without a kick the 50 ms poll timeout still finds it
    time.sleep(0.01)
    h.place(1, sqe(0x00, nsid=1))
    h.regs.write32(h.db(1, False), h.rings[1].tail)
    assert len(h.wait(1, timeout=1)) == 1


# --- shadow doorbells -----------------------------------------------------------------

def test_doorbell_buffer_config(host):
    h = host
    dbs, eis = h.alloc(PAGE), h.alloc(PAGE)
    assert status_of(h.admin(0x7C, prp1=dbs.iova + 8, prp2=eis.iova)) == INVALID_FIELD
    assert status_of(h.admin(0x7C, prp1=dbs.iova, prp2=0)) == INVALID_FIELD
    assert h.admin(0x7C, prp1=dbs.iova, prp2=eis.iova).status == 0
    r = h.rings[1]
    stride = 4
    # submit through the shadow page only: the MMIO doorbell is not written
    h.place(1, sqe(0x00, nsid=1))
    h.place(1, sqe(0x00, nsid=1))
    h.arena.write(dbs.iova + 2 * 1 * stride, struct.pack("<I", r.tail))
    h.model.kick()
    deadline = time.monotonic() + 2
    got = []
    while len(got) < 2:
        dw = h.arena.read(r.cq.iova + 16 * r.head, 16)
        if struct.unpack_from("<H", dw, 14)[0] & 1 == r.phase:
            got.append(dw)
            r.head += 1
        assert time.monotonic() < deadline
    h.arena.write(dbs.iova + (2 * 1 + 1) * stride, struct.pack("<I", r.head))
    h.model.kick()
    deadline = time.monotonic() + 2
    while struct.unpack_from("<II", h.arena.read(eis.iova + 2 * stride, 8)) != (r.tail, r.head):
        assert time.monotonic() < deadline, "event indexes not updated"
        time.sleep(0.001)
    assert h.model.stats()["shadow_doorbells"]
    # a queue created afterwards uses the shadow page too; MMIO still works
    h.create_io(2)
    assert h.write(0, pattern(512), qid=2).status == 0


# --- the image store ------------------------------------------------------------------

def test_image_persistence(make_host, tmp_path):
    path = tmp_path / "disk.img"
    h = make_host(image=path, namespaces=((NS_SIZE, 512), (16 << 20, 4096)))
    h.create_io(1)
    data = pattern(128 * 1024, 8)
    h.write(1000, data)
    h.write(5, pattern(4096, 1), nsid=2, lba=4096)
    assert h.admin(0x80, nsid=2, cdw10=0).status == 0       # ns 2 becomes 512-byte LBAs
    assert os.stat(path).st_blocks * 512 < 4 << 20          # sparse
    h.model.stop()
    h.model.stop()                                          # idempotent
    with pytest.raises(RuntimeError):
        h.model.start()
    info = _model.read_image_header(str(path))
    assert [(n["size"], n["lba_size"]) for n in info["namespaces"]] == [(NS_SIZE, 512), (16 << 20, 512)]
    assert info["clean"] and info["power_cycles"] == 1
    assert all(n["offset"] % (1 << 20) == 0 for n in info["namespaces"])
    h2 = make_host(image=path, create=False)
    h2.create_io(1)
    assert h2.read(1000, len(data))[1] == data
    assert h2.read(40, 4096, nsid=2)[1] == pattern(4096, 1)
    assert h2.model.namespaces[1]["lba_size"] == 512
    assert h2.model.stats()["power_cycles"] == 2
    # deallocation punches holes that read back as zeroes
    assert h2.io(0x08, nsid=1, cdw10=1000, cdw12=255 | (1 << 25)).status == 0
    assert h2.read(1000, 4096)[1] == bytes(4096)



def test_full_file_system_fails_the_write_not_the_model(make_host, tmp_path):
    """Writes go through a shared mapping of the image.  On a file system
    that cannot back a page (a sparse image on a full tmpfs) the copy raises
    SIGBUS: that write must complete with Write Fault, this process and the
    model must live, written data must stay readable, and freeing space must
    make writes succeed again."""
    require(os.geteuid() == 0, "root (mounts a 4 MiB tmpfs)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        h = make_host(image=str(mnt / "full.img"), namespaces=((64 << 20, 512),))
        h.create_io(1)
        chunk = 128 * 1024
        written, faults = [], 0
        for i in range(64):                   # 8 MiB into 4 MiB of tmpfs
            c = h.write(i * (chunk // 512), pattern(chunk, i))
            if c.status == 0:
                written.append(i)
            else:
                assert status_of(c)[:2] == (2, 0x80), c     # Media Errors / Write Fault
                faults += 1
        assert faults and len(written) >= 16, (written, faults)
        for i in written:
            c, data = h.read(i * (chunk // 512), chunk)
            assert c.status == 0 and data == pattern(chunk, i), i
        # Deallocate the first MiB: the holes give the space back, and a write
        # that failed for want of it now succeeds
        assert h.io(0x08, nsid=1, cdw10=0, cdw12=(1 << 20) // 512 - 1 | (1 << 25)).status == 0
        lost = next(i for i in range(64) if i not in written)
        assert h.write(lost * (chunk // 512), pattern(chunk, 99)).status == 0
        assert h.read(lost * (chunk // 512), chunk)[1] == pattern(chunk, 99)
        h.model.stop()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)

def test_image_errors(make_host, tmp_path):
    arena = _core.DmaArena(1 << 20)
    regs = _core.RegisterFile(_model.model_regs_size(4))
    mk = lambda path, **kw: _model.ControllerModel(arena, regs, image=str(path), max_io_queues=4, **kw)
    with pytest.raises(FileNotFoundError):
        mk(tmp_path / "missing.img", create=False)
    # no magic: a raw image (one namespace over it all), never rewritten
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 8192)
    m = mk(junk)
    assert m.raw and [(n["size"], n["lba_size"]) for n in m.namespaces] == [(8192, 512)]
    m.stop()
    assert junk.read_bytes() == b"\0" * 8192
    with pytest.raises(ValueError, match="NVMEFSIMG1"):
        _model.read_image_header(str(junk))
    # the magic and a header that makes no sense: an error, not raw
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"NVMEFSIMG1" + b"\0" * 8182)
    with pytest.raises(ValueError, match="version"):
        mk(bad)
    good = tmp_path / "good.img"
    _model.create_image(str(good), ((1 << 20, 512),))
    with pytest.raises(FileExistsError):
        _model.create_image(str(good), ((1 << 20, 512),))
    # an existing image's header wins over the namespaces argument
    m = mk(good, namespaces=((2 << 20, 4096),))
    assert [(n["size"], n["lba_size"]) for n in m.namespaces] == [(1 << 20, 512)]
    m.stop()
    with pytest.raises(ValueError, match="LBA size"):
        _model.create_image(str(tmp_path / "x.img"), ((1 << 20, 520),))
    ro = tmp_path / "ro.img"
    _model.create_image(str(ro), ((1 << 20, 512),))
    os.chmod(ro, 0o444)
    with pytest.raises(PermissionError, match="ro.img"):
        mk(ro)
    m = mk(good)
    with pytest.raises(OSError, match="in use"):
        mk(good)
    m.stop()
    # a model that is never started or stopped is torn down safely
    m2 = mk(good)
    del m2
    m3 = mk(good)
    m3.start()
    del m3


def test_constructor_validation():
    arena = _core.DmaArena(1 << 20)
    small = _core.RegisterFile(0x1000 + 16)
    with pytest.raises(ValueError, match="too small"):
        _model.ControllerModel(arena, small, max_io_queues=64)
    regs = _core.RegisterFile(_model.model_regs_size(4))
    for kw in ({"sgl": "maybe"}, {"mqes": 0}, {"namespaces": ((1000, 512),)},
               {"namespaces": ((1 << 20, 1024),)}, {"serial": "x" * 21}):
        with pytest.raises(ValueError):
            _model.ControllerModel(arena, regs, max_io_queues=4, **kw)


def test_a_bad_entry_anywhere_moves_no_byte(host):
    """DMA isolation: a data pointer with one entry outside the memory
    mapped for the controller (PRP list entry, SGL descriptor) fails with
    Data Transfer Error before any byte moves -- neither into the valid
    pages of a read's buffer, nor from a write's into the namespace."""
    h = host
    buf = h.alloc(4 * PAGE)
    lst = h.alloc(PAGE)
    fill = b"\xc3" * (4 * PAGE)
    h.arena.write(buf.iova, fill)
    assert h.write(0, pattern(4 * PAGE, 3)).status == 0
    outside = h.arena.iova_base + h.arena.size          # the first page past the arena
    # read: PRP1 and the first list entries valid, the last one outside
    h.arena.write(lst.iova, struct.pack("<QQQ", buf.iova + PAGE, buf.iova + 2 * PAGE, outside))
    c = h.io(0x02, nsid=1, cdw12=4 * PAGE // 512 - 1, prp1=buf.iova, prp2=lst.iova)
    assert status_of(c) == DATA_XFER
    assert h.arena.read(buf.iova, 4 * PAGE) == fill, "a failed read wrote into the host's buffer"
    # the same through an SGL: a valid data block, then one outside
    segs = h.alloc(PAGE)
    h.arena.write(segs.iova, sgl_desc(buf.iova, 2 * PAGE) + sgl_desc(outside, 2 * PAGE))
    c = h.io(0x02, nsid=1, cdw12=4 * PAGE // 512 - 1, sgl=sgl_desc(segs.iova, 32, LAST_SEGMENT))
    assert status_of(c) == DATA_XFER
    assert h.arena.read(buf.iova, 4 * PAGE) == fill
    # write: the namespace keeps what it had
    c = h.io(0x01, nsid=1, cdw12=4 * PAGE // 512 - 1, prp1=buf.iova, prp2=lst.iova)
    assert status_of(c) == DATA_XFER
    c, back = h.read(0, 4 * PAGE)
    assert c.status == 0 and back == pattern(4 * PAGE, 3), "a failed write changed the namespace"


def test_commands_supported_and_effects_log(host):
    """Log page 05h lists exactly the commands the model serves: every
    opcode without CSUPP is refused with Invalid Opcode, admin and I/O; the
    effects of Format NVM and of the writes are the spec's."""
    h = host
    ident = h.identify(1)
    assert ident[261] & 0x02, "LPA bit 1: Commands Supported and Effects"
    c, raw = h.get_log(0x05, 4096)
    assert status_of(c) == OK
    acs = struct.unpack_from("<256I", raw, 0)
    iocs = struct.unpack_from("<256I", raw, 1024)
    assert raw[2048:] == bytes(2048)
    assert acs[0x80] == 0b1111 | (2 << 16)              # Format: CSUPP LBCC NCC NIC, CSE: alone
    assert acs[0x06] == 1 and acs[0x3E] == 0
    assert iocs[0x01] == 0b11 and iocs[0x02] == 1 and iocs[0x7E] == 0
    for opc in range(256):
        if not acs[opc] & 1:
            assert status_of(h.admin(opc)) == (0, 0x01, True), f"admin opcode {opc:#x}"
        if not iocs[opc] & 1:
            assert status_of(h.io(opc, nsid=1)) == (0, 0x01, True), f"I/O opcode {opc:#x}"
