"""DMA isolation in the vfio lab: the IOMMU's promise, tested from both ends.

1. Bad bus addresses (``run_bad_addresses``): IOVAs with no IOMMU mapping for
   the device, placed in each place a controller takes an address from --
   PRP1, PRP2 as a data page, the PRP list pointer, a PRP list entry, an SGL
   data block (in SGL1 and inside a segment), an SGL segment pointer, an
   admin command's PRP1 -- sent through the raw host (tests/model_harness.py:
   it writes the SQ entries itself, so the fields can be wrong on purpose) to
   QEMU's controller over VFIO and to the model in the same guest process.
   Each command must complete with the status pinned in EXPECTED (QEMU) or
   Data Transfer Error (model); a canary buffer beside the command's real
   buffers, whose bus address a truncating device would hit, and 4 MiB of
   the process's own memory must not change by one byte; a write must leave
   on the medium only its real buffer's bytes or zeroes (nothing from memory
   it did not name, such as the canary); the guest kernel must log the
   IOMMU's refusal (a DMAR fault) at those addresses and at no other; and
   verified I/O on the same queue must work afterwards.

2. The driver's builders (``run_builders``): for seeded random buffer layouts
   inside an arena allocation, every address the PRP and SGL builders put in
   a command or a list -- the queue pair's own (per-command list pages) and
   the Python entry points build_prp / build_sgl -- lies inside the one
   IOVA range VfioDevice.map_arena mapped, and the list pointers inside the
   list memory the builder was given; QEMU then moves the data (verified)
   and the IOMMU logs no fault at all.  The host-side property tests
   (tests/test_prp_sgl_props.py) already check the builders against the
   reference walker on the model's arena; this is the same promise with the
   real IOMMU as the judge.
"""
import errno
import hashlib
import os
import random
import re
import struct
import time

from nvmefs import _core

from model_harness import LAST_SEGMENT, PAGE, SEGMENT, Timeout, bring_up, sgl_desc, sqe, status_of
from refcheck import coalesce, walk_prp, walk_sgl

MiB = 1 << 20
IO_WRITE, IO_READ = 0x01, 0x02
DTE = (0, 0x04)
SUCCESS = (0, 0x00)


# -- the guest kernel's log: DMAR faults ----------------------------------------------

DMAR_FAULT = re.compile(r"DMAR: \[DMA (Read|Write)[^\]]*\] Request device \[([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])\] "
                        r"fault addr 0x([0-9a-f]+)(?: \[fault reason 0x([0-9a-f]+)\] ?(.*))?")


class KernelLog:
    """Records of /dev/kmsg from the point this object was made (or from boot:
    ``from_boot=True``).  The intel-iommu driver logs each fault it handles,
    rate-limited (about five faults per five seconds), so a count of faults
    proves nothing; which addresses faulted does."""

    def __init__(self, from_boot=False):
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        if not from_boot:
            os.lseek(self.fd, 0, os.SEEK_END)
        self.records = []

    def read(self):
        while True:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:      # overwritten before we read it: go on
                    continue
                raise
            self.records.append(rec.decode("utf-8", "replace").split(";", 1)[-1].rstrip("\n"))
        return self.records

    def dmar_faults(self):
        """[(direction, 'bb:dd.f', page address, reason)] logged so far."""
        out = []
        for line in self.read():
            m = DMAR_FAULT.search(line)
            if m:
                out.append((m.group(1), f"{m.group(2)}:{m.group(3)}.{m.group(4)}", int(m.group(5), 16),
                            (m.group(7) or "").strip()))
        return out

    def wait_for_fault(self, timeout=5.0):
        """The fault interrupt reaches the guest kernel on its own time: wait
        (bounded) until one fault has been logged."""
        deadline = time.monotonic() + timeout
        while not self.dmar_faults() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.dmar_faults()

    def close(self):
        os.close(self.fd)


def short_bdf(bdf):
    return bdf.split(":", 1)[1] if bdf.count(":") == 2 else bdf


# -- 1. bad bus addresses -----------------------------------------------------------

def bad_addresses(arena, canary):
    """Bus addresses with no mapping: the pages just outside the arena's one
    mapping, and two that a device or driver bug would turn into the
    canary -- its IOVA with bit 40 set (a device keeping 40 address bits
    would write the canary) and its process virtual address (the classic
    driver bug of handing the device a pointer instead of a bus address)."""
    return {
        "past the end": arena.iova_base + arena.size,
        "below the start": arena.iova_base - PAGE,
        "canary + 2^40": canary.iova + (1 << 40),
        "canary's vaddr": arena.vaddr_base + (canary.iova - arena.iova_base),
    }


LBA = 512
AREA = 4096          # where probes read and write on namespace 1, in LBAs

PROBES = []


def probe(name, writes=False):
    def add(fn):
        PROBES.append((name, writes, fn))
        return fn
    return add


def _rw(opc, nlb, slba=AREA, **kw):
    return sqe(opc, nsid=1, cdw10=slba, cdw12=nlb - 1, **kw)


@probe("read, PRP1")
def _(h, b, bad):
    return h.cmd(_rw(IO_READ, 8, prp1=bad), 1)


@probe("write, PRP1", writes=True)
def _(h, b, bad):
    return h.cmd(_rw(IO_WRITE, 8, prp1=bad), 1)


@probe("read, PRP2 data page")
def _(h, b, bad):
    return h.cmd(_rw(IO_READ, 16, prp1=b.buf.iova, prp2=bad), 1)


@probe("read, PRP2 list pointer")
def _(h, b, bad):
    return h.cmd(_rw(IO_READ, 24, prp1=b.buf.iova, prp2=bad), 1)


@probe("read, PRP list entry")
def _(h, b, bad):
    h.arena.write(b.lst.iova, struct.pack("<QQ", b.buf.iova + PAGE, bad))
    return h.cmd(_rw(IO_READ, 24, prp1=b.buf.iova, prp2=b.lst.iova), 1)


@probe("write, PRP list entry", writes=True)
def _(h, b, bad):
    h.arena.write(b.lst.iova, struct.pack("<QQ", bad, b.buf.iova + 2 * PAGE))
    return h.cmd(_rw(IO_WRITE, 24, prp1=b.buf.iova, prp2=b.lst.iova), 1)


@probe("read, SGL data block")
def _(h, b, bad):
    return h.cmd(_rw(IO_READ, 8, sgl=sgl_desc(bad, 4096)), 1)


@probe("read, SGL segment pointer")
def _(h, b, bad):
    return h.cmd(_rw(IO_READ, 8, sgl=sgl_desc(bad, 32, typ=LAST_SEGMENT)), 1)


@probe("read, data block in an SGL segment")
def _(h, b, bad):
    h.arena.write(b.lst.iova, sgl_desc(b.buf.iova, 2048) + sgl_desc(bad, 2048))
    return h.cmd(_rw(IO_READ, 8, sgl=sgl_desc(b.lst.iova, 32, typ=LAST_SEGMENT)), 1)


@probe("write, data block in an SGL segment", writes=True)
def _(h, b, bad):
    h.arena.write(b.lst.iova, sgl_desc(bad, 2048) + sgl_desc(b.buf.iova, 2048))
    return h.cmd(_rw(IO_WRITE, 8, sgl=sgl_desc(b.lst.iova, 32, typ=LAST_SEGMENT)), 1)


@probe("read, next segment pointer in an SGL segment")
def _(h, b, bad):
    h.arena.write(b.lst.iova, sgl_desc(b.buf.iova, 2048) + sgl_desc(bad, 16, typ=LAST_SEGMENT))
    return h.cmd(_rw(IO_READ, 8, sgl=sgl_desc(b.lst.iova, 32, typ=SEGMENT)), 1)


@probe("admin Identify, PRP1")
def _(h, b, bad):
    return h.cmd(sqe(0x06, cdw10=1, prp1=bad), 0)


# probe -> what QEMU 7.2 answers, and why.  The model answers Data Transfer
# Error to every probe (NVMe: a data transfer that cannot complete).
DATA_PATH = ("QEMU: the IOMMU refuses the DMA (the guest kernel logs a DMAR fault), but 7.2 moves "
             "read and write data with dma-helpers, which takes an address that is not RAM through "
             "its bounce buffer and ignores the failed access: the command succeeds with nothing "
             "read into host memory, and a write puts zeroes on the medium where the bad address "
             "pointed.  The spec's status is Data Transfer Error (the model's)")
TX_PATH = ("QEMU: nvme_tx() checks only the residual of dma_buf_read(), not whether the DMA "
           "failed: success, nothing written to host memory; the spec's status is Data Transfer "
           "Error (the model's)")
LIST_READ = ("Data Transfer Error, as the spec says: 7.2 reads PRP lists and SGL segments with "
             "pci_dma_read() and reports its failure")
EXPECTED = {
    "read, PRP1": (SUCCESS, DATA_PATH),
    "write, PRP1": (SUCCESS, DATA_PATH),
    "read, PRP2 data page": (SUCCESS, DATA_PATH),
    "read, PRP2 list pointer": (DTE, LIST_READ),
    "read, PRP list entry": (SUCCESS, DATA_PATH),
    "write, PRP list entry": (SUCCESS, DATA_PATH),
    "read, SGL data block": (SUCCESS, DATA_PATH),
    "read, SGL segment pointer": (DTE, LIST_READ),
    "read, data block in an SGL segment": (SUCCESS, DATA_PATH),
    "write, data block in an SGL segment": (SUCCESS, DATA_PATH),
    "read, next segment pointer in an SGL segment": (DTE, LIST_READ),
    "admin Identify, PRP1": (SUCCESS, TX_PATH),
}


def table(qemu, model, medium):
    """The probes' answers as text: one row per probe (the same status at
    every bad address is shown once), then the reasons."""
    def name(st):
        if isinstance(st, str):
            return st
        return f"{_core.decode_status(_core.make_status(*st)).name} ({st[0]}/{st[1]:#04x})"

    rows = [("probe", "QEMU (VFIO)", "model", "medium after a QEMU write")]
    for pname, _writes, _fn in PROBES:
        qs = {name(v) for (p, _b), v in qemu.items() if p == pname}
        ms = {name(v) for (p, _b), v in model.items() if p == pname}
        rows.append((pname, " / ".join(sorted(qs)), " / ".join(sorted(ms)),
                     " ".join(sorted(medium.get(pname, ())))))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(w[i]) for i in range(4)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("medium: one character per LBA: = not written, g the command's real buffer, 0 zeroes")
    lines.append(f"bad addresses: {', '.join(sorted({b for _p, b in qemu}))}")
    for reason in dict.fromkeys(r for _st, r in EXPECTED.values()):
        lines.append("* " + ", ".join(p for p, (_st, r) in EXPECTED.items() if r == reason) + ": " + reason)
    return "\n".join(lines)


class Buffers:
    """The probes' real buffers and, right after them in the arena, the canary."""

    def __init__(self, h):
        self.buf = h.alloc(4 * PAGE)
        self.lst = h.alloc(PAGE)
        self.canary = h.alloc(4 * PAGE)
        assert self.canary.iova == self.lst.iova + PAGE == self.buf.iova + 5 * PAGE, "the canary is not beside them"
        self.canary_bytes = random.Random(99).randbytes(4 * PAGE)
        h.arena.write(self.canary.iova, self.canary_bytes)
        self.good = random.Random(98).randbytes(4 * PAGE)

    def refill(self, arena):
        arena.write(self.buf.iova, self.good)

    def canary_intact(self, arena):
        return arena.read(self.canary.iova, 4 * PAGE) == self.canary_bytes


def verified_io(h, seed):
    """A write and read back through PRPs and through SGLs on queue 1."""
    data = random.Random(seed).randbytes(64 * 1024)
    for dptr in ("prp", "sgl"):
        c = h.write(0, data, dptr=dptr)
        assert c.status == 0, f"write after the bad commands ({dptr}): {c}"
        c, back = h.read(0, len(data), dptr=dptr)
        assert c.status == 0 and back == data, f"read after the bad commands ({dptr}): {c}"


def run_bad_addresses(model, arena, regs):
    """Every probe with every bad address.  Returns ({(probe, bad name):
    (sct, sc) or 'error text'}, {probe: what its write left on the medium},
    [problems], {bad name: address})."""
    h = bring_up(model, arena, regs)
    b = Buffers(h)
    bads = bad_addresses(arena, b.canary)
    heap = random.Random(7).randbytes(4 * MiB)       # process memory outside the arena
    heap_digest = hashlib.sha256(heap).digest()
    pattern = random.Random(5).randbytes(24 * LBA)
    results, medium, problems = {}, {}, []
    for name, writes, fn in PROBES:
        for bname, bad in bads.items():
            if writes:
                assert h.write(AREA, pattern).status == 0
                b.refill(arena)
            try:
                c = fn(h, b, bad)
                results[(name, bname)] = status_of(c)[:2]
            except Timeout as exc:
                results[(name, bname)] = f"Timeout: {exc}"
                h.stash = {}
            if not b.canary_intact(arena):
                problems.append(f"{name} at {bname}: the canary changed")
                arena.write(b.canary.iova, b.canary_bytes)
            if writes:
                c, got = h.read(AREA, len(pattern))
                assert c.status == 0, c
                what = _medium(got, pattern, b.good)
                if "x" in what:
                    problems.append(f"{name} at {bname}: bytes from neither the command's buffer nor "
                                    f"zeroes reached the medium (LBAs {what})")
                medium.setdefault(name, set()).add(what)
    if hashlib.sha256(heap).digest() != heap_digest:
        problems.append("process memory outside the arena changed")
    verified_io(h, 3)
    csts = regs.read32(0x1C)
    if csts & 2:
        problems.append(f"controller fatal status after the probes (CSTS {csts:#x})")
    try:
        h.disable()
    except Timeout:
        problems.append("the controller did not disable after the probes")
    return results, medium, problems, bads


def _medium(got, pattern, good):
    """What a write left, LBA by LBA: '=' the earlier pattern (not written),
    'g' the bytes of the command's real buffer, '0' zeroes, 'x' anything else
    (which would have come from memory the command did not name)."""
    def one(i):
        lba = got[i:i + LBA]
        if lba == pattern[i:i + LBA]:
            return "="
        if not any(lba):
            return "0"
        return "g" if lba in (good[k:k + LBA] for k in range(0, len(good), LBA)) else "x"
    return "".join(one(i) for i in range(0, len(got), LBA))


# -- 2. the builders emit only mapped addresses ---------------------------------------

def prp_layout(rnd, base, room):
    """Segments PRPs can express, inside [base, base + room): a first one at
    any dword offset, whole pages in the middle, a last one from a page
    start; the total a multiple of the LBA size."""
    n = rnd.choice((1, 1, 2, 3, rnd.randrange(1, 12)))
    page = rnd.randrange(8)
    segs = []
    for i in range(n):
        if i == 0:
            off = rnd.randrange(PAGE // 4) * 4
            length = rnd.randrange(1, 80 * PAGE) if n == 1 else rnd.randrange(1, 8) * PAGE - off
        elif i < n - 1:
            off, length = 0, rnd.randrange(1, 16) * PAGE
        else:
            off, length = 0, rnd.randrange(1, 16 * PAGE)
        segs.append([base + page * PAGE + off, length])
        page += (off + length + PAGE - 1) // PAGE + rnd.randrange(3)
    total = sum(n for _a, n in segs)
    segs[-1][1] += -total % LBA
    assert segs[-1][0] + segs[-1][1] <= base + room
    return [tuple(s) for s in segs]


def sgl_layout(rnd, base, room, max_segments):
    """Byte-granular segments with gaps (QEMU's SGLS says no alignment)."""
    n = rnd.choice((1, 2, rnd.randrange(1, max_segments + 1)))
    pos = rnd.randrange(64)
    segs = []
    for _ in range(n):
        length = rnd.randrange(1, 2 * PAGE)
        segs.append([base + pos, length])
        pos += length + rnd.randrange(0, 300)
    total = sum(n for _a, n in segs)
    segs[-1][1] += -total % LBA
    assert segs[-1][0] + segs[-1][1] <= base + room
    return [tuple(s) for s in segs]


class Window:
    """The bus address ranges a command may touch: the arena's one IOMMU
    mapping, and within it the list memory the builder was handed."""

    def __init__(self, arena, lists):
        self.lo, self.hi = arena.iova_base, arena.iova_base + arena.size
        self.lists = lists          # (iova, bytes)
        self.arena = arena
        self.list_reads = []

    def mapped(self, addr, n):
        return self.lo <= addr and addr + n <= self.hi

    def read(self, addr, n):
        """The reference walker reads lists through this: each read is a
        list address the builder emitted."""
        self.list_reads.append((addr, n))
        if not self.mapped(addr, n):
            raise AssertionError(f"list address {addr:#x}+{n} outside the mapped IOVA range "
                                 f"[{self.lo:#x}, {self.hi:#x})")
        lo, size = self.lists
        if not (lo <= addr and addr + n <= lo + size):
            raise AssertionError(f"list address {addr:#x}+{n} outside the list memory "
                                 f"[{lo:#x}, {lo + size:#x}) the builder was given")
        return self.arena.read(addr, n)


def check_dptr(window, raw, segs, total):
    """Walk the data pointer of the 64-byte SQ entry ``raw`` the way a
    controller does; every address must lie in the window and the data
    ranges must be exactly ``segs``."""
    psdt = (raw[1] >> 6) & 3
    if psdt == 0:
        prp1, prp2 = struct.unpack_from("<QQ", raw, 24)
        ranges = [(a, n, False) for a, n in walk_prp(window.read, prp1, prp2, total)]
    else:
        ranges = walk_sgl(window.read, raw[24:40], total)
    for a, n, _bb in ranges:
        assert window.mapped(a, n), f"data address {a:#x}+{n} outside the mapped IOVA range"
    assert coalesce(ranges) == coalesce([(a, n, False) for a, n in segs])
    return "sgl" if psdt else "prp"


def run_builders(arena, regs, cases=30, seed=20240516):
    """Seeded random layouts, each written from one layout and read back
    into another, through the queue pair's builders and through build_prp /
    build_sgl; every command's data pointer is walked and checked before the
    doorbell, then the controller moves the data and it is compared.
    Returns counters."""
    rnd = random.Random(seed)
    h = bring_up(None, arena, regs)
    qp = _core.QueuePair(arena, regs, 2, 64, max_transfer=4 * MiB)
    qp.sgls, = struct.unpack_from("<I", h.identify(1), 536)     # as the driver reads it
    c = h.admin(0x05, cdw10=(63 << 16) | 2, cdw11=(2 << 16) | 1, prp1=qp.cq_iova)
    assert c.status == 0, c
    c = h.admin(0x01, cdw10=(63 << 16) | 2, cdw11=(2 << 16) | 1, prp1=qp.sq_iova)
    assert c.status == 0, c
    src, dst = h.alloc(ROOM), h.alloc(ROOM)
    lists = h.alloc(16 * PAGE)
    count = {"prp": 0, "sgl": 0, "queue pair": 0, "build_*": 0, "list reads": 0, "bytes": 0}
    for case in range(cases):
        slba = case * (ROOM // LBA)          # a fresh namespace area per case
        w = _layout(rnd, src.iova)
        r = _layout(rnd, dst.iova)
        data = rnd.randbytes(sum(n for _a, n in w[0]))
        pos = 0
        for a, n in w[0]:
            arena.write(a, data[pos:pos + n])
            pos += n
        for opc, (segs, mode) in ((IO_WRITE, w), (IO_READ, r)):
            total = sum(n for _a, n in segs)
            if rnd.random() < 0.5:
                slot = qp.sq_tail
                cid = qp.submit_command(opc, nsid=1, cdw10=slba, cdw12=total // LBA - 1, segments=segs,
                                        dptr=mode, is_read=opc == IO_READ, ring=False)
                liova, lpages = qp.tracker_list(cid)
                window = Window(arena, (liova, lpages * PAGE))
                kind = check_dptr(window, qp.sq_entry(slot), segs, total)
                qp.ring()
                status = _reap_one(qp, cid)
                count["queue pair"] += 1
            else:
                window = Window(arena, (lists.iova, 16 * PAGE))
                kw = dict(nsid=1, cdw10=slba, cdw12=total // LBA - 1)
                if mode == "sgl":
                    kw["sgl"] = _core.build_sgl(segs, lists)
                else:
                    kw["prp1"], kw["prp2"] = _core.build_prp(segs, lists)
                raw = sqe(opc, **kw)
                kind = check_dptr(window, raw, segs, total)
                status = h.cmd(raw, 1).status
                count["build_*"] += 1
            count[kind] += 1
            count["list reads"] += len(window.list_reads)
            count["bytes"] += total
            assert status == 0, (f"case {case}: {kind} {'read' if opc == IO_READ else 'write'} of "
                                 f"{len(segs)} segments failed with status {status:#x}")
        got = b"".join(arena.read(a, n) for a, n in r[0])
        n = min(len(got), len(data))
        assert got[:n] == data[:n], f"case {case}: the read back differs from what was written"
    assert qp.outstanding == 0 and qp.stats()["stale_completions"] == 0, qp.stats()
    h.disable()
    return count


ROOM = 2 * MiB        # each layout lies in a buffer of this size


def _layout(rnd, base):
    if rnd.random() < 0.5:
        return prp_layout(rnd, base, ROOM), rnd.choice(("prp", "auto"))
    return sgl_layout(rnd, base, ROOM, 120), "sgl"


def _reap_one(qp, cid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        for _user, got, status, _dw0, _dw1 in qp.reap():
            assert got == cid, (got, cid)
            return status
        if time.monotonic() > deadline:
            raise Timeout(f"queue {qp.qid}: CID {cid} did not complete in {timeout} s")
        time.sleep(0.0002)
