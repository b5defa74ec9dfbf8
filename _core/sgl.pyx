# Scatter/gather lists (NVMe base spec 4.1.2 and NVME-NOTES.md "SGL descriptors").
#
# One data segment: SGL1 is a Data Block.  Several: SGL1 is a Last Segment
# pointing at the descriptor list in the tracker's list pages; when the
# descriptors do not fit in one page, each full page ends in a Segment
# descriptor (or a Last Segment for the final page) pointing at the next one.
# A Last Segment's list holds no segment descriptors (spec rule).  Read ranges
# the caller does not want become Bit Bucket descriptors.

# the fault codes and the inline descriptor helpers: nvmefs/_core.pxd
cdef int sgl_build(const dma_seg *segs, uint32_t nseg, uint32_t page_size, bint dword_only,
                   uint64_t list_iova, uint8_t *list_vaddr, uint32_t list_pages,
                   nvme_sgl_desc *sgl1, uint32_t *fault, uint32_t *fault_seg) noexcept nogil:
    """Fill SGL1 (the SQE's DPTR) and the list pages.  ``dword_only``: the
    controller reported SGLS=10b (dword alignment and granularity)."""
    cdef uint64_t per = page_size >> 4
    cdef uint32_t i, page, n_here, remaining
    cdef bint any_data = False
    cdef nvme_sgl_desc *d
    fault[0] = SGL_OK
    fault_seg[0] = 0
    if nseg == 0:
        fault[0] = SGL_NO_SEGMENTS
        return -EINVAL
    for i in range(nseg):
        if segs[i].length == 0:
            fault[0] = SGL_EMPTY_SEGMENT
            fault_seg[0] = i
            return -EINVAL
        if dword_only and ((segs[i].iova | segs[i].length) & 3):
            fault[0] = SGL_NOT_DWORD
            fault_seg[0] = i
            return -EINVAL
        if not (segs[i].flags & SEG_BIT_BUCKET):
            any_data = True
    if not any_data:
        fault[0] = SGL_BIT_BUCKET_ONLY
        return -EINVAL
    if nseg == 1:
        sgl_set_seg(sgl1, &segs[0])
        return 0
    if sgl_list_pages_for(nseg, page_size) > list_pages:
        fault[0] = SGL_LIST_TOO_SMALL
        return -E2BIG

    remaining = nseg
    i = 0
    page = 0
    d = sgl1
    while True:
        if remaining <= per:
            # the final list: described by a Last Segment, holds no segment descriptors
            sgl_set(d, list_iova + <uint64_t>page * page_size, remaining * 16, NVME_SGL_LAST_SEGMENT)
            n_here = remaining
        else:
            sgl_set(d, list_iova + <uint64_t>page * page_size, <uint32_t>(per * 16), NVME_SGL_SEGMENT)
            n_here = <uint32_t>(per - 1)
        d = <nvme_sgl_desc *>(list_vaddr + <size_t>page * page_size)
        while n_here:
            sgl_set_seg(d, &segs[i])
            d += 1
            i += 1
            n_here -= 1
            remaining -= 1
        if remaining == 0:
            return 0
        # d now addresses the last slot of a full page: it links to the next page
        page += 1


cdef str sgl_fault_message(uint32_t fault, uint32_t seg, const dma_seg *segs):
    if fault == SGL_EMPTY_SEGMENT:
        return f"segment {seg} is empty"
    if fault == SGL_NOT_DWORD:
        return (f"segment {seg} (0x{segs[seg].iova:x}+{segs[seg].length}) is not dword aligned, "
                "which this controller's SGL support requires")
    if fault == SGL_LIST_TOO_SMALL:
        return "too many segments for the command's SGL list memory"
    if fault == SGL_BIT_BUCKET_ONLY:
        return "an SGL needs at least one data block besides bit buckets"
    if fault == SGL_NO_SEGMENTS:
        return "no data segments"
    return "invalid SGL layout"


# --- PRP or SGL --------------------------------------------------------------------

cdef enum dptr_choice:
    USE_PRP = 0
    USE_SGL = 1

cdef enum:
    SGLS_SUPPORTED = 0x1        # SGLS bits 1:0 = 01b
    SGLS_DWORD_ALIGNED = 0x2    # SGLS bits 1:0 = 10b
    SGLS_BIT_BUCKET = 1 << 16
    SGL_THRESHOLD_DEFAULT = 32768


cdef int choose_dptr(uint32_t sgls, const dma_seg *segs, uint32_t nseg, uint32_t page_size,
                     bint is_admin, bint is_read, uint32_t sgl_threshold) noexcept nogil:
    """USE_PRP or USE_SGL for this buffer on this controller, or -errno when
    neither can describe it (the caller then bounces).

    The rule follows Linux nvme_pci_use_sgls(): admin commands and controllers
    without SGL support use PRPs; a single contiguous buffer of at most two
    pages always uses PRPs (no list at all); otherwise SGLs when the average
    segment is at least ``sgl_threshold`` bytes (32 KiB as Linux's default).
    Two things force SGLs: bit buckets, and layouts PRPs cannot express."""
    cdef uint32_t i
    cdef uint64_t total = 0, mask = page_size - 1
    cdef bint has_bb = False, prp_ok = True, sgl_ok
    cdef uint32_t mode = sgls & 0x3
    if nseg == 0:
        return -EINVAL
    for i in range(nseg):
        total += segs[i].length
        if segs[i].flags & SEG_BIT_BUCKET:
            has_bb = True
        if i == 0:
            if segs[i].iova & 3:
                prp_ok = False
        elif segs[i].iova & mask:
            prp_ok = False
        if i + 1 < nseg and (segs[i].iova + segs[i].length) & mask:
            prp_ok = False
    sgl_ok = (not is_admin) and (mode == SGLS_SUPPORTED or mode == SGLS_DWORD_ALIGNED)
    if sgl_ok and mode == SGLS_DWORD_ALIGNED:
        for i in range(nseg):
            if (segs[i].iova | segs[i].length) & 3:
                sgl_ok = False
    if has_bb:
        if sgl_ok and is_read and (sgls & SGLS_BIT_BUCKET):
            return USE_SGL
        return -EOPNOTSUPP
    if not sgl_ok:
        return USE_PRP if prp_ok else -EINVAL
    if not prp_ok:
        return USE_SGL
    if nseg == 1 and (segs[0].iova & mask) + segs[0].length <= 2 * page_size:
        return USE_PRP
    if sgl_threshold == 0 or (total + nseg - 1) // nseg < sgl_threshold:
        return USE_PRP
    return USE_SGL
