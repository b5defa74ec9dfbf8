# The C core of the FUSE frontend's LBA range locks (nvmefs/fusefs.py
# RangeLock): the ranges of one namespace that writes in flight hold.
#
# Both the trio thread (read-modify-writes, fallocate, pyfuse3's writes)
# and the lane thread (the lane engine's writes, lane.pyx) take and give
# back ranges here.  Each side touches it only while holding the world lock
# (_core/fuseshim/session_hook.c), so it has no lock of its own; the lane's
# side runs without the GIL.  Only the GIL side grows the array: the lane
# side declines a write rather than allocate (RangeLock starts with room
# for every request the engine can have in flight).

cdef struct lba_range:
    uint64_t a
    uint64_t b


cdef class RangeSet:
    """Held half-open LBA ranges; no two of them overlap."""
    cdef lba_range *r
    cdef uint32_t n
    cdef uint32_t cap
    # trio tasks parked until a range frees (RangeLock.acquire): the lane
    # thread, which cannot wake them itself, asks trio's thread to
    cdef public uint32_t waiters

    def __cinit__(self, uint32_t capacity=64):
        self.r = NULL
        if capacity < 1:
            capacity = 1
        self.r = <lba_range *>malloc(capacity * sizeof(lba_range))
        if self.r == NULL:
            raise MemoryError()
        self.cap = capacity

    def __dealloc__(self):
        free(self.r)

    cdef inline bint overlaps(self, uint64_t a, uint64_t b) noexcept nogil:
        cdef uint32_t i
        for i in range(self.n):
            if a < self.r[i].b and self.r[i].a < b:
                return True
        return False

    cdef int add(self, uint64_t a, uint64_t b) noexcept nogil:
        """Take [a, b): 0, -EBUSY when a held range overlaps it, -ENOMEM
        when the array is full (only grow() makes room)."""
        if self.overlaps(a, b):
            return -EBUSY
        if self.n == self.cap:
            return -ENOMEM
        self.r[self.n].a = a
        self.r[self.n].b = b
        self.n += 1
        return 0

    cdef int remove(self, uint64_t a, uint64_t b) noexcept nogil:
        cdef uint32_t i
        for i in range(self.n):
            if self.r[i].a == a and self.r[i].b == b:
                # keep the order ranges were taken in (held lists them so)
                memmove(&self.r[i], &self.r[i + 1], (self.n - i - 1) * sizeof(lba_range))
                self.n -= 1
                return 0
        return -EINVAL

    cdef int grow(self) except -1:
        cdef lba_range *bigger = <lba_range *>realloc(self.r, 2 * self.cap * sizeof(lba_range))
        if bigger == NULL:
            raise MemoryError()
        self.r = bigger
        self.cap *= 2
        return 0

    # -- Python surface (RangeLock) -----------------------------------------------

    def try_acquire(self, uint64_t a, uint64_t b):
        """Take [a, b) now if nothing held overlaps it."""
        if self.overlaps(a, b):
            return False
        if self.n == self.cap:
            self.grow()
        return self.add(a, b) == 0

    def release(self, uint64_t a, uint64_t b):
        if self.remove(a, b) < 0:
            raise ValueError(f"LBA range [{a}, {b}) is not held")

    def free(self, uint64_t a, uint64_t b):
        return not self.overlaps(a, b)

    @property
    def held(self):
        return [(self.r[i].a, self.r[i].b) for i in range(self.n)]

    def __len__(self):
        return self.n
