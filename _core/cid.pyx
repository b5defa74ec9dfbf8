# Command identifiers (defects 1 and 5).
#
# A CID is the index of a tracker in an array sized to the queue's depth,
# with the spare upper bits holding a generation count (the Linux
# nvme_cid/genctr scheme), so a stale or duplicate completion -- one whose
# tracker is free or has been reused since -- is detected and dropped.  Free
# trackers sit in a FIFO ring: allocation takes the oldest free slot, which
# maximises the time before an id comes back, and returns -EBUSY when none is
# free; it never wraps onto an outstanding id.  Each tracker owns its
# completion slot and its preallocated PRP/SGL list pages, so building a
# command allocates nothing (defects 5 and 8).

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


cdef class CidTable:
    """Trackers of one queue.  ``CidTable(depth)``: ``depth`` outstanding
    commands at most (1..65535)."""
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

    def __cinit__(self, uint32_t depth):
        self.trk = NULL
        self.free_ring = NULL
        if depth < 1 or depth > 65535:
            raise ValueError(f"queue depth {depth} outside 1..65535")
        self.depth = depth
        self.index_bits = 0
        while (1u << self.index_bits) < depth:
            self.index_bits += 1
        self.index_mask = (1u << self.index_bits) - 1
        self.gen_bits = 16 - self.index_bits
        self.trk = <nvme_tracker *>calloc(depth, sizeof(nvme_tracker))
        self.free_ring = <uint16_t *>malloc(depth * sizeof(uint16_t))
        if self.trk == NULL or self.free_ring == NULL:
            raise MemoryError()
        cdef uint32_t i
        for i in range(depth):
            self.free_ring[i] = <uint16_t>i
            self.trk[i].cid = <uint16_t>i
        self.free_head = 0
        self.free_count = depth

    def __dealloc__(self):
        free(self.trk)
        free(self.free_ring)

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

    # Python surface (tests, stats) -------------------------------------------------
    @property
    def outstanding(self):
        return self.depth - self.free_count

    def py_alloc(self):
        """Allocate and mark submitted; returns the CID or None when exhausted."""
        cdef int idx = self.alloc()
        if idx < 0:
            return None
        self.trk[idx].state = TRK_SUBMITTED
        return self.trk[idx].cid

    def py_complete(self, uint16_t cid):
        """Complete by CID as a completion would: True, or False for a stale/duplicate id."""
        cdef int idx = self.lookup(cid)
        if idx < 0:
            return False
        self.release(idx)
        return True
