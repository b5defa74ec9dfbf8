"""A pure-Python reference for PRP lists and SGL chains.

It walks a data pointer the way a controller does (NVMe base spec 4.1.1 and
4.1.2; QEMU hw/nvme nvme_map_prp / nvme_map_sgl behave the same way) and
returns the byte ranges it describes, or raises RefError naming the status
a strict controller would return.  It shares no code with the Cython
builders on purpose: the property tests compare the two.
"""
import struct

PRP_OFFSET_INVALID = "PRP_OFFSET_INVALID"
SGL_DESCRIPTOR_TYPE_INVALID = "SGL_DESCRIPTOR_TYPE_INVALID"
INVALID_SGL_SEGMENT_DESCRIPTOR = "INVALID_SGL_SEGMENT_DESCRIPTOR"
INVALID_NUMBER_OF_SGL_DESCRIPTORS = "INVALID_NUMBER_OF_SGL_DESCRIPTORS"
DATA_SGL_LENGTH_INVALID = "DATA_SGL_LENGTH_INVALID"

DATA_BLOCK, BIT_BUCKET, SEGMENT, LAST_SEGMENT = 0, 1, 2, 3


class RefError(Exception):
    def __init__(self, status, detail=""):
        super().__init__(f"{status}: {detail}")
        self.status = status


def walk_prp(read, prp1, prp2, length, page_size=4096):
    """Byte ranges [(addr, len)] of a PRP transfer of ``length`` bytes.
    ``read(addr, n)`` returns n bytes of bus memory."""
    mask = page_size - 1
    if prp1 & 3:
        raise RefError(PRP_OFFSET_INVALID, f"PRP1 0x{prp1:x} not dword aligned")
    first = min(length, page_size - (prp1 & mask))
    ranges = [(prp1, first)]
    remaining = length - first
    if remaining == 0:
        return ranges
    if remaining <= page_size:
        if prp2 & mask:
            raise RefError(PRP_OFFSET_INVALID, f"PRP2 0x{prp2:x} has an offset")
        return ranges + [(prp2, remaining)]
    # PRP2 is a list pointer; its entries are page addresses with no offset
    if prp2 & 7:
        raise RefError(PRP_OFFSET_INVALID, f"PRP list pointer 0x{prp2:x} not qword aligned")
    per_page = page_size // 8
    list_addr = prp2
    slot = (prp2 & mask) // 8
    while remaining:
        entry = struct.unpack("<Q", read(list_addr + slot * 8, 8))[0]
        if slot == per_page - 1 and remaining > page_size:
            # last entry of a full list page with more than one page left: a chain pointer
            if entry & mask:
                raise RefError(PRP_OFFSET_INVALID, f"chained list pointer 0x{entry:x} has an offset")
            list_addr, slot = entry, 0
            continue
        if entry & mask:
            raise RefError(PRP_OFFSET_INVALID, f"list entry 0x{entry:x} has an offset")
        n = min(page_size, remaining)
        ranges.append((entry, n))
        remaining -= n
        slot += 1
    return ranges


def parse_sgl(raw):
    addr, length, _r0, _r1, _r2, ident = struct.unpack("<QIBBBB", raw)
    return addr, length, ident >> 4, ident & 0xF


def walk_sgl(read, sgl1, length=None, allow_bit_bucket=True):
    """Byte ranges [(addr, len, is_bit_bucket)] described by the 16-byte SGL1.
    When ``length`` is given, the data length must match the SGL's total
    (as for a command whose NLB fixes the length)."""
    addr, dlen, typ, sub = parse_sgl(sgl1)
    ranges = []

    def data(a, n, t):
        if t == DATA_BLOCK:
            ranges.append((a, n, False))
        elif t == BIT_BUCKET:
            if not allow_bit_bucket:
                raise RefError(SGL_DESCRIPTOR_TYPE_INVALID, "bit bucket not supported")
            ranges.append((a, n, True))
        else:
            raise RefError(SGL_DESCRIPTOR_TYPE_INVALID, f"type {t} where data was expected")

    if typ in (DATA_BLOCK, BIT_BUCKET):
        data(addr, dlen, typ)
    elif typ in (SEGMENT, LAST_SEGMENT):
        seen = 0
        while True:
            if dlen == 0 or dlen % 16:
                raise RefError(INVALID_SGL_SEGMENT_DESCRIPTOR, f"segment length {dlen}")
            n = dlen // 16
            descs = [parse_sgl(read(addr + 16 * i, 16)) for i in range(n)]
            seen += 1
            if seen > 4096:
                raise RefError(INVALID_SGL_SEGMENT_DESCRIPTOR, "segment loop")
            last_is_last = typ == LAST_SEGMENT
            for i, (a, ln, t, _s) in enumerate(descs):
                if t in (SEGMENT, LAST_SEGMENT):
                    if last_is_last:
                        raise RefError(INVALID_SGL_SEGMENT_DESCRIPTOR,
                                       "segment descriptor inside a last segment")
                    if i != n - 1:
                        raise RefError(INVALID_SGL_SEGMENT_DESCRIPTOR,
                                       "segment descriptor not last in its list")
                    continue
                if ln == 0 and t == DATA_BLOCK:
                    continue
                data(a, ln, t)
            if last_is_last:
                break
            a, ln, t, _s = descs[-1]
            if t not in (SEGMENT, LAST_SEGMENT):
                # a Segment's list that ends without a pointer ends the SGL
                break
            addr, dlen, typ = a, ln, t
    else:
        raise RefError(SGL_DESCRIPTOR_TYPE_INVALID, f"SGL1 type {typ}")
    if length is not None and sum(r[1] for r in ranges) != length:
        raise RefError(DATA_SGL_LENGTH_INVALID, f"SGL covers {sum(r[1] for r in ranges)} of {length} bytes")
    return ranges


def coalesce(ranges):
    """Merge adjacent (addr, len[, bb]) ranges so layouts compare independent of page splits."""
    out = []
    for r in ranges:
        a, n = r[0], r[1]
        bb = r[2] if len(r) > 2 else False
        if out and not bb and not out[-1][2] and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], out[-1][1] + n, False)
        else:
            out.append((a, n, bb))
    return out
