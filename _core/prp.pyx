# PRP lists (NVMe base spec 4.1.1 "PRP entry" and NVME-NOTES.md "PRP rules").
#
# Input is a list of (bus address, length) segments.  PRP1 may carry a dword
# aligned offset; every later page address is page aligned (defect 4: a PRP2
# with an offset is invalid, and the controller answers PRP Offset Invalid).
# A layout where a middle segment starts or a non-final segment ends off a
# page boundary cannot be described by PRPs at all: that is reported, not
# papered over, so the caller can choose SGL or a bounce buffer.
#
# Lists are written into the tracker's preallocated, contiguous list pages
# (defect 8).  A list page holds page_size/8 entries; when more remain, its
# last entry points at the next list page (chaining).

# dma_seg, the fault codes and the inline page counters: nvmefs/_core.pxd
cdef int prp_build(const dma_seg *segs, uint32_t nseg, uint32_t page_size,
                   uint64_t list_iova, uint8_t *list_vaddr, uint32_t list_pages,
                   uint64_t *prp1, uint64_t *prp2, uint32_t *fault, uint32_t *fault_seg) noexcept nogil:
    cdef uint64_t mask = page_size - 1
    cdef uint64_t per = page_size >> 3
    cdef uint32_t i
    cdef uint64_t addr, end, total_entries
    fault[0] = PRP_OK
    fault_seg[0] = 0
    if nseg == 0:
        fault[0] = PRP_NO_SEGMENTS
        return -EINVAL
    for i in range(nseg):
        fault_seg[0] = i
        if segs[i].length == 0:
            fault[0] = PRP_EMPTY_SEGMENT
            return -EINVAL
        if segs[i].flags & SEG_BIT_BUCKET:
            fault[0] = PRP_BIT_BUCKET
            return -EOPNOTSUPP
        if i == 0:
            if segs[i].iova & 3:
                fault[0] = PRP_FIRST_NOT_DWORD
                return -EINVAL
        elif segs[i].iova & mask:
            fault[0] = PRP_MIDDLE_START
            return -EINVAL
        if i + 1 < nseg and (segs[i].iova + segs[i].length) & mask:
            fault[0] = PRP_MIDDLE_END
            return -EINVAL
    fault_seg[0] = 0

    prp1[0] = segs[0].iova
    total_entries = prp_pages_of(segs, nseg, page_size)
    if total_entries == 1:
        prp2[0] = 0
        return 0
    if total_entries == 2:
        # the second page is either the rest of segment 0 or all of segment 1
        if nseg == 1:
            prp2[0] = (segs[0].iova & ~mask) + page_size
        else:
            prp2[0] = segs[1].iova
        return 0
    if prp_list_pages_for(total_entries - 1, page_size) > list_pages:
        fault[0] = PRP_LIST_TOO_SMALL
        return -E2BIG

    prp2[0] = list_iova
    cdef uint64_t *entry = <uint64_t *>list_vaddr
    cdef uint64_t slot = 0            # index within the current list page
    cdef uint64_t remaining = total_entries - 1
    cdef uint32_t page = 0
    cdef bint first = True
    for i in range(nseg):
        if first:
            addr = (segs[0].iova & ~mask) + page_size
            first = False
        else:
            addr = segs[i].iova
        end = segs[i].iova + segs[i].length
        while addr < end:
            if slot == per - 1 and remaining > 1:
                # last slot of a full list page: chain to the next list page
                page += 1
                entry[slot] = list_iova + <uint64_t>page * page_size
                entry = <uint64_t *>(list_vaddr + <size_t>page * page_size)
                slot = 0
            entry[slot] = addr
            slot += 1
            remaining -= 1
            addr += page_size
    return 0


cdef int segments_from_py(object segments, dma_seg *out, uint32_t cap) except -1:
    cdef uint32_t n = 0
    for seg in segments:
        if n >= cap:
            raise ValueError(f"more than {cap} segments")
        out[n].iova = seg[0]
        out[n].length = seg[1]
        out[n].flags = SEG_BIT_BUCKET if (len(seg) > 2 and seg[2]) else 0
        n += 1
    return n


cdef str prp_fault_message(uint32_t fault, uint32_t seg, const dma_seg *segs, uint32_t page_size):
    if fault == PRP_FIRST_NOT_DWORD:
        return f"PRP1 0x{segs[0].iova:x} is not dword aligned"
    if fault == PRP_MIDDLE_START:
        return (f"segment {seg} starts at 0x{segs[seg].iova:x}, not on a {page_size}-byte page: "
                "not expressible with PRPs (use SGL or a bounce buffer)")
    if fault == PRP_MIDDLE_END:
        return (f"segment {seg} ends at 0x{segs[seg].iova + segs[seg].length:x}, not on a page boundary, "
                "and is not the last: not expressible with PRPs (use SGL or a bounce buffer)")
    if fault == PRP_EMPTY_SEGMENT:
        return f"segment {seg} is empty"
    if fault == PRP_BIT_BUCKET:
        return f"segment {seg} is a bit bucket, which only SGLs can describe"
    if fault == PRP_LIST_TOO_SMALL:
        return "transfer needs more PRP list pages than the command's list memory holds"
    if fault == PRP_NO_SEGMENTS:
        return "no data segments"
    return "invalid PRP layout"
