# Cython-level measurement loops for bench/core_bench.py: the loop runs in C
# with the GIL released, so Python call overhead is not what is measured.

cdef extern from *:
    """
    static volatile uint64_t bench_sink;
    static inline void bench_consume(uint64_t v) { bench_sink += v; }
    """
    void bench_consume(uint64_t v) nogil


def bench_cid(uint32_t depth, uint64_t iterations):
    """ns per CID alloc+release pair."""
    cdef CidTable t = CidTable(depth)
    cdef uint64_t i, t0, t1
    cdef int idx
    with nogil:
        t0 = nvmefs_now_ns()
        for i in range(iterations):
            idx = t.alloc()
            t.trk[idx].state = TRK_SUBMITTED
            bench_consume(t.trk[idx].cid)
            t.release(idx)
        t1 = nvmefs_now_ns()
    return (t1 - t0) / <double>iterations


def bench_prp(DmaArena arena, uint64_t nbytes, uint64_t iterations, uint32_t offset=0):
    """ns per PRP build of one contiguous ``nbytes`` transfer (list included)."""
    cdef uint32_t ps = arena.page_size
    cdef DmaBuffer data = arena.alloc(nbytes + ps)
    cdef uint64_t entries = (offset + nbytes + ps - 1) // ps
    cdef uint32_t lp = prp_list_pages_for(entries, ps)
    cdef DmaBuffer lst = arena.alloc(<size_t>lp * ps)
    cdef dma_seg seg
    cdef uint64_t prp1, prp2, i, t0, t1
    cdef uint32_t fault = 0, fseg
    seg.iova = data.iova + offset
    seg.length = <uint32_t>nbytes
    seg.flags = 0
    with nogil:
        t0 = nvmefs_now_ns()
        for i in range(iterations):
            if prp_build(&seg, 1, ps, lst.iova, lst.vaddr, lp, &prp1, &prp2, &fault, &fseg) < 0:
                break
            bench_consume(prp2)
        t1 = nvmefs_now_ns()
    data.free()
    lst.free()
    if fault:
        raise RuntimeError(prp_fault_message(fault, fseg, &seg, ps))
    return (t1 - t0) / <double>iterations


def bench_sgl(DmaArena arena, uint32_t nseg, uint64_t iterations, uint32_t seg_bytes=4096):
    """ns per SGL build of ``nseg`` scattered segments (lists included)."""
    cdef uint32_t ps = arena.page_size
    cdef DmaBuffer data = arena.alloc(<size_t>nseg * 2 * ps)
    cdef uint32_t lp = sgl_list_pages_for(nseg, ps)
    cdef DmaBuffer lst = arena.alloc(<size_t>lp * ps)
    cdef dma_seg *segs = <dma_seg *>malloc(nseg * sizeof(dma_seg))
    cdef nvme_sgl_desc sgl1
    cdef uint64_t i, t0, t1
    cdef uint32_t k, fault = 0, fseg
    for k in range(nseg):
        # every other page, at an odd dword offset: a layout PRPs cannot express
        segs[k].iova = data.iova + <uint64_t>k * 2 * ps + 4 * (k % 7)
        segs[k].length = seg_bytes - 4 * (k % 7)
        segs[k].flags = 0
    with nogil:
        t0 = nvmefs_now_ns()
        for i in range(iterations):
            if sgl_build(segs, nseg, ps, False, lst.iova, lst.vaddr, lp, &sgl1, &fault, &fseg) < 0:
                break
            bench_consume(sgl1.addr)
        t1 = nvmefs_now_ns()
    free(segs)
    data.free()
    lst.free()
    if fault:
        raise RuntimeError("SGL build failed in bench")
    return (t1 - t0) / <double>iterations


def bench_sqe_copy(uint64_t iterations):
    """ns per 64-byte SQE copy into a ring slot: the floor any submission pays,
    measured in the same run as a baseline for the other numbers."""
    cdef nvme_sqe *ring = <nvme_sqe *>calloc(256, sizeof(nvme_sqe))
    cdef nvme_sqe cmd
    cdef uint64_t i, t0, t1
    memset(&cmd, 0, sizeof(cmd))
    if ring == NULL:
        raise MemoryError()
    with nogil:
        t0 = nvmefs_now_ns()
        for i in range(iterations):
            cmd.cdw10 = <uint32_t>i
            memcpy(&ring[i & 255], &cmd, sizeof(nvme_sqe))
            bench_consume(ring[(i + 1) & 255].cdw10)
        t1 = nvmefs_now_ns()
    free(ring)
    return (t1 - t0) / <double>iterations
