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


# -- the ioworker: the core's own I/O loop against a device ---------------------------------
#
# One host thread keeps ``qd`` commands outstanding on one queue pair through
# QueuePair.submit / ring_sq / process_completions -- the code the lanes
# submit and reap with -- and records every command's latency in a
# log-linear histogram (64 sub-buckets per power of two: 1.6 % resolution).
# It polls the CQ (the bench creates polled queues), so what it measures is
# the protocol and the device, not interrupt delivery.

cdef extern from *:
    """
    #include <time.h>
    static inline uint64_t iow_thread_cpu_ns(void)
    {
        struct timespec ts;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    }
    static inline int iow_log2(uint64_t v) { return 63 - __builtin_clzll(v); }
    """
    uint64_t iow_thread_cpu_ns() nogil
    int iow_log2(uint64_t v) nogil

cdef enum:
    IOW_SUB = 64
    IOW_MAXEXP = 47                     # 2^47 ns: longer latencies share the last bucket
    IOW_BUCKETS = IOW_SUB * (IOW_MAXEXP - 4)
    IOW_CHECK_EVERY = 64                # completions between looks at the clock


@cython.linetrace(False)
@cython.profile(False)
cdef inline uint32_t iow_bucket(uint64_t v) noexcept nogil:
    cdef int e
    if v < IOW_SUB:
        return <uint32_t>v
    e = iow_log2(v)
    if e > IOW_MAXEXP:
        return IOW_BUCKETS - 1
    return <uint32_t>((e - 5) * IOW_SUB + ((v >> (e - 6)) & (IOW_SUB - 1)))


cdef uint64_t iow_bucket_floor(uint32_t i) noexcept:
    if i < IOW_SUB:
        return i
    return <uint64_t>(IOW_SUB + i % IOW_SUB) << (i // IOW_SUB - 1)


@cython.linetrace(False)
@cython.profile(False)
cdef inline uint64_t iow_rand(uint64_t *s) noexcept nogil:
    # xorshift64*: cheap next to a command, and the same sequence per seed
    cdef uint64_t x = s[0]
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    s[0] = x
    return x * 0x2545F4914F6CDD1Dull


def ioworker(QueuePair qp not None, DmaArena arena not None, *, uint32_t nsid, uint64_t nlba,
             uint32_t lba_size, uint32_t qd, uint32_t io_bytes=4096, uint32_t read_pct=100,
             bint sequential=False, str dptr="prp", double seconds=1.0, uint64_t seed=1,
             uint64_t max_ios=0):
    """Keep ``qd`` reads/writes of ``io_bytes`` outstanding on ``qp`` for
    ``seconds`` (or ``max_ios`` commands), random LBAs aligned to the I/O
    size (or sequential), ``read_pct`` % reads, data pointers as PRPs or
    SGLs (``dptr``: prp, sgl, auto).  Returns a dict: ios, reads, bytes,
    errors, elapsed_ns, host_cpu_ns (the thread's CPU time: all of it, as it
    polls), host_busy_ns (the loop turns that submitted or reaped), lat_ns
    (mean, p50, p99, p99.9, max)."""
    if dptr not in ("prp", "sgl", "auto"):
        raise ValueError("dptr is prp, sgl or auto")
    if qd < 1 or qd >= qp.entries:
        raise ValueError(f"qd {qd} needs 1 <= qd < the queue's {qp.entries} entries")
    if io_bytes == 0 or io_bytes % lba_size or io_bytes > qp.max_transfer:
        raise ValueError(f"io_bytes {io_bytes}: a multiple of {lba_size} up to {qp.max_transfer}")
    cdef uint32_t nlb = io_bytes // lba_size
    cdef uint64_t slots_in_ns = nlba // nlb
    if slots_in_ns == 0:
        raise ValueError("the namespace is smaller than one I/O")
    cdef int mode = DPTR_PRP if dptr == "prp" else (DPTR_SGL if dptr == "sgl" else DPTR_AUTO)
    cdef DmaBuffer data = arena.alloc(<size_t>qd * io_bytes)
    cdef uint64_t *hist = <uint64_t *>calloc(IOW_BUCKETS, sizeof(uint64_t))
    cdef uint64_t *t_sub = <uint64_t *>calloc(qd, sizeof(uint64_t))
    cdef uint32_t *free_slots = <uint32_t *>malloc(qd * sizeof(uint32_t))
    if hist == NULL or t_sub == NULL or free_slots == NULL:
        free(hist)
        free(t_sub)
        free(free_slots)
        data.free()
        raise MemoryError()
    cdef uint32_t nfree = qd, i, slot, k
    cdef int rc = 0, n, fault = 0
    cdef uint64_t rng = seed * 0x9E3779B97F4A7C15ull + 1, next_lba = 0, slba
    cdef uint64_t ios = 0, reads = 0, errors = 0, submitted = 0, lat, lat_sum = 0, lat_max = 0
    cdef uint64_t t0, t1, now, cpu0, cpu1, deadline, since_check = 0, it0, busy = 0
    cdef uint16_t st
    cdef bint is_read, stop = False
    cdef nvme_sqe cmd
    cdef dma_seg seg
    for i in range(qd):
        free_slots[i] = qd - 1 - i
    with nogil:
        cpu0 = iow_thread_cpu_ns()
        t0 = nvmefs_now_ns()
        deadline = t0 + <uint64_t>(seconds * 1e9)
        while True:
            it0 = nvmefs_now_ns()
            k = 0
            if not stop:
                while nfree and (max_ios == 0 or submitted < max_ios):
                    slot = free_slots[nfree - 1]
                    if sequential:
                        slba = next_lba
                        next_lba += nlb
                        if next_lba + nlb > nlba:
                            next_lba = 0
                    else:
                        slba = (iow_rand(&rng) % slots_in_ns) * nlb
                    is_read = read_pct >= 100 or (iow_rand(&rng) % 100) < read_pct
                    memset(&cmd, 0, sizeof(cmd))
                    cmd.opc = IO_READ if is_read else IO_WRITE
                    cmd.nsid = nsid
                    cmd.cdw10 = <uint32_t>slba
                    cmd.cdw11 = <uint32_t>(slba >> 32)
                    cmd.cdw12 = nlb - 1
                    seg.iova = data.iova + <uint64_t>slot * io_bytes
                    seg.length = io_bytes
                    seg.flags = 0
                    t_sub[slot] = nvmefs_now_ns()
                    rc = qp.submit(&cmd, &seg, 1, mode, is_read, slot | (<uint64_t>is_read << 32), False)
                    if rc < 0:
                        if rc != -EAGAIN and rc != -EBUSY:
                            fault = rc
                            stop = True
                        break
                    nfree -= 1
                    submitted += 1
                    k += 1
                if k:
                    qp.ring_sq()
            n = qp.process_completions(0)
            if n:
                now = nvmefs_now_ns()
                for i in range(<uint32_t>n):
                    slot = <uint32_t>(qp.out_user[i] & <uint64_t>0xFFFFFFFFu)
                    st = (qp.out_cqe[i].status >> 1) & 0x7FFF
                    if st:
                        errors += 1
                    if qp.out_user[i] >> 32:
                        reads += 1
                    lat = now - t_sub[slot]
                    lat_sum += lat
                    if lat > lat_max:
                        lat_max = lat
                    hist[iow_bucket(lat)] += 1
                    free_slots[nfree] = slot
                    nfree += 1
                ios += <uint64_t>n
                since_check += <uint64_t>n
            if n or k:
                # the host's own cost: iterations that submitted or reaped,
                # not the ones that only looked at an empty CQ
                busy += nvmefs_now_ns() - it0
            if nfree == qd and (stop or (max_ios and submitted >= max_ios)):
                break
            if not stop and (since_check >= IOW_CHECK_EVERY or n == 0):
                since_check = 0
                if nvmefs_now_ns() >= deadline:
                    stop = True
            if stop and nfree < qd and nvmefs_now_ns() > deadline + <uint64_t>5000000000ull:
                break           # a device that stopped answering: give up, report what came back
        t1 = nvmefs_now_ns()
        cpu1 = iow_thread_cpu_ns()
    outstanding = qd - nfree
    pct = {}
    cdef uint64_t acc = 0, want
    cdef uint32_t b = 0
    for q in (0.5, 0.99, 0.999):
        want = <uint64_t>(q * ios) + 1 if ios else 0
        while b < IOW_BUCKETS and acc + hist[b] < want:
            acc += hist[b]
            b += 1
        pct[q] = iow_bucket_floor(b) if ios else 0
    free(hist)
    free(t_sub)
    free(free_slots)
    if outstanding == 0:
        data.free()
    # else: the device may still write into the buffers; leak them with the arena
    if fault:
        raise RuntimeError(f"building the data pointer failed (-errno {-fault}): a bench bug, not a device answer")
    return {"ios": ios, "reads": reads, "writes": ios - reads, "bytes": ios * io_bytes, "errors": errors,
            "outstanding": outstanding, "elapsed_ns": t1 - t0, "host_cpu_ns": cpu1 - cpu0,
            "host_busy_ns": busy,
            "lat_ns": {"mean": lat_sum / ios if ios else 0.0, "p50": pct[0.5], "p99": pct[0.99],
                       "p99.9": pct[0.999], "max": lat_max}}
