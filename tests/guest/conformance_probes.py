"""Differential conformance: one table of raw probe commands sent through the
same raw host (tests/model_harness.py: it writes SQ entries and doorbells
itself, so any field can be wrong on purpose) to QEMU's NVMe controller over
VFIO and to the built-in model, compared on (SCT, SC).

Runs inside the vfio-lab guest, where both controllers are reachable from
one process (the model is in-process; the guest runs the same code as the
host).  Differences not listed in DEVIATIONS fail the test.
"""
import struct

from model_harness import BIT_BUCKET, DATA, LAST_SEGMENT, PAGE, SEGMENT, bring_up, sgl_desc, sqe, status_of

MiB = 1 << 20
MDTS_BYTES = 4 * MiB            # the lab's QEMU runs with mdts=10; the model side too

# probe name -> why QEMU and the model answer differently.  "QEMU:" means
# QEMU deviates from the spec (documented here, nothing to fix); "model:"
# means the model deviates (to be fixed in the model).
DEVIATIONS = {
    "PRP: MDTS bytes from offset 0x200 (1025 entries)":
        "QEMU: Internal Error for a transfer within MDTS whose PRP list has 1025 entries (QEMU "
        "7.2 maps each page as one scatter element and appears to stop at IOV_MAX = 1024)",
    "SGL: data block longer than the transfer":
        "QEMU: accepts it although its SGLS bit 18 (SGL longer than data) is clear; the spec "
        "says Data SGL Length Invalid (the model's answer)",
    "SGL: reserved descriptor type 0xE":
        "QEMU: Invalid SGL Segment Descriptor for a reserved type in SGL1; the spec says SGL "
        "Descriptor Type Invalid (the model's answer)",
    "SGL: segment -> segment -> last segment (3 lists)":
        "QEMU: rejects a valid chain of more than two segments: hw/nvme/ctrl.c nvme_map_sgl() "
        "keeps a pointer to the previous segment's last descriptor inside the buffer it then "
        "overwrites with the next segment, and tests the wrong descriptor's type",
    "deallocate a range beyond the end":
        "QEMU: nvme_dsm() skips ranges outside the namespace and completes with success; the "
        "NVM command set lists LBA Out of Range for Dataset Management (the model's answer)",
    "read of an inactive namespace (99)":
        "both conform: QEMU reports NN=256, so NSID 99 is valid but inactive (Invalid Field in "
        "Command); the model's NN is 16 (the NSIDs Namespace Management can allocate), so 99 "
        "is invalid (Invalid Namespace or Format)",
    "Identify Namespace of an inactive NSID (99)":
        "both conform, NN differs as above: an inactive NSID gets a zeroed structure (QEMU), "
        "an invalid one Invalid Namespace or Format (model)",
    "Get Log Page 7Fh (unknown 7Fh)":
        "QEMU: Invalid Field in Command for an unsupported log page; the spec says Invalid Log "
        "Page (the model's answer)",
}

PROBES = []


def probe(name):
    def add(fn):
        PROBES.append((name, fn))
        return fn
    return add


def _rw(opc, slba, nlb, nsid=1, **kw):
    return sqe(opc, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=nlb - 1, **kw)


def _read(h, slba=0, nlb=8, **kw):
    return h.cmd(_rw(0x02, slba, nlb, **kw), 1)


# -- data pointers: PRP ---------------------------------------------------------------

@probe("PRP: read 4 KiB, PRP1 page aligned")
def _(h, ns):
    b = h.alloc(PAGE)
    return _read(h, prp1=b.iova)


@probe("PRP: read 4 KiB, PRP1 offset 0x200, PRP2 next page")
def _(h, ns):
    b = h.alloc(2 * PAGE)
    return _read(h, prp1=b.iova + 0x200, prp2=b.iova + PAGE)


@probe("PRP: PRP2 (data page) with an offset")
def _(h, ns):
    b = h.alloc(3 * PAGE)
    return _read(h, prp1=b.iova + 0x200, prp2=b.iova + PAGE + 0x200)


@probe("PRP: list entry with an offset")
def _(h, ns):
    b, lst = h.alloc(3 * PAGE), h.alloc(PAGE)
    h.arena.write(lst.iova, struct.pack("<QQ", b.iova + PAGE + 0x200, b.iova + 2 * PAGE))
    return _read(h, nlb=24, prp1=b.iova, prp2=lst.iova)


@probe("PRP: list pointer with a dword offset")
def _(h, ns):
    b, lst = h.alloc(3 * PAGE), h.alloc(PAGE)
    h.arena.write(lst.iova + 8, struct.pack("<QQ", b.iova + PAGE, b.iova + 2 * PAGE))
    return _read(h, nlb=24, prp1=b.iova, prp2=lst.iova + 8)


@probe("PRP: MDTS bytes from offset 0x200 (1025 entries)")
def _(h, ns):
    # exactly MDTS from an offset start: 1025 PRP entries, within MDTS
    b = h.alloc(MDTS_BYTES + PAGE)
    prp1, prp2 = h.prps(b.iova + 0x200, MDTS_BYTES)
    return _read(h, nlb=MDTS_BYTES // 512, prp1=prp1, prp2=prp2)


# -- data pointers: SGL -----------------------------------------------------------------

@probe("SGL: one data block")
def _(h, ns):
    b = h.alloc(PAGE)
    return _read(h, sgl=sgl_desc(b.iova, 4096))


@probe("SGL: data block shorter than the transfer")
def _(h, ns):
    b = h.alloc(PAGE)
    return _read(h, sgl=sgl_desc(b.iova, 2048))


@probe("SGL: data block longer than the transfer")
def _(h, ns):
    b = h.alloc(2 * PAGE)
    return _read(h, sgl=sgl_desc(b.iova, 8192))


@probe("SGL: reserved descriptor type 0xE")
def _(h, ns):
    b = h.alloc(PAGE)
    return _read(h, sgl=sgl_desc(b.iova, 4096, typ=0xE))


@probe("SGL: last segment of two data blocks")
def _(h, ns):
    b, lst = h.alloc(2 * PAGE), h.alloc(PAGE)
    h.arena.write(lst.iova, sgl_desc(b.iova, 1024) + sgl_desc(b.iova + PAGE + 4, 3072))
    return _read(h, sgl=sgl_desc(lst.iova, 32, typ=LAST_SEGMENT))


@probe("SGL: segment -> last segment chain")
def _(h, ns):
    b, l1, l2 = h.alloc(2 * PAGE), h.alloc(PAGE), h.alloc(PAGE)
    h.arena.write(l1.iova, sgl_desc(b.iova, 2048) + sgl_desc(l2.iova, 16, typ=LAST_SEGMENT))
    h.arena.write(l2.iova, sgl_desc(b.iova + PAGE, 2048))
    return _read(h, sgl=sgl_desc(l1.iova, 32, typ=SEGMENT))


@probe("SGL: segment -> segment -> last segment (3 lists)")
def _(h, ns):
    b, l1, l2, l3 = h.alloc(2 * PAGE), h.alloc(PAGE), h.alloc(PAGE), h.alloc(PAGE)
    h.arena.write(l1.iova, sgl_desc(b.iova, 1024) + sgl_desc(l2.iova, 32, typ=SEGMENT))
    h.arena.write(l2.iova, sgl_desc(b.iova + 1024, 1024) + sgl_desc(l3.iova, 16, typ=LAST_SEGMENT))
    h.arena.write(l3.iova, sgl_desc(b.iova + PAGE, 2048))
    return _read(h, sgl=sgl_desc(l1.iova, 32, typ=SEGMENT))


@probe("SGL: last segment length not a multiple of 16")
def _(h, ns):
    b, lst = h.alloc(PAGE), h.alloc(PAGE)
    h.arena.write(lst.iova, sgl_desc(b.iova, 2048) + sgl_desc(b.iova + 2048, 2048))
    return _read(h, sgl=sgl_desc(lst.iova, 24, typ=LAST_SEGMENT))


@probe("SGL: last segment list holding a segment descriptor")
def _(h, ns):
    b, l1, l2 = h.alloc(PAGE), h.alloc(PAGE), h.alloc(PAGE)
    h.arena.write(l1.iova, sgl_desc(b.iova, 2048) + sgl_desc(l2.iova, 16, typ=SEGMENT))
    h.arena.write(l2.iova, sgl_desc(b.iova + 2048, 2048))
    return _read(h, sgl=sgl_desc(l1.iova, 32, typ=LAST_SEGMENT))


@probe("SGL: empty last segment (length 0)")
def _(h, ns):
    lst = h.alloc(PAGE)
    return _read(h, sgl=sgl_desc(lst.iova, 0, typ=LAST_SEGMENT))


@probe("SGL: bit bucket in a read")
def _(h, ns):
    b, lst = h.alloc(PAGE), h.alloc(PAGE)
    h.arena.write(lst.iova, sgl_desc(0, 2048, typ=BIT_BUCKET) + sgl_desc(b.iova, 2048))
    return _read(h, sgl=sgl_desc(lst.iova, 32, typ=LAST_SEGMENT))


@probe("SGL: bit bucket in a write")
def _(h, ns):
    b, lst = h.alloc(PAGE), h.alloc(PAGE)
    h.arena.write(lst.iova, sgl_desc(0, 2048, typ=BIT_BUCKET) + sgl_desc(b.iova, 2048))
    return h.cmd(_rw(0x01, 0, 8, sgl=sgl_desc(lst.iova, 32, typ=LAST_SEGMENT)), 1)


@probe("SGL: on an admin command (Identify)")
def _(h, ns):
    b = h.alloc(PAGE)
    return h.cmd(sqe(0x06, cdw10=1, sgl=sgl_desc(b.iova, 4096)), 0)


# -- I/O command checks -----------------------------------------------------------------

@probe("MDTS + 1 page read")
def _(h, ns):
    b = h.alloc(MDTS_BYTES + PAGE)
    return _read(h, nlb=(MDTS_BYTES + PAGE) // 512, sgl=sgl_desc(b.iova, MDTS_BYTES + PAGE))


@probe("read at the first LBA beyond the end")
def _(h, ns):
    b = h.alloc(PAGE)
    return _read(h, slba=ns, nlb=1, prp1=b.iova)


@probe("read straddling the end")
def _(h, ns):
    b = h.alloc(PAGE)
    return _read(h, slba=ns - 4, nlb=8, prp1=b.iova)


@probe("write zeroes beyond the end")
def _(h, ns):
    return h.cmd(_rw(0x08, ns, 8), 1)


@probe("deallocate a range beyond the end")
def _(h, ns):
    b = h.alloc(PAGE)
    h.arena.write(b.iova, struct.pack("<IIQ", 0, 8, ns + 100))
    return h.cmd(sqe(0x09, nsid=1, cdw10=0, cdw11=1 << 2, prp1=b.iova), 1)


@probe("read of an inactive namespace (99)")
def _(h, ns):
    b = h.alloc(PAGE)
    return _read(h, nsid=99, prp1=b.iova)


@probe("read of namespace 0")
def _(h, ns):
    b = h.alloc(PAGE)
    return _read(h, nsid=0, prp1=b.iova)


@probe("flush of all namespaces (FFFFFFFFh)")
def _(h, ns):
    return h.cmd(sqe(0x00, nsid=0xFFFFFFFF), 1)


@probe("unknown I/O opcode 0x7E")
def _(h, ns):
    return h.cmd(sqe(0x7E, nsid=1), 1)


@probe("unknown admin opcode 0x3E")
def _(h, ns):
    return h.cmd(sqe(0x3E), 0)


# -- queue management -------------------------------------------------------------------

def _create_cq(h, qid, qsize, iv=None, pc=1, ien=0):
    b = h.alloc(max(qsize, 1) * 16 + PAGE)
    return h.cmd(sqe(0x05, cdw10=((qsize - 1) & 0xFFFF) << 16 | qid,
                     cdw11=((qid if iv is None else iv) << 16) | (ien << 1) | pc, prp1=b.iova), 0)


def _create_sq(h, qid, qsize, cqid):
    b = h.alloc(qsize * 64 + PAGE)
    return h.cmd(sqe(0x01, cdw10=((qsize - 1) & 0xFFFF) << 16 | qid, cdw11=(cqid << 16) | 1,
                     prp1=b.iova), 0)


@probe("Create I/O CQ: qid 0")
def _(h, ns):
    return _create_cq(h, 0, 16)


@probe("Create I/O CQ: qid 65535 (above the granted queues)")
def _(h, ns):
    return _create_cq(h, 65535, 16, iv=0)


@probe("Create I/O CQ: qid already in use")
def _(h, ns):
    return _create_cq(h, 1, 16)


@probe("Create I/O CQ: size 1 (QSIZE 0)")
def _(h, ns):
    return _create_cq(h, 5, 1)


@probe("Create I/O CQ: size MQES + 2")
def _(h, ns):
    mqes = h.regs.read64(0) & 0xFFFF
    return _create_cq(h, 5, mqes + 2)


@probe("Create I/O CQ: interrupt vector 2000")
def _(h, ns):
    return _create_cq(h, 5, 16, iv=2000, ien=1)


@probe("Create I/O SQ: completion queue does not exist")
def _(h, ns):
    return _create_sq(h, 6, 16, 7)


@probe("Create I/O SQ: qid 0")
def _(h, ns):
    return _create_sq(h, 0, 16, 1)


@probe("Create I/O SQ: size 1 (QSIZE 0)")
def _(h, ns):
    return _create_sq(h, 6, 1, 1)


@probe("Delete I/O CQ with its SQ still there")
def _(h, ns):
    return h.cmd(sqe(0x04, cdw10=1), 0)


@probe("Delete I/O SQ 0")
def _(h, ns):
    return h.cmd(sqe(0x00, cdw10=0), 0)


@probe("Delete I/O SQ that does not exist (9)")
def _(h, ns):
    return h.cmd(sqe(0x00, cdw10=9), 0)


# -- admin: log pages, identify, features -----------------------------------------------

def _log(lid, nbytes=512):
    def fn(h, ns):
        c, _data = h.get_log(lid, nbytes)
        return c
    return fn


for _lid, _what in ((0x01, "Error Information"), (0x02, "SMART / Health"), (0x03, "Firmware Slot"),
                    (0x04, "Changed Namespace List"), (0x05, "Commands Supported and Effects"),
                    (0x7F, "unknown 7Fh")):
    probe(f"Get Log Page {_lid:02X}h ({_what})")(_log(_lid, 4096 if _lid in (4, 5) else 512))


@probe("Identify CNS 55h (reserved)")
def _(h, ns):
    b = h.alloc(PAGE)
    return h.cmd(sqe(0x06, cdw10=0x55, prp1=b.iova), 0)


@probe("Identify Namespace of an inactive NSID (99)")
def _(h, ns):
    b = h.alloc(PAGE)
    return h.cmd(sqe(0x06, nsid=99, cdw10=0, prp1=b.iova), 0)


@probe("Get Features FID 00h (reserved)")
def _(h, ns):
    return h.cmd(sqe(0x0A, cdw10=0), 0)


@probe("Set Features Number of Queues after queues exist")
def _(h, ns):
    return h.cmd(sqe(0x09, cdw10=0x07, cdw11=0), 0)


# -- the runner -------------------------------------------------------------------------

def run_probes(model, arena, regs):
    """Bring the controller up with one I/O queue pair (polled) and run every
    probe; returns [(name, (sct, sc) or 'error text')]."""
    h = bring_up(model, arena, regs)
    ns_blocks, = struct.unpack_from("<Q", h.identify(0, 1), 0)
    out = []
    for name, fn in PROBES:
        try:
            c = fn(h, ns_blocks)
            sct, sc, _dnr = status_of(c)
            out.append((name, (sct, sc)))
        except Exception as exc:              # noqa: BLE001 -- a hang/timeout is a result too
            out.append((name, f"{type(exc).__name__}: {exc}"[:60]))
            h.stash = {}
    try:
        h.disable()
    except Exception:                         # noqa: BLE001
        pass
    return out


def fmt(result):
    if isinstance(result, str):
        return result
    sct, sc = result
    if (sct, sc) == (0, 0):
        return "SUCCESS"
    from nvmefs import _core
    return f"{_core.decode_status((sct << 9 | sc << 1)).name} ({sct}/{sc:#04x})"


def table(qemu, model):
    rows = [("probe", "QEMU (VFIO)", "model", "")]
    diffs = []
    for (name, q), (_n, m) in zip(qemu, model):
        mark = ""
        if q != m:
            mark = "documented" if name in DEVIATIONS else "DIFFERENT"
            if name not in DEVIATIONS:
                diffs.append(name)
        rows.append((name, fmt(q), fmt(m), mark))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(w[i]) for i in range(4)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for name in DEVIATIONS:
        lines.append(f"* {name}: {DEVIATIONS[name]}")
    return "\n".join(lines), diffs
