# LBA range locks: the ranges of one namespace that writes in flight hold.
#
# Every lane (lane.pyx) takes one here for each write, read-modify-write
# and fallocate, from the lane's own thread, without the GIL: a
# read-modify-write that reads an edge LBA must not put stale bytes back
# over another lane's write there.  One mutex per namespace guards the
# set; it is held for a scan of the held ranges (as many as writes in
# flight), never across a command.
#
# A lane whose request finds its range busy parks the request and marks
# itself waiting here; whoever gives a range back then wakes every waiting
# lane (lane_wake_waiters in lane.pyx), which tries its parked requests
# again in arrival order.

cdef extern from "<pthread.h>" nogil:
    ctypedef struct rl_mutex "pthread_mutex_t":
        pass
    int rl_mutex_init "pthread_mutex_init"(rl_mutex *m, void *attr)
    int rl_mutex_lock "pthread_mutex_lock"(rl_mutex *m)
    int rl_mutex_unlock "pthread_mutex_unlock"(rl_mutex *m)
    int rl_mutex_destroy "pthread_mutex_destroy"(rl_mutex *m)

cdef struct lba_range:
    uint64_t a
    uint64_t b


cdef class RangeSet:
    """``RangeSet(capacity, lanes)``: at most ``capacity`` half-open LBA
    ranges held at once, no two overlapping; ``lanes`` lanes may wait."""
    cdef rl_mutex mu
    cdef bint mu_ok
    cdef lba_range *r
    cdef uint32_t n
    cdef readonly uint32_t capacity
    cdef uint8_t *waiting       # per lane: it parked a request on a busy range
    cdef uint32_t nlanes
    cdef readonly uint64_t conflicts

    def __cinit__(self, uint32_t capacity, uint32_t lanes=1):
        self.r = NULL
        self.waiting = NULL
        if capacity < 1 or lanes < 1:
            raise ValueError("a range set needs room for one range and one lane")
        self.r = <lba_range *>malloc(capacity * sizeof(lba_range))
        self.waiting = <uint8_t *>calloc(lanes, 1)
        if self.r == NULL or self.waiting == NULL:
            raise MemoryError()
        if rl_mutex_init(&self.mu, NULL) != 0:
            raise OSError("cannot initialise a range lock mutex")
        self.mu_ok = True
        self.capacity = capacity
        self.nlanes = lanes

    def __dealloc__(self):
        if self.mu_ok:
            rl_mutex_destroy(&self.mu)
        free(self.r)
        free(self.waiting)

    cdef inline bint overlaps(self, uint64_t a, uint64_t b) noexcept nogil:
        cdef uint32_t i
        for i in range(self.n):
            if a < self.r[i].b and self.r[i].a < b:
                return True
        return False

    cdef int take(self, uint64_t a, uint64_t b, uint32_t lane) noexcept nogil:
        """Hold [a, b): 0, or -EBUSY when a held range overlaps it (then
        ``lane`` is marked waiting and woken by the next give())."""
        cdef int rc = 0
        rl_mutex_lock(&self.mu)
        if self.overlaps(a, b) or self.n == self.capacity:
            # a full set means more ranges than requests in flight: a bug,
            # but waiting for one to come back is still correct
            self.conflicts += 1
            if lane < self.nlanes:
                self.waiting[lane] = 1
            rc = -EBUSY
        else:
            self.r[self.n].a = a
            self.r[self.n].b = b
            self.n += 1
        rl_mutex_unlock(&self.mu)
        return rc

    cdef int give(self, uint64_t a, uint64_t b, uint8_t *wake) noexcept nogil:
        """Give [a, b) back.  ``wake`` (nlanes bytes) gets a 1 for each lane
        that waits for a range; returns how many, or -EINVAL when [a, b)
        was not held."""
        cdef uint32_t i
        cdef int found = -EINVAL, waiters = 0
        rl_mutex_lock(&self.mu)
        for i in range(self.n):
            if self.r[i].a == a and self.r[i].b == b:
                self.r[i] = self.r[self.n - 1]
                self.n -= 1
                found = 0
                break
        if found == 0:
            for i in range(self.nlanes):
                if self.waiting[i]:
                    self.waiting[i] = 0
                    wake[i] = 1
                    waiters += 1
        rl_mutex_unlock(&self.mu)
        return waiters if found == 0 else found

    # -- Python surface (tests) -----------------------------------------------------

    def try_acquire(self, uint64_t a, uint64_t b, uint32_t lane=0):
        """Take [a, b) now if nothing held overlaps it."""
        return self.take(a, b, lane) == 0

    def release(self, uint64_t a, uint64_t b):
        """Give [a, b) back; the lanes that were waiting, as a list."""
        cdef uint8_t *wake = <uint8_t *>calloc(self.nlanes, 1)
        cdef int rc
        cdef uint32_t i
        if wake == NULL:
            raise MemoryError()
        try:
            rc = self.give(a, b, wake)
            if rc < 0:
                raise ValueError(f"LBA range [{a}, {b}) is not held")
            return [i for i in range(self.nlanes) if wake[i]]
        finally:
            free(wake)

    @property
    def held(self):
        rl_mutex_lock(&self.mu)
        try:
            return sorted((self.r[i].a, self.r[i].b) for i in range(self.n))
        finally:
            rl_mutex_unlock(&self.mu)

    def __len__(self):
        return self.n
