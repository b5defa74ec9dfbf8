"""Differential fuzzing in the vfio lab: the model fuzzer's seeded command
sequences (tests/fuzz_model.py ``Commands``) sent to QEMU's NVMe controller
over VFIO and to the model in the same guest process, and compared
completion by completion on (SCT, SC).

The sequence is generated once per seed, apart from both controllers: the
list pages it writes are recorded and replayed into each controller's arena,
which hold the same allocations at the same bus addresses, so both see the
same 64-byte entries and the same list bytes.  Every difference must fall in
a class of DEVIATIONS (a predicate and the reason); any other fails the test.

Changed from the model fuzzer, for QEMU's sake and the comparison's:
- no Asynchronous Event Requests: they stay outstanding, and the two
  controllers raise different events;
- Format NVM keeps namespace 1 at LBA format 0 (the two controllers list
  different formats: a successful format to another one would change every
  later answer);
- no command deletes the raw queue pair (qid 1) the sequence runs on;
- everything runs on the raw queue, one command at a time (a burst of the
  model fuzzer is a run of I/O commands here);
- two kinds of command are sent to neither controller, because QEMU 7.2
  never completes them (see sgl_spins and maps_unmapped):
  * an SGL whose segment chain walks back to a segment already walked:
    7.2's nvme_map_sgl() has no forward-progress check and spins in QEMU's
    main loop, which hangs the whole guest (newer QEMU refuses the chain);
  * a Read or Write whose data pointer reaches memory outside the IOMMU
    mapping: seen here, a Write of 26 LBAs from PRP1 at page offset 0x92c
    with a PRP list of zero entries (IOVA 0, unmapped) never completed, and
    from then on no command whose data touched an unmapped IOVA completed
    either, also after a controller reset -- dma-helpers' one bounce buffer,
    through which QEMU sends such accesses, appears to stay taken.  The
    isolation test (dma_isolation.py) sends such addresses on purpose, in
    shapes that leave QEMU working.
"""
import collections
import random
import struct

import fuzz_model
from model_harness import PAGE, Timeout, bring_up, sqe

MiB = 1 << 20
SEEDS = (11, 12, 13)
STEPS = 250                      # per seed
NS1_LBAS = (64 * MiB) // 512     # the lab's namespace 1
MDTS_BYTES = 4 * MiB
REG_CSTS = 0x1C

LIST_PAGES = 8                   # what Commands writes lists into
# a segment descriptor's length reaches up to 64 KiB past its list page:
# the list allocation holds that much more, all of it rewritten before each
# step, so both controllers read the same descriptors there
LIST_BYTES = (LIST_PAGES + 17) * PAGE


class Recorder:
    """Stands in for the arena while the sequence is generated: the list
    region's bytes are kept here and copied whole into each controller's
    arena before each step (a read may have put data into a list page on
    one controller and not on the other)."""

    def __init__(self, iova_base, size, lists):
        self.iova_base, self.size, self.lists = iova_base, size, lists
        self.mirror = bytearray(LIST_BYTES)

    def write(self, iova, data):
        off = iova - self.lists
        assert 0 <= off and off + len(data) <= LIST_PAGES * PAGE, "the generator wrote outside its lists"
        self.mirror[off:off + len(data)] = data


Cmd = collections.namedtuple("Cmd", "step qid opc raw")
Step = collections.namedtuple("Step", "lists cmds")


class Layout:
    """The bus addresses both controllers' arenas share."""

    def __init__(self, arena, lists, data, sentinel):
        self.iova_base, self.size = arena.iova_base, arena.size
        self.lists, self.data, self.sentinel = lists.iova, data.iova, sentinel.iova

    def key(self):
        return (self.iova_base, self.size, self.lists, self.data, self.sentinel)


def sequence(seed, layout, steps=STEPS):
    """Yields the steps of one seed: the list region's bytes and the commands."""
    rnd = random.Random(seed)
    rec = Recorder(layout.iova_base, layout.size, layout.lists)
    gen = fuzz_model.Commands(rnd, rec, layout.data, layout.lists, ns_lbas=NS1_LBAS)
    for i in range(steps):
        k = rnd.random()
        if k < 0.15:
            opc, kw = gen.admin_cmd()
            if opc == 0x0C:
                continue
            if opc == 0x80:
                kw["cdw10"] &= ~0xF
            if opc in (0x00, 0x04) and kw["cdw10"] & 0xFFFF == 1:
                kw["cdw10"] = (kw["cdw10"] & ~0xFFFF) | 9
            cmds = [Cmd(i, 0, opc, sqe(opc, **kw))]
        elif k < 0.7:
            opc, kw = gen.io_cmd()
            cmds = [Cmd(i, 1, opc, sqe(opc, **kw))]
        else:
            cmds = []
            for _ in range(rnd.randrange(1, 16)):
                opc, kw = gen.io_cmd()
                cmds.append(Cmd(i, 1, opc, sqe(opc, **kw)))
        yield Step(bytes(rec.mirror), cmds)


SEGMENT, LAST_SEGMENT = 2, 3
PAGE_MASK = PAGE - 1


def _desc(raw, off=0):
    addr, length, ident = struct.unpack_from("<QI3xB", raw, off)
    return addr, length, ident >> 4


def sgl_spins(read, raw):
    """Would QEMU 7.2 walk this command's SGL segment chain forever?  Follows
    the last descriptor of each (Last) Segment as nvme_map_sgl() does,
    ignoring its Last Segment stop (7.2 tests that on a stale buffer, so it
    may not stop) -- True if the walk comes back to a segment it has seen.
    ``read(iova, n)``: the controller's memory, None outside the mapping."""
    if (raw[1] >> 6) & 3 not in (1, 2):
        return False
    addr, length, typ = _desc(raw, 24)
    seen = set()
    while typ in (SEGMENT, LAST_SEGMENT):
        if length == 0 or length & 0xF:
            return False            # refused before the walk goes on
        if (addr, length) in seen:
            return True
        seen.add((addr, length))
        last = read(addr + length - 16, 16)
        if last is None:
            return False            # the IOMMU fails the read: Data Transfer Error
        addr, length, typ = _desc(last)
    return False


def maps_unmapped(read, raw, lo, hi):
    """Would QEMU 7.2 map memory outside [lo, hi) -- the IOMMU mapping -- for
    this Read or Write?  Those two move their data with dma-helpers, which
    can leave QEMU unable to complete any DMA to unmapped memory again (see
    the module's doc).  Walks the data pointer the way 7.2's nvme_map_prp()
    / nvme_map_sgl() do, counting a mapping error as no DMA (7.2 maps the
    whole pointer before it moves a byte) only where 7.2 is certain to raise
    it; elsewhere it assumes the walk goes on, so that it errs towards
    True."""
    opc, flags = raw[0], raw[1]
    nsid, = struct.unpack_from("<I", raw, 4)
    lbs = {1: 512, 2: 4096}.get(nsid)
    if opc not in (0x01, 0x02) or lbs is None:
        return False
    length = ((struct.unpack_from("<I", raw, 48)[0] & 0xFFFF) + 1) * lbs
    if length > MDTS_BYTES:
        return False                # nvme_check_mdts() comes first

    def out(a, n):
        return not (lo <= a and a + n <= hi)

    psdt = (flags >> 6) & 3
    if psdt == 0:
        prp1, prp2 = struct.unpack_from("<QQ", raw, 24)
        first = min(length, PAGE - (prp1 & PAGE_MASK))
        if out(prp1, first):
            return True
        rem = length - first
        if rem == 0:
            return False
        if rem <= PAGE:
            return not prp2 & PAGE_MASK and out(prp2, rem)
        nents = (PAGE - (prp2 & PAGE_MASK)) >> 3
        lst = read(prp2, nents * 8)
        i = 0
        while rem:
            if lst is None:
                return False        # list read refused: Data Transfer Error
            ent, = struct.unpack_from("<Q", lst, 8 * i)
            if i == nents - 1 and rem > PAGE:
                if ent & PAGE_MASK:
                    return False
                nents = min((rem + PAGE - 1) // PAGE, PAGE // 8)
                lst, i = read(ent, nents * 8), 0
                continue
            if ent & PAGE_MASK:
                return False        # Invalid PRP Offset
            if out(ent, min(rem, PAGE)):
                return True
            rem -= min(rem, PAGE)
            i += 1
        return False
    if psdt == 3:
        return False                # Invalid Field
    addr, dlen, typ = _desc(raw, 24)
    if typ == 0:
        return bool(dlen) and out(addr, min(dlen, length))
    seen, hit = set(), False
    while typ in (SEGMENT, LAST_SEGMENT) and (addr, dlen) not in seen:
        if dlen == 0 or dlen & 0xF:
            return False
        seen.add((addr, dlen))
        seg = read(addr, dlen)
        if seg is None:
            return False
        descs = [(a, n, i >> 4) for a, n, i in struct.iter_unpack("<QI3xB", seg)]
        *body, last = descs
        for a, n, t in (descs if last[2] == 0 else body):
            hit |= t == 0 and n > 0 and out(a, min(n, length))
        addr, dlen, typ = last
    return hit


# -- what a command asks for, seen before it is sent ----------------------------------

SUCCESS, INVALID_OPCODE, INVALID_FIELD, DTE, INVALID_NS = (0, 0x00), (0, 0x01), (0, 0x02), (0, 0x04), (0, 0x0B)
SGL_SEG_INVALID, SGL_COUNT_INVALID, SGL_LEN_INVALID = (0, 0x0D), (0, 0x0E), (0, 0x0F)
SGL_TYPE_INVALID, PRP_OFFSET_INVALID, LBA_RANGE = (0, 0x11), (0, 0x13), (0, 0x80)
NS_LBAS = {1: NS1_LBAS, 2: 64 * MiB // 4096}
LBA_BYTES = {1: 512, 2: 4096}
IO_KNOWN = set(fuzz_model.IO_OPCODES)
# the features NVMe 1.4 makes mandatory that the model does not implement
# (it has 06h, 07h, 08h and 0Bh)


class Facts:
    """What a command's fields ask for and what its data pointer reaches
    (walked as the specification describes it, over the controller's memory
    as it is before the command runs).  ``faults``: each fault of the
    command -> the statuses that would report it; when a command has
    several, the two controllers may report different ones, and both
    conform."""

    def __init__(self, qid, raw, read, lo, hi):
        (self.opc, flags, _cid, self.nsid, _r2, _r3, _mptr, self.prp1, self.prp2,
         *self.cdw) = struct.unpack("<BBHIIIQQQ6I", raw)
        self.admin = qid == 0
        self.fuse, self.psdt = flags & 3, flags >> 6
        self.raw, self.read, self.lo, self.hi = raw, read, lo, hi
        self.faults = {}
        self.outside = self.prp_low_bits = self.sgl_subtype = self.sgl_longer = False
        self.sgl_bad_segment_type = self.sgl_misplaced_segment = self.dsm_beyond = False
        c10, c11, c12 = self.cdw[:3]
        self.fid = c10 & 0xFF
        self.length = self._length()
        if not self.admin:
            if self.nsid not in LBA_BYTES and not (self.opc == 0x00 and self.nsid == 0xFFFFFFFF):
                self.fault("namespace", INVALID_NS, INVALID_FIELD)       # invalid or inactive
            if self.fuse:
                self.fault("fused", INVALID_FIELD)
            if self.opc not in IO_KNOWN:
                self.fault("opcode", INVALID_OPCODE)
            if self.opc in (0x01, 0x02, 0x05, 0x08) and self.nsid in LBA_BYTES:
                slba = c10 | c11 << 32
                if slba + (c12 & 0xFFFF) + 1 > NS_LBAS[self.nsid]:
                    self.fault("LBA range", LBA_RANGE)
        elif self.opc == 0x80 and self.nsid not in (1, 2, 0xFFFFFFFF):
            self.fault("namespace", INVALID_NS, INVALID_FIELD)
        if self.psdt == 3 or self.admin and self.psdt:
            self.fault("PSDT", INVALID_FIELD)
        if self.length is not None and self.length > MDTS_BYTES:
            self.fault("MDTS", INVALID_FIELD)
        elements = self._walk()
        if elements and self.opc == 0x09 and not self.admin and c11 & 4 and self.nsid in NS_LBAS:
            data = b"".join(read(a, n) or b"" for a, n in elements)
            for k in range(0, len(data) - 15, 16):
                _attr, nlb, slba = struct.unpack_from("<IIQ", data, k)
                if slba + nlb > NS_LBAS[self.nsid]:
                    self.dsm_beyond = True
                    self.fault("LBA range", LBA_RANGE)

    def fault(self, kind, *statuses):
        self.faults.setdefault(kind, set()).update(statuses)

    def justifies(self, status):
        """The faults that ``status`` would report."""
        return {k for k, st in self.faults.items() if status in st}

    def _length(self):
        """Bytes the command moves, where its fields say (None: unknown)."""
        c10, c11 = self.cdw[0], self.cdw[1]
        if self.admin:
            if self.opc == 0x06:
                return 4096
            if self.opc == 0x02:
                return ((((c11 & 0xFFFF) << 16) | (c10 >> 16)) + 1) * 4
            return None
        if self.opc in (0x01, 0x02, 0x05) and self.nsid in LBA_BYTES:
            return ((self.cdw[2] & 0xFFFF) + 1) * LBA_BYTES[self.nsid]
        if self.opc == 0x09:
            return ((c10 & 0xFF) + 1) * 16
        return None

    def _out(self, a, n):
        return not (self.lo <= a and a + max(n, 1) <= self.hi)

    def _walk(self):
        """The data pointer's (address, length) elements (None when the
        walk stops at a fault); records the faults met."""
        n = self.length
        if self.psdt == 0:
            return self._walk_prp(n)
        if self.psdt in (1, 2):
            return self._walk_sgl(n)
        return None

    def _walk_prp(self, n):
        if self.prp1 & 3:
            self.fault("PRP offset", PRP_OFFSET_INVALID)
            self.prp_low_bits = True
        if n is None:               # at least PRP1 is used
            if self._out(self.prp1, 1):
                self.fault("address", DTE)
                self.outside = True
            return None
        first = min(n, PAGE - (self.prp1 & PAGE_MASK))
        elements, rem = [(self.prp1, first)], n - first
        if 0 < rem <= PAGE:
            if self.prp2 & PAGE_MASK:
                self.fault("PRP offset", PRP_OFFSET_INVALID)
            elements.append((self.prp2, rem))
        elif rem:
            if self.prp2 & 7:
                self.fault("PRP offset", PRP_OFFSET_INVALID)
                self.prp_low_bits = True
            addr, slot = self.prp2 & ~7, (self.prp2 & PAGE_MASK) >> 3
            while rem:
                raw = self.read(addr + 8 * slot, 8)
                if raw is None:
                    self.fault("address", DTE)
                    self.outside = True
                    break
                ent, = struct.unpack("<Q", raw)
                if slot == PAGE // 8 - 1 and rem > PAGE:
                    if ent & PAGE_MASK:
                        self.fault("PRP offset", PRP_OFFSET_INVALID)
                    addr, slot = ent & ~PAGE_MASK, 0
                    continue
                if ent & PAGE_MASK:
                    self.fault("PRP offset", PRP_OFFSET_INVALID)
                elements.append((ent, min(rem, PAGE)))
                rem -= min(rem, PAGE)
                slot += 1
        for a, k in elements:
            if self._out(a, k):
                self.fault("address", DTE)
                self.outside = True
        return elements

    def _walk_sgl(self, n):
        data, bb = [], 0
        addr, dlen, ident = struct.unpack_from("<QI3xB", self.raw, 24)
        typ, sub = ident >> 4, ident & 0xF
        if typ not in (0, SEGMENT, LAST_SEGMENT):
            # a bit bucket (QEMU's SGLS has none) or a reserved type where a
            # Data Block or a (Last) Segment belongs
            self.fault("SGL descriptor in a segment's place", SGL_TYPE_INVALID, SGL_SEG_INVALID)
            self.sgl_bad_segment_type = True
            if typ == 1 and n is not None and dlen != n:
                self.fault("SGL length", SGL_LEN_INVALID)
            return None
        descs = [(addr, dlen, typ, sub)]
        seen = set()
        while descs[-1][2] in (SEGMENT, LAST_SEGMENT) and len(seen) < 64:
            addr, dlen, typ, _sub = descs.pop()
            if dlen == 0 or dlen & 0xF or (addr, dlen) in seen:
                self.fault("SGL segment", SGL_SEG_INVALID)
                return None
            seen.add((addr, dlen))
            seg = self.read(addr, dlen)
            if seg is None:
                self.fault("address", DTE)
                self.outside = True
                return None
            inner = [(a, l_, i_ >> 4, i_ & 0xF) for a, l_, i_ in struct.iter_unpack("<QI3xB", seg)]
            for a, l_, t, s_ in inner[:-1]:
                if t in (SEGMENT, LAST_SEGMENT):
                    self.fault("SGL segment descriptor misplaced", SGL_SEG_INVALID, SGL_COUNT_INVALID)
                    self.sgl_misplaced_segment = True
            last = inner[-1]
            if last[2] not in (0, SEGMENT, LAST_SEGMENT):
                self.fault("SGL descriptor in a segment's place", SGL_TYPE_INVALID, SGL_SEG_INVALID)
                self.sgl_bad_segment_type = True
            if typ == LAST_SEGMENT and last[2] in (SEGMENT, LAST_SEGMENT):
                self.fault("SGL segment", SGL_SEG_INVALID)
            descs += inner[:-1] + [last]
        for a, l_, t, s_ in descs:
            if t == 1:
                self.fault("SGL descriptor type", SGL_TYPE_INVALID)      # QEMU's SGLS (and the model's here): no bit buckets
                bb += l_
            elif t not in (0, SEGMENT, LAST_SEGMENT):
                self.fault("SGL descriptor type", SGL_TYPE_INVALID)
            elif t == 0:
                if s_:
                    self.fault("SGL descriptor type", SGL_TYPE_INVALID)
                    self.sgl_subtype = True
                data.append((a, l_))
        if n is not None:
            total = sum(l_ for _a, l_ in data) + bb
            if total != n:
                self.fault("SGL length", SGL_LEN_INVALID)
                self.sgl_longer = total > n
            rem, elements = n, []
            for a, l_ in data:
                if rem and l_:
                    elements.append((a, min(l_, rem)))
                    rem -= min(l_, rem)
        else:
            elements = [(a, min(l_, 1)) for a, l_ in data]
        for a, k in elements:
            if self._out(a, k):
                self.fault("address", DTE)
                self.outside = True
        return elements


# -- the difference classes -------------------------------------------------------------

# class -> (predicate(facts, qemu, model), reason).  "QEMU:" means QEMU 7.2
# deviates from the specification (documented here, nothing to fix); "model:"
# means the model deviates (to be fixed in the model); "both conform" means
# the specification allows either answer.
DEVIATIONS = {}


def deviation(name, reason):
    def add(pred):
        DEVIATIONS[name] = (pred, reason)
        return pred
    return add


@deviation("QEMU: DMA outside the IOMMU mapping reported as success",
           "QEMU: a data pointer into unmapped IOVA space fails in the IOMMU (a DMAR fault), but "
           "7.2 ignores the failed DMA and completes with success (nvme_tx() looks only at the "
           "residual; the data path drops it in dma-helpers' bounce buffer); the model answers "
           "Data Transfer Error.  Reads and writes of this kind are not sent (maps_unmapped); "
           "the isolation test pins each shape")
def _(f, q, m):
    return f.outside and q == SUCCESS and m == DTE


@deviation("QEMU: PRP1 and list pointer low bits not checked",
           "QEMU: 7.2's nvme_map_prp() does not check that PRP1 is dword aligned or that a PRP "
           "list pointer is qword aligned (it reads from the unaligned address), so the command "
           "goes on; the spec (PRP entry: bits 1:0 of the offset are 00b) makes it PRP Offset "
           "Invalid, the model's answer")
def _(f, q, m):
    return f.prp_low_bits and m == PRP_OFFSET_INVALID and (q in (SUCCESS, DTE) or f.justifies(q))


@deviation("both conform: Dataset Management without the Deallocate attribute",
           "QEMU: 7.2's nvme_dsm() reads the range list only when AD is set, so a DSM with no "
           "attribute it acts on completes with success whatever its data pointer; the model "
           "checks the pointer and the ranges of every DSM.  With no attribute the command asks "
           "for nothing (NVM Command Set, Dataset Management), so either answer is defensible")
def _(f, q, m):
    return not f.admin and f.opc == 0x09 and not f.cdw[1] & 4 and q == SUCCESS and m != SUCCESS


@deviation("QEMU: deallocate of a range beyond the end",
           "QEMU: nvme_dsm() skips ranges outside the namespace and completes with success; the "
           "NVM command set lists LBA Out of Range for Dataset Management (the model's answer; "
           "also in conformance_probes.DEVIATIONS)")
def _(f, q, m):
    return f.dsm_beyond and q == SUCCESS and m == LBA_RANGE


@deviation("QEMU: reserved or bit bucket descriptor where a segment belongs",
           "QEMU: a descriptor type other than Data Block or (Last) Segment in SGL1, or last in a "
           "segment, gets Invalid SGL Segment Descriptor from nvme_map_sgl(); the spec's status "
           "for a type the controller does not support is SGL Descriptor Type Invalid (the "
           "model's answer; also in conformance_probes.DEVIATIONS)")
def _(f, q, m):
    return f.sgl_bad_segment_type and q == SGL_SEG_INVALID and m == SGL_TYPE_INVALID


@deviation("QEMU: SGL Data Block sub type not checked",
           "QEMU: 7.2 ignores a Data Block descriptor's Sub Type; 1h (Offset) is for NVMe over "
           "Fabrics and the others are reserved, so the spec's status is SGL Descriptor Type "
           "Invalid (the model's answer).  QEMU then answers what the rest of the command "
           "deserves")
def _(f, q, m):
    return f.sgl_subtype and m == SGL_TYPE_INVALID and (q == SUCCESS or f.justifies(q))


@deviation("QEMU: SGL Data Block longer than the transfer",
           "QEMU: accepts SGL data longer than the command's transfer although its SGLS bit 18 "
           "(SGL longer than data) is clear; the spec says Data SGL Length Invalid (the model's "
           "answer; also in conformance_probes.DEVIATIONS)")
def _(f, q, m):
    return f.sgl_longer and q == SUCCESS and m == SGL_LEN_INVALID


@deviation("QEMU: (Last) Segment descriptor inside a segment",
           "QEMU: a Segment or Last Segment descriptor that is not last in its segment gets "
           "Invalid Number of SGL Descriptors; the spec's status for a misplaced segment "
           "descriptor is Invalid SGL Segment Descriptor (the model's answer)")
def _(f, q, m):
    return f.sgl_misplaced_segment and q == SGL_COUNT_INVALID and m == SGL_SEG_INVALID


@deviation("QEMU: broadcast NSID on a command that does not take it",
           "QEMU: Invalid Field in Command for NSID FFFFFFFFh on an I/O command other than "
           "Flush; a command that does not support the broadcast value treats it as an invalid "
           "NSID: Invalid Namespace or Format (the model's answer, and what the UNH-IOL "
           "conformance tests expect)")
def _(f, q, m):
    return not f.admin and f.nsid == 0xFFFFFFFF and q == INVALID_FIELD and m == INVALID_NS


@deviation("both conform: NSID valid for QEMU, invalid for the model (NN differs)",
           "both conform: QEMU reports NN=256 and the model a smaller NN, so an NSID between the "
           "two is inactive on QEMU (Invalid Field in Command) and invalid on the model (Invalid "
           "Namespace or Format); as in conformance_probes.DEVIATIONS")
def _(f, q, m):
    return f.nn[1] < f.nsid <= f.nn[0] and q == INVALID_FIELD and m == INVALID_NS


@deviation("QEMU: fused bits on Flush",
           "QEMU: 7.2 handles Flush before it looks at the FUSE field, so a Flush marked as part "
           "of a fused operation succeeds; FUSES is 0 (no fused operations), so the spec's status "
           "is Invalid Field in Command, which QEMU itself gives every other I/O opcode and the "
           "model gives Flush too")
def _(f, q, m):
    return not f.admin and f.opc == 0x00 and f.fuse and q == SUCCESS and m == INVALID_FIELD


@deviation("QEMU: Delete I/O Completion Queue of a queue that does not exist",
           "QEMU: Completion Queue Invalid; that status belongs to Create I/O Submission Queue, "
           "and Delete I/O Completion Queue lists Invalid Queue Identifier (the model's answer)")
def _(f, q, m):
    return f.admin and f.opc == 0x04 and q == (1, 0x00) and m == (1, 0x01)


@deviation("QEMU: Temperature Threshold of a sensor it does not have",
           "QEMU: 7.2 answers Get / Set Features Temperature Threshold naming a sensor other "
           "than the composite one (TMPSEL 1h..Eh: absent or reserved) or a reserved THSEL with "
           "success, setting nothing; both controllers report only the composite temperature, "
           "and the model gives Invalid Field in Command for a value that selects nothing")
def _(f, q, m):
    if not (f.admin and f.opc in (0x09, 0x0A) and f.fid == 0x04):
        return False
    tmpsel, thsel = (f.cdw[1] >> 16) & 0xF, (f.cdw[1] >> 20) & 3
    return (tmpsel not in (0, 0xF) or thsel > 1) and q == SUCCESS and m == INVALID_FIELD


@deviation("QEMU: Get Features with a reserved Select value",
           "QEMU: 7.2 answers a Get Features whose SEL is 4..7 (reserved) with the current "
           "value; the model gives Invalid Field in Command")
def _(f, q, m):
    return f.admin and f.opc == 0x0A and (f.cdw[0] >> 8) & 7 > 3 and q == SUCCESS and m == INVALID_FIELD


@deviation("QEMU: Format NVM with a reserved Secure Erase Settings value",
           "QEMU: 7.2 formats when SES is 3..7 (reserved); the model gives Invalid Field in "
           "Command, the spec's status for a reserved value")
def _(f, q, m):
    return f.admin and f.opc == 0x80 and (f.cdw[0] >> 9) & 7 > 2 and q == SUCCESS and m == INVALID_FIELD


@deviation("QEMU: Get Log Page of an unsupported page",
           "QEMU: Invalid Field in Command for a log page it does not support; the spec says "
           "Invalid Log Page (the model's answer; also in conformance_probes.DEVIATIONS)")
def _(f, q, m):
    return f.admin and f.opc == 0x02 and q == INVALID_FIELD and m == (1, 0x09)


@deviation("both conform: Identify CNS 05h (I/O Command Set specific namespace)",
           "both conform: QEMU implements the optional CNS 05h (and checks its NSID); the model "
           "does not, and answers Invalid Field in Command as for any CNS it does not support")
def _(f, q, m):
    return f.admin and f.opc == 0x06 and f.cdw[0] & 0xFF == 0x05 and m == INVALID_FIELD


@deviation("both conform: Verify (optional) implemented by QEMU only",
           "both conform: QEMU implements the optional Verify command (ONCS bit 7); the model "
           "does not and answers Invalid Command Opcode")
def _(f, q, m):
    return not f.admin and f.opc == 0x0C and m == INVALID_OPCODE


@deviation("both conform: several faults, reported in a different order",
           "both conform: the command has more than one fault (an invalid namespace, fused "
           "bits, an unknown opcode, a bad data pointer, ...) and each controller reports one of "
           "them; the spec does not order the checks")
def _(f, q, m):
    return any(a != b for a in f.justifies(q) for b in f.justifies(m))


def classify(f, q, m):
    """The first class that explains a difference, or None."""
    for name, (pred, _reason) in DEVIATIONS.items():
        if pred(f, q, m):
            return name
    return None


class Target:
    """One controller behind the raw host, with the fuzzer's buffers."""

    def __init__(self, name, model, arena, regs):
        self.name, self.arena, self.regs = name, arena, regs
        h = self.h = bring_up(model, arena, regs)
        # lists below the data: no transfer from a data address reaches them;
        # the data region holds a transfer of MDTS from its last page, so no
        # command the controllers accept reaches the sentinel after it
        lists = h.alloc(LIST_BYTES)
        data = h.alloc(64 * PAGE + MDTS_BYTES + 64 * PAGE)
        sentinel = h.alloc(16 * PAGE)
        self.sentinel_bytes = random.Random(1).randbytes(16 * PAGE)
        arena.write(sentinel.iova, self.sentinel_bytes)
        self.layout = Layout(arena, lists, data, sentinel)
        self.nn, = struct.unpack_from("<I", h.identify(1), 516)
        # both namespaces read as zeroes: then reads, compares and the bytes
        # a data pointer brings back are the same on both controllers
        for nsid, lbas in ((1, NS1_LBAS), (2, 64 * MiB // 4096)):
            for slba in range(0, lbas, 1 << 15):
                c = h.io(0x08, 1, nsid=nsid, cdw10=slba, cdw12=min(1 << 15, lbas - slba) - 1)
                assert c.status == 0, (name, c)
        self.dead = None

    def load(self, step):
        self.arena.write(self.layout.lists, step.lists)

    def read(self, iova, n):
        """The controller's view of memory: None outside the IOMMU mapping."""
        try:
            return self.arena.read(iova, n)
        except ValueError:
            return None

    def run_one(self, cmd):
        """(sct, sc), or 'timeout' (and the target is dead from then on)."""
        if self.dead:
            return "not run"
        try:
            c = self.h.cmd(cmd.raw, cmd.qid, timeout=5)
        except Timeout as exc:
            self.dead = f"step {cmd.step}: {exc}"
            return "timeout"
        self.cleanup(cmd, c)
        return (c.sct, c.sc)

    def cleanup(self, cmd, c):
        """A queue a Create command made is taken away again (the raw host
        owns no ring there); not part of the comparison."""
        if cmd.qid == 0 and cmd.opc in (0x01, 0x05) and c.status == 0:
            qid = struct.unpack_from("<I", cmd.raw, 40)[0] & 0xFFFF
            self.h.admin(0x00, cdw10=qid)
            self.h.admin(0x04, cdw10=qid)

    def final_checks(self):
        problems = []
        if self.regs.read32(REG_CSTS) & 2:
            problems.append(f"{self.name}: controller fatal status (CSTS.CFS)")
        if self.arena.read(self.layout.sentinel, 16 * PAGE) != self.sentinel_bytes:
            problems.append(f"{self.name}: sentinel memory beside the fuzzer's buffers changed")
        data = random.Random(2).randbytes(16 * PAGE)
        c = self.h.write(0, data)
        c2, back = self.h.read(0, len(data))
        if c.status or c2.status or back != data:
            problems.append(f"{self.name}: verified write and read after the fuzzing failed ({c}, {c2})")
        return problems

    def close(self):
        try:
            self.h.disable()
        except Timeout:
            pass


def run(qemu_transport, model_transport, seeds=SEEDS, steps=STEPS):
    """Returns (rows, problems): rows = [(seed, Cmd, qemu, model, Facts when
    they differ)] for every command ('skipped: why' on both for what is not
    sent); problems = what went wrong with either controller.

    One command at a time, QEMU's then the model's: what QEMU will read is
    then exactly what the checks below read (a command in flight beside it
    could change a list page under them)."""
    rows, problems = [], []
    for seed in seeds:
        q = Target("QEMU", getattr(qemu_transport, "model", None), qemu_transport.arena, qemu_transport.regs)
        m = Target("model", model_transport.model, model_transport.arena, model_transport.regs)
        try:
            assert q.layout.key() == m.layout.key(), (q.layout.key(), m.layout.key())
            lo, hi = q.layout.iova_base, q.layout.iova_base + q.layout.size
            for step in sequence(seed, q.layout, steps):
                q.load(step)
                m.load(step)
                for cmd in step.cmds:
                    if sgl_spins(q.read, cmd.raw):
                        rows.append((seed, cmd, "skipped: SGL loop", "skipped: SGL loop", None))
                    elif maps_unmapped(q.read, cmd.raw, lo, hi):
                        rows.append((seed, cmd, "skipped: unmapped data", "skipped: unmapped data", None))
                    else:
                        f = Facts(cmd.qid, cmd.raw, q.read, lo, hi)
                        f.nn = (q.nn, m.nn)
                        rq, rm = q.run_one(cmd), m.run_one(cmd)
                        rows.append((seed, cmd, rq, rm, f if rq != rm else None))
            for t in (q, m):
                if t.dead:
                    problems.append(f"seed {seed}: {t.name} stopped answering: {t.dead}")
                problems += [f"seed {seed}: {p}" for p in t.final_checks()]
        finally:
            q.close()
            m.close()
    return rows, problems


def report(rows):
    """(text, unexplained): the comparison as a table -- per difference
    class its count, one example and the reason -- and the differences no
    class explains."""
    from nvmefs import _core

    def name(st):
        if isinstance(st, str):
            return st
        return f"{_core.decode_status(_core.make_status(*st)).name} ({st[0]}/{st[1]:#04x})"

    sent = [r for r in rows if not str(r[2]).startswith("skipped")]
    skipped = collections.Counter(r[2][len("skipped: "):] for r in rows if str(r[2]).startswith("skipped"))
    diffs = [r for r in sent if r[2] != r[3]]
    counts, examples, unexplained = collections.Counter(), {}, []
    for seed, cmd, q, m, f in diffs:
        k = classify(f, q, m) if f is not None else None
        what = (f"seed {seed} step {cmd.step}: {'admin' if cmd.qid == 0 else 'I/O'} opcode {cmd.opc:#04x}, "
                f"QEMU {name(q)}, model {name(m)}")
        if k is None:
            unexplained.append(what + f" -- SQE {cmd.raw.hex()}")
        else:
            counts[k] += 1
            examples.setdefault(k, what)
    both_ok = sum(1 for r in sent if r[2] == r[3] == SUCCESS)
    lines = [f"seeds {', '.join(map(str, sorted({r[0] for r in rows})))}: {len(rows)} commands; "
             f"{len(sent)} sent to both controllers ({both_ok} succeeded on both), "
             f"{len(sent) - len(diffs)} with the same status, {len(diffs)} different; not sent: "
             + (", ".join(f"{n} ({why})" for why, n in skipped.items()) or "none"), ""]
    w = max([len(k) for k in counts] + [5])
    lines.append(f"{'count':>6}  {'class':<{w}}  first example")
    for k, n in counts.most_common():
        lines.append(f"{n:>6}  {k:<{w}}  {examples[k]}")
    if unexplained:
        lines.append(f"{len(unexplained):>6}  {'UNEXPLAINED':<{w}}")
    lines.append("")
    for k in counts:
        lines.append(f"* {k}: {DEVIATIONS[k][1]}")
    return "\n".join(lines), unexplained
