# Lanes: the mount's data path, one per CPU.
#
# A lane is one native thread pinned to its CPU, with its own FUSE channel
# (a /dev/fuse fd cloned from the session's) and its own NVMe I/O queue
# pair.  It reads a request, builds the NVMe command(s) for it (lane_io.pyx),
# submits, reaps its queue's completions and writes the FUSE reply on the
# channel the request came from -- all in C, never taking the GIL.  Its
# buffers are DMA memory, so a write's data is where its command reads it
# from, and a read's data lands where the reply is sent from.
#
#   /dev/fuse channel --read--> lane --submit--> SQ     controller
#          ^                     |  <--reap----  CQ <-- (interrupt eventfd)
#          +------reply----------+
#
# With FUSE over io_uring (lane_uring.pyx) the lane takes its requests from
# ring entries on its CPU's kernel queue instead, and answers with each
# entry's commit; /dev/fuse is still read (FORGET, INTERRUPT, a fallback).
#
# What a lane does not serve -- every request other than READ, WRITE,
# FALLOCATE, FLUSH and FSYNC -- it hands to pyfuse3 through the forwarder
# (_core/fuseshim/forward.c), which answers it on the same channel.
#
# A request from a thread pinned away from this lane's CPU is handed to
# the lane on that thread's CPU (inbox ring) with its buffer, which comes
# back once answered (return ring); /dev/fuse gives a request to whichever
# channel reads first, so this is how "the lane of the caller's CPU" holds.
#
# The control plane (trio, nvmefs/lanes.py) talks to a lane only by
# message: a mailbox it writes and the lane acknowledges (quiesce before a
# reset disables the controller, attach a new queue pair after it, fail
# for good, stop), and an event ring the lane fills (command failures with
# their status, retries, timeouts) and trio drains.  Nothing is shared per
# request; the few counters trio reads for stats are plain integers.

from libc.stdint cimport int16_t
from posix.uio cimport iovec, writev

cdef extern from "lane_sys.h" nogil:
    ctypedef struct lane_ring:
        pass
    ctypedef unsigned long lane_pthread "pthread_t"
    int lane_ring_init(lane_ring *r, uint32_t capacity, uint32_t esize)
    void lane_ring_free(lane_ring *r)
    int lane_ring_push(lane_ring *r, const void *e)
    int lane_ring_pop(lane_ring *r, void *e)
    int lane_ring_ready(lane_ring *r)
    uint32_t lane_load32(const uint32_t *p)
    uint32_t lane_dec32(uint32_t *p)
    uint32_t lane_inc32(uint32_t *p)
    int lane_dec32_above(uint32_t *p, uint32_t floor)
    void lane_store32(uint32_t *p, uint32_t v)
    uint64_t lane_load64(const uint64_t *p)
    void lane_store64(uint64_t *p, uint64_t v)
    void lane_wake(int fd)
    void lane_drain(int fd)
    int lane_thread_start(lane_pthread *t, void *(*fn)(void *) noexcept nogil, void *arg, int cpu)
    int lane_thread_join(lane_pthread t)
    int lane_current_cpu()
    int lane_route_tid(int tid, int self_cpu, const int16_t *lane_of_cpu, int ncpu)
    int lane_fuse_clone(int session_fd)
    int lane_eventfd()

cdef extern from "lane_uring.h" nogil:
    ctypedef struct lu_ring:
        int ok
        unsigned pending
    struct lu_ent_in_out:
        uint64_t commit_id
        uint32_t payload_sz
    struct lu_req_header:
        char in_out[128]
        char op_in[128]
        lu_ent_in_out ent
    enum:
        LU_CMD_REGISTER
        LU_CMD_COMMIT_AND_FETCH
    int lu_init(lu_ring *r, unsigned entries, int fuse_fd)
    int lu_fd(lu_ring *r)
    int lu_prep(lu_ring *r, unsigned cmd, uint64_t user, iovec *iov, uint16_t qid, uint64_t commit_id)
    int lu_submit(lu_ring *r)
    int lu_peek(lu_ring *r, uint64_t *user, int *res)
    unsigned lu_ready(lu_ring *r)
    void lu_exit(lu_ring *r)

cdef extern from "<linux/fuse.h>" nogil:
    enum:
        FUSE_FORGET
        FUSE_READ
        FUSE_WRITE
        FUSE_FSYNC
        FUSE_FLUSH
        FUSE_INTERRUPT
        FUSE_BATCH_FORGET
        FUSE_FALLOCATE
        FUSE_GETXATTR
        FUSE_WRITE_CACHE
    struct fuse_in_header:
        uint32_t len
        uint32_t opcode
        uint64_t unique
        uint64_t nodeid
        uint32_t uid
        uint32_t gid
        uint32_t pid
    struct fuse_read_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
    struct fuse_write_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
        uint32_t write_flags
    struct fuse_fallocate_in:
        uint64_t fh
        uint64_t offset
        uint64_t length
        uint32_t mode
    struct fuse_interrupt_in:
        uint64_t unique
    struct fuse_out_header:
        uint32_t len
        int32_t error
        uint64_t unique
    struct fuse_write_out:
        uint32_t size
        uint32_t padding

from posix.unistd cimport read as posix_read
from libc.errno cimport EIO, EINTR, ENODEV, ENODATA, ENOENT, ENOSPC, ENOSYS, EINVAL, EAGAIN, EBUSY, EOPNOTSUPP, ENOTCONN

import os as _os
import socket as _socket

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "<time.h>" nogil:
    struct lane_timespec "timespec":
        long tv_sec
        long tv_nsec
    int lane_clock_gettime "clock_gettime"(int clk, lane_timespec *ts)
    enum: LANE_CLOCK_REALTIME "CLOCK_REALTIME"

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef enum:
    LANE_MAX_NSID = 1024        # Identify CNS 02h lists at most 1024 namespaces
    LANE_MAX_LANES = 1024
    LANE_MAX_CPUS = 4096
    LANE_HDR_ROOM = 4096        # a request's headers, before an RMW write's data
    LANE_ROUTE_CACHE = 256
    LANE_EVENTS = 1024
    LANE_NONE = 0xFFFFFFFF
    LANE_BUFFERLESS = 256       # request slots beyond the buffers (flushes)

# control mailbox commands (trio -> lane)
cdef enum:
    CTL_NONE = 0
    CTL_QUIESCE = 1             # stop touching the queue pair: a reset disables the controller
    CTL_ATTACH = 2              # serve on the queue pair in next_qp
    CTL_FAIL = 3                # the controller is gone for good: answer EIO
    CTL_STOP = 4                # stop reading; answer what is in flight; end the thread
    CTL_NAMESPACES = 5          # serve the namespace table in next_ns from now on

# event ring records (lane -> trio)
cdef enum:
    EV_ACK = 1                  # a control command is done (seq in nlb)
    EV_ERROR = 2                # a command failed for good; its request ends with err
    EV_RETRY = 3                # a command failed with a status the rule retries
    EV_TIMEOUT = 4              # a command is past the timeout (abort it)
    EV_TIMEOUT2 = 5             # ... and past twice the timeout (reset)
    EV_EXIT = 6                 # the thread ended (err: 0 or -errno of its last read)
    EV_LOST = 7                 # events were dropped: the ring was full (nlb: how many)

cdef struct lane_event:
    uint8_t kind
    uint8_t opcode
    uint8_t attempt
    uint8_t fuse_op
    uint16_t lane
    uint16_t qid
    uint16_t cid
    uint16_t status
    int32_t err
    uint32_t nsid
    uint32_t nlb
    uint64_t lba
    uint64_t unique
    uint64_t gen

cdef struct lane_ns:
    uint32_t nsid               # 0: no such namespace
    uint32_t lba_shift
    uint64_t nlbas
    uint64_t size
    uint32_t wz_lbas            # Write Zeroes per command (WZSL, NLB), 0: no Write Zeroes
    uint32_t dsm                # Dataset Management deallocate reads as zeroes
    uint32_t dsm_ranges         # DMRL
    uint64_t dsm_range_lbas     # DMRSL
    uint64_t dsm_lbas           # DMSL (0: no limit)

cdef struct lane_xfer:          # a request (its buffer) handed between lanes
    uint8_t *buf
    uint32_t len
    int32_t reply_fd
    uint32_t home
    uint32_t bufidx

cdef enum:
    RE_IDLE = 0                 # not registered (yet)
    RE_KERNEL = 1               # registered or committed: the kernel's
    RE_BUSY = 2                 # holds a request this lane serves
    RE_FWD = 3                  # holds a request pyfuse3 serves (its reply comes by reply_r)
    RE_DEAD = 4                 # ended (connection gone, or REGISTER refused)
    URING_OFF = 0               # the lanes read every request from /dev/fuse
    URING_PENDING = 1           # rings built, FUSE_INIT not answered yet
    URING_GO = 2                # INIT said io_uring: register the entries
    URING_DECLINED = 3          # the kernel did not offer it: /dev/fuse only

cdef struct lane_rent:          # one FUSE io_uring entry
    lu_req_header *hdr
    iovec iov[2]                # the header, and the payload (DMA memory)
    uint64_t iova               # the payload's bus address
    uint64_t unique
    uint64_t commit_id
    uint16_t qid
    uint8_t state
    uint8_t last_cmd

cdef struct lane_route_entry:
    uint32_t tid
    int32_t target
    uint64_t expires

cdef struct lane_delayed:       # a command waiting to be submitted again
    uint32_t slot
    uint32_t idx
    uint8_t phase
    uint8_t attempt
    uint64_t due

cdef struct lane_backlog:       # a data request read while no DMA buffer was free
    lane_backlog *next
    uint32_t len
    int32_t reply_fd
    uint8_t data[1]


# request kinds and states (lane_io.pyx)
cdef enum:
    K_READ = 1
    K_WRITE = 2                 # LBA-aligned: the command points into the request
    K_RMW = 3                   # unaligned: edge LBAs read, data moved, one write
    K_FALLOC = 4
    K_FLUSH = 5

cdef enum:
    S_FREE = 0
    S_RANGE = 1                 # waits for its LBA range
    S_RUN = 2                   # commands queued or at the controller

cdef struct lreq:
    uint64_t unique
    uint64_t nodeid
    uint8_t *buf
    uint64_t iova
    int32_t reply_fd
    uint32_t home               # lane whose buffer this is
    uint32_t bufidx             # its index there
    uint32_t link               # next in the FIFO it sits in (waitq, rangeq)
    uint8_t kind
    uint8_t state
    uint8_t phase
    uint8_t nedge               # partial LBAs read back (RMW, fallocate): 0..2
    uint8_t punch               # fallocate: deallocate as well as zero
    uint8_t method              # fallocate: how whole LBAs are zeroed (M_*)
    uint8_t queued              # on the waitq
    uint8_t fuse_op
    uint8_t ranged              # holds [first, first + count) in its namespace's RangeSet
    uint8_t lost                # had commands at the controller when a reset began
    uint8_t quarantine          # ... which could not be disabled: never reuse its buffer
    uint8_t past_end            # a writeback write cut at the end: ENOSPC once written
    int32_t err                 # errno it ends with once nothing is in flight (0: none)
    uint32_t nsid
    uint32_t shift
    uint64_t first              # LBAs it covers (held in the range lock for writes)
    uint64_t count
    uint64_t off                # byte offset asked for
    uint64_t mid_a              # fallocate: the whole LBAs
    uint64_t mid_b
    uint64_t edge_lba[2]
    uint32_t skip               # read: the window's offset in the data
    uint32_t size               # read: bytes answered; write: bytes written
    uint32_t data_off           # write: where the data starts in buf
    uint32_t per                # LBAs per command of the current phase
    uint32_t ncmds              # commands of the current phase
    uint32_t next               # the first not yet submitted
    uint32_t pending            # at the controller
    uint32_t delayed            # waiting in the delayed list
    uint32_t cap                # most commands at the controller at once (0: no limit)


cdef struct lane_t:
    uint32_t id
    int32_t cpu
    uint32_t nlanes
    int32_t fd                  # this lane's /dev/fuse channel
    int32_t wake_fd             # eventfd: mailbox, inbox, returns, range waits
    int32_t irq_fd              # the queue's interrupt eventfd (-1: polled)
    uint16_t qid                # its queue pair's id
    uint16_t next_qid
    void *qp                    # QueuePair (a borrowed reference: LaneSet keeps it)
    void *shared                # the LaneSet
    lane_shared *sh
    lane_pthread thread
    bint running
    bint attached               # submitting and reaping
    bint failed                 # the controller is gone: data requests get EIO
    bint reading                # takes requests from /dev/fuse
    bint stopping
    bint abandon                # LaneSet is going away: leave at once
    bint own_fd                 # close fd when the thread has ended
    int32_t exit_err
    uint64_t gen                # attach generation (events carry it)
    uint64_t spin_ns
    uint64_t max_transfer
    uint64_t timeout_ns
    uint32_t retries
    uint64_t crdt_ns[3]         # Command Retry Delay Times (Identify Controller CRDT1..3)
    uint32_t page_size
    uint8_t *wakebuf            # nlanes bytes: whom a range given back wakes
    # buffers this lane reads requests into (DMA memory)
    uint8_t *bufmem
    uint64_t bufiova
    size_t stride
    size_t readsize
    uint32_t nbuf
    uint32_t *freebuf
    uint32_t nfreebuf
    uint8_t *spare              # read into while no DMA buffer is free (malloc)
    lane_backlog *bl_head
    lane_backlog *bl_tail
    uint32_t nbacklog
    # request slots
    lreq *req
    uint32_t nreq
    uint32_t *freereq
    uint32_t nfreereq
    uint32_t active             # requests in slots
    uint32_t inflight           # commands at the controller
    uint32_t wq_head            # FIFO of requests with commands to submit
    uint32_t wq_tail
    uint32_t rq_head            # FIFO of requests waiting for their range
    uint32_t rq_tail
    uint32_t range_wait         # set by another lane: a range came back
    lane_delayed *dl
    uint32_t ndl
    uint32_t dlcap
    # sleeping: another thread that gives this lane work writes wake_fd
    # only when this is set (store, full fence, load on both sides)
    uint32_t sleeping
    # mailbox (trio -> lane)
    uint32_t ctl_seq
    uint32_t ctl_cmd
    uint32_t ctl_done
    void *next_qp
    int32_t next_irq
    uint64_t next_gen
    lane_ns *next_ns
    lane_ns *ns                 # the namespace table in use (LaneSet.ns_tables)
    # events (lane -> trio)
    lane_ring events
    uint32_t events_lost
    lane_route_entry route[LANE_ROUTE_CACHE]
    uint64_t now                # the loop's clock, ns
    uint64_t next_timeout_check
    # counters (stats: trio reads them as they are)
    uint64_t n_read, n_write, n_rmw, n_falloc, n_flush, n_empty, n_forwarded, n_handed_in, n_handed_out
    uint64_t n_xattr_none
    uint64_t n_interrupts, n_commands, n_split, n_retries, n_errors, n_lost, n_range_waits, n_sq_waits
    uint64_t n_buffer_waits, n_spun, n_reply_errors, n_timeouts, n_sleeps, n_received
    uint64_t n_quarantined
    uint64_t bytes_read, bytes_written
    uint32_t max_active
    # FUSE over io_uring (lane_uring.pyx): one ring, with entries for the
    # queue of this lane's CPU and of CPUs no lane runs on
    lu_ring uring
    lane_rent *ents
    uint32_t nent
    uint32_t nent_alive         # registered and not ended
    uint8_t registered
    int32_t reply_r             # pyfuse3's replies to ring requests (socketpair)
    int32_t reply_w
    uint8_t *fwdbuf             # a ring request put together for pyfuse3
    uint8_t *rbuf               # a reply of pyfuse3's, read from reply_r
    uint32_t rbuf_size
    int32_t register_err        # the first REGISTER failure (-errno)
    uint32_t nfwd               # entries whose request pyfuse3 holds
    uint8_t conn_gone           # the connection ended (ENODEV, ENOTCONN): nothing more can be answered
    uint8_t fuse_readable       # poll() saw the /dev/fuse channel readable
    uint8_t fuse_away           # not polling /dev/fuse (lane_send_idle_away)
    uint32_t go_away            # set by a lane that read FUSE_CHECK_EVERY requests while this one kept none
    uint32_t away_ms            # how long an away lane sleeps before it reads again
    uint32_t since_check        # requests read since this lane last looked at the others
    uint64_t *seen              # [nlanes]: each lane's lane_kept() at that look
    uint64_t n_routed           # requests read here and handed to the lane of their caller's CPU
    uint64_t n_fuse_away
    uint32_t fuse_skip          # loop turns since /dev/fuse was last read (rings active)
    uint64_t n_ring_requests, n_ring_commits, n_ring_forwarded, n_ring_ended, n_register_errors
    uint64_t n_ring_reply_misses, n_commit_errors


cdef struct lane_shared:
    uint32_t nlanes
    lane_t **lanes
    lane_ring *inbox            # [to * nlanes + from]
    lane_ring *returns          # [to * nlanes + from]
    int16_t *lane_of_cpu
    int32_t ncpu
    int32_t event_fd            # trio waits on it
    void **ranges               # per nsid: RangeSet (borrowed; LaneSet.range_objs)
    uint64_t *mtime             # per nsid: wall-clock ns of the last write answered
    uint8_t *zero_buf           # zeroes for fallocate without Write Zeroes (DMA memory)
    uint64_t zero_iova
    uint32_t zero_len
    uint32_t max_lba            # the largest LBA the buffers leave room for
    uint32_t readers            # lanes still reading /dev/fuse: while any is, one may hand over
    uint32_t watchers           # reading lanes that poll /dev/fuse (not fuse_away): never 0 while any reads
    # non-data requests go to pyfuse3 (fuseshim forward.c); NULL: ENOSYS
    int (*forward)(const void *req, size_t len, int reply_fd) noexcept nogil
    int (*forwarded)(uint64_t unique) noexcept nogil
    uint32_t uring_state        # URING_*
    uint32_t uring_fault        # tests: REGISTER with a payload the kernel refuses
    uint32_t nqid               # the rings' queues: every possible CPU
    uint64_t *qid_requests      # per qid: requests fetched (written by its lane only)
    uint64_t *qid_reads


cdef inline uint64_t lane_wall_ns() noexcept nogil:
    cdef lane_timespec ts
    lane_clock_gettime(LANE_CLOCK_REALTIME, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


# -- replies --------------------------------------------------------------------------

cdef void lane_reply(lane_t *ln, int fd, uint64_t unique, int err, const void *data, size_t n) noexcept nogil:
    """One FUSE answer: fuse_out_header + data in one writev, on the
    channel the request was read from."""
    cdef fuse_out_header h
    cdef iovec iov[2]
    if fd <= -2:
        # a request that came on this lane's ring: the answer is its entry's commit
        lane_ring_commit(ln, <uint32_t>(-2 - fd), unique, err, data, n)
        return
    h.len = <uint32_t>(sizeof(fuse_out_header) + n)
    h.error = -err
    h.unique = unique
    iov[0].iov_base = &h
    iov[0].iov_len = sizeof(fuse_out_header)
    iov[1].iov_base = <void *>data
    iov[1].iov_len = n
    while writev(fd, iov, 2 if n else 1) < 0:
        if errno != EINTR:
            # ENOENT: the kernel gave up on the request (interrupted);
            # ENODEV: the connection is gone.  Nobody waits for it.
            ln.n_reply_errors += 1
            break


# -- events to the control plane -----------------------------------------------------

cdef void lane_post(lane_t *ln, uint8_t kind, lreq *r, uint16_t qid, uint16_t cid, uint8_t opcode,
                    uint16_t status, uint8_t attempt, int32_t err, uint64_t lba, uint32_t nlb) noexcept nogil:
    cdef lane_event e
    memset(&e, 0, sizeof(e))
    e.kind = kind
    e.lane = <uint16_t>ln.id
    e.qid = qid
    e.cid = cid
    e.opcode = opcode
    e.status = status
    e.attempt = attempt
    e.err = err
    e.lba = lba
    e.nlb = nlb
    e.gen = ln.gen
    if r != NULL:
        e.nsid = r.nsid
        e.unique = r.unique
        e.fuse_op = r.fuse_op
    if not lane_ring_push(&ln.events, &e):
        ln.events_lost += 1         # nvmefs stats shows it; the request itself is still answered
        return
    lane_wake(ln.sh.event_fd)


# -- buffers and slots ------------------------------------------------------------------

cdef inline uint8_t *lane_buf(lane_t *ln, uint32_t i) noexcept nogil:
    return ln.bufmem + <size_t>i * ln.stride

cdef void lane_give_buffer(lane_t *ln, uint32_t home, uint32_t bufidx) noexcept nogil:
    """A buffer is free again: back to this lane's list, or to its home
    lane's through the return ring."""
    cdef lane_t *h
    cdef lane_xfer x
    if home == ln.id:
        ln.freebuf[ln.nfreebuf] = bufidx
        ln.nfreebuf += 1
        return
    h = ln.sh.lanes[home]
    x.buf = NULL
    x.len = 0
    x.reply_fd = -1
    x.home = home
    x.bufidx = bufidx
    # the ring holds every buffer its home has: it cannot be full
    lane_ring_push(&ln.sh.returns[home * ln.sh.nlanes + ln.id], &x)
    nvmefs_mb()
    if lane_load32(&h.sleeping):
        lane_wake(h.wake_fd)


cdef void lane_free_slot(lane_t *ln, uint32_t slot) noexcept nogil:
    cdef lreq *r = &ln.req[slot]
    if r.bufidx != LANE_NONE:
        lane_give_buffer(ln, r.home, r.bufidx)
    r.state = S_FREE
    r.buf = NULL
    ln.freereq[ln.nfreereq] = slot
    ln.nfreereq += 1
    ln.active -= 1


cdef inline void fifo_push(lane_t *ln, uint32_t *head, uint32_t *tail, uint32_t slot) noexcept nogil:
    ln.req[slot].link = LANE_NONE
    if tail[0] == LANE_NONE:
        head[0] = slot
    else:
        ln.req[tail[0]].link = slot
    tail[0] = slot


# -- the thread ---------------------------------------------------------------------------

DEF FUSE_CHECK_EVERY = 32       # requests a lane reads before it looks for idle lanes (lane_send_idle_away)
DEF AWAY_MS_MAX = 128           # the longest an away lane sleeps before it reads /dev/fuse again

cdef void *lane_main(void *arg) noexcept nogil:
    cdef lane_t *ln = <lane_t *>arg
    lane_loop(ln)
    # the kernel cancels the entries it still holds (none after an unmount:
    # each ended with -ENOTCONN)
    lu_exit(&ln.uring)
    lane_post(ln, EV_EXIT, NULL, 0, 0, 0, 0, 0, ln.exit_err, 0, 0)
    return NULL


cdef void lane_loop(lane_t *ln) noexcept nogil:
    cdef ssize_t n
    cdef uint8_t *into
    cdef uint32_t bi
    cdef bint progress
    while True:
        ln.now = nvmefs_now_ns()
        if ln.abandon:
            return
        lane_control(ln)
        progress = lane_take_handed(ln)
        if ln.nent:
            if lane_uring_step(ln):
                progress = True
        if ln.attached:
            if lane_reap(ln):
                progress = True
            if ln.ndl:
                lane_retry_due(ln)
            if ln.wq_head != LANE_NONE:
                lane_submit_waiting(ln)
            if ln.now >= ln.next_timeout_check:
                lane_check_timeouts(ln)
        if lane_load32(&ln.range_wait):
            lane_store32(&ln.range_wait, 0)
            lane_retry_ranges(ln)
        if ln.nent:
            lu_submit(&ln.uring)     # the commits this turn made, in one system call
        if ln.stopping and lane_may_end(ln):
            return
        if ln.nbacklog and ln.nfreereq and (ln.nfreebuf or lane_backlog_flush_first(ln)):
            lane_take_backlog(ln)
            continue
        if not ln.reading:
            if not progress:
                lane_wait(ln, False)
            continue
        # a DMA buffer for the next request, or the spare: then the
        # request waits (backlog) if it is a data request, but lookups,
        # opens and stats never stall behind commands in flight
        if ln.nent_alive and not ln.fuse_readable and ln.fuse_skip < 64:
            # the rings carry the requests: /dev/fuse only FORGET and
            # INTERRUPT, read when poll() says so (and now and then)
            ln.fuse_skip += 1
            if not progress:
                lane_wait(ln, True)
            continue
        ln.fuse_readable = 0
        ln.fuse_skip = 0
        if ln.nfreebuf:
            bi = ln.freebuf[ln.nfreebuf - 1]
            into = lane_buf(ln, bi)
        else:
            bi = LANE_NONE
            into = ln.spare
        n = posix_read(ln.fd, into, ln.readsize)
        if n < 0:
            if errno == EAGAIN:
                if not progress:
                    lane_wait(ln, True)
                continue
            if errno == EINTR or errno == ENOENT:      # ENOENT: interrupted before we read it
                continue
            # ENODEV: unmounted, the connection is gone.  What is in flight
            # is still answered (the writes fail harmlessly) and its
            # buffers wait for its commands before the thread ends.
            if errno == ENODEV:
                ln.conn_gone = 1
            lane_stop_reading(ln, 0 if errno == ENODEV else -errno)
            continue
        if <size_t>n < sizeof(fuse_in_header):
            lane_stop_reading(ln, -EIO)     # libfuse's "short read on fuse device"
            continue
        lane_store64(&ln.n_received, ln.n_received + 1)     # other lanes read it (lane_send_idle_away)
        lane_worked(ln)
        ln.since_check += 1
        if ln.since_check >= FUSE_CHECK_EVERY and not ln.nent_alive:
            lane_send_idle_away(ln)
        lane_dispatch(ln, into, <size_t>n, bi, ln.fd)


# /dev/fuse has one queue for all its channels, and poll() on it is not an
# exclusive wait: every lane sleeping in poll wakes for every request, and
# all but one find it empty.  With a caller at QD1 on CPU 0 the lane on
# CPU 1 woke for each request (31k context switches a second) and served
# none, and the cross-CPU wake-ups held the mount to a third of what one
# lane does there.  So a lane that read FUSE_CHECK_EVERY requests while
# another kept none (it read none, or handed each one to the lane of its
# caller's CPU, a hop more) and was handed none sends that one away: it stops
# polling /dev/fuse and reads it now and then (1 ms, doubling to 128 ms),
# and polls again as soon as it reads a request, is handed one of a caller
# on its CPU, or is the last lane left.  Under load every lane reads and all
# of them poll.  io_uring has no such race: the kernel queues a request on
# its caller's CPU (the rule is off while the rings carry the requests).
# go_away stays set while a lane is away, so the lane that sent it away
# does not wake it again at each check.
cdef void lane_send_idle_away(lane_t *ln) noexcept nogil:
    cdef uint32_t j
    cdef uint64_t r
    cdef lane_t *o
    ln.since_check = 0
    for j in range(ln.sh.nlanes):
        if j == ln.id:
            continue
        o = ln.sh.lanes[j]
        r = lane_kept(o)
        if r == ln.seen[j] and not lane_load32(&o.go_away):
            lane_store32(&o.go_away, 1)
            lane_wake(o.wake_fd)
        ln.seen[j] = r


cdef inline uint64_t lane_kept(lane_t *o) noexcept nogil:
    """What lane ``o`` served: the requests it read and kept, and those it
    was handed (a caller on its CPU).  Read by the other lanes, the three
    counts not at one instant: a request caught between them makes a lane
    look busy for one check more, which only delays a send-away."""
    cdef uint64_t routed = lane_load64(&o.n_routed)
    return lane_load64(&o.n_received) + lane_load64(&o.n_handed_in) - routed


cdef void lane_go_away(lane_t *ln) noexcept nogil:
    if ln.fuse_away:
        return
    if not ln.nent_alive and ln.reading and lane_dec32_above(&ln.sh.watchers, 0):
        ln.fuse_away = 1
        ln.away_ms = 1
        ln.n_fuse_away += 1
        return
    lane_store32(&ln.go_away, 0)    # it cannot leave (the last watcher, the rings, stopping)


cdef void lane_fuse_rejoin(lane_t *ln) noexcept nogil:
    ln.fuse_away = 0
    lane_store32(&ln.go_away, 0)
    lane_inc32(&ln.sh.watchers)


cdef inline void lane_worked(lane_t *ln) noexcept nogil:
    """It read a request or was handed one: it polls /dev/fuse again if it
    had stopped, and a send-away that came in since is stale."""
    if ln.fuse_away:
        lane_fuse_rejoin(ln)
    elif lane_load32(&ln.go_away):
        lane_store32(&ln.go_away, 0)


cdef void lane_stop_reading(lane_t *ln, int32_t err) noexcept nogil:
    cdef uint32_t k
    if ln.reading:
        ln.reading = False
        if ln.fuse_away:
            ln.fuse_away = 0
        elif lane_dec32(&ln.sh.watchers) == 0:
            # the lanes that stopped polling must watch again (or find the
            # connection gone) now, not at their next look
            for k in range(ln.sh.nlanes):
                if k != ln.id:
                    lane_wake(ln.sh.lanes[k].wake_fd)
        if lane_dec32(&ln.sh.readers) == 0:
            # the last reader: nobody hands requests over any more, and the
            # others may now end (lane_may_end)
            for k in range(ln.sh.nlanes):
                if k != ln.id:
                    lane_wake(ln.sh.lanes[k].wake_fd)
    if ln.exit_err == 0:
        ln.exit_err = err
    ln.stopping = True


cdef bint lane_may_end(lane_t *ln) noexcept nogil:
    """Nothing of this lane's is left: no request, every buffer back
    home, and no other lane can hand it one."""
    cdef uint32_t j
    if ln.active or ln.nbacklog or ln.nfreebuf != ln.nbuf or lane_load32(&ln.sh.readers):
        return False
    if ln.nfwd and not ln.conn_gone:
        return False            # pyfuse3 still owes answers that go out on this lane's ring
    for j in range(ln.sh.nlanes):
        if j != ln.id and lane_ring_ready(&ln.sh.inbox[ln.id * ln.sh.nlanes + j]):
            return False
    return True


cdef bint lane_take_handed(lane_t *ln) noexcept nogil:
    """Requests other lanes handed over, and buffers coming back."""
    cdef uint32_t j
    cdef lane_xfer x
    cdef bint got = False
    cdef lane_shared *sh = ln.sh
    if sh.nlanes == 1:
        return False
    for j in range(sh.nlanes):
        if j == ln.id:
            continue
        while lane_ring_pop(&sh.returns[ln.id * sh.nlanes + j], &x):
            ln.freebuf[ln.nfreebuf] = x.bufidx
            ln.nfreebuf += 1
            got = True
        while ln.nfreereq and lane_ring_pop(&sh.inbox[ln.id * sh.nlanes + j], &x):
            lane_store64(&ln.n_handed_in, ln.n_handed_in + 1)  # read by lane_send_idle_away
            # a caller on this lane's CPU: its next requests are better
            # read here than handed over
            lane_worked(ln)
            if x.home == LANE_NONE:
                lane_backlog_link(ln, <lane_backlog *>x.buf)
            else:
                lane_serve(ln, x.buf, x.len, x.home, x.bufidx, x.reply_fd)
            got = True
    return got


cdef bint lane_work_waiting(lane_t *ln) noexcept nogil:
    """Something another thread gave this lane since it last looked."""
    cdef uint32_t j
    cdef lane_shared *sh = ln.sh
    if lane_load32(&ln.ctl_seq) != ln.ctl_done or lane_load32(&ln.range_wait):
        return True
    for j in range(sh.nlanes):
        if j != ln.id and (lane_ring_ready(&sh.returns[ln.id * sh.nlanes + j])
                           or lane_ring_ready(&sh.inbox[ln.id * sh.nlanes + j])):
            return True
    return False


cdef void lane_wait(lane_t *ln, bint want_fuse) noexcept nogil:
    """Sleep until /dev/fuse (want_fuse and a buffer to read into), a
    completion, a message or a timer needs the thread."""
    cdef pollfd p[5]
    cdef int np = 0, timeout = -1
    cdef uint64_t start, now, due
    cdef bint busy = ln.attached and ln.inflight > 0
    cdef uint32_t i
    if busy:
        # hybrid polling: a command usually completes within microseconds,
        # sooner than this thread would be woken
        if (<QueuePair>ln.qp).cq_ready():
            return
        if ln.spin_ns:
            start = nvmefs_now_ns()
            while True:
                now = nvmefs_now_ns()
                if now - start >= ln.spin_ns:
                    break
                spin_pause(now - start)
                if (<QueuePair>ln.qp).cq_ready():
                    ln.n_spun += 1
                    return
        if ln.irq_fd >= 0:
            # drain, then look once more: a completion posted after the
            # look signals the eventfd again, so the poll cannot miss it
            lane_drain(ln.irq_fd)
            if (<QueuePair>ln.qp).cq_ready():
                return
            p[np].fd = ln.irq_fd
            p[np].events = POLLIN
            np += 1
        else:
            timeout = 0         # a polled queue: nothing signals it, watch it
    cdef int fuse_at = -1, away = -1
    if lane_load32(&ln.go_away):
        lane_go_away(ln)
    if want_fuse and ln.fuse_away:
        if ln.nent_alive or lane_load32(&ln.sh.watchers) == 0:
            lane_fuse_rejoin(ln)
        else:
            want_fuse = False
            away = <int>ln.away_ms
            if ln.away_ms < AWAY_MS_MAX:
                ln.away_ms *= 2
    if want_fuse:
        fuse_at = np
        p[np].fd = ln.fd
        p[np].events = POLLIN
        p[np].revents = 0
        np += 1
    p[np].fd = ln.wake_fd
    p[np].events = POLLIN
    np += 1
    if ln.nent and lu_fd(&ln.uring) >= 0:
        p[np].fd = lu_fd(&ln.uring)
        p[np].events = POLLIN
        np += 1
        p[np].fd = ln.reply_r
        p[np].events = POLLIN
        np += 1
    if timeout < 0:
        due = 0
        if ln.ndl:
            due = ln.dl[0].due
            for i in range(1, ln.ndl):
                if ln.dl[i].due < due:
                    due = ln.dl[i].due
        if busy and (due == 0 or ln.next_timeout_check < due):
            due = ln.next_timeout_check
        if due:
            now = nvmefs_now_ns()
            timeout = 0 if due <= now else <int>((due - now) // 1000000) + 1
    if away >= 0 and (timeout < 0 or timeout > away):
        timeout = away
    lane_store32(&ln.sleeping, 1)
    nvmefs_mb()
    if lane_work_waiting(ln) or (ln.nent and (lu_ready(&ln.uring) or ln.uring.pending)):
        lane_store32(&ln.sleeping, 0)
        return
    if timeout == 0 and busy and ln.irq_fd < 0:
        sched_yield()
    else:
        ln.n_sleeps += 1
        poll(p, np, timeout)
        if fuse_at >= 0 and p[fuse_at].revents:
            ln.fuse_readable = 1
    lane_store32(&ln.sleeping, 0)
    lane_drain(ln.wake_fd)


# -- the mailbox ----------------------------------------------------------------------------

cdef void lane_control(lane_t *ln) noexcept nogil:
    cdef uint32_t seq = lane_load32(&ln.ctl_seq)
    cdef uint32_t cmd, i
    cdef lreq *r
    if seq == ln.ctl_done:
        return
    cmd = ln.ctl_cmd
    if cmd == CTL_QUIESCE:
        # The controller is about to be disabled: what is at it is lost.
        # Each running request starts its current phase again on the next
        # queue (reads and writes are idempotent under the range lock),
        # and nothing touches this queue pair again.
        ln.attached = False
        for i in range(ln.nreq):
            r = &ln.req[i]
            if r.state == S_RUN:
                if r.pending:
                    r.lost = 1
                    ln.n_lost += 1
                r.pending = 0
                r.delayed = 0
                r.next = 0
                lane_enqueue(ln, i, False)
        ln.ndl = 0
        ln.inflight = 0
        ln.qp = NULL
        ln.irq_fd = -1
    elif cmd == CTL_ATTACH:
        ln.qp = ln.next_qp
        ln.irq_fd = ln.next_irq
        ln.gen = ln.next_gen
        ln.qid = ln.next_qid
        ln.ns = ln.next_ns
        ln.failed = False
        ln.attached = ln.qp != NULL
        ln.next_timeout_check = 0
        for i in range(ln.nreq):
            r = &ln.req[i]
            # the controller was disabled before it was brought up again
            r.lost = 0
            # requests of namespaces the bring-up no longer found end here
            if r.state != S_FREE and (r.nsid > LANE_MAX_NSID or ln.ns[r.nsid].nsid == 0):
                r.err = EIO
    elif cmd == CTL_FAIL:
        ln.attached = False
        ln.failed = True
        ln.qp = NULL
        ln.irq_fd = -1
        ln.ndl = 0
        ln.inflight = 0
        for i in range(ln.nreq):
            r = &ln.req[i]
            if r.state != S_FREE:
                r.pending = 0
                r.delayed = 0
                r.err = EIO
                r.queued = 0
                r.quarantine = r.lost and ln.next_irq != 0
    elif cmd == CTL_STOP:
        lane_stop_reading(ln, 0)
    elif cmd == CTL_NAMESPACES:
        # a namespace came, went or changed its LBA size while the queues
        # stayed: requests parsed from now on see the new table; ones in
        # flight finish with what the controller answers (a namespace that
        # went: Invalid Field, EIO)
        ln.ns = ln.next_ns
    lane_store32(&ln.ctl_done, seq)
    lane_post(ln, EV_ACK, NULL, 0, 0, 0, 0, 0, 0, 0, seq)
    if cmd == CTL_FAIL:
        lane_fail_all(ln)



# -- dispatch ------------------------------------------------------------------------------

cdef inline bint lane_is_data(uint32_t op) noexcept nogil:
    return (op == FUSE_READ or op == FUSE_WRITE or op == FUSE_FALLOCATE or op == FUSE_FLUSH
            or op == FUSE_FSYNC)


cdef bint lane_xattr_is_none(const uint8_t *buf, size_t n) noexcept nogil:
    """A GETXATTR of a name the mount does not have: only user.nvmefs.*
    exist (nvmefs/fusefs.py answers those)."""
    cdef size_t off = sizeof(fuse_in_header) + 8      # struct fuse_getxattr_in: size, padding
    cdef const char *prefix = b"user.nvmefs."
    cdef size_t i = 0
    if n <= off:
        return False
    while prefix[i] != 0:
        if off + i >= n or buf[off + i] != <uint8_t>prefix[i]:
            return True
        i += 1
    return False


cdef void lane_dispatch(lane_t *ln, uint8_t *buf, size_t n, uint32_t bi, int32_t reply_fd) noexcept nogil:
    """A request just read into ``buf`` (a free DMA buffer, index ``bi``,
    or the spare when bi == LANE_NONE)."""
    cdef fuse_in_header *h = <fuse_in_header *>buf
    cdef int target
    if h.len != n:
        lane_reply(ln, reply_fd, h.unique, EIO, NULL, 0)
        return
    if not lane_is_data(h.opcode):
        if h.opcode == FUSE_GETXATTR and lane_xattr_is_none(buf, n):
            # the kernel asks for security.capability before a buffered
            # write (once per attribute refresh with FUSE_HANDLE_KILLPRIV_V2,
            # forward.c), and tools ask for security.* and system.* names:
            # answered here, not a trip through Python
            ln.n_xattr_none += 1
            lane_reply(ln, reply_fd, h.unique, ENODATA, NULL, 0)
            return
        lane_forward(ln, buf, n, reply_fd)
        return
    if bi == LANE_NONE:
        # A flush needs no buffer (close() of any copy of an fd sends one:
        # it must not wait behind reads holding every buffer)
        if (h.opcode == FUSE_FLUSH or h.opcode == FUSE_FSYNC) and ln.nfreereq:
            lane_serve(ln, buf, n, ln.id, LANE_NONE, reply_fd)
        else:
            lane_backlog_push(ln, buf, n, reply_fd)
        return
    target = lane_route(ln, h.pid)
    ln.nfreebuf -= 1            # bi is the buffer on top of the list
    if target >= 0 and <uint32_t>target != ln.id:
        if lane_hand(ln, <uint32_t>target, buf, n, bi, reply_fd):
            return
    lane_serve(ln, buf, n, ln.id, bi, reply_fd)


cdef void lane_forward(lane_t *ln, uint8_t *buf, size_t n, int32_t reply_fd) noexcept nogil:
    """To pyfuse3 (a copy: the buffer stays this lane's)."""
    cdef fuse_in_header *h = <fuse_in_header *>buf
    cdef fuse_interrupt_in *ii
    cdef int rc
    if h.opcode == FUSE_INTERRUPT:
        ii = <fuse_interrupt_in *>(buf + sizeof(fuse_in_header))
        # a data request (a lane's) is answered as soon as its commands
        # complete: its interrupt is dropped.  One pyfuse3 holds goes there.
        if (n < sizeof(fuse_in_header) + sizeof(fuse_interrupt_in) or ln.sh.forwarded == NULL
                or not ln.sh.forwarded(ii.unique)):
            ln.n_interrupts += 1
            return
    if ln.sh.forward == NULL:
        if h.opcode != FUSE_FORGET and h.opcode != FUSE_BATCH_FORGET and h.opcode != FUSE_INTERRUPT:
            lane_reply(ln, reply_fd, h.unique, ENOSYS, NULL, 0)
        return
    rc = ln.sh.forward(buf, n, reply_fd)
    if rc < 0:
        if h.opcode != FUSE_FORGET and h.opcode != FUSE_BATCH_FORGET and h.opcode != FUSE_INTERRUPT:
            lane_reply(ln, reply_fd, h.unique, -rc, NULL, 0)
        return
    ln.n_forwarded += 1


cdef int lane_route(lane_t *ln, uint32_t tid) noexcept nogil:
    """The lane that should serve a request of thread ``tid`` (-1: here);
    its CPU mask is asked once and kept for a while."""
    cdef lane_route_entry *e
    if ln.sh.nlanes == 1 or tid == 0:
        return -1
    e = &ln.route[tid & (LANE_ROUTE_CACHE - 1)]
    if e.tid == tid and ln.now < e.expires:
        return e.target
    e.tid = tid
    e.target = lane_route_tid(<int>tid, ln.cpu, ln.sh.lane_of_cpu, ln.sh.ncpu)
    # a changed affinity (or a reused thread id) is seen within this
    e.expires = ln.now + 200000000
    return e.target


cdef bint lane_hand(lane_t *ln, uint32_t target, uint8_t *buf, size_t n, uint32_t bi,
                    int32_t reply_fd) noexcept nogil:
    cdef lane_t *t = ln.sh.lanes[target]
    cdef lane_xfer x
    x.buf = buf
    x.len = <uint32_t>n
    x.reply_fd = reply_fd
    x.home = ln.id
    x.bufidx = bi
    if not lane_ring_push(&ln.sh.inbox[target * ln.sh.nlanes + ln.id], &x):
        return False
    ln.n_handed_out += 1
    lane_store64(&ln.n_routed, ln.n_routed + 1)    # read by lane_kept
    nvmefs_mb()
    if lane_load32(&t.sleeping):
        lane_wake(t.wake_fd)
    return True


cdef void lane_backlog_push(lane_t *ln, uint8_t *buf, size_t n, int32_t reply_fd) noexcept nogil:
    """A data request read into the spare: a copy waits for a buffer -- of
    another lane that has some free, or of this one."""
    cdef fuse_in_header *h = <fuse_in_header *>buf
    cdef lane_backlog *b = <lane_backlog *>malloc(sizeof(lane_backlog) + n)
    cdef uint32_t k, best = LANE_NONE, most = 1, free_k
    cdef lane_xfer x
    if b == NULL:
        lane_reply(ln, reply_fd, h.unique, EIO, NULL, 0)
        return
    ln.n_buffer_waits += 1
    b.next = NULL
    b.len = <uint32_t>n
    b.reply_fd = reply_fd
    memcpy(b.data, buf, n)
    # (another lane's count, read as it is: a hint, the receiver decides)
    for k in range(ln.sh.nlanes):
        if k != ln.id:
            free_k = lane_load32(&ln.sh.lanes[k].nfreebuf)
            if free_k > most and ln.sh.lanes[k].reading:
                best, most = k, free_k
    if best != LANE_NONE:
        x.buf = <uint8_t *>b
        x.len = <uint32_t>n
        x.reply_fd = reply_fd
        x.home = LANE_NONE          # a copy: the receiver puts it in its backlog
        x.bufidx = LANE_NONE
        if lane_ring_push(&ln.sh.inbox[best * ln.sh.nlanes + ln.id], &x):
            ln.n_handed_out += 1
            nvmefs_mb()
            if lane_load32(&ln.sh.lanes[best].sleeping):
                lane_wake(ln.sh.lanes[best].wake_fd)
            return
    lane_backlog_link(ln, b)


cdef void lane_backlog_link(lane_t *ln, lane_backlog *b) noexcept nogil:
    b.next = NULL
    if ln.bl_tail == NULL:
        ln.bl_head = b
    else:
        ln.bl_tail.next = b
    ln.bl_tail = b
    ln.nbacklog += 1


cdef inline bint lane_backlog_flush_first(lane_t *ln) noexcept nogil:
    cdef uint32_t op = (<fuse_in_header *>ln.bl_head.data).opcode
    return op == FUSE_FLUSH or op == FUSE_FSYNC


cdef void lane_take_backlog(lane_t *ln) noexcept nogil:
    """Requests read while no buffer (or slot) was free, in order, as
    buffers come back (a flush needs only a slot)."""
    cdef lane_backlog *b
    cdef uint32_t bi
    cdef uint8_t *buf
    cdef fuse_in_header *h
    while ln.bl_head != NULL and ln.nfreereq:
        b = ln.bl_head
        h = <fuse_in_header *>b.data
        if h.opcode == FUSE_FLUSH or h.opcode == FUSE_FSYNC:
            bi = LANE_NONE
            buf = b.data
        elif ln.nfreebuf:
            ln.nfreebuf -= 1
            bi = ln.freebuf[ln.nfreebuf]
            buf = lane_buf(ln, bi)
            memcpy(buf, b.data, b.len)
        else:
            return
        ln.bl_head = b.next
        if ln.bl_head == NULL:
            ln.bl_tail = NULL
        ln.nbacklog -= 1
        lane_serve(ln, buf, b.len, ln.id, bi, b.reply_fd)
        free(b)


cdef void lane_fail_all(lane_t *ln) noexcept nogil:
    """The controller is gone: every request ends now (nothing of theirs
    is at a controller any more)."""
    cdef uint32_t i
    for i in range(ln.nreq):
        if ln.req[i].state != S_FREE:
            lane_finish(ln, i)
    ln.wq_head = ln.wq_tail = LANE_NONE
    ln.rq_head = ln.rq_tail = LANE_NONE


def _lane_ctl_names():
    return {"quiesce": CTL_QUIESCE, "attach": CTL_ATTACH, "fail": CTL_FAIL, "stop": CTL_STOP,
            "namespaces": CTL_NAMESPACES}


# -- the control plane's handle ---------------------------------------------------------------

LANE_EVENT_KINDS = {EV_ACK: "ack", EV_ERROR: "error", EV_RETRY: "retry", EV_TIMEOUT: "timeout",
                    EV_TIMEOUT2: "timeout2", EV_EXIT: "exit", EV_LOST: "lost"}


cdef class LaneSet:
    """``LaneSet(arena, cpus, buffers_per_lane, max_write=1 MiB, max_lba=4096)``:
    one lane per entry of ``cpus`` (lane i pinned to cpus[i]; -1: not
    pinned).  Built and driven by nvmefs/lanes.py, which is the only
    caller: the methods here are the mailbox, the event ring and the
    counters, each a few lines of C."""
    cdef lane_shared sh
    cdef lane_t **lanes
    cdef readonly uint32_t count
    cdef DmaArena arena
    cdef list bufs               # DmaBuffer of each lane's buffers, the zero buffer
    cdef lane_ns *tables[2]
    cdef int table_cur
    cdef dict range_objs         # nsid -> RangeSet
    cdef list qps                # the queue pairs the lanes use (kept alive here)
    cdef readonly size_t stride
    cdef readonly size_t max_write
    cdef readonly uint32_t buffers_per_lane
    cdef readonly bint started

    def __cinit__(self, DmaArena arena not None, cpus, uint32_t buffers_per_lane, *,
                  size_t max_write=1 << 20, uint32_t max_lba=4096, uint32_t zero_len=1 << 20):
        cdef uint32_t i, j, n = len(cpus)
        cdef lane_t *ln
        cdef DmaBuffer mem
        cdef int fd
        self.lanes = NULL
        self.tables[0] = self.tables[1] = NULL
        memset(&self.sh, 0, sizeof(lane_shared))
        self.sh.event_fd = -1
        if n < 1 or n > LANE_MAX_LANES:
            raise ValueError(f"{n} lanes outside 1..{LANE_MAX_LANES}")
        if buffers_per_lane < 2 or buffers_per_lane > 4096:
            raise ValueError(f"{buffers_per_lane} buffers per lane outside 2..4096")
        if <uint64_t>n * buffers_per_lane + LANE_BUFFERLESS >= (1 << USER_SLOT_BITS):
            raise ValueError(f"{n} lanes of {buffers_per_lane} buffers: too many requests in flight")
        if max_lba < 512 or max_lba & (max_lba - 1):
            raise ValueError(f"LBA size {max_lba} is not a power of two >= 512")
        if max_write < 4096:
            raise ValueError("max_write below 4 KiB")
        self.arena = arena
        self.count = n
        self.buffers_per_lane = buffers_per_lane
        self.max_write = max_write
        self.bufs = []
        self.qps = [None] * n
        self.range_objs = {}
        ps = arena.page_size
        # [headers room][data of the largest request, or an RMW write's LBAs,
        # or a read's LBAs with a partial one at each end][two edge LBAs]
        self.stride = (LANE_HDR_ROOM + max_write + 2 * max_lba + 2 * max_lba + ps - 1) // ps * ps
        self.sh.nlanes = n
        self.sh.max_lba = max_lba
        self.sh.lanes = <lane_t **>calloc(n, sizeof(lane_t *))
        self.sh.inbox = <lane_ring *>calloc(n * n, sizeof(lane_ring))
        self.sh.returns = <lane_ring *>calloc(n * n, sizeof(lane_ring))
        self.sh.ranges = <void **>calloc(LANE_MAX_NSID + 1, sizeof(void *))
        self.sh.mtime = <uint64_t *>calloc(LANE_MAX_NSID + 1, sizeof(uint64_t))
        self.sh.lane_of_cpu = <int16_t *>malloc(LANE_MAX_CPUS * sizeof(int16_t))
        self.tables[0] = <lane_ns *>calloc(LANE_MAX_NSID + 1, sizeof(lane_ns))
        self.tables[1] = <lane_ns *>calloc(LANE_MAX_NSID + 1, sizeof(lane_ns))
        self.lanes = self.sh.lanes
        if (self.sh.lanes == NULL or self.sh.inbox == NULL or self.sh.returns == NULL or self.sh.ranges == NULL
                or self.sh.mtime == NULL or self.sh.lane_of_cpu == NULL or self.tables[0] == NULL
                or self.tables[1] == NULL):
            raise MemoryError()
        for i in range(<uint32_t>LANE_MAX_CPUS):
            self.sh.lane_of_cpu[i] = -1
        fd = lane_eventfd()
        if fd < 0:
            raise OSError(-fd, "cannot create the lanes' event eventfd")
        self.sh.event_fd = fd
        zero = arena.alloc(zero_len)
        memset((<DmaBuffer>zero).vaddr, 0, zero_len)
        self.bufs.append(zero)
        self.sh.zero_buf = (<DmaBuffer>zero).vaddr
        self.sh.zero_iova = (<DmaBuffer>zero).iova
        self.sh.zero_len = zero_len
        for i in range(n):
            for j in range(n):
                if i != j and (lane_ring_init(&self.sh.inbox[i * n + j], buffers_per_lane, sizeof(lane_xfer))
                               or lane_ring_init(&self.sh.returns[i * n + j], buffers_per_lane,
                                                 sizeof(lane_xfer))):
                    raise MemoryError()
        for i in range(n):
            ln = <lane_t *>calloc(1, sizeof(lane_t))
            if ln == NULL:
                raise MemoryError()
            self.sh.lanes[i] = ln
            ln.fd = -1
            ln.wake_fd = -1
            ln.irq_fd = -1
            ln.reply_r = -1
            ln.reply_w = -1
            ln.id = i
            ln.nlanes = n
            ln.cpu = cpus[i]
            ln.sh = &self.sh
            ln.shared = <void *>self
            ln.page_size = ps
            ln.stride = self.stride
            ln.readsize = self.stride - 2 * max_lba
            ln.nbuf = buffers_per_lane
            # every buffer in a slot, and room for flushes, which take none
            ln.nreq = n * buffers_per_lane + LANE_BUFFERLESS
            ln.wq_head = ln.wq_tail = ln.rq_head = ln.rq_tail = LANE_NONE
            ln.ns = self.tables[0]
            ln.dlcap = ln.nreq
            mem = arena.alloc(self.stride * buffers_per_lane)
            self.bufs.append(mem)
            ln.bufmem = mem.vaddr
            ln.bufiova = mem.iova
            ln.freebuf = <uint32_t *>malloc(buffers_per_lane * sizeof(uint32_t))
            ln.req = <lreq *>calloc(ln.nreq, sizeof(lreq))
            ln.freereq = <uint32_t *>malloc(ln.nreq * sizeof(uint32_t))
            ln.dl = <lane_delayed *>malloc(ln.dlcap * sizeof(lane_delayed))
            ln.spare = <uint8_t *>malloc(ln.readsize)
            ln.wakebuf = <uint8_t *>calloc(n, 1)
            ln.seen = <uint64_t *>calloc(n, sizeof(uint64_t))
            if (ln.freebuf == NULL or ln.req == NULL or ln.freereq == NULL or ln.dl == NULL
                    or ln.spare == NULL or ln.wakebuf == NULL or ln.seen == NULL):
                raise MemoryError()
            if lane_ring_init(&ln.events, LANE_EVENTS, sizeof(lane_event)):
                raise MemoryError()
            # LIFO: the buffers used last are the ones in cache and in RSS
            for j in range(buffers_per_lane):
                ln.freebuf[j] = buffers_per_lane - 1 - j
            ln.nfreebuf = buffers_per_lane
            for j in range(ln.nreq):
                ln.freereq[j] = ln.nreq - 1 - j
            ln.nfreereq = ln.nreq
            fd = lane_eventfd()
            if fd < 0:
                raise OSError(-fd, "cannot create a lane's eventfd")
            ln.wake_fd = fd
            if 0 <= ln.cpu < LANE_MAX_CPUS and self.sh.lane_of_cpu[ln.cpu] < 0:
                self.sh.lane_of_cpu[ln.cpu] = <int16_t>i
                if ln.cpu + 1 > self.sh.ncpu:
                    self.sh.ncpu = ln.cpu + 1

    def __dealloc__(self):
        cdef uint32_t i, j, n = self.sh.nlanes
        cdef lane_t *ln
        cdef lane_backlog *b
        if self.sh.lanes != NULL:
            for i in range(n):
                ln = self.sh.lanes[i]
                if ln == NULL:
                    continue
                if ln.running:
                    # never free what a running thread uses: end it first
                    ln.abandon = True
                    lane_wake(ln.wake_fd)
                    with nogil:
                        lane_thread_join(ln.thread)
                while ln.bl_head != NULL:
                    b = ln.bl_head
                    ln.bl_head = b.next
                    free(b)
                if ln.fd >= 0 and ln.own_fd:
                    close(ln.fd)
                if ln.wake_fd >= 0:
                    close(ln.wake_fd)
                lu_exit(&ln.uring)
                if ln.reply_r >= 0:
                    close(ln.reply_r)
                if ln.reply_w >= 0:
                    close(ln.reply_w)
                if ln.ents != NULL:
                    free(ln.ents[0].hdr)
                free(ln.ents)
                free(ln.fwdbuf)
                free(ln.rbuf)
                lane_ring_free(&ln.events)
                free(ln.freebuf)
                free(ln.req)
                free(ln.freereq)
                free(ln.dl)
                free(ln.spare)
                free(ln.wakebuf)
                free(ln.seen)
                free(ln)
        if self.sh.inbox != NULL:
            for i in range(n * n):
                lane_ring_free(&self.sh.inbox[i])
                lane_ring_free(&self.sh.returns[i])
        if self.sh.event_fd >= 0:
            close(self.sh.event_fd)
        free(self.sh.lanes)
        free(self.sh.inbox)
        free(self.sh.returns)
        free(self.sh.ranges)
        free(self.sh.mtime)
        free(self.sh.lane_of_cpu)
        free(self.sh.qid_requests)
        free(self.sh.qid_reads)
        free(self.tables[0])
        free(self.tables[1])

    # -- set-up (before start) -----------------------------------------------------------

    def set_forwarder(self, uintptr_t forward, uintptr_t forwarded):
        """C functions of the FUSE shim (forward.c): forward(req, len, fd)
        queues a request for pyfuse3, forwarded(unique) says whether pyfuse3
        holds a request.  0, 0: non-data requests are answered ENOSYS."""
        if self.started:
            raise RuntimeError("the lanes are running")
        self.sh.forward = <int (*)(const void *, size_t, int) noexcept nogil>forward
        self.sh.forwarded = <int (*)(uint64_t) noexcept nogil>forwarded

    def set_options(self, uint64_t spin_ns, double timeout, uint32_t retries, crdt=(0, 0, 0)):
        """Hybrid polling window, command timeout (s), retries of a
        failed command, and the controller's Command Retry Delay Times
        (CRDT1..3, in 100 ms units)."""
        cdef uint32_t i, k
        if retries > 15:
            raise ValueError("at most 15 retries")
        for i in range(self.count):
            self.lanes[i].spin_ns = spin_ns
            self.lanes[i].timeout_ns = <uint64_t>(timeout * 1e9)
            self.lanes[i].retries = retries
            for k in range(3):
                self.lanes[i].crdt_ns[k] = <uint64_t>crdt[k] * 100000000

    def set_namespaces(self, namespaces):
        """The table the next attach() hands the lanes: (nsid, lba_size,
        nlbas, limits) each, limits as Controller.nvm_limits plus
        ``write_zeroes``, ``dsm`` (deallocate reads as zeroes).  The lanes
        switch to it in attach() or on a "namespaces" post: before then they
        still read the old one, which stays intact until the next call (so
        wait for every lane's acknowledgement before calling again)."""
        cdef int nxt = 1 - self.table_cur
        cdef lane_ns *t = self.tables[nxt]
        cdef uint32_t nsid, shift, lba_size
        memset(t, 0, (LANE_MAX_NSID + 1) * sizeof(lane_ns))
        for nsid, lba_size, nlbas, lim in namespaces:
            if nsid < 1 or nsid > LANE_MAX_NSID:
                continue
            shift = 0
            while (1u << shift) < lba_size:
                shift += 1
            if (1u << shift) != lba_size:
                raise ValueError(f"LBA size {lba_size} is not a power of two")
            t[nsid].nsid = nsid
            t[nsid].lba_shift = shift
            t[nsid].nlbas = nlbas
            t[nsid].size = <uint64_t>nlbas << shift
            if lim.get("write_zeroes"):
                wz = 65536
                if lim.get("write_zeroes_bytes"):
                    wz = max(1, min(wz, lim["write_zeroes_bytes"] >> shift))
                t[nsid].wz_lbas = wz
            t[nsid].dsm = 1 if lim.get("dsm") else 0
            t[nsid].dsm_ranges = min(256, lim.get("dsm_ranges", 256))
            t[nsid].dsm_range_lbas = min(0xFFFFFFFF, lim.get("dsm_range_lbas", 0xFFFFFFFF))
            t[nsid].dsm_lbas = lim.get("dsm_lbas", 0)
            if nsid not in self.range_objs:
                rs = RangeSet(self.count * self.buffers_per_lane, self.count)
                self.range_objs[nsid] = rs
                self.sh.ranges[nsid] = <void *>rs
        self.table_cur = nxt

    def setup_uring(self, int fuse_fd, qids, bint fault=False):
        """FUSE over io_uring (lane_uring.pyx), before start(): lane i gets
        ``depth`` entries on queue ``qid`` for each (qid, depth) in
        ``qids[i]`` (every possible CPU's queue in one lane's list or
        another's), each with a DMA payload of max_write bytes.  Raises
        OSError or MemoryError if a ring cannot be made (the caller then
        stays with /dev/fuse).  ``fault``: tests, REGISTER with a payload
        the kernel refuses."""
        cdef uint32_t i, k, e, nent, nq, nreq, depth
        cdef lane_t *ln
        cdef DmaBuffer mem
        cdef lu_req_header *hdrs
        cdef size_t esize = self.stride + 2 * LANE_HDR_ROOM
        cdef int rc
        if self.started:
            raise RuntimeError("the lanes are running")
        if len(qids) != self.count or any(not 1 <= d <= 1024 for lane in qids for _q, d in lane):
            raise ValueError("one list of (queue, depth) per lane, depth 1..1024")
        nq = max(max(q for q, _d in lane) if lane else 0 for lane in qids) + 1
        self.sh.qid_requests = <uint64_t *>calloc(nq, sizeof(uint64_t))
        self.sh.qid_reads = <uint64_t *>calloc(nq, sizeof(uint64_t))
        if self.sh.qid_requests == NULL or self.sh.qid_reads == NULL:
            raise MemoryError()
        self.sh.nqid = nq
        for i in range(self.count):
            ln = self.lanes[i]
            nent = sum(d for _q, d in qids[i])
            if nent == 0:
                continue
            owner_of = [q for q, d in qids[i] for _ in range(d)]
            ln.ents = <lane_rent *>calloc(nent, sizeof(lane_rent))
            hdrs = <lu_req_header *>calloc(nent, sizeof(lu_req_header))
            ln.fwdbuf = <uint8_t *>malloc(self.stride + LANE_HDR_ROOM)
            ln.rbuf_size = <uint32_t>(self.max_write + LANE_HDR_ROOM)
            ln.rbuf = <uint8_t *>malloc(ln.rbuf_size)
            if ln.ents == NULL or hdrs == NULL or ln.fwdbuf == NULL or ln.rbuf == NULL:
                free(hdrs)
                raise MemoryError()
            ln.ents[0].hdr = hdrs           # freed with the lane, whatever happens next
            mem = self.arena.alloc(esize * nent)
            self.bufs.append(mem)
            for e in range(nent):
                ln.ents[e].hdr = &hdrs[e]
                ln.ents[e].iov[0].iov_base = &hdrs[e]
                ln.ents[e].iov[0].iov_len = sizeof(lu_req_header)
                # [header room][payload: max_write][room an RMW write reaches past it]
                ln.ents[e].iov[1].iov_base = mem.vaddr + e * esize + LANE_HDR_ROOM
                ln.ents[e].iov[1].iov_len = self.max_write
                ln.ents[e].iova = mem.iova + e * esize + LANE_HDR_ROOM
                ln.ents[e].qid = <uint16_t>owner_of[e]
            ln.nent = nent
            rc = lu_init(&ln.uring, nent, fuse_fd)
            if rc < 0:
                raise OSError(-rc, f"cannot create lane {i}'s io_uring: {_os.strerror(-rc)}")
            a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
            for sk in (a, b):
                # one answer per message; room for many (READDIR, xattrs)
                sk.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, 4 << 20)
                sk.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 4 << 20)
            a.setblocking(False)
            ln.reply_r = a.detach()
            ln.reply_w = b.detach()
            # a request slot for every entry: a ring request never waits for one
            nreq = ln.nreq + nent
            free(ln.req)
            free(ln.freereq)
            free(ln.dl)
            ln.req = <lreq *>calloc(nreq, sizeof(lreq))
            ln.freereq = <uint32_t *>malloc(nreq * sizeof(uint32_t))
            ln.dl = <lane_delayed *>malloc(nreq * sizeof(lane_delayed))
            if ln.req == NULL or ln.freereq == NULL or ln.dl == NULL:
                raise MemoryError()
            ln.nreq = ln.dlcap = nreq
            for k in range(nreq):
                ln.freereq[k] = nreq - 1 - k
            ln.nfreereq = nreq
        self.sh.uring_fault = fault
        self.sh.uring_state = URING_PENDING

    def uring_hook(self):
        """(function, context) for the FUSE shim's want_uring(): called
        once the FUSE_INIT answer is written, with whether it asked for
        io_uring."""
        return <uintptr_t>&lane_uring_init_answered, <uintptr_t>&self.sh

    @property
    def uring_state(self):
        return ("off", "pending", "active", "declined")[lane_load32(&self.sh.uring_state)]

    def uring_stats(self):
        """Per queue: the lane serving it and the requests it took."""
        cdef uint32_t i, e
        cdef lane_t *ln
        owner = {}
        for i in range(self.count):
            ln = self.lanes[i]
            for e in range(ln.nent):
                owner[ln.ents[e].qid] = i
        return [{"qid": q, "lane": owner.get(q), "requests": self.sh.qid_requests[q],
                 "reads": self.sh.qid_reads[q]} for q in range(self.sh.nqid)]

    def start(self, fuse_fds, bint own=True):
        """Start the threads, lane i reading ``fuse_fds[i]`` (non-blocking;
        closed with the lane when ``own``).  Each lane is pinned to its CPU."""
        cdef uint32_t i
        cdef int rc
        cdef lane_t *ln
        if self.started:
            raise RuntimeError("the lanes are running")
        if len(fuse_fds) != self.count:
            raise ValueError(f"{len(fuse_fds)} channels for {self.count} lanes")
        for i in range(self.count):
            self.lanes[i].fd = fuse_fds[i]
            self.lanes[i].own_fd = own
            self.lanes[i].reading = True
        self.sh.readers = self.count
        self.sh.watchers = self.count
        self.started = True
        for i in range(self.count):
            ln = self.lanes[i]
            rc = lane_thread_start(&ln.thread, lane_main, ln, ln.cpu)
            if rc < 0:
                raise OSError(-rc, f"cannot start lane {i}")
            ln.running = True

    def join(self):
        """Wait for every thread to end (after stop, or the unmount)."""
        cdef uint32_t i
        cdef lane_t *ln
        for i in range(self.count):
            ln = self.lanes[i]
            if ln.running:
                with nogil:
                    lane_thread_join(ln.thread)
                ln.running = False

    def close_channels(self):
        """Close the lanes' FUSE channels, once nothing can answer on them
        any more (the threads have ended and pyfuse3's loop too): until
        then a late reply must find its channel, not a reused fd number."""
        cdef uint32_t i
        cdef lane_t *ln
        self.join()
        for i in range(self.count):
            ln = self.lanes[i]
            if ln.fd >= 0 and ln.own_fd:
                close(ln.fd)
            ln.fd = -1

    # -- the mailbox ------------------------------------------------------------------

    def post(self, uint32_t lane, str what, qp=None, int irq_fd=-1, uint64_t gen=0, bint dma_unsafe=False):
        """Give lane ``lane`` a command (quiesce, attach, fail, stop); its
        acknowledgement comes as an ("ack", seq) event.  Returns seq.
        For attach, ``qp`` is its queue pair (kept alive here) and the
        namespace table is the one set_namespaces() made last."""
        cdef lane_t *ln
        cdef uint32_t seq
        cmd = _lane_ctl_names()[what]
        if lane >= self.count:
            raise IndexError(lane)
        ln = self.lanes[lane]
        if lane_load32(&ln.ctl_seq) != lane_load32(&ln.ctl_done):
            raise RuntimeError(f"lane {lane}: a control command is still pending")
        if cmd == CTL_ATTACH:
            self.qps[lane] = qp
            ln.next_qp = <void *>qp
            ln.next_irq = irq_fd
            ln.next_gen = gen
            ln.next_ns = self.tables[self.table_cur]
            ln.max_transfer = qp.max_transfer
            ln.next_qid = qp.qid
        elif cmd == CTL_NAMESPACES:
            ln.next_ns = self.tables[self.table_cur]
        elif cmd == CTL_FAIL:
            # the controller could not be disabled: it may still write
            # into the buffers of what it had
            ln.next_irq = 1 if dma_unsafe else 0
        ln.ctl_cmd = cmd
        seq = ln.ctl_seq + 1
        lane_store32(&ln.ctl_seq, seq)
        nvmefs_mb()
        lane_wake(ln.wake_fd)
        if not ln.running:
            # not started (yet, or any more): the lane's own steps, here
            with nogil:
                lane_control(ln)
        return seq

    def acked(self, uint32_t lane, uint32_t seq):
        return lane_load32(&self.lanes[lane].ctl_done) == seq

    def release_queue(self, uint32_t lane):
        """Drop the reference to a queue pair the lane has let go of."""
        if self.lanes[lane].qp == NULL:
            self.qps[lane] = None

    def events(self):
        """Drain the event rings: a list of (kind, lane, fields...) tuples."""
        cdef uint32_t i
        cdef lane_event e
        cdef lane_t *ln
        cdef uint32_t lost
        lane_drain(self.sh.event_fd)
        out = []
        for i in range(self.count):
            ln = self.lanes[i]
            while lane_ring_pop(&ln.events, &e):
                out.append((LANE_EVENT_KINDS.get(e.kind, e.kind), e.lane, e.qid, e.cid, e.opcode, e.status,
                            e.attempt, e.err, e.nsid, e.lba, e.nlb, e.unique, e.gen, e.fuse_op))
        return out

    def events_lost(self, uint32_t lane):
        return self.lanes[lane].events_lost

    @property
    def event_fd(self):
        return self.sh.event_fd

    # -- what trio reads ---------------------------------------------------------------

    def mtime_ns(self, uint32_t nsid):
        """Wall-clock ns of the last write a lane answered there, 0 for none."""
        return lane_load64(&self.sh.mtime[nsid]) if 0 < nsid <= LANE_MAX_NSID else 0

    def running(self, uint32_t lane):
        return bool(self.lanes[lane].running)

    def cpu(self, uint32_t lane):
        return self.lanes[lane].cpu

    def stats(self):
        cdef uint32_t i
        cdef lane_t *ln
        out = []
        for i in range(self.count):
            ln = self.lanes[i]
            out.append({
                "lane": i, "cpu": ln.cpu, "received": ln.n_received, "reads": ln.n_read,
                "writes": ln.n_write, "rmw": ln.n_rmw, "fallocates": ln.n_falloc, "flushes": ln.n_flush,
                "empty_reads": ln.n_empty, "to_pyfuse3": ln.n_forwarded, "xattr_none": ln.n_xattr_none, "handed_in": ln.n_handed_in,
                "handed_out": ln.n_handed_out, "interrupts": ln.n_interrupts, "commands": ln.n_commands,
                "split": ln.n_split, "retries": ln.n_retries, "errors": ln.n_errors,
                "lost_to_reset": ln.n_lost, "range_waits": ln.n_range_waits, "sq_waits": ln.n_sq_waits,
                "buffer_waits": ln.n_buffer_waits, "spun": ln.n_spun, "reply_errors": ln.n_reply_errors,
                "timeouts": ln.n_timeouts, "sleeps": ln.n_sleeps, "fuse_away": ln.n_fuse_away, "bytes_read": ln.bytes_read,
                "bytes_written": ln.bytes_written, "in_flight": ln.active, "max_in_flight": ln.max_active,
                "buffers": ln.nbuf, "attached": bool(ln.attached), "failed": bool(ln.failed),
                "running": bool(ln.running), "events_lost": ln.events_lost,
                "quarantined": ln.n_quarantined, "backlog": ln.nbacklog,
                "ring_entries": ln.nent, "ring_entries_registered": ln.nent_alive,
                "ring_requests": ln.n_ring_requests, "ring_commits": ln.n_ring_commits,
                "ring_to_pyfuse3": ln.n_ring_forwarded, "ring_ended": ln.n_ring_ended,
                "register_errors": ln.n_register_errors, "register_error": ln.register_err,
                "commit_errors": ln.n_commit_errors,
            })
        return out

    def ranges(self, uint32_t nsid):
        """The RangeSet of a namespace (tests), or None."""
        return self.range_objs.get(nsid)


def clone_fuse_channel(int session_fd):
    """A new /dev/fuse channel of the connection behind ``session_fd``
    (FUSE_DEV_IOC_CLONE), non-blocking."""
    cdef int fd = lane_fuse_clone(session_fd)
    if fd < 0:
        raise OSError(-fd, f"cannot clone the FUSE channel: {_os.strerror(-fd)}")
    return fd


