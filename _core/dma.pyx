# DMA memory: an arena of page-aligned memory with its own bus address space.
#
# Every address that reaches a controller (queue bases, PRP entries, SGL
# descriptors, list pointers) is an IOVA taken from here, never a process
# virtual address (defect 4).  For the in-process model the arena's IOVA
# space is its own; the VFIO transport maps the same range once with
# VFIO_IOMMU_MAP_DMA at the same IOVA, so nothing above changes.
#
# Allocation is a first-fit page map.  It takes the GIL (it is called at queue
# creation and for bounce buffers, never per descriptor); the controller
# thread only calls translate(), which reads immutable fields.

cdef enum:
    ARENA_DEFAULT_IOVA = 0x100000000   # above 4 GiB: catches any 32-bit truncation


cdef class DmaArena:
    """A region of DMA-able memory with bus (IO virtual) addresses.

    ``DmaArena(size, page_size=4096, iova_base=0x1_0000_0000)``
    """
    # fields and inline methods: nvmefs/_core.pxd (shared with the model)

    def __cinit__(self, size_t size, size_t page_size=4096, uint64_t iova_base=ARENA_DEFAULT_IOVA):
        self.base = NULL
        self.run = NULL
        self.used = NULL
        if page_size < 4096 or (page_size & (page_size - 1)):
            raise ValueError(f"page size {page_size} is not a power of two >= 4096")
        if size == 0 or size % page_size:
            raise ValueError(f"arena size {size} is not a non-zero multiple of the page size {page_size}")
        if iova_base % page_size:
            raise ValueError("arena IOVA base must be page aligned")
        self.size = size
        self.page_size = page_size
        self.page_shift = 0
        while (<size_t>1 << self.page_shift) < page_size:
            self.page_shift += 1
        self.npages = size // page_size
        self.iova_base = iova_base
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if p == MAP_FAILED:
            raise MemoryError(f"cannot map {size} bytes of DMA arena")
        self.base = <uint8_t *>p
        self.run = <uint32_t *>calloc(self.npages, sizeof(uint32_t))
        self.used = <uint8_t *>calloc(self.npages, 1)
        if self.run == NULL or self.used == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL
        free(self.run)
        free(self.used)

    @property
    def vaddr_base(self):
        """Process address of the arena (for VFIO_IOMMU_MAP_DMA only)."""
        return <uintptr_t>self.base

    cdef int alloc_pages(self, size_t n, uint64_t *iova, uint8_t **vaddr) except -2:
        cdef size_t start, i, scanned = 0, found
        if n == 0 or n > self.npages:
            return -ENOMEM
        start = self.hint
        while scanned < self.npages:
            if start + n > self.npages:
                scanned += self.npages - start
                start = 0
                continue
            found = 1
            for i in range(start, start + n):
                if self.used[i]:
                    scanned += i + 1 - start
                    start = i + 1
                    found = 0
                    break
            if found:
                memset(self.used + start, 1, n)
                self.run[start] = <uint32_t>n
                self.hint = (start + n) % self.npages
                self.allocations += 1
                self.pages_in_use += n
                if self.pages_in_use > self.peak_pages:
                    self.peak_pages = self.pages_in_use
                iova[0] = self.iova_base + (<uint64_t>start << self.page_shift)
                vaddr[0] = self.base + (start << self.page_shift)
                if start < self.fresh_from:
                    # partly (or wholly) reused: clear what earlier owners wrote
                    memset(vaddr[0], 0, (min(start + n, self.fresh_from) - start) << self.page_shift)
                if start + n > self.fresh_from:
                    self.fresh_from = start + n
                return 0
        return -ENOMEM

    cdef int free_pages(self, uint64_t iova) except -2:
        if iova < self.iova_base or iova >= self.iova_base + self.size or (iova - self.iova_base) % self.page_size:
            return -EINVAL
        cdef size_t first = <size_t>((iova - self.iova_base) >> self.page_shift)
        cdef uint32_t n = self.run[first]
        if n == 0:
            return -EINVAL
        memset(self.used + first, 0, n)
        self.run[first] = 0
        self.frees += 1
        self.pages_in_use -= n
        return 0

    def alloc(self, size_t nbytes):
        """A page-aligned zeroed buffer of at least ``nbytes`` (a DmaBuffer).
        Pages never handed out before are not touched: a large buffer costs
        resident memory only where it is used (the lanes' receive
        buffers, the bounce pools)."""
        cdef uint64_t iova
        cdef uint8_t *vaddr
        cdef size_t n = (nbytes + self.page_size - 1) >> self.page_shift
        if nbytes == 0:
            raise ValueError("cannot allocate an empty DMA buffer")
        if self.alloc_pages(n, &iova, &vaddr) < 0:
            raise MemoryError(f"DMA arena exhausted: {n} pages wanted, "
                              f"{self.npages - self.pages_in_use} of {self.npages} free")
        return DmaBuffer.new(self, iova, vaddr, n << self.page_shift)

    def read(self, uint64_t iova, size_t length):
        """Bytes at a bus address (tests and the reference checker walk lists with it)."""
        cdef uint8_t *p = self.translate(iova, length)
        if p == NULL:
            raise ValueError(f"IOVA range 0x{iova:x}+{length} is outside the arena")
        return PyBytes_FromStringAndSize(<char *>p, length)

    def write(self, uint64_t iova, const uint8_t[::1] data):
        cdef uint8_t *p = self.translate(iova, data.shape[0])
        if p == NULL:
            raise ValueError(f"IOVA range 0x{iova:x}+{data.shape[0]} is outside the arena")
        if data.shape[0]:
            memcpy(p, &data[0], data.shape[0])

    def stats(self):
        return {"pages": self.npages, "pages_in_use": self.pages_in_use,
                "peak_pages": self.peak_pages, "allocations": self.allocations,
                "frees": self.frees, "page_size": self.page_size}


cdef class DmaBuffer:
    """A page-aligned piece of a DmaArena; exports the buffer protocol
    (zero-copy I/O) and refuses to be freed while a view is out."""
    # fields and inline methods: nvmefs/_core.pxd (shared with the model)

    def __init__(self):
        raise TypeError("DmaBuffer is created by DmaArena.alloc()")

    @staticmethod
    cdef DmaBuffer new(DmaArena arena, uint64_t iova, uint8_t *vaddr, size_t size):
        cdef DmaBuffer b = DmaBuffer.__new__(DmaBuffer)
        b.arena = arena
        b.iova = iova
        b.vaddr = vaddr
        b.size = size
        return b

    def __getbuffer__(self, Py_buffer *view, int flags):
        if self.freed:
            raise ValueError("DMA buffer was freed")
        PyBuffer_FillInfo(view, self, self.vaddr, self.size, 0, flags)
        self.views += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.views -= 1

    def __len__(self):
        return self.size

    def free(self):
        if self.freed:
            return
        if self.views:
            raise BufferError(f"DMA buffer has {self.views} exported view(s)")
        self.freed = True
        self.arena.free_pages(self.iova)

    def __dealloc__(self):
        # a half-built or already-freed buffer gives nothing back
        if self.arena is not None and not self.freed:
            self.arena.free_pages(self.iova)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()
