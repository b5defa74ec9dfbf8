# Python entry points to the descriptor builders, for tests, the reference
# checker and tools.  They build into caller-provided list memory exactly as
# the queue pair does into a tracker's pages.

cdef dma_seg *_seg_scratch(object segments, uint32_t *n) except NULL:
    cdef list segs = list(segments)
    cdef dma_seg *out = <dma_seg *>malloc(max(len(segs), 1) * sizeof(dma_seg))
    if out == NULL:
        raise MemoryError()
    try:
        n[0] = segments_from_py(segs, out, len(segs))
    except BaseException:
        free(out)
        raise
    return out


def build_prp(segments, DmaBuffer list_mem not None):
    """PRP1 and PRP2 for ``segments`` ((bus address, length) tuples), writing
    any PRP list into ``list_mem``.  Raises PrpLayoutError for layouts PRPs
    cannot express."""
    cdef uint32_t n, fault, fault_seg
    cdef uint64_t prp1 = 0, prp2 = 0
    cdef uint32_t ps = list_mem.arena.page_size
    cdef dma_seg *segs = _seg_scratch(segments, &n)
    cdef int rc
    try:
        rc = prp_build(segs, n, ps, list_mem.iova, list_mem.vaddr, <uint32_t>(list_mem.size // ps),
                       &prp1, &prp2, &fault, &fault_seg)
        if rc < 0:
            from nvmefs.errors import PrpLayoutError
            raise PrpLayoutError(prp_fault_message(fault, fault_seg, segs, ps))
        return prp1, prp2
    finally:
        free(segs)


def build_sgl(segments, DmaBuffer list_mem not None, bint dword_only=False):
    """The 16-byte SGL1 for ``segments`` ((bus address, length[, bit_bucket])),
    writing any descriptor lists into ``list_mem``."""
    cdef uint32_t n, fault, fault_seg
    cdef nvme_sgl_desc sgl1
    cdef uint32_t ps = list_mem.arena.page_size
    cdef dma_seg *segs = _seg_scratch(segments, &n)
    cdef int rc
    try:
        rc = sgl_build(segs, n, ps, dword_only, list_mem.iova, list_mem.vaddr,
                       <uint32_t>(list_mem.size // ps), &sgl1, &fault, &fault_seg)
        if rc < 0:
            from nvmefs.errors import SglLayoutError
            raise SglLayoutError(sgl_fault_message(fault, fault_seg, segs))
        return PyBytes_FromStringAndSize(<char *>&sgl1, sizeof(sgl1))
    finally:
        free(segs)


def choose_data_pointer(segments, uint32_t sgls, uint32_t page_size=4096, bint admin=False,
                        bint read=False, uint32_t threshold=SGL_THRESHOLD_DEFAULT):
    """"prp" or "sgl" for this buffer layout on a controller reporting
    Identify SGLS = ``sgls``; raises when neither applies (bounce it)."""
    cdef uint32_t n
    cdef dma_seg *segs = _seg_scratch(segments, &n)
    cdef int rc
    try:
        rc = choose_dptr(sgls, segs, n, page_size, admin, read, threshold)
    finally:
        free(segs)
    if rc == USE_PRP:
        return "prp"
    if rc == USE_SGL:
        return "sgl"
    from nvmefs.errors import PrpLayoutError, SglLayoutError
    if rc == -EOPNOTSUPP:
        raise SglLayoutError("bit buckets need a read on a controller with SGL bit bucket support")
    raise PrpLayoutError("layout not expressible with PRPs and SGLs are not available: bounce it")


def prp_list_pages_needed(uint64_t nbytes, uint32_t first_offset=0, uint32_t page_size=4096):
    """List pages a contiguous transfer needs (0 when PRP1/PRP2 suffice)."""
    cdef uint64_t entries = (first_offset % page_size + nbytes + page_size - 1) // page_size
    if entries <= 2:
        return 0
    return prp_list_pages_for(entries - 1, page_size)


def wire_layout():
    """Sizes and offsets of the wire structs as compiled (struct packing tests)."""
    cdef nvme_sqe s
    cdef nvme_cqe c
    cdef nvme_sgl_desc d
    cdef uintptr_t sb = <uintptr_t>&s, cb = <uintptr_t>&c, db = <uintptr_t>&d
    return {
        "sqe": {"size": sizeof(nvme_sqe), "opc": <uintptr_t>&s.opc - sb, "flags": <uintptr_t>&s.flags - sb,
                "cid": <uintptr_t>&s.cid - sb, "nsid": <uintptr_t>&s.nsid - sb,
                "mptr": <uintptr_t>&s.mptr - sb, "dptr": <uintptr_t>&s.dptr - sb,
                "cdw10": <uintptr_t>&s.cdw10 - sb, "cdw15": <uintptr_t>&s.cdw15 - sb},
        "cqe": {"size": sizeof(nvme_cqe), "dw0": <uintptr_t>&c.dw0 - cb, "sqhd": <uintptr_t>&c.sqhd - cb,
                "sqid": <uintptr_t>&c.sqid - cb, "cid": <uintptr_t>&c.cid - cb,
                "status": <uintptr_t>&c.status - cb},
        "sgl": {"size": sizeof(nvme_sgl_desc), "addr": <uintptr_t>&d.addr - db,
                "length": <uintptr_t>&d.length - db, "id": <uintptr_t>&d.id - db},
    }
