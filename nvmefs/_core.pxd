# cython: language_level=3
# The C-level interface of the driver core (nvmefs._core) to the extension
# that plays the device side (nvmefs._model: the software controller, the
# echo device and the bench loops).  The types a device needs to reach host
# memory and queues -- DMA memory, the register file, the queue pair and its
# trackers -- are declared here; their inline methods live here too, so the
# lanes' hot path stays inlined, and the rest of each class is in its
# component .pyx.  Anything not here is private to the driver core.

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.errno cimport EBUSY, EINVAL, ESTALE
from posix.unistd cimport write

from nvme_spec cimport *
from barrier cimport *


cdef struct dma_seg:
    uint64_t iova
    uint32_t length
    uint32_t flags        # SEG_BIT_BUCKET: read data to discard (SGL only)


cdef enum:
    SEG_BIT_BUCKET = 1


# builder results beyond -errno: which rule failed, for the error message
cdef enum prp_fault:
    PRP_OK = 0
    PRP_FIRST_NOT_DWORD = 1
    PRP_MIDDLE_START = 2
    PRP_MIDDLE_END = 3
    PRP_EMPTY_SEGMENT = 4
    PRP_LIST_TOO_SMALL = 5
    PRP_BIT_BUCKET = 6
    PRP_NO_SEGMENTS = 7


cdef inline uint32_t prp_list_pages_for(uint64_t entries, uint32_t page_size) noexcept nogil:
    """List pages needed for ``entries`` PRP entries after PRP1 when PRP2 is a list."""
    cdef uint64_t per = page_size >> 3
    if entries <= per:
        return 1
    return <uint32_t>((entries - 1 + per - 2) // (per - 1))


cdef inline uint64_t prp_pages_of(const dma_seg *segs, uint32_t nseg, uint32_t page_size) noexcept nogil:
    """Number of PRP entries (PRP1 included) the layout needs."""
    cdef uint64_t mask = page_size - 1, n = 0, start, end
    cdef uint32_t i
    for i in range(nseg):
        start = segs[i].iova & ~mask
        end = segs[i].iova + segs[i].length
        n += (end - start + mask) // page_size
    return n


cdef enum sgl_fault:
    SGL_OK = 0
    SGL_EMPTY_SEGMENT = 1
    SGL_LIST_TOO_SMALL = 2
    SGL_NOT_DWORD = 3
    SGL_NO_SEGMENTS = 4
    SGL_BIT_BUCKET_ONLY = 5


cdef inline uint32_t sgl_list_pages_for(uint64_t ndesc, uint32_t page_size) noexcept nogil:
    cdef uint64_t per = page_size >> 4
    if ndesc <= per:
        return 1
    return <uint32_t>((ndesc - 1 + per - 2) // (per - 1))


cdef inline void sgl_set(nvme_sgl_desc *d, uint64_t addr, uint32_t length, uint8_t type) noexcept nogil:
    d.addr = addr
    d.length = length
    d.rsvd[0] = 0
    d.rsvd[1] = 0
    d.rsvd[2] = 0
    d.id = <uint8_t>(type << 4)


cdef inline void sgl_set_seg(nvme_sgl_desc *d, const dma_seg *s) noexcept nogil:
    if s.flags & SEG_BIT_BUCKET:
        sgl_set(d, 0, s.length, NVME_SGL_BIT_BUCKET)
    else:
        sgl_set(d, s.iova, s.length, NVME_SGL_DATA_BLOCK)


@cython.linetrace(False)
@cython.profile(False)
cdef inline uint8_t status_phase(uint16_t s) noexcept nogil:
    return s & 0x1


@cython.linetrace(False)
@cython.profile(False)
cdef inline uint8_t status_sc(uint16_t s) noexcept nogil:
    return (s >> 1) & 0xFF


@cython.linetrace(False)
@cython.profile(False)
cdef inline uint8_t status_sct(uint16_t s) noexcept nogil:
    return (s >> 9) & 0x7


@cython.linetrace(False)
@cython.profile(False)
cdef inline uint8_t status_crd(uint16_t s) noexcept nogil:
    return (s >> 12) & 0x3


@cython.linetrace(False)
@cython.profile(False)
cdef inline bint status_more(uint16_t s) noexcept nogil:
    return (s >> 14) & 0x1


@cython.linetrace(False)
@cython.profile(False)
cdef inline bint status_dnr(uint16_t s) noexcept nogil:
    return (s >> 15) & 0x1


@cython.linetrace(False)
@cython.profile(False)
cdef inline bint status_is_error(uint16_t s) noexcept nogil:
    # SC and SCT only: CRD/M/DNR carry no meaning on a successful completion
    return (s & 0x0FFE) != 0


@cython.linetrace(False)
@cython.profile(False)
cdef inline uint16_t status_pack(uint8_t sct, uint8_t sc, uint8_t crd, bint more,
                                 bint dnr, uint8_t phase) noexcept nogil:
    return <uint16_t>((phase & 0x1) | (<uint16_t>sc << 1) | ((sct & 0x7) << 9)
                      | ((crd & 0x3) << 12) | (<uint16_t>(more != 0) << 14)
                      | (<uint16_t>(dnr != 0) << 15))


cdef enum tracker_state:
    TRK_FREE = 0
    TRK_ALLOCATED = 1     # handed out, not yet in the SQ
    TRK_SUBMITTED = 2     # in the SQ / at the controller


cdef struct nvme_tracker:
    uint16_t cid          # index | generation << index_bits, as placed in the SQE
    uint8_t  state
    uint8_t  opc
    uint64_t user         # the submitter's completion context (opaque)
    uint64_t submit_ns
    nvme_cqe cpl          # this command's completion slot
    uint64_t list_iova    # preallocated list pages (contiguous), bus address
    uint8_t *list_vaddr
    uint32_t list_pages


cdef enum dptr_mode:
    DPTR_AUTO = 0
    DPTR_PRP = 1
    DPTR_SGL = 2


cdef class DmaArena:
    cdef uint8_t *base
    cdef readonly size_t size
    cdef readonly size_t page_size
    cdef uint32_t page_shift
    cdef size_t npages
    cdef readonly uint64_t iova_base
    cdef uint32_t *run          # run length at the first page of each allocation, 0 = free
    cdef uint8_t *used
    cdef size_t hint
    cdef readonly uint64_t allocations
    cdef readonly uint64_t frees
    cdef readonly uint64_t pages_in_use
    cdef readonly uint64_t peak_pages
    # pages at and above this index were never handed out: still the zero
    # pages mmap gave, untouched (alloc() need not clear them, and does not
    # make them resident)
    cdef size_t fresh_from
    cdef int alloc_pages(self, size_t n, uint64_t *iova, uint8_t **vaddr) except -2
    cdef int free_pages(self, uint64_t iova) except -2
    @cython.linetrace(False)
    @cython.profile(False)
    cdef inline uint8_t *translate(self, uint64_t iova, uint64_t length) noexcept nogil:
        """Bus address -> process address, NULL when [iova, iova+length) is not mapped
        (what an IOMMU fault is to a real device)."""
        if iova < self.iova_base:
            return NULL
        cdef uint64_t off = iova - self.iova_base
        if off > self.size or length > self.size - off:
            return NULL
        return self.base + off

    @cython.linetrace(False)
    @cython.profile(False)
    cdef inline uint64_t iova_of(self, const void *p) noexcept nogil:
        return self.iova_base + <uint64_t>(<const uint8_t *>p - self.base)


cdef class DmaBuffer:
    cdef readonly DmaArena arena
    cdef readonly uint64_t iova
    cdef uint8_t *vaddr
    cdef readonly size_t size
    cdef int views
    cdef bint freed
    @staticmethod
    cdef DmaBuffer new(DmaArena arena, uint64_t iova, uint8_t *vaddr, size_t size)


cdef class RegisterFile:
    cdef uint8_t *base
    cdef readonly size_t size
    cdef bint owned
    cdef object keepalive
    @staticmethod
    cdef RegisterFile wrap(uint8_t *base, size_t size, object keepalive)
    cdef inline volatile uint32_t *reg32(self, size_t off) noexcept nogil:
        return <volatile uint32_t *>(self.base + off)

    cdef inline volatile uint32_t *doorbell(self, uint32_t qid, bint cq, uint32_t dstrd) noexcept nogil:
        return <volatile uint32_t *>(self.base + NVME_REG_DBS + (2 * qid + cq) * (<size_t>4 << dstrd))

    cdef int check(self, size_t off, size_t width) except -1


cdef class CidTable:
    cdef nvme_tracker *trk
    cdef uint16_t *free_ring
    cdef readonly uint32_t depth
    cdef readonly uint32_t index_bits
    cdef uint32_t index_mask
    cdef readonly uint32_t gen_bits
    cdef uint32_t free_head
    cdef readonly uint32_t free_count
    cdef readonly uint64_t stale_completions
    cdef readonly uint64_t exhausted
    cdef readonly uint64_t allocs
    cdef inline int alloc(self) noexcept nogil:
        """Tracker index, or -EBUSY when every id is outstanding (back off)."""
        if self.free_count == 0:
            self.exhausted += 1
            return -EBUSY
        cdef uint32_t idx = self.free_ring[self.free_head]
        self.free_head += 1
        if self.free_head == self.depth:
            self.free_head = 0
        self.free_count -= 1
        cdef nvme_tracker *t = &self.trk[idx]
        cdef uint32_t gen = (t.cid >> self.index_bits) + 1
        if self.gen_bits:
            gen &= (1u << self.gen_bits) - 1
        else:
            gen = 0
        t.cid = <uint16_t>(idx | (gen << self.index_bits))
        t.state = TRK_ALLOCATED
        self.allocs += 1
        return <int>idx

    cdef inline int release(self, uint32_t idx) noexcept nogil:
        if idx >= self.depth or self.trk[idx].state == TRK_FREE:
            return -EINVAL
        self.trk[idx].state = TRK_FREE
        cdef uint32_t tail = self.free_head + self.free_count
        if tail >= self.depth:
            tail -= self.depth
        self.free_ring[tail] = <uint16_t>idx
        self.free_count += 1
        return 0

    cdef inline int lookup(self, uint16_t cid) noexcept nogil:
        """Index of the outstanding command with this exact CID, or -ESTALE
        (unknown index, free tracker, or an older generation)."""
        cdef uint32_t idx = cid & self.index_mask
        if idx >= self.depth or self.trk[idx].state != TRK_SUBMITTED or self.trk[idx].cid != cid:
            self.stale_completions += 1
            return -ESTALE
        return <int>idx

    cdef inline nvme_tracker *get(self, uint32_t idx) noexcept nogil:
        return &self.trk[idx]


cdef class QueuePair:
    cdef readonly uint16_t qid
    cdef readonly uint32_t entries
    cdef readonly uint32_t depth
    cdef readonly CidTable cids
    cdef readonly DmaArena arena
    cdef RegisterFile regs
    cdef object sq_buf, cq_buf, list_buf
    cdef nvme_sqe *sq
    cdef nvme_cqe *cq
    cdef readonly uint64_t sq_iova
    cdef readonly uint64_t cq_iova
    cdef volatile uint32_t *sq_db
    cdef volatile uint32_t *cq_db
    cdef readonly uint32_t sq_tail
    cdef readonly uint32_t sq_head
    cdef uint32_t sq_tail_rung
    cdef readonly uint32_t cq_head
    cdef readonly uint16_t phase
    cdef readonly uint32_t page_size
    cdef readonly uint32_t list_pages_per_cmd
    cdef readonly uint32_t max_transfer
    cdef public uint32_t sgls
    cdef public uint32_t sgl_threshold
    cdef public bint sgl_only          # a fabrics transport: every command's data by SGL
    cdef nvme_cqe *out_cqe
    cdef uint64_t *out_user
    cdef dma_seg *py_segs
    cdef uint32_t last_fault
    cdef uint32_t last_fault_seg
    cdef int last_dptr
    # counters (stats): the hot path only increments plain integers
    cdef readonly uint64_t submitted
    cdef readonly uint64_t completed
    cdef readonly uint64_t sq_full_events
    cdef readonly uint64_t doorbell_writes
    cdef readonly uint64_t cq_doorbell_writes
    cdef readonly uint64_t prp_commands
    cdef readonly uint64_t sgl_commands
    cdef readonly uint64_t bad_sqhd
    cdef readonly uint64_t wrong_sqid
    cdef readonly uint64_t errors
    cdef bint test_doorbell_first      # deliberately defective ordering, tests only
    cdef volatile uint32_t *idle_flag  # set by a device that sleeps when idle (the model)
    cdef int kick_fd
    # shadow doorbells (Doorbell Buffer Config): NULL when not in use
    cdef volatile uint32_t *sh_sq
    cdef volatile uint32_t *sh_cq
    cdef volatile uint32_t *ei_sq
    cdef volatile uint32_t *ei_cq
    cdef bint sh_always_ring
    cdef object sh_keep
    cdef readonly uint64_t shadow_skips
    cdef inline bint sq_full(self) noexcept nogil:
        cdef uint32_t next = self.sq_tail + 1
        if next == self.entries:
            next = 0
        return next == self.sq_head

    cdef int submit(self, nvme_sqe *cmd, const dma_seg *segs, uint32_t nseg, int mode,
                    bint is_read, uint64_t user, bint ring) noexcept nogil
    cdef void _defective_publish(self, nvme_sqe *cmd) noexcept nogil
    cdef inline void ring_sq(self) noexcept nogil:
        cdef uint32_t old
        if self.sq_tail != self.sq_tail_rung:
            old = self.sq_tail_rung
            self.sq_tail_rung = self.sq_tail
            if self.sh_sq != NULL:
                if self.shadow_publish(self.sh_sq, self.ei_sq, self.sq_tail, old):
                    nvmefs_doorbell_write(self.sq_db, self.sq_tail)
                    self.doorbell_writes += 1
                else:
                    self.shadow_skips += 1
            else:
                nvmefs_doorbell_write(self.sq_db, self.sq_tail)
                self.doorbell_writes += 1
            self.notify()

    cdef inline bint shadow_publish(self, volatile uint32_t *shadow, volatile uint32_t *eventidx,
                                    uint32_t value, uint32_t old) noexcept nogil:
        """Store the new doorbell value in the shadow page; True when the MMIO
        doorbell must be written too (Linux nvme_dbbuf_update_and_check_event:
        entry visible before the shadow value, full fence, then the
        controller's event index decides)."""
        cdef uint16_t ev
        nvmefs_wmb()
        nvmefs_store_release32(shadow, value)
        nvmefs_mb()
        if self.sh_always_ring:
            return True
        ev = <uint16_t>nvmefs_load_acquire32(eventidx)
        return <uint16_t>(<uint16_t>value - ev - 1) < <uint16_t>(<uint16_t>value - <uint16_t>old)

    cdef inline void notify(self) noexcept nogil:
        # A device that sleeps when idle (the software model) publishes an
        # idle flag; the full fence orders our doorbell store before the
        # flag load, pairing with the device's store-flag/fence/recheck, so
        # either it sees the doorbell or we see the flag (no lost wake-up).
        cdef uint64_t one = 1
        if self.idle_flag != NULL:
            nvmefs_mb()
            if nvmefs_load_acquire32(self.idle_flag):
                write(self.kick_fd, &one, sizeof(one))

    cdef int process_completions(self, uint32_t max_n) noexcept nogil
    cdef inline bint cq_ready(self) noexcept nogil:
        return (nvmefs_load_acquire16(&self.cq[self.cq_head].status) & 1) == self.phase

    cdef long long poll_one(self, uint8_t opc, uint32_t nsid, uint64_t slba, uint32_t cdw12,
                            uint64_t iova, uint32_t nbytes, bint is_read, uint64_t spin_ns) except? -0x7fffffffffff
    cdef object poll_read(self, uint32_t nsid, uint64_t slba, uint32_t cdw12, uint32_t lba_size,
                          DmaBuffer buf, size_t off, uint32_t nbytes, size_t skip, size_t size,
                          uint64_t spin_ns)
    cdef long long poll_write(self, uint32_t nsid, uint64_t slba, uint32_t cdw12, uint32_t lba_size,
                              DmaBuffer buf, size_t off, const uint8_t *src, size_t n,
                              uint64_t spin_ns) except? -0x7fffffffffff
    cdef uint32_t load_segments(self, object segments) except? 0


cdef int prp_build(const dma_seg *segs, uint32_t nseg, uint32_t page_size,
                   uint64_t list_iova, uint8_t *list_vaddr, uint32_t list_pages,
                   uint64_t *prp1, uint64_t *prp2, uint32_t *fault, uint32_t *fault_seg) noexcept nogil
cdef str prp_fault_message(uint32_t fault, uint32_t seg, const dma_seg *segs, uint32_t page_size)
cdef int sgl_build(const dma_seg *segs, uint32_t nseg, uint32_t page_size, bint dword_only,
                   uint64_t list_iova, uint8_t *list_vaddr, uint32_t list_pages,
                   nvme_sgl_desc *sgl1, uint32_t *fault, uint32_t *fault_seg) noexcept nogil
