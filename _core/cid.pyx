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

# the tracker struct and its states: nvmefs/_core.pxd
cdef class CidTable:
    """Trackers of one queue.  ``CidTable(depth)``: ``depth`` outstanding
    commands at most (1..65535)."""
    # fields and inline methods: nvmefs/_core.pxd (shared with the model)

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
