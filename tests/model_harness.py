"""A raw host for conformance tests of the controller model.

It manages its own SQ/CQ rings in the DmaArena and writes 64-byte entries
and doorbells itself, so tests can place any field -- including invalid
data pointers -- exactly where a controller reads it.  Every wait has a
deadline; nothing here can hang a test run.
"""
import collections
import struct
import time

from nvmefs import _core

PAGE = 4096
SQE = struct.Struct("<BBHIIIQQQIIIIII")
CQE = struct.Struct("<IIHHHH")

CC_READY = (6 << 16) | (4 << 20) | 1           # IOSQES=6, IOCQES=4, MPS=0, EN=1

REG_CAP, REG_VS, REG_CC, REG_CSTS, REG_AQA, REG_ASQ, REG_ACQ = 0x00, 0x08, 0x14, 0x1C, 0x24, 0x28, 0x30

Cqe = collections.namedtuple("Cqe", "dw0 dw1 sqhd sqid cid status sct sc dnr")


class Timeout(AssertionError):
    pass


def sqe(opc, *, cid=0, nsid=0, cdw10=0, cdw11=0, cdw12=0, cdw13=0, cdw14=0, cdw15=0,
        prp1=0, prp2=0, sgl=None, psdt=None, fuse=0, mptr=0):
    """A raw 64-byte submission queue entry.  ``sgl``: 16 raw bytes for SGL1
    (sets PSDT=01 unless ``psdt`` says otherwise)."""
    if psdt is None:
        psdt = 1 if sgl is not None else 0
    raw = SQE.pack(opc, (psdt << 6) | fuse, cid, nsid, 0, 0, mptr, prp1, prp2,
                   cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)
    if sgl is not None:
        assert len(sgl) == 16
        raw = raw[:24] + bytes(sgl) + raw[40:]
    return raw


def sgl_desc(addr, length, typ=0, subtype=0):
    return struct.pack("<QI3xB", addr, length, (typ << 4) | subtype)


DATA, BIT_BUCKET, SEGMENT, LAST_SEGMENT = 0, 1, 2, 3


class Ring:
    """One host-side SQ/CQ pair (qid 0 = the admin queue)."""

    def __init__(self, arena, qid, entries, cq_entries=None):
        self.qid = qid
        self.entries = entries
        self.cq_entries = cq_entries or entries
        self.sq = arena.alloc(entries * 64)
        self.cq = arena.alloc(self.cq_entries * 16)
        self.tail = 0
        self.head = 0
        self.phase = 1
        self.next_cid = 1


class Host:
    def __init__(self, model, arena, regs, dstrd=0):
        self.model, self.arena, self.regs, self.dstrd = model, arena, regs, dstrd
        self.rings = {}
        self.bufs = []
        self.stash = {}         # completions seen while waiting for another CID
        self.rung = {}

    # --- registers ---

    def db(self, qid, cq):
        return self.regs.doorbell_offset(qid, cq, self.dstrd)

    def wait_csts(self, mask, value, timeout=2.0):
        deadline = time.monotonic() + timeout
        while (self.regs.read32(REG_CSTS) & mask) != value:
            if time.monotonic() > deadline:
                raise Timeout(f"CSTS 0x{self.regs.read32(REG_CSTS):x}: bits 0x{mask:x} != 0x{value:x}")
            time.sleep(0.0002)
        return self.regs.read32(REG_CSTS)

    def enable(self, admin_entries=32, cc=CC_READY, expect_ready=True):
        admin = Ring(self.arena, 0, admin_entries)
        self.rings[0] = admin
        self.stash.pop(0, None)
        self.rung.pop(0, None)
        self.regs.write32(REG_AQA, ((admin_entries - 1) << 16) | (admin_entries - 1))
        self.regs.write64(REG_ASQ, admin.sq.iova)
        self.regs.write64(REG_ACQ, admin.cq.iova)
        self.regs.write32(REG_CC, cc)
        self.model.kick()
        if expect_ready:
            self.wait_csts(1, 1)
        return admin

    def disable(self):
        self.regs.write32(REG_CC, 0)
        self.model.kick()
        self.wait_csts(1, 0)
        self.rings = {}
        self.stash = {}
        self.rung = {}

    def reset(self):
        self.disable()
        return self.enable()

    # --- submission and completion ---

    def alloc(self, n):
        b = self.arena.alloc(n)
        self.bufs.append(b)
        return b

    def place(self, qid, raw, cid=None):
        """Write ``raw`` into the next SQ slot (the CID field replaced when
        ``cid`` is given or the entry has CID 0), without ringing."""
        r = self.rings[qid]
        if cid is None:
            cid = struct.unpack_from("<H", raw, 2)[0] or r.next_cid
        r.next_cid = (cid + 1) & 0xFFFF or 1
        raw = raw[:2] + struct.pack("<H", cid) + raw[4:]
        self.arena.write(r.sq.iova + 64 * r.tail, raw)
        r.tail = (r.tail + 1) % r.entries
        return cid

    def ring(self, qid):
        self.regs.write32(self.db(qid, False), self.rings[qid].tail)
        self.model.kick()

    def submit(self, qid, raw, cid=None):
        cid = self.place(qid, raw, cid)
        self.ring(qid)
        return cid

    def poll(self, qid):
        """Every completion already posted (no waiting)."""
        r = self.rings[qid]
        out = self.stash.pop(qid, [])
        while True:
            dw0, dw1, sqhd, sqid, cid, st = CQE.unpack(self.arena.read(r.cq.iova + 16 * r.head, 16))
            if (st & 1) != r.phase:
                break
            s = st & 0xFFFE
            out.append(Cqe(dw0, dw1, sqhd, sqid, cid, s, (s >> 9) & 7, (s >> 1) & 0xFF, bool(s >> 15)))
            r.head += 1
            if r.head == r.cq_entries:
                r.head = 0
                r.phase ^= 1
        if out and r.head != self.rung.get(qid):
            self.rung[qid] = r.head
            self.regs.write32(self.db(qid, True), r.head)
            self.model.kick()
        return out

    def wait(self, qid, n=1, timeout=3.0):
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            got += self.poll(qid)
            if len(got) >= n:
                break
            if time.monotonic() > deadline:
                raise Timeout(f"queue {qid}: {len(got)} of {n} completions within {timeout}s")
            time.sleep(0.0002)
        return got

    def expect_none(self, qid, duration=0.1):
        time.sleep(duration)
        got = self.poll(qid)
        assert got == [], f"unexpected completions {got}"

    def cmd(self, raw, qid=0, timeout=3.0):
        """Submit one command and wait for its completion; completions of
        other commands seen meanwhile are kept for the next poll/wait."""
        cid = self.submit(qid, raw)
        deadline = time.monotonic() + timeout
        while True:
            got = self.poll(qid)
            mine = [c for c in got if c.cid == cid]
            others = [c for c in got if c.cid != cid]
            if others:
                self.stash.setdefault(qid, []).extend(others)
            if mine:
                assert len(mine) == 1 and mine[0].sqid == qid, mine
                return mine[0]
            if time.monotonic() > deadline:
                raise Timeout(f"queue {qid}: no completion for CID {cid} within {timeout}s")
            time.sleep(0.0002)

    def admin(self, opc, **kw):
        return self.cmd(sqe(opc, **kw), 0)

    def io(self, opc, qid=1, **kw):
        return self.cmd(sqe(opc, **kw), qid)

    # --- common admin sequences ---

    def create_io(self, qid, entries=64, ien=True, iv=None, cq_entries=None):
        r = Ring(self.arena, qid, entries, cq_entries)
        iv = qid if iv is None else iv
        c = self.admin(0x05, cdw10=((r.cq_entries - 1) << 16) | qid,
                       cdw11=(iv << 16) | (int(ien) << 1) | 1, prp1=r.cq.iova)
        assert c.status == 0, c
        c = self.admin(0x01, cdw10=((entries - 1) << 16) | qid, cdw11=(qid << 16) | 1,
                       prp1=r.sq.iova)
        assert c.status == 0, c
        self.rings[qid] = r
        self.stash.pop(qid, None)
        self.rung.pop(qid, None)
        return r

    def identify(self, cns, nsid=0):
        buf = self.alloc(PAGE)
        c = self.admin(0x06, nsid=nsid, cdw10=cns, prp1=buf.iova)
        assert c.status == 0, c
        return self.arena.read(buf.iova, PAGE)

    def get_log(self, lid, nbytes, offset=0, nsid=0xFFFFFFFF, rae=False):
        buf = self.alloc(max(nbytes, 1) + PAGE)
        numd = nbytes // 4 - 1
        prp1, prp2 = self.prps(buf.iova, nbytes)
        c = self.admin(0x02, nsid=nsid, cdw10=((numd & 0xFFFF) << 16) | (int(rae) << 15) | lid,
                       cdw11=numd >> 16, cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32,
                       prp1=prp1, prp2=prp2)
        return c, self.arena.read(buf.iova, nbytes)

    def prps(self, iova, nbytes):
        lst = self.alloc(16 * PAGE)
        return _core.build_prp([(iova, nbytes)], lst)

    def sgl(self, segments):
        lst = self.alloc(16 * PAGE)
        return _core.build_sgl(segments, lst)

    # --- I/O helpers (namespace 1, LBA size ``lba``) ---

    def write(self, slba, data, qid=1, nsid=1, lba=512, dptr="prp", fua=False):
        buf = self.alloc(len(data))
        self.arena.write(buf.iova, data)
        return self.io(0x01, qid, **self._rw(buf.iova, slba, len(data), nsid, lba, dptr, fua))

    def read(self, slba, nbytes, qid=1, nsid=1, lba=512, dptr="prp"):
        buf = self.alloc(nbytes)
        c = self.io(0x02, qid, **self._rw(buf.iova, slba, nbytes, nsid, lba, dptr, False))
        return c, self.arena.read(buf.iova, nbytes)

    def _rw(self, iova, slba, nbytes, nsid, lba, dptr, fua):
        kw = dict(nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                  cdw12=(nbytes // lba - 1) | (int(fua) << 30))
        if dptr == "prp":
            kw["prp1"], kw["prp2"] = self.prps(iova, nbytes)
        else:
            kw["sgl"] = self.sgl([(iova, nbytes)])
        return kw


def status_of(c):
    """(sct, sc, dnr) of a completion, as decode_status sees it."""
    info = _core.decode_status(c.status)
    return info.sct, info.sc, info.dnr


class _NoKick:
    """A real controller (QEMU's, over VFIO) needs no wake-up after doorbells."""

    @staticmethod
    def kick():
        pass


def bring_up(model, arena, regs):
    """A raw host on ``model`` (None: a real controller behind ``regs``),
    reset and brought up with one polled I/O queue pair, qid 1 (64 entries)."""
    h = Host(model or _NoKick(), arena, regs)
    regs.write32(REG_CC, 0)
    h.wait_csts(1, 0, timeout=10)
    h.enable()
    c = h.admin(0x09, cdw10=0x07, cdw11=0)          # Number of Queues: 1 + 1
    assert c.status == 0, c
    h.create_io(1, entries=64, ien=False)
    return h
