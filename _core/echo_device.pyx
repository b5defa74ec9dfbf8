# A minimal device on its own native thread that consumes one SQ through its
# doorbell and completes every command with success.  It is not the
# controller model (step 2); it exists to test and bench the queue pair's
# ordering and flow control against a concurrent reader, the way hardware
# reads it: through the doorbell, never through the host's variables.
#
# Verification: the submitter puts a running sequence number in CDW2 and
# values derived from it in NSID and CDW10..15.  An entry the device reads
# after seeing the doorbell must carry the next sequence number with all
# derived fields intact; anything else is a torn or stale entry (defect 6).

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef enum:
    ECHO_MAGIC = 0x9e3779b9

@cython.linetrace(False)
@cython.profile(False)
cdef inline uint32_t echo_field(uint32_t seq, uint32_t k) noexcept nogil:
    return (seq * <uint32_t>ECHO_MAGIC) ^ (k * 0x01010101u)

@cython.linetrace(False)
@cython.profile(False)
cdef inline void echo_fill(nvme_sqe *cmd, uint32_t seq) noexcept nogil:
    cmd.cdw2 = seq
    cmd.nsid = echo_field(seq, 1)
    cmd.cdw10 = echo_field(seq, 10)
    cmd.cdw11 = echo_field(seq, 11)
    cmd.cdw12 = echo_field(seq, 12)
    cmd.cdw13 = echo_field(seq, 13)
    cmd.cdw14 = echo_field(seq, 14)
    cmd.cdw15 = echo_field(seq, 15)

cdef struct echo_state:
    int stop
    int verify
    nvme_sqe *sq
    nvme_cqe *cq
    uint32_t entries
    uint16_t qid
    volatile uint32_t *sq_db
    volatile uint32_t *cq_db
    uint32_t sq_head
    uint32_t cq_tail
    uint16_t phase
    uint32_t next_seq
    uint64_t seen
    uint64_t torn
    uint64_t cq_full_spins

@cython.linetrace(False)
@cython.profile(False)
cdef void *echo_main(void *arg) noexcept nogil:
    cdef echo_state *st = <echo_state *>arg
    cdef uint32_t tail, seq, nxt
    cdef nvme_sqe e
    cdef nvme_cqe *c
    cdef bint ok
    while not __atomic_load_n_int(&st.stop):
        tail = nvmefs_load_acquire32(st.sq_db)
        if tail >= st.entries or tail == st.sq_head:
            sched_yield()
            continue
        while st.sq_head != tail:
            e = st.sq[st.sq_head]
            st.sq_head += 1
            if st.sq_head == st.entries:
                st.sq_head = 0
            st.seen += 1
            if st.verify:
                seq = e.cdw2
                ok = (seq == st.next_seq and e.nsid == echo_field(seq, 1)
                      and e.cdw10 == echo_field(seq, 10) and e.cdw11 == echo_field(seq, 11)
                      and e.cdw12 == echo_field(seq, 12) and e.cdw13 == echo_field(seq, 13)
                      and e.cdw14 == echo_field(seq, 14) and e.cdw15 == echo_field(seq, 15))
                if not ok:
                    st.torn += 1
                st.next_seq += 1
            # never overrun the CQ: wait for the host's head doorbell
            nxt = st.cq_tail + 1
            if nxt == st.entries:
                nxt = 0
            while nxt == nvmefs_load_acquire32(st.cq_db) and not __atomic_load_n_int(&st.stop):
                st.cq_full_spins += 1
                sched_yield()
            c = &st.cq[st.cq_tail]
            c.dw0 = e.cdw2
            c.dw1 = 0
            c.sqhd = <uint16_t>st.sq_head
            c.sqid = st.qid
            c.cid = e.cid
            # the phase bit is published last, with release semantics
            nvmefs_store_release16(&c.status, st.phase)
            st.cq_tail = nxt
            if nxt == 0:
                st.phase ^= 1
    return NULL

cdef extern from *:
    """
    static inline int __atomic_load_n_int(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void __atomic_store_n_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    int __atomic_load_n_int(int *p) nogil
    void __atomic_store_n_int(int *p, int v) nogil


cdef class EchoDevice:
    """``EchoDevice(qp, verify=True)``: completes everything submitted to ``qp``
    from a native thread.  ``start()``/``stop()``; ``seen`` and ``torn`` counters."""
    cdef echo_state st
    cdef pthread_t thread
    cdef bint running
    cdef QueuePair qp

    def __cinit__(self, QueuePair qp not None, bint verify=True):
        memset(&self.st, 0, sizeof(self.st))
        self.qp = qp
        self.st.verify = verify
        self.st.sq = qp.sq
        self.st.cq = qp.cq
        self.st.entries = qp.entries
        self.st.qid = qp.qid
        self.st.sq_db = qp.sq_db
        self.st.cq_db = qp.cq_db
        # Attaching is creating the queue: the device starts where the host
        # is, and its doorbells must say so too.  A register file outlives
        # its queue pairs (core_bench makes a new pair on the same qid for
        # every run), so the registers may still hold the last queue's tail
        # and head; the thread would take a stale tail for new entries and
        # complete never-written slots, then skip the host's real commands
        # in them (they never complete), and a stale CQ head makes it stall
        # for CQ space that is free.
        self.st.sq_head = qp.sq_tail_rung
        self.st.cq_tail = qp.cq_head
        self.st.phase = qp.phase
        nvmefs_store_release32(qp.sq_db, qp.sq_tail_rung)
        nvmefs_store_release32(qp.cq_db, qp.cq_head)
        self.st.next_seq = 0

    def start(self):
        if self.running:
            return
        __atomic_store_n_int(&self.st.stop, 0)
        if pthread_create(&self.thread, NULL, echo_main, &self.st) != 0:
            raise OSError("cannot start the echo device thread")
        self.running = True

    def stop(self):
        if not self.running:
            return
        __atomic_store_n_int(&self.st.stop, 1)
        with nogil:
            pthread_join(self.thread, NULL)
        self.running = False

    def __dealloc__(self):
        if self.running:
            __atomic_store_n_int(&self.st.stop, 1)
            pthread_join(self.thread, NULL)

    @property
    def seen(self):
        return self.st.seen

    @property
    def torn(self):
        return self.st.torn


def echo_stress(QueuePair qp, EchoDevice dev, uint64_t count, uint32_t batch=1, double timeout=30.0):
    """Submit ``count`` verified commands through ``qp`` (doorbell every
    ``batch`` commands) against a running EchoDevice, reaping as it goes,
    with the GIL released.  Returns (completed, wrong_echo, elapsed_ns);
    stops early at ``timeout`` seconds."""
    cdef nvme_sqe cmd
    cdef uint64_t seq = 0, done = 0, wrong = 0, pending = 0
    cdef uint64_t t0 = nvmefs_now_ns()
    cdef uint64_t limit = <uint64_t>(timeout * 1e9)
    cdef int rc, n, i
    with nogil:
        while done < count:
            while seq < count:
                memset(&cmd, 0, sizeof(cmd))
                cmd.opc = 0
                echo_fill(&cmd, <uint32_t>seq)
                rc = qp.submit(&cmd, NULL, 0, DPTR_AUTO, False, seq, False)
                if rc < 0:
                    break
                seq += 1
                pending += 1
                if pending >= batch:
                    qp.ring_sq()
                    pending = 0
            if pending:
                qp.ring_sq()
                pending = 0
            n = qp.process_completions(0)
            for i in range(n):
                if qp.out_cqe[i].dw0 != <uint32_t>qp.out_user[i]:
                    wrong += 1
            done += n
            if n == 0 and nvmefs_now_ns() - t0 > limit:
                break
    return done, wrong, nvmefs_now_ns() - t0
