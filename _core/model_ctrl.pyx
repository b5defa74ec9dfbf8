# The in-process NVMe controller model: registers, queues, the controller
# thread, fault injection and the Python class.
#
# The driver talks to it exactly as to hardware: BAR0 registers in a
# RegisterFile, doorbells at 0x1000 + (2y + cq) * (4 << CAP.DSTRD), queues and
# data in the DmaArena's bus address space (reached only via translate()),
# completions written body first and the status word (phase bit) last with a
# release store, and one eventfd per interrupt vector written after CQEs were
# posted to a CQ with interrupts enabled.
#
# The controller runs on its own pthread with no Python objects and the GIL
# never taken.  It polls the doorbells while there is work; after
# MDL_IDLE_NS without any it publishes idle = 1, fences, looks once more, and
# sleeps in poll() on the kick eventfd (at most MDL_SLEEP_MS, sooner when a
# delayed completion is due).  A host that wrote a doorbell or register
# fences, reads the idle flag and, if set, writes the kick eventfd
# (notifier()).
#
# Commands run to completion at fetch (admin in model_admin.pyx, I/O in
# model_io.pyx).  Completions that cannot be posted now -- delayed or dropped
# by fault injection, Asynchronous Event Requests, a full CQ -- wait in the
# "held" list, which is also what Abort and the CID conflict check search.

cdef extern from "model_sys.h" nogil:
    ctypedef unsigned long mdl_pthread_t "pthread_t"
    ctypedef struct mdl_mutex "pthread_mutex_t":
        pass
    int mdl_pthread_create "pthread_create"(mdl_pthread_t *t, const void *attr,
                                            void *(*start)(void *) noexcept nogil, void *arg)
    int mdl_pthread_join "pthread_join"(mdl_pthread_t t, void **ret)
    int mdl_pthread_getcpuclockid "pthread_getcpuclockid"(mdl_pthread_t t, int *clk)
    int mdl_clock_gettime_ns(int clk, uint64_t *ns)
    int mdl_mutex_init "pthread_mutex_init"(mdl_mutex *m, const void *attr)
    int mdl_mutex_destroy "pthread_mutex_destroy"(mdl_mutex *m)
    int mdl_mutex_lock "pthread_mutex_lock"(mdl_mutex *m)
    int mdl_mutex_unlock "pthread_mutex_unlock"(mdl_mutex *m)
    int mdl_sched_yield "sched_yield"()
    int mdl_eventfd "eventfd"(unsigned int initval, int flags)
    int MDL_EFD_NONBLOCK "EFD_NONBLOCK"
    int MDL_EFD_CLOEXEC "EFD_CLOEXEC"
    int mdl_close "close"(int fd)
    void *mdl_mmap "mmap"(void *addr, size_t length, int prot, int flags, int fd, int64_t off)

cdef enum:
    MDL_IDLE_NS_DEFAULT = 50000  # busy-poll this long after the last piece of work
    MDL_SLEEP_MS = 50            # longest sleep: bounds how late a kick-less doorbell is seen
    MDL_BURST = 64               # commands per SQ per pass (round robin fairness)
    MDL_MAX_RULES = 64
    MDL_ERRLOG_ENTRIES = 64
    MDL_AERL = 3                 # 0-based: 4 outstanding Asynchronous Event Requests
    MDL_ACL = 3
    MDL_AEN_QUEUE = 8
    MDL_ABUF = 8192

# CC / CSTS fields
cdef enum:
    CC_EN = 1
    CSTS_RDY = 1
    CSTS_CFS = 2
    CSTS_SHST_MASK = 0xC
    CSTS_SHST_DONE = 0x8

cdef enum mdl_held_kind:
    HELD_DROP = 1        # fault injection: never completed unless aborted
    HELD_DELAY = 2       # fault injection: executed, completion due at release_ns
    HELD_AER = 3         # Asynchronous Event Request waiting for an event
    HELD_POST = 4        # a finished completion waiting for room in its CQ

cdef enum mdl_action:
    ACT_FAIL = 1
    ACT_DROP = 2
    ACT_DELAY = 3

cdef struct mdl_sq:
    nvme_sqe *ring
    uint64_t base
    uint32_t size
    uint32_t head
    uint32_t tail
    uint32_t db_last        # last value seen in the MMIO doorbell
    uint32_t sh_last        # last value seen in the shadow doorbell
    uint32_t bad_last       # invalid tail already reported (+1), 0 = none
    uint16_t cqid
    uint8_t valid

cdef struct mdl_cq:
    nvme_cqe *ring
    uint64_t base
    uint32_t size
    uint32_t head
    uint32_t tail
    uint32_t db_last
    uint32_t sh_last
    uint32_t bad_last
    uint32_t nsq            # SQs feeding this CQ
    uint16_t iv
    uint16_t phase
    uint8_t ien
    uint8_t valid

cdef struct mdl_held:
    uint64_t release_ns     # 0: waits for an abort / an event
    uint64_t lba
    uint32_t nsid
    uint32_t dw0
    uint32_t st
    uint16_t sqid
    uint16_t cid
    uint8_t kind
    uint8_t opc

cdef struct mdl_rule:
    uint64_t lba_start
    uint64_t lba_end
    uint64_t nth
    uint64_t count          # 0: every match from the nth on
    uint64_t seen
    uint64_t fired
    uint64_t delay_ns
    uint32_t id
    uint32_t nsid           # 0: any namespace
    uint32_t st
    uint8_t active
    uint8_t admin
    uint8_t opc
    uint8_t action

cdef struct mdl_cmdctx:
    nvme_sqe *cmd
    uint64_t lba
    uint32_t nsid
    uint32_t dw0
    uint16_t sqid

cdef struct mdl_ctrl:
    void *arena
    uint8_t *regs
    size_t regs_size
    # configuration
    uint32_t nq              # I/O queue pairs supported
    uint32_t mqes
    uint32_t mdts
    # NVM command set limits (Identify CNS 06h, CSI 0); 0 = none
    uint8_t wzsl             # Write Zeroes: 2^wzsl minimum pages
    uint8_t dmrl             # DSM: ranges per command
    uint32_t dmrsl           # DSM: LBAs per range
    uint64_t dmsl            # DSM: LBAs per command
    uint32_t sgls
    uint32_t dstrd
    uint32_t stride
    uint32_t to
    uint8_t vwc
    uint8_t polled
    uint8_t null_data        # bench only: reads and writes move no data (see ControllerModel)
    char serial[21]
    char model[41]
    mdl_store store
    # controller state
    int stop
    uint32_t idle            # host-visible: the thread is (about to be) asleep
    uint64_t idle_ns         # busy-poll window before sleeping
    int kick_fd
    int *irq_fds
    uint32_t nvec
    uint8_t *irq_pending
    int hang_req
    int fatal_req
    int hung
    uint8_t fatal
    uint8_t ready
    uint32_t cc_last
    uint32_t csts
    mdl_sq *sq
    mdl_cq *cq
    # features
    uint32_t wce
    uint32_t aec
    uint32_t coalescing
    uint32_t arbitration     # Set Features 01h, as set
    uint32_t power_state     # 02h: PS and WH
    uint16_t temp_over       # 04h: composite temperature thresholds, kelvin
    uint16_t temp_under
    uint32_t write_atomicity # 0Ah: DN
    uint32_t error_recovery[16]   # 05h, per namespace: TLER
    uint8_t *iv_cd           # 09h: coalescing disabled, per interrupt vector
    # shadow doorbells (Doorbell Buffer Config)
    uint8_t dbbuf
    uint8_t *dbs
    uint8_t *eis
    uint64_t dbs_len
    # held completions
    mdl_held *held
    uint32_t nheld
    uint32_t held_cap
    uint32_t aers
    uint32_t aen[8]
    uint32_t naen
    uint8_t aen_error_masked
    uint8_t aen_ns_masked    # a Namespace Attribute Changed event waits for log 04h to be read
    uint32_t ns_changed      # Changed Namespace List (log 04h): bit nsid-1
    # error information log: a ring, newest at errlog_head
    uint8_t errlog[4096]
    uint32_t errlog_head
    uint64_t error_count
    # fault injection (rules written by Python under the lock)
    mdl_mutex lock
    uint8_t lock_ok
    mdl_rule rules[64]
    int nrules
    uint32_t next_rule_id
    # scratch owned by the thread
    uint8_t *scratch         # bit bucket sink
    uint8_t *abuf            # admin data buffer
    mdl_iovlist iol
    # counters (written by the thread only)
    uint64_t admin_ops[256]
    uint64_t io_ops[256]
    uint64_t start_ns
    uint64_t busy_ns
    uint64_t fetched
    uint64_t completed
    uint64_t errors
    uint64_t resets
    uint64_t shutdowns
    uint64_t bytes_read
    uint64_t bytes_written
    uint64_t host_reads
    uint64_t host_writes
    uint64_t media_errors
    uint64_t invalid_doorbells
    uint64_t interrupts
    uint64_t inj_fail
    uint64_t inj_drop
    uint64_t inj_delay
    uint64_t aborted
    uint64_t cid_conflicts
    uint64_t cq_full_stalls
    uint64_t sleeps
    uint64_t enable_failures


@cython.linetrace(False)
@cython.profile(False)
cdef inline uint32_t mdl_reg_load(mdl_ctrl *c, size_t off) noexcept nogil:
    return nvmefs_load_acquire32(<volatile uint32_t *>(c.regs + off))

@cython.linetrace(False)
@cython.profile(False)
cdef inline void mdl_reg_store(mdl_ctrl *c, size_t off, uint32_t v) noexcept nogil:
    nvmefs_store_release32(<volatile uint32_t *>(c.regs + off), v)

@cython.linetrace(False)
@cython.profile(False)
cdef inline uint64_t mdl_reg_load64(mdl_ctrl *c, size_t off) noexcept nogil:
    return nvmefs_load_acquire64(<volatile uint64_t *>(c.regs + off))

@cython.linetrace(False)
@cython.profile(False)
cdef inline size_t mdl_db_off(mdl_ctrl *c, uint32_t qid, bint cq) noexcept nogil:
    return NVME_REG_DBS + (2 * qid + cq) * c.stride

@cython.linetrace(False)
@cython.profile(False)
cdef inline void mdl_set_csts(mdl_ctrl *c, uint32_t v) noexcept nogil:
    c.csts = v
    mdl_reg_store(c, NVME_REG_CSTS, v)


# --- completions, error log, asynchronous events -------------------------------------

@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_errlog_add(mdl_ctrl *c, uint16_t sqid, uint16_t cid, uint32_t st,
                         uint64_t lba, uint32_t nsid) noexcept nogil:
    cdef uint8_t *e
    cdef uint16_t status = status_pack((st >> 8) & 7, st & 0xFF, 0, False, (st & MST_DNR) != 0, 0)
    cdef uint16_t loc = 0xFFFF
    c.error_count += 1
    c.errlog_head = (c.errlog_head + MDL_ERRLOG_ENTRIES - 1) % MDL_ERRLOG_ENTRIES
    e = &c.errlog[64 * c.errlog_head]
    memset(e, 0, 64)
    memcpy(e, &c.error_count, 8)
    memcpy(e + 8, &sqid, 2)
    memcpy(e + 10, &cid, 2)
    memcpy(e + 12, &status, 2)
    memcpy(e + 14, &loc, 2)
    memcpy(e + 16, &lba, 8)
    memcpy(e + 24, &nsid, 4)


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_count_error(mdl_ctrl *c, uint16_t sqid, uint16_t cid, uint32_t st,
                          uint64_t lba, uint32_t nsid) noexcept nogil:
    c.errors += 1
    if ((st >> 8) & 7) == 2 and (st & 0xFF) != 0x85:
        c.media_errors += 1
    mdl_errlog_add(c, sqid, cid, st, lba, nsid)


@cython.linetrace(False)
@cython.profile(False)
cdef inline bint mdl_cq_full(mdl_cq *cq) noexcept nogil:
    cdef uint32_t nxt = cq.tail + 1
    if nxt == cq.size:
        nxt = 0
    return nxt == cq.head


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_post(mdl_ctrl *c, uint16_t sqid, uint16_t cid, uint32_t dw0, uint32_t st) noexcept nogil:
    """Write one CQE to the CQ of ``sqid``: body first, then the status word
    with the phase bit as a release store.  -EAGAIN when the CQ is full."""
    cdef mdl_sq *sq = &c.sq[sqid]
    cdef mdl_cq *cq = &c.cq[sq.cqid]
    cdef nvme_cqe *e
    if not cq.valid or mdl_cq_full(cq):
        return -EAGAIN
    e = &cq.ring[cq.tail]
    e.dw0 = dw0
    e.dw1 = 0
    e.sqhd = <uint16_t>sq.head
    e.sqid = sqid
    e.cid = cid
    nvmefs_store_release16(&e.status, status_pack((st >> 8) & 7, st & 0xFF, 0, False,
                                                  (st & MST_DNR) != 0, <uint8_t>cq.phase))
    cq.tail += 1
    if cq.tail == cq.size:
        cq.tail = 0
        cq.phase ^= 1
    if cq.ien and not c.polled and cq.iv < c.nvec:
        c.irq_pending[cq.iv] = 1
    c.completed += 1
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_held_add(mdl_ctrl *c, uint8_t kind, uint16_t sqid, uint16_t cid, uint8_t opc,
                      uint32_t dw0, uint32_t st, uint64_t release_ns, uint64_t lba,
                      uint32_t nsid) noexcept nogil:
    cdef mdl_held *grown
    cdef uint32_t cap
    cdef mdl_held *h
    if c.nheld == c.held_cap:
        cap = c.held_cap * 2 if c.held_cap else 64
        grown = <mdl_held *>realloc(c.held, cap * sizeof(mdl_held))
        if grown == NULL:
            return -ENOMEM
        c.held = grown
        c.held_cap = cap
    h = &c.held[c.nheld]
    c.nheld += 1
    h.kind = kind
    h.sqid = sqid
    h.cid = cid
    h.opc = opc
    h.dw0 = dw0
    h.st = st
    h.release_ns = release_ns
    h.lba = lba
    h.nsid = nsid
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_held_remove(mdl_ctrl *c, uint32_t i) noexcept nogil:
    # keeps release order (FIFO) for completions due at the same time
    memmove(&c.held[i], &c.held[i + 1], (c.nheld - i - 1) * sizeof(mdl_held))
    c.nheld -= 1


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_held_find(mdl_ctrl *c, uint16_t sqid, uint16_t cid) noexcept nogil:
    cdef uint32_t i
    for i in range(c.nheld):
        if c.held[i].sqid == sqid and c.held[i].cid == cid:
            return <int>i
    return -1


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_complete(mdl_ctrl *c, mdl_cmdctx *x, uint32_t st) noexcept nogil:
    """Post a command's completion (or hold it if its CQ is full)."""
    cdef uint32_t s = st & 0xFFFF
    if s & 0x7FF:
        mdl_count_error(c, x.sqid, x.cmd.cid, s, x.lba, x.nsid)
    if mdl_post(c, x.sqid, x.cmd.cid, x.dw0, s) < 0:
        mdl_held_add(c, HELD_POST, x.sqid, x.cmd.cid, x.cmd.opc, x.dw0, s, 1, x.lba, x.nsid)


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_release_held(mdl_ctrl *c, uint64_t now) noexcept nogil:
    cdef uint32_t i = 0
    cdef int work = 0
    cdef mdl_held *h
    while i < c.nheld:
        h = &c.held[i]
        if h.release_ns and h.release_ns <= now:
            if mdl_post(c, h.sqid, h.cid, h.dw0, h.st) == 0:
                if (h.st & 0x7FF) and h.kind != HELD_POST:
                    mdl_count_error(c, h.sqid, h.cid, h.st, h.lba, h.nsid)
                mdl_held_remove(c, i)
                work = 1
                continue
        i += 1
    return work


@cython.linetrace(False)
@cython.profile(False)
cdef uint64_t mdl_next_release(mdl_ctrl *c) noexcept nogil:
    cdef uint32_t i
    cdef uint64_t t = 0
    for i in range(c.nheld):
        if c.held[i].release_ns and (t == 0 or c.held[i].release_ns < t):
            t = c.held[i].release_ns
    return t


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_aen_dispatch(mdl_ctrl *c) noexcept nogil:
    """Complete outstanding Asynchronous Event Requests with queued events."""
    cdef uint32_t i, ev
    while c.naen:
        for i in range(c.nheld):
            if c.held[i].kind == HELD_AER and c.held[i].release_ns == 0:
                break
        else:
            return
        ev = c.aen[0]
        c.naen -= 1
        memmove(&c.aen[0], &c.aen[1], c.naen * sizeof(uint32_t))
        c.held[i].dw0 = ev
        c.held[i].st = 0
        c.held[i].release_ns = 1
        c.aers -= 1
        if (ev & 7) == 0:
            # further error events wait until the host reads the Error log (RAE=0)
            c.aen_error_masked = 1


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_aen(mdl_ctrl *c, uint8_t typ, uint8_t info, uint8_t lid) noexcept nogil:
    cdef uint32_t i, ev = typ | (<uint32_t>info << 8) | (<uint32_t>lid << 16)
    if typ == 0 and c.aen_error_masked:
        return
    for i in range(c.naen):
        if c.aen[i] == ev:
            return
    if c.naen < MDL_AEN_QUEUE:
        c.aen[c.naen] = ev
        c.naen += 1
    mdl_aen_dispatch(c)


# --- registers and reset --------------------------------------------------------

@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_zero_doorbells(mdl_ctrl *c, uint32_t qid) noexcept nogil:
    # doorbells are write-only on hardware; the model's register memory is
    # reset with the queue so a stale value never reads as a new write
    mdl_reg_store(c, mdl_db_off(c, qid, 0), 0)
    mdl_reg_store(c, mdl_db_off(c, qid, 1), 0)
    c.sq[qid].db_last = 0
    c.cq[qid].db_last = 0
    c.sq[qid].bad_last = 0
    c.cq[qid].bad_last = 0


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_features_default(mdl_ctrl *c) noexcept nogil:
    """The mandatory features' values after a reset (NVMe 1.4 5.21.1)."""
    cdef uint32_t i
    c.arbitration = 0
    c.power_state = 0
    c.temp_over = 343            # WCTEMP, as Identify Controller reports it
    c.temp_under = 0
    c.write_atomicity = 0
    for i in range(16):
        c.error_recovery[i] = 0
    if c.iv_cd != NULL:
        memset(c.iv_cd, 0, c.nvec)


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_reset(mdl_ctrl *c) noexcept nogil:
    """Controller reset (CC.EN 1 -> 0): every queue, held command, event and
    shadow doorbell forgotten; hang and fatal state cleared."""
    cdef uint32_t q
    for q in range(c.nq + 1):
        c.sq[q].valid = 0
        c.cq[q].valid = 0
        c.cq[q].nsq = 0
        mdl_zero_doorbells(c, q)
    c.nheld = 0
    c.aers = 0
    c.naen = 0
    c.aen_error_masked = 0
    c.aen_ns_masked = 0
    c.dbbuf = 0
    c.dbs = NULL
    c.eis = NULL
    c.wce = c.vwc
    c.aec = 0
    c.coalescing = 0
    mdl_features_default(c)
    c.fatal = 0
    mdl_store_int(&c.fatal_req, 0)
    mdl_store_int(&c.hang_req, 0)
    mdl_store_int(&c.hung, 0)
    c.ready = 0
    memset(c.irq_pending, 0, c.nvec)
    c.resets += 1
    mdl_set_csts(c, c.csts & CSTS_SHST_MASK)


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_enable(mdl_ctrl *c, uint32_t cc) noexcept nogil:
    cdef uint32_t aqa = mdl_reg_load(c, NVME_REG_AQA)
    cdef uint64_t asq = mdl_reg_load64(c, NVME_REG_ASQ)
    cdef uint64_t acq = mdl_reg_load64(c, NVME_REG_ACQ)
    cdef uint32_t asqs = (aqa & 0xFFF) + 1, acqs = ((aqa >> 16) & 0xFFF) + 1
    cdef nvme_sqe *sring = NULL
    cdef nvme_cqe *cring = NULL
    cdef bint ok = not c.fatal
    ok = ok and ((cc >> 4) & 7) == 0           # CSS: NVM command set
    ok = ok and ((cc >> 7) & 0xF) == 0         # MPS: 4 KiB only (MPSMIN = MPSMAX = 0)
    ok = ok and ((cc >> 11) & 7) == 0          # AMS: round robin
    ok = ok and ((cc >> 16) & 0xF) == 6 and ((cc >> 20) & 0xF) == 4
    ok = ok and asqs >= 2 and acqs >= 2
    ok = ok and asq != 0 and acq != 0 and (asq & MDL_PAGE_MASK) == 0 and (acq & MDL_PAGE_MASK) == 0
    if ok:
        sring = <nvme_sqe *>mdl_tr(c.arena, asq, <uint64_t>asqs * 64)
        cring = <nvme_cqe *>mdl_tr(c.arena, acq, <uint64_t>acqs * 16)
        ok = sring != NULL and cring != NULL
    if not ok:
        c.enable_failures += 1
        mdl_set_csts(c, c.csts | CSTS_CFS)
        return
    memset(&c.sq[0], 0, sizeof(mdl_sq))
    memset(&c.cq[0], 0, sizeof(mdl_cq))
    c.sq[0].ring = sring
    c.sq[0].base = asq
    c.sq[0].size = asqs
    c.sq[0].valid = 1
    c.cq[0].ring = cring
    c.cq[0].base = acq
    c.cq[0].size = acqs
    c.cq[0].phase = 1
    c.cq[0].ien = 1
    c.cq[0].nsq = 1
    c.cq[0].valid = 1
    mdl_zero_doorbells(c, 0)
    c.ready = 1
    mdl_set_csts(c, (c.csts & ~CSTS_CFS) | CSTS_RDY)


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_cc_changed(mdl_ctrl *c, uint32_t cc) noexcept nogil:
    cdef uint32_t old = c.cc_last
    cdef uint32_t shn = (cc >> 14) & 3, oshn = (old >> 14) & 3
    c.cc_last = cc
    if (old & CC_EN) and not (cc & CC_EN):
        mdl_reset(c)
    elif not (old & CC_EN) and (cc & CC_EN):
        mdl_enable(c, cc)
    if shn and not oshn and not c.fatal and not c.hung:
        # normal or abrupt: everything completed is already in the store;
        # make it durable, then report shutdown complete
        mdl_store_flush(&c.store)
        c.shutdowns += 1
        mdl_set_csts(c, (c.csts & ~CSTS_SHST_MASK) | CSTS_SHST_DONE)
    elif not shn and oshn:
        mdl_set_csts(c, c.csts & ~CSTS_SHST_MASK)


# --- doorbells ---------------------------------------------------------------------

@cython.linetrace(False)
@cython.profile(False)
cdef inline uint32_t mdl_shadow_load(mdl_ctrl *c, uint32_t qid, bint cq) noexcept nogil:
    return nvmefs_load_acquire32(<volatile uint32_t *>(c.dbs + (2 * qid + cq) * c.stride))

@cython.linetrace(False)
@cython.profile(False)
cdef inline void mdl_eventidx_store(mdl_ctrl *c, uint32_t qid, bint cq, uint32_t v) noexcept nogil:
    nvmefs_store_release32(<volatile uint32_t *>(c.eis + (2 * qid + cq) * c.stride), v)

@cython.linetrace(False)
@cython.profile(False)
cdef inline void mdl_shadow_store(mdl_ctrl *c, uint32_t qid, bint cq, uint32_t v) noexcept nogil:
    nvmefs_store_release32(<volatile uint32_t *>(c.dbs + (2 * qid + cq) * c.stride), v)


@cython.linetrace(False)
@cython.profile(False)
cdef inline int mdl_doorbell(mdl_ctrl *c, uint32_t q, bint is_cq, bint valid, uint32_t size,
                             uint32_t *cur, uint32_t *db_last, uint32_t *sh_last,
                             uint32_t *bad_last) noexcept nogil:
    """One doorbell (an SQ tail or a CQ head): move ``*cur`` to a new valid
    value, or report a bad write once with an error event.  Nonzero if
    anything happened."""
    cdef uint32_t v = mdl_reg_load(c, mdl_db_off(c, q, is_cq)), cand
    if not valid:
        if v == db_last[0]:
            return 0
        db_last[0] = v
        c.invalid_doorbells += 1
        mdl_aen(c, 0, 0x00, 0x01)                 # Write to Invalid Doorbell Register
        return 1
    cand = cur[0]
    if v != db_last[0]:
        db_last[0] = v
        cand = v
    elif c.dbbuf and q:
        v = mdl_shadow_load(c, q, is_cq)
        if v != sh_last[0]:
            sh_last[0] = v
            cand = v
    if cand == cur[0]:
        return 0
    if cand >= size:
        if bad_last[0] == cand + 1:
            return 0
        bad_last[0] = cand + 1
        c.invalid_doorbells += 1
        mdl_aen(c, 0, 0x01, 0x01)                 # Invalid Doorbell Write Value
        return 1
    cur[0] = cand
    return 1


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_scan_doorbells(mdl_ctrl *c) noexcept nogil:
    """Pick up new SQ tails and CQ heads.  With shadow doorbells an I/O
    queue's value is whichever of the MMIO doorbell and the shadow entry
    changed last (a host may write the shadow alone, or both); the admin
    queue always uses MMIO, as Linux does."""
    cdef uint32_t q, head
    cdef int work = 0
    cdef mdl_sq *sq
    cdef mdl_cq *cq
    for q in range(c.nq + 1):
        sq = &c.sq[q]
        work |= mdl_doorbell(c, q, 0, sq.valid, sq.size, &sq.tail, &sq.db_last, &sq.sh_last,
                             &sq.bad_last)
        cq = &c.cq[q]
        head = cq.head
        work |= mdl_doorbell(c, q, 1, cq.valid, cq.size, &cq.head, &cq.db_last, &cq.sh_last,
                             &cq.bad_last)
        if cq.head != head and c.dbbuf and q:
            mdl_eventidx_store(c, q, 1, cq.head)
    return work


# --- fault injection ----------------------------------------------------------------

@cython.linetrace(False)
@cython.profile(False)
cdef inline bint mdl_io_has_lba(uint8_t opc) noexcept nogil:
    return opc == 0x01 or opc == 0x02 or opc == 0x05 or opc == 0x08


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_fault_match(mdl_ctrl *c, bint admin, const nvme_sqe *cmd, mdl_rule *hit) noexcept nogil:
    """The action of the first rule that fires for this command (0: none)."""
    cdef int i, action = 0
    cdef mdl_rule *r
    cdef uint64_t slba, elba
    if mdl_load_int(&c.nrules) == 0:
        return 0
    mdl_mutex_lock(&c.lock)
    for i in range(MDL_MAX_RULES):
        r = &c.rules[i]
        if not r.active or r.admin != admin or r.opc != cmd.opc:
            continue
        if r.nsid and r.nsid != cmd.nsid:
            continue
        if not admin and mdl_io_has_lba(cmd.opc):
            slba = cmd.cdw10 | (<uint64_t>cmd.cdw11 << 32)
            elba = slba + (cmd.cdw12 & 0xFFFF)
            if elba < r.lba_start or slba > r.lba_end:
                continue
        r.seen += 1
        if r.seen < r.nth:
            continue
        r.fired += 1
        if r.count and r.fired >= r.count:
            r.active = 0
            mdl_store_int(&c.nrules, c.nrules - 1)
        hit[0] = r[0]
        action = r.action
        break
    mdl_mutex_unlock(&c.lock)
    return action


# --- the command loop ---------------------------------------------------------------

@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_dispatch(mdl_ctrl *c, uint16_t sqid, nvme_sqe *cmd) noexcept nogil:
    cdef mdl_cmdctx x
    cdef mdl_rule rule
    cdef int action
    cdef uint32_t st
    cdef bint admin = sqid == 0
    x.cmd = cmd
    x.sqid = sqid
    x.dw0 = 0
    x.lba = 0
    x.nsid = cmd.nsid
    if admin:
        c.admin_ops[cmd.opc] += 1
    else:
        c.io_ops[cmd.opc] += 1
        if mdl_io_has_lba(cmd.opc):
            x.lba = cmd.cdw10 | (<uint64_t>cmd.cdw11 << 32)
    if mdl_held_find(c, sqid, cmd.cid) >= 0:
        # a CID is unique among the SQ's outstanding commands; only a held
        # (dropped, delayed, AER) command can still be outstanding here
        c.cid_conflicts += 1
        mdl_complete(c, &x, MST_CID_CONFLICT | MST_DNR)
        return
    action = mdl_fault_match(c, admin, cmd, &rule)
    if action == ACT_FAIL:
        c.inj_fail += 1
        mdl_complete(c, &x, rule.st)
        return
    if action == ACT_DROP:
        c.inj_drop += 1
        mdl_held_add(c, HELD_DROP, sqid, cmd.cid, cmd.opc, 0, 0, 0, x.lba, x.nsid)
        return
    if admin:
        st = mdl_admin_exec(c, &x)
    else:
        st = mdl_io_exec(c, &x)
    if st == MST_HELD:
        return
    if action == ACT_DELAY:
        c.inj_delay += 1
        mdl_held_add(c, HELD_DELAY, sqid, cmd.cid, cmd.opc, x.dw0, st,
                     nvmefs_now_ns() + rule.delay_ns, x.lba, x.nsid)
        return
    mdl_complete(c, &x, st)


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_process_sqs(mdl_ctrl *c) noexcept nogil:
    cdef uint32_t q, budget
    cdef int work = 0
    cdef mdl_sq *sq
    cdef nvme_sqe cmd
    for q in range(c.nq + 1):
        sq = &c.sq[q]
        if not sq.valid:
            continue
        budget = MDL_BURST
        while sq.valid and sq.head != sq.tail and budget:
            if mdl_cq_full(&c.cq[sq.cqid]):
                c.cq_full_stalls += 1
                break
            # the doorbell was loaded with acquire: the entry is complete
            memcpy(&cmd, &sq.ring[sq.head], sizeof(nvme_sqe))
            sq.head += 1
            if sq.head == sq.size:
                sq.head = 0
            budget -= 1
            work = 1
            c.fetched += 1
            mdl_dispatch(c, <uint16_t>q, &cmd)
            if not c.ready:
                return work
        if c.dbbuf and q and sq.valid:
            mdl_eventidx_store(c, q, 0, sq.tail)
    return work


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_fire_irqs(mdl_ctrl *c) noexcept nogil:
    cdef uint32_t v
    for v in range(c.nvec):
        if c.irq_pending[v]:
            c.irq_pending[v] = 0
            c.interrupts += 1
            mdl_eventfd_signal(c.irq_fds[v])


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_step(mdl_ctrl *c) noexcept nogil:
    """One pass over registers, doorbells, timers and SQs; nonzero if
    anything happened."""
    cdef int work = 0, h
    cdef uint32_t cc
    cdef uint64_t t0
    if mdl_xchg_int(&c.fatal_req, 0):
        c.fatal = 1
        mdl_set_csts(c, c.csts | CSTS_CFS)
        work = 1
    h = mdl_load_int(&c.hang_req)
    if h != c.hung:
        mdl_store_int(&c.hung, h)
        work = 1
    cc = mdl_reg_load(c, NVME_REG_CC)
    if cc != c.cc_last:
        mdl_cc_changed(c, cc)
        work = 1
    if not c.ready or c.fatal or c.hung:
        return work
    t0 = nvmefs_now_ns()
    work |= mdl_scan_doorbells(c)
    if c.nheld:
        work |= mdl_release_held(c, t0)
    work |= mdl_process_sqs(c)
    mdl_fire_irqs(c)
    if work:
        c.busy_ns += nvmefs_now_ns() - t0
    return work


@cython.linetrace(False)
@cython.profile(False)
cdef void *mdl_thread_main(void *arg) noexcept nogil:
    cdef mdl_ctrl *c = <mdl_ctrl *>arg
    cdef uint64_t last = nvmefs_now_ns(), now, due
    cdef int timeout
    while not mdl_load_int(&c.stop):
        if mdl_step(c):
            last = nvmefs_now_ns()
            continue
        now = nvmefs_now_ns()
        if now - last < c.idle_ns:
            mdl_cpu_relax()
            mdl_sched_yield()
            continue
        # publish idle, fence, and look once more: a host that wrote before
        # seeing idle=1 is caught here, one that wrote after will kick
        mdl_store_u32(&c.idle, 1)
        nvmefs_mb()
        if mdl_step(c) or mdl_load_int(&c.stop):
            mdl_store_u32(&c.idle, 0)
            last = nvmefs_now_ns()
            continue
        timeout = MDL_SLEEP_MS
        due = mdl_next_release(c) if (c.ready and not c.fatal and not c.hung) else 0
        if due:
            now = nvmefs_now_ns()
            # at least 1 ms: a completion due now but stuck behind a full CQ
            # must not turn the sleep into a spin (the head doorbell kicks us)
            timeout = 1 if due <= now else <int>((due - now) // 1000000) + 1
            if timeout > MDL_SLEEP_MS:
                timeout = MDL_SLEEP_MS
        mdl_wait_readable(c.kick_fd, timeout)
        mdl_eventfd_drain(c.kick_fd)
        c.sleeps += 1
        mdl_store_u32(&c.idle, 0)
        last = nvmefs_now_ns()
    return NULL


# --- Python class ---------------------------------------------------------------------

import errno as _errno_mod
import fcntl as _fcntl
import stat as _stat
import time as _time

_SGL_MODES = {"off": 0, "on": 0x1, "bitbucket": 0x1 | (1 << 16)}
_ACTIONS = {"fail": ACT_FAIL, "drop": ACT_DROP, "delay": ACT_DELAY}


def _lock_image(int fd, str path):
    """One controller per image.  An open-file-description lock (F_OFD_SETLK)
    conflicts with any other open of the image, in this process or another,
    yet not with flock(), which a caller may hold on the same file for its
    own bookkeeping."""
    lk = getattr(_fcntl, "F_OFD_SETLK", None)
    try:
        if lk is not None:
            # struct flock: l_type, l_whence, l_start, l_len (0: to the end), l_pid
            _fcntl.fcntl(fd, lk, _struct.pack("hhxxxxqqixxxx", _fcntl.F_WRLCK, 0, 0, 0, 0))
        else:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError) as exc:
        if exc.errno not in (_errno_mod.EAGAIN, _errno_mod.EACCES, _errno_mod.EWOULDBLOCK):
            raise
        raise OSError(_errno_mod.EBUSY, "image is in use by another controller", path) from None


def model_regs_size(max_io_queues=64, dstrd=0):
    """Bytes of BAR0 a ControllerModel with these parameters needs."""
    return NVME_REG_DBS + (2 * (max_io_queues + 1)) * (4 << dstrd)


cdef class ControllerModel:
    """A software NVMe controller on its own native thread (see the module
    comment and README).  ``ControllerModel(arena, regs, *, namespaces=None,
    image=None, create=True, max_io_queues=64, mqes=1023, mdts=9,
    sgl="bitbucket", vwc=True, dstrd=0, timeout_500ms=20, polled=False,
    serial=..., model_name=..., wzsl=0, dmrl=0, dmrsl=0, dmsl=0,
    null_data=False, raw_lba_size=512)``.

    ``image``: an nvmefs image, or a raw disk image or block device (no
    NVMEFSIMG1 magic): one namespace over all of it, of ``raw_lba_size``-byte
    LBAs, never written but for the host's data.

    ``null_data``: for benchmarks of the protocol alone: Read and Write are
    checked and their data pointers walked as always, but no byte moves
    between the store and host memory (a read leaves the buffer as it was).

    ``wzsl``/``dmrl``/``dmrsl``/``dmsl``: the NVM command set limits reported
    by Identify CNS 06h and enforced (Invalid Field; QEMU skips a DSM range
    above DMRSL silently, the model refuses so that a host ignoring the
    limits is caught).

    ``namespaces``: (size_bytes, lba_size) pairs, default one 1 GiB namespace
    of 512-byte blocks, attached.  With an existing ``image`` the layout comes
    from the image header and ``namespaces`` is ignored.  ``capacity``: NVM
    capacity in bytes of a new image or of the memory store (default: what
    the namespaces take); Namespace Management creates namespaces in what is
    left.  A raw image has no namespace management.
    ``stop()`` powers the controller off and closes the image; it cannot be
    started again."""
    cdef mdl_ctrl *c
    cdef readonly DmaArena arena
    cdef readonly RegisterFile regs
    cdef mdl_pthread_t thread
    cdef readonly bint running
    cdef readonly bint closed
    cdef readonly object image_path
    cdef object image_file        # Python file object holding the fd and its lock
    cdef readonly bint raw           # a raw image or block device (no header)
    cdef uint64_t opened_ns

    def __cinit__(self, DmaArena arena not None, RegisterFile regs not None, *, namespaces=None,
                  image=None, bint create=True, uint32_t max_io_queues=64, uint32_t mqes=1023,
                  uint32_t mdts=9, str sgl="bitbucket", bint vwc=True, uint32_t dstrd=0,
                  uint32_t timeout_500ms=20, bint polled=False, str serial="NVMEFS0000001",
                  str model_name="nvmefs software controller", double idle_spin_us=50,
                  uint32_t wzsl=0, uint32_t dmrl=0, uint32_t dmrsl=0, uint64_t dmsl=0,
                  bint null_data=False, uint32_t raw_lba_size=512, capacity=None):
        self.c = NULL
        self.arena = arena
        self.regs = regs
        if not 1 <= max_io_queues <= 65534:
            raise ValueError(f"max_io_queues {max_io_queues} outside 1..65534")
        if not 1 <= mqes <= 65535:
            raise ValueError(f"mqes {mqes} outside 1..65535 (0-based queue size)")
        if mdts > 15:
            raise ValueError(f"mdts {mdts} outside 0..15")
        if sgl not in _SGL_MODES:
            raise ValueError(f"sgl must be one of {sorted(_SGL_MODES)}, not {sgl!r}")
        if dstrd > 15:
            raise ValueError(f"dstrd {dstrd} outside 0..15")
        if wzsl > 20 or dmrl > 255:
            raise ValueError(f"wzsl {wzsl} outside 0..20 or dmrl {dmrl} outside 0..255")
        if not 1 <= timeout_500ms <= 255:
            raise ValueError(f"timeout_500ms {timeout_500ms} outside 1..255")
        sn = serial.encode("ascii")
        mn = model_name.encode("ascii")
        if len(sn) > 20 or len(mn) > 40:
            raise ValueError("serial is at most 20 and model_name at most 40 ASCII characters")
        need = model_regs_size(max_io_queues, dstrd)
        if regs.size < need:
            raise ValueError(f"register file of {regs.size} bytes is too small for {max_io_queues} "
                             f"I/O queues with DSTRD {dstrd}: {need} bytes needed")

        self.c = <mdl_ctrl *>calloc(1, sizeof(mdl_ctrl))
        if self.c == NULL:
            raise MemoryError()
        cdef mdl_ctrl *c = self.c
        c.store.fd = -1
        c.kick_fd = -1
        c.arena = <void *>arena
        c.regs = regs.base
        c.regs_size = regs.size
        c.nq = max_io_queues
        c.mqes = mqes
        c.mdts = mdts
        c.wzsl = <uint8_t>wzsl
        c.dmrl = <uint8_t>dmrl
        c.dmrsl = dmrsl
        c.dmsl = dmsl
        c.sgls = _SGL_MODES[sgl]
        c.dstrd = dstrd
        c.stride = 4 << dstrd
        c.to = timeout_500ms
        c.vwc = vwc
        c.wce = vwc
        c.polled = polled
        c.null_data = null_data
        # how long the thread busy-polls before sleeping: a wake-up costs tens
        # of microseconds on a VM, spinning costs a core the host may need
        c.idle_ns = <uint64_t>(idle_spin_us * 1000) if idle_spin_us > 0 else 0
        memset(c.serial, 0x20, 20)
        memcpy(c.serial, <char *>sn, len(sn))
        memset(c.model, 0x20, 40)
        memcpy(c.model, <char *>mn, len(mn))
        c.nvec = max_io_queues + 1
        c.sq = <mdl_sq *>calloc(c.nq + 1, sizeof(mdl_sq))
        c.cq = <mdl_cq *>calloc(c.nq + 1, sizeof(mdl_cq))
        c.irq_fds = <int *>malloc(c.nvec * sizeof(int))
        c.irq_pending = <uint8_t *>calloc(c.nvec, 1)
        c.iv_cd = <uint8_t *>calloc(c.nvec, 1)
        mdl_features_default(c)
        c.scratch = <uint8_t *>malloc(MDL_SCRATCH)
        c.abuf = <uint8_t *>malloc(MDL_ABUF)
        cdef uint32_t v
        if c.irq_fds != NULL:
            for v in range(c.nvec):
                c.irq_fds[v] = -1
        if (c.sq == NULL or c.cq == NULL or c.irq_fds == NULL or c.irq_pending == NULL
                or c.iv_cd == NULL or c.scratch == NULL or c.abuf == NULL):
            raise MemoryError()
        if mdl_mutex_init(&c.lock, NULL) != 0:
            raise OSError("cannot initialise the fault-injection lock")
        c.lock_ok = 1
        for v in range(c.nvec):
            c.irq_fds[v] = mdl_eventfd(0, MDL_EFD_NONBLOCK | MDL_EFD_CLOEXEC)
            if c.irq_fds[v] < 0:
                raise OSError(_errno_mod.EMFILE, f"cannot create interrupt eventfd {v}")
        c.kick_fd = mdl_eventfd(0, MDL_EFD_NONBLOCK | MDL_EFD_CLOEXEC)
        if c.kick_fd < 0:
            raise OSError(_errno_mod.EMFILE, "cannot create the kick eventfd")

        if image is not None:
            self._open_image(_os.fspath(image), namespaces, create, raw_lba_size, capacity)
        else:
            self._open_memory(namespaces if namespaces is not None else ((1 << 30, 512),), capacity)
        self.opened_ns = nvmefs_now_ns()
        c.start_ns = self.opened_ns
        self._power_on()

    cdef _open_memory(self, namespaces, capacity):
        layout, capacity = _image_layout(namespaces, capacity)
        cdef mdl_ctrl *c = self.c
        cdef void *p
        c.store.fd = -1
        c.store.power_cycles = 1
        c.store.nns = MDL_MAX_NS
        c.store.mgmt = 1
        c.store.capacity = capacity
        for i, (size, _off, lbaf) in enumerate(layout):
            p = mdl_mmap(NULL, size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            if p == MAP_FAILED:
                raise MemoryError(f"cannot map {size} bytes for namespace {i + 1}")
            c.store.ns[i].mem = <uint8_t *>p
            c.store.ns[i].size = size
            c.store.ns[i].data_off = 0
            c.store.ns[i].attached = 1
            mdl_ns_set_format(&c.store.ns[i], lbaf)

    cdef _open_image(self, str path, namespaces, bint create, uint32_t raw_lba_size, capacity):
        cdef mdl_ctrl *c = self.c
        if not _os.path.exists(path):
            if not create:
                raise FileNotFoundError(_errno_mod.ENOENT, "image file does not exist", path)
            create_image(path, namespaces if namespaces is not None else ((1 << 30, 512),),
                         capacity=capacity)
        st = _os.stat(path)
        if not (_stat.S_ISREG(st.st_mode) or _stat.S_ISBLK(st.st_mode)):
            raise ValueError(f"{path}: not a regular file or a block device")
        if not st.st_mode & 0o222:
            # refused even for root, who could open it anyway
            raise PermissionError(_errno_mod.EACCES, "image file is read-only", path)
        try:
            if _stat.S_ISBLK(st.st_mode):
                # O_EXCL on a block device: refused (EBUSY) while it is
                # mounted or otherwise held, as mkfs refuses it
                f = _os.fdopen(_os.open(path, _os.O_RDWR | _os.O_EXCL | _os.O_CLOEXEC), "r+b", buffering=0)
            else:
                f = open(path, "r+b", buffering=0)
        except OSError as exc:
            if exc.errno in (_errno_mod.EROFS, _errno_mod.EACCES, _errno_mod.EPERM):
                raise PermissionError(exc.errno, "image is read-only", path) from None
            if exc.errno == _errno_mod.EBUSY:
                raise OSError(exc.errno, "block device is in use (mounted, or held by another program)",
                              path) from None
            raise
        try:
            _lock_image(f.fileno(), path)
            info = probe_image(path)
            if info["format"] == "raw":
                self._open_raw(f, path, info, raw_lba_size)
                return
            nss = info["namespaces"]
            if namespaces is not None:
                want = [(int(sz), int(l)) for sz, l in namespaces]
                have = [(ns["size"], ns["lba_size"]) for ns in nss]
                if want != have:
                    # the image is authoritative (Format may have changed it since)
                    _log.info("%s: using the image's namespaces %s, not %s", path, have, want)
            flags = info["flags"]
            cycles = info["power_cycles"] + 1
            unsafe = info["unsafe_shutdowns"] + (1 if flags & MDL_IMG_DIRTY else 0)
            _os.pwrite(f.fileno(), _pack_fixed(info["entries"], flags | MDL_IMG_DIRTY, cycles,
                                               info["power_on_seconds"], unsafe, info["capacity"]), 0)
            _os.fsync(f.fileno())
        except BaseException:
            f.close()
            raise
        self.image_file = f
        self.image_path = path
        c.store.fd = f.fileno()
        c.store.power_cycles = cycles
        c.store.power_on_seconds = info["power_on_seconds"]
        c.store.unsafe_shutdowns = unsafe
        c.store.nns = MDL_MAX_NS
        c.store.mgmt = 1
        c.store.capacity = info["capacity"]
        for ns in nss:
            i = ns["nsid"] - 1
            c.store.ns[i].size = ns["size"]
            c.store.ns[i].data_off = ns["offset"]
            c.store.ns[i].mem = NULL
            c.store.ns[i].attached = ns["attached"]
            mdl_ns_set_format(&c.store.ns[i], ns["lbaf"])
        # the whole data area, so that a namespace created later is mapped too
        self._map_image(MDL_IMG_ALIGN, MDL_IMG_ALIGN + info["capacity"])

    cdef _open_raw(self, f, str path, info, uint32_t lba):
        """One namespace over the whole raw image, of ``lba``-byte LBAs."""
        cdef mdl_ctrl *c = self.c
        if lba not in _LBA_SIZES:
            raise ValueError(f"LBA size {lba} is not 512 or 4096")
        size = info["file_size"] // lba * lba
        if size < RAW_MIN_BYTES:
            raise ValueError(f"{path}: raw image of {info['file_size']} bytes is too small "
                             f"(at least {RAW_MIN_BYTES})")
        if size != info["file_size"]:
            _log.info("%s: the last %d bytes are not a whole %d-byte LBA and are not served",
                      path, info["file_size"] - size, lba)
        self.image_file = f
        self.image_path = path
        self.raw = True
        c.store.raw = 1
        c.store.fd = f.fileno()
        c.store.power_cycles = 1
        c.store.ns[0].size = size
        c.store.ns[0].data_off = 0
        c.store.ns[0].mem = NULL
        c.store.ns[0].attached = 1
        mdl_ns_set_format(&c.store.ns[0], _LBA_SIZES[lba])
        c.store.nns = 1
        c.store.capacity = size
        self._map_image(0, size)

    cdef _map_image(self, uint64_t start, uint64_t end):
        cdef mdl_ctrl *c = self.c
        cdef void *p
        if end <= start:
            return
        mdl_bus_guard_install()
        p = mdl_mmap(NULL, end - start, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                     c.store.fd, start)
        if p == MAP_FAILED:
            _log.info("%s: cannot map the image (%s); writing with pwritev",
                      self.image_path, _os.strerror(mdl_errno()))
            return
        c.store.map = <uint8_t *>p
        c.store.map_off = start
        c.store.map_len = end - start

    cdef _power_on(self):
        cdef mdl_ctrl *c = self.c
        cdef uint64_t cap = (<uint64_t>c.mqes | (1 << 16) | (<uint64_t>c.to << 24)
                             | (<uint64_t>c.dstrd << 32) | (<uint64_t>1 << 37))
        nvmefs_store_release64(<volatile uint64_t *>(c.regs + NVME_REG_CAP), cap)
        mdl_reg_store(c, NVME_REG_VS, 0x00010400)
        mdl_reg_store(c, NVME_REG_CC, 0)
        c.cc_last = 0
        mdl_set_csts(c, 0)
        cdef uint32_t q
        for q in range(c.nq + 1):
            mdl_zero_doorbells(c, q)

    def start(self):
        """Start the controller thread (idempotent)."""
        if self.closed:
            raise RuntimeError("the controller model was stopped; create a new one")
        if self.running:
            return
        mdl_store_int(&self.c.stop, 0)
        if mdl_pthread_create(&self.thread, NULL, mdl_thread_main, self.c) != 0:
            raise OSError("cannot start the controller model thread")
        self.running = True

    def thread_cpu_ns(self):
        """CPU time the controller thread has used (ns): the device's share of
        a benchmark, apart from the host threads'."""
        cdef int clk
        cdef uint64_t ns
        if not self.running or mdl_pthread_getcpuclockid(self.thread, &clk) != 0:
            return 0
        if mdl_clock_gettime_ns(clk, &ns) != 0:
            return 0
        return ns

    cdef void _join(self) noexcept:
        if self.running:
            mdl_store_int(&self.c.stop, 1)
            mdl_eventfd_signal(self.c.kick_fd)
            with nogil:
                mdl_pthread_join(self.thread, NULL)
            self.running = False

    def stop(self):
        """Stop the thread and close the store (idempotent).  The image header
        records the power-on time and a clean close."""
        self._join()
        if self.closed:
            return
        self.closed = True
        self._close_store()

    cdef _close_store(self):
        cdef mdl_ctrl *c = self.c
        cdef uint32_t i
        if c == NULL:
            return
        if self.image_file is not None:
            f = self.image_file
            self.image_file = None
            c.store.fd = -1
            if c.store.map != NULL:
                # dirty pages stay in the page cache; the fsync below writes them
                munmap(c.store.map, c.store.map_len)
                c.store.map = NULL
            try:
                if self.raw:
                    _os.fsync(f.fileno())   # no header: the data is all there is
                    return
                info = read_image_header(self.image_path)
                pon = info["power_on_seconds"] + (nvmefs_now_ns() - self.opened_ns) // 1000000000
                _os.fsync(f.fileno())
                _os.pwrite(f.fileno(), _pack_fixed(info["entries"], info["flags"] & ~MDL_IMG_DIRTY,
                                                   info["power_cycles"], pon, info["unsafe_shutdowns"],
                                                   info["capacity"]), 0)
                _os.fsync(f.fileno())
            finally:
                f.close()
        for i in range(c.store.nns):
            if c.store.ns[i].mem != NULL:
                munmap(c.store.ns[i].mem, c.store.ns[i].size)
                c.store.ns[i].mem = NULL

    def __dealloc__(self):
        cdef mdl_ctrl *c = self.c
        cdef uint32_t v
        if c == NULL:
            return
        if self.running:
            mdl_store_int(&c.stop, 1)
            mdl_eventfd_signal(c.kick_fd)
            mdl_pthread_join(self.thread, NULL)
            self.running = False
        if not self.closed:
            self.closed = True
            try:
                self._close_store()
            except BaseException:
                pass
        if c.irq_fds != NULL:
            for v in range(c.nvec):
                if c.irq_fds[v] >= 0:
                    mdl_close(c.irq_fds[v])
        if c.kick_fd >= 0:
            mdl_close(c.kick_fd)
        if c.lock_ok:
            mdl_mutex_destroy(&c.lock)
        free(c.sq)
        free(c.cq)
        free(c.irq_fds)
        free(c.irq_pending)
        free(c.iv_cd)
        free(c.scratch)
        free(c.abuf)
        free(c.held)
        free(c.iol.iov)
        free(c)
        self.c = NULL

    # --- host-side hooks ---

    def irq_fd(self, uint32_t vector):
        """The eventfd written (value 1) after CQEs were posted to a CQ with
        interrupts enabled on ``vector``; the admin CQ uses vector 0."""
        if vector >= self.c.nvec:
            raise ValueError(f"interrupt vector {vector} outside 0..{self.c.nvec - 1}")
        return self.c.irq_fds[vector]

    def notifier(self):
        """(address of the uint32 idle flag, kick eventfd).  After a doorbell or
        register write: full fence, read the flag, and if it is 1 write 1 to
        the eventfd."""
        return <uintptr_t>&self.c.idle, self.c.kick_fd

    def kick(self):
        """Wake the controller thread (after register writes or doorbells)."""
        mdl_eventfd_signal(self.c.kick_fd)

    @property
    def idle(self):
        return bool(mdl_load_u32(&self.c.idle))

    # --- fault injection ---

    def inject(self, uint8_t opcode, *, bint admin=False, uint32_t nsid=0, uint64_t lba_start=0,
               uint64_t lba_end=0xFFFFFFFFFFFFFFFF, uint64_t nth=1, uint64_t count=1,
               str action="fail", uint32_t sct=0, uint32_t sc=0x06, bint dnr=False,
               uint32_t delay_ms=0):
        """Arm a fault: the ``nth`` matching command from now on, and then
        ``count`` consecutive matches in all (0 = every later match), is failed
        with (sct, sc, dnr), dropped (never completed, still outstanding for
        Abort and CID conflicts), or delayed (executed now, completed
        ``delay_ms`` later).  Matching: opcode on the admin or I/O queues,
        nsid (0 = any), and for LBA commands an overlap with
        [lba_start, lba_end].  Returns the rule id."""
        if action not in _ACTIONS:
            raise ValueError(f"action must be one of {sorted(_ACTIONS)}, not {action!r}")
        if nth < 1:
            raise ValueError("nth counts from 1")
        if sct > 7 or sc > 0xFF:
            raise ValueError("sct is 0..7 and sc 0..255")
        if action == "fail" and sct == 0 and sc == 0:
            raise ValueError("a failure needs a non-zero status")
        if lba_end < lba_start:
            raise ValueError("lba_end < lba_start")
        cdef mdl_ctrl *c = self.c
        cdef int i, slot = -1
        cdef uint32_t rid
        with nogil:
            mdl_mutex_lock(&c.lock)
        for i in range(MDL_MAX_RULES):
            if not c.rules[i].active:
                slot = i
                break
        if slot < 0:
            mdl_mutex_unlock(&c.lock)
            raise RuntimeError(f"at most {MDL_MAX_RULES} fault rules may be armed")
        c.next_rule_id += 1
        rid = c.next_rule_id
        memset(&c.rules[slot], 0, sizeof(mdl_rule))
        c.rules[slot].id = rid
        c.rules[slot].admin = admin
        c.rules[slot].opc = opcode
        c.rules[slot].nsid = nsid
        c.rules[slot].lba_start = lba_start
        c.rules[slot].lba_end = lba_end
        c.rules[slot].nth = nth
        c.rules[slot].count = count
        c.rules[slot].action = _ACTIONS[action]
        c.rules[slot].st = (sct << 8) | sc | (MST_DNR if dnr else 0)
        c.rules[slot].delay_ns = <uint64_t>delay_ms * 1000000
        c.rules[slot].active = 1
        mdl_store_int(&c.nrules, c.nrules + 1)
        mdl_mutex_unlock(&c.lock)
        return rid

    def clear_faults(self):
        """Disarm every fault rule (held commands stay held)."""
        cdef mdl_ctrl *c = self.c
        cdef int i
        with nogil:
            mdl_mutex_lock(&c.lock)
            for i in range(MDL_MAX_RULES):
                c.rules[i].active = 0
            mdl_store_int(&c.nrules, 0)
            mdl_mutex_unlock(&c.lock)

    def faults(self):
        """Armed rules as dicts (id, opcode, admin, action, seen, fired)."""
        cdef mdl_ctrl *c = self.c
        out = []
        with nogil:
            mdl_mutex_lock(&c.lock)
        for i in range(MDL_MAX_RULES):
            if c.rules[i].active:
                out.append({"id": c.rules[i].id, "opcode": c.rules[i].opc,
                            "admin": bool(c.rules[i].admin), "seen": c.rules[i].seen,
                            "fired": c.rules[i].fired,
                            "action": {ACT_FAIL: "fail", ACT_DROP: "drop",
                                       ACT_DELAY: "delay"}[c.rules[i].action]})
        mdl_mutex_unlock(&c.lock)
        return out

    cdef _wait_for(self, int *flag, int value, double timeout):
        deadline = _time.monotonic() + timeout
        while self.running and mdl_load_int(flag) != value:
            mdl_eventfd_signal(self.c.kick_fd)
            if _time.monotonic() > deadline:
                raise TimeoutError("the controller model thread did not respond")
            _time.sleep(0.0002)

    def set_fatal(self):
        """Controller fatal status: CSTS.CFS = 1 and nothing is processed until
        the host resets the controller (CC.EN 1 -> 0).  Returns once CFS shows."""
        mdl_store_int(&self.c.fatal_req, 1)
        mdl_eventfd_signal(self.c.kick_fd)
        deadline = _time.monotonic() + 5.0
        while self.running and not (self.regs.read32(NVME_REG_CSTS) & CSTS_CFS):
            if _time.monotonic() > deadline:
                raise TimeoutError("the controller model thread did not respond")
            _time.sleep(0.0002)

    def hang(self, bint on=True):
        """Stop fetching and posting (``on``), or resume.  Registers stay live;
        a reset (CC.EN 1 -> 0) also ends the hang.  Returns once the thread
        has taken the new state."""
        mdl_store_int(&self.c.hang_req, on)
        self._wait_for(&self.c.hung, on, 5.0)

    # --- inspection ---

    @property
    def namespaces(self):
        cdef mdl_ctrl *c = self.c
        return [{"nsid": i + 1, "size": c.store.ns[i].size,
                 "lba_size": 1 << c.store.ns[i].lba_shift, "nlba": c.store.ns[i].nlba,
                 "lbaf": c.store.ns[i].lbaf, "attached": bool(c.store.ns[i].attached)}
                for i in range(c.store.nns) if c.store.ns[i].size]

    @property
    def capacity(self):
        """(NVM capacity, unallocated capacity) in bytes, as Identify
        Controller reports them (TNVMCAP, UNVMCAP)."""
        cdef uint64_t unalloc = 0
        mdl_store_place(&self.c.store, 0, &unalloc)
        return self.c.store.capacity, unalloc

    @property
    def namespace_path(self):
        """The image file backing the namespaces, or None for memory."""
        return self.image_path

    @property
    def max_io_queues(self):
        return self.c.nq

    @property
    def sgls(self):
        """Identify Controller SGLS as reported."""
        return self.c.sgls

    @property
    def csts(self):
        return self.regs.read32(NVME_REG_CSTS)

    def stats(self):
        cdef mdl_ctrl *c = self.c
        return {
            "admin_commands": {i: c.admin_ops[i] for i in range(256) if c.admin_ops[i]},
            "io_commands": {i: c.io_ops[i] for i in range(256) if c.io_ops[i]},
            "fetched": c.fetched, "completed": c.completed, "errors": c.errors,
            "error_log_entries": c.error_count, "media_errors": c.media_errors,
            "resets": c.resets, "shutdowns": c.shutdowns, "enable_failures": c.enable_failures,
            "bytes_read": c.bytes_read, "bytes_written": c.bytes_written,
            "host_read_commands": c.host_reads, "host_write_commands": c.host_writes,
            "invalid_doorbell_writes": c.invalid_doorbells, "interrupts": c.interrupts,
            "injected_failures": c.inj_fail, "injected_drops": c.inj_drop,
            "injected_delays": c.inj_delay, "aborted": c.aborted, "aborts": c.admin_ops[0x08],
            "cid_conflicts": c.cid_conflicts, "cq_full_stalls": c.cq_full_stalls,
            "held": c.nheld, "sleeps": c.sleeps, "power_cycles": c.store.power_cycles,
            "ready": bool(c.ready), "fatal": bool(c.fatal), "hung": bool(mdl_load_int(&c.hung)),
            "shadow_doorbells": bool(c.dbbuf),
            "busy_ns": c.busy_ns,
        }
