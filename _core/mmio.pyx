# Controller register file (BAR0): true 32/64-bit accesses on a memory
# region.  For the model it is plain memory the controller thread watches;
# for VFIO it is the mmap of BAR0.  Doorbell addresses honour CAP.DSTRD.

cdef class RegisterFile:
    """BAR0 of a controller.  ``RegisterFile(size)`` owns zeroed memory (the
    model's registers); transports wrap a mapped BAR with ``RegisterFile.wrap``."""
    # fields and inline methods: nvmefs/_core.pxd (shared with the model)

    def __cinit__(self, size_t size=0):
        self.base = NULL
        self.owned = False
        if size:
            if size < 0x1000 + 8:
                raise ValueError("a register file holds at least the 4 KiB register page and one doorbell pair")
            # page aligned like a BAR, so 64-bit registers are naturally aligned
            if posix_memalign(<void **>&self.base, 4096, size) != 0:
                raise MemoryError()
            memset(self.base, 0, size)
            self.size = size
            self.owned = True

    @staticmethod
    cdef RegisterFile wrap(uint8_t *base, size_t size, object keepalive):
        cdef RegisterFile r = RegisterFile.__new__(RegisterFile)
        r.base = base
        r.size = size
        r.keepalive = keepalive
        return r

    def __dealloc__(self):
        if self.owned and self.base != NULL:
            free(self.base)
        self.base = NULL


    cdef int check(self, size_t off, size_t width) except -1:
        if off % width or off + width > self.size:
            raise ValueError(f"register access at 0x{off:x} width {width} is outside or unaligned")
        return 0

    def read32(self, size_t off):
        self.check(off, 4)
        return nvmefs_load_acquire32(<volatile uint32_t *>(self.base + off))

    def write32(self, size_t off, uint32_t value):
        self.check(off, 4)
        nvmefs_store_release32(<volatile uint32_t *>(self.base + off), value)

    def read64(self, size_t off):
        self.check(off, 8)
        return nvmefs_load_acquire64(<volatile uint64_t *>(self.base + off))

    def write64(self, size_t off, uint64_t value):
        self.check(off, 8)
        nvmefs_store_release64(<volatile uint64_t *>(self.base + off), value)

    def doorbell_offset(self, uint32_t qid, bint cq, uint32_t dstrd=0):
        return NVME_REG_DBS + (2 * qid + cq) * (4 << dstrd)
