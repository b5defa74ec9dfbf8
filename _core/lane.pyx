# The lane engine: the FUSE lane thread's reads and writes, from /dev/fuse
# to an NVMe I/O queue of its own and back to /dev/fuse, in C, without the
# GIL.
#
# Why: the lane thread used to answer one request at a time through
# DirectLane (fastpath.pyx): take the GIL, run Python, submit one command
# and spin until the controller's thread answered it, reply, read the next.
# At QD32 it spent half its time spinning on commands one by one while the
# controller's thread waited for the next, and a 1 MiB write was copied
# twice more than it had to be (into a bounce chunk, and into a bytes
# object kept for a retry).  Here the thread submits each request as soon
# as it has read it, reaps completions between reads, and answers on
# /dev/fuse itself (a FUSE reply is one writev of fuse_out_header + data).
#
# Zero copy: the receive buffers are DMA arena memory.  A write's data is
# read from /dev/fuse straight into one, and its command points at the data
# inside the request, 80 bytes into the buffer: PRP1 may carry a dword-
# aligned offset and every later PRP entry is a whole page (NVME-NOTES "PRP
# rules"), an SGL data block takes any dword-aligned address.  A read's
# data is DMAed over the request it came in and sent from there.
#
# Ownership: the queue pair is the engine's alone (per-queue ownership,
# defect 3): Controller creates it beside the trio queues (lane_queue=True)
# and hands it over through NvmeFS.lane_attach().  The lane thread calls
# reserve/offer/reap/spin holding the world lock (session_hook.c); trio's
# thread calls attach/detach/expired/reply_* holding it too, since it holds
# it whenever it is not waiting for I/O.  So nothing here needs a lock.
#
# Python is reached only on rare paths, taking the GIL there: a command
# that failed (the request is handed to a trio task, which applies the
# general path's retry rules), a controller reset (the requests in flight
# are handed over the same way), and waking trio tasks parked on a range a
# lane write gave back.

cdef extern from "<linux/fuse.h>" nogil:
    enum:
        FUSE_READ
        FUSE_WRITE
        FUSE_INTERRUPT
        FUSE_COMPAT_WRITE_IN_SIZE
    struct fuse_in_header:
        uint32_t len
        uint32_t opcode
        uint64_t unique
        uint64_t nodeid
    struct fuse_read_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
    struct fuse_write_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
    struct fuse_interrupt_in:
        uint64_t unique
    struct fuse_out_header:
        uint32_t len
        int32_t error
        uint64_t unique
    struct fuse_write_out:
        uint32_t size
        uint32_t padding

from posix.uio cimport iovec, writev
from libc.errno cimport EIO, EINTR
# clock_gettime, timespec and CLOCK_REALTIME: cimported by fastpath.pyx

cdef extern from "lane_engine.h" nogil:
    enum:
        NVMEFS_LANE_DECLINED
        NVMEFS_LANE_TAKEN
        NVMEFS_LANE_ANSWERED
    struct nvmefs_lane_engine:
        void *ctx
        size_t bufsize
        unsigned max_background
        void *(*reserve)(void *ctx) noexcept nogil
        void (*unreserve)(void *ctx, void *buf) noexcept nogil
        int (*offer)(void *ctx, void *buf, size_t len) noexcept nogil
        int (*reap)(void *ctx) noexcept nogil
        int (*in_flight)(void *ctx) noexcept nogil
        int (*spin)(void *ctx) noexcept nogil
        int (*irq_fd)(void *ctx) noexcept nogil
        void (*bind)(void *ctx, int fuse_fd) noexcept nogil

# for Python (the hand-over's opcode, offer_request's result)
FUSE_OP_READ = FUSE_READ
FUSE_OP_WRITE = FUSE_WRITE
LANE_DECLINED = NVMEFS_LANE_DECLINED
LANE_TAKEN = NVMEFS_LANE_TAKEN
LANE_ANSWERED = NVMEFS_LANE_ANSWERED
# receive buffers: enough for QD32 with a few to spare, each the largest
# request libfuse negotiates (max_write 1 MiB: FUSE_MAX_MAX_PAGES pages,
# plus its 4 KiB of header room)
LANE_BUFFERS = 48
LANE_BUFSIZE = (1 << 20) + 4096

cdef enum:
    LANE_MAX_NSID = 1024        # Identify CNS 02h lists at most 1024 namespaces
    NVM_WRITE = 0x01
    NVM_READ = 0x02

cdef enum lane_req_state:
    REQ_FREE = 0
    REQ_RESERVED = 1            # the lane thread reads /dev/fuse into it
    REQ_ACTIVE = 2              # commands at the controller (or waiting for SQ room)
    REQ_LOST = 3                # handed over by detach(); the old controller may still DMA here

cdef struct lane_ns:
    uint32_t nsid               # 0: no such namespace
    uint32_t lba_shift
    uint64_t nlbas
    uint64_t size
    void *ranges                # its RangeLock's RangeSet (kept alive by LaneEngine.ns_objs)

cdef struct lane_req:
    uint64_t unique
    uint8_t *buf
    uint64_t iova
    uint64_t first              # LBA
    uint64_t count              # LBAs
    uint32_t skip               # read: the window's offset in the data; write: the data's offset in buf
    uint32_t size               # bytes answered (read) or written (write)
    uint32_t nsid
    uint32_t npieces            # commands the request needs (MDTS, NLB limits)
    uint32_t next_piece         # the first not yet submitted
    uint32_t pending            # submitted and not completed
    uint16_t status             # the first error status a piece completed with (0 none)
    uint16_t failed_cid
    uint8_t opcode              # FUSE_READ or FUSE_WRITE
    uint8_t state
    uint8_t broken              # a piece could not be built: the general path redoes the request


cdef void *lane_reserve(void *ctx) noexcept nogil:
    return (<LaneEngine>ctx).reserve()

cdef void lane_unreserve(void *ctx, void *buf) noexcept nogil:
    (<LaneEngine>ctx).unreserve(<uint8_t *>buf)

cdef int lane_offer(void *ctx, void *buf, size_t n) noexcept nogil:
    return (<LaneEngine>ctx).offer(<uint8_t *>buf, n)

cdef int lane_reap(void *ctx) noexcept nogil:
    return (<LaneEngine>ctx).reap()

cdef int lane_in_flight(void *ctx) noexcept nogil:
    return <int>(<LaneEngine>ctx).active

cdef int lane_spin(void *ctx) noexcept nogil:
    return (<LaneEngine>ctx).spin()

cdef int lane_irq_fd(void *ctx) noexcept nogil:
    return (<LaneEngine>ctx).irq

cdef void lane_bind(void *ctx, int fd) noexcept nogil:
    (<LaneEngine>ctx).fuse_fd = fd


cdef inline uint64_t lane_wall_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef class LaneEngine:
    """``LaneEngine(arena, handoff, wake, buffers=LANE_BUFFERS, bufsize=LANE_BUFSIZE)``.

    ``handoff(job)`` is called (GIL held, in whichever thread the engine
    runs) with a request the engine cannot finish: ``(opcode, unique, nsid,
    first, count, skip, size, data, failed)`` -- FUSE_READ or FUSE_WRITE,
    the FUSE request id, the LBAs, a read's window (skip, size) or a
    write's size and its data (bytes), and ``failed``: (status, qid, cid)
    of the command that failed, or None when the commands were lost to a
    reset or could not be built.  It must see to exactly one answer
    (reply_*), and for a write give its range back (RangeLock.release).
    ``wake(lock)`` asks trio's thread to wake tasks parked on ``lock``."""
    cdef nvmefs_lane_engine api
    cdef DmaArena arena
    cdef DmaBuffer mem
    cdef readonly size_t bufsize
    cdef size_t stride
    cdef readonly uint32_t buffers
    cdef lane_req *reqs
    cdef uint32_t *free_idx     # LIFO: the buffers used last are the ones in cache and in RSS
    cdef uint32_t nfree
    cdef uint32_t *waitq        # requests with pieces waiting for SQ room, in arrival order
    cdef uint32_t wq_head
    cdef uint32_t wq_count
    cdef lane_ns *ns
    cdef uint64_t *mtime        # per nsid, wall-clock ns of the last write answered here
    cdef object ns_objs         # nsid -> (RangeSet, RangeLock)
    cdef QueuePair qp
    cdef readonly bint attached
    cdef readonly int irq
    cdef int fuse_fd
    cdef uint64_t spin_ns
    cdef uint64_t max_transfer
    cdef readonly uint32_t active
    cdef object handoff
    cdef object wake
    cdef object handed          # uniques handed to a task and not yet answered (reply_*)
    cdef uint32_t n_handed_open
    # counters (stats)
    cdef uint64_t n_reads, n_writes, n_empty, n_commands, n_split, n_declined, n_range_busy
    cdef uint64_t n_interrupts, n_handed, n_lost, n_buffer_waits, n_sq_waits, n_spun, n_reply_errors
    cdef uint64_t bytes_read, bytes_written
    cdef uint32_t max_active

    def __cinit__(self, DmaArena arena not None, handoff, wake, *, uint32_t buffers=LANE_BUFFERS,
                  size_t bufsize=LANE_BUFSIZE):
        cdef uint32_t i
        self.reqs = NULL
        self.free_idx = NULL
        self.waitq = NULL
        self.ns = NULL
        self.mtime = NULL
        self.irq = -1
        self.fuse_fd = -1
        if buffers < 1 or buffers > 65535:
            raise ValueError(f"lane engine: {buffers} buffers outside 1..65535")
        # the smallest read buffer the kernel accepts (FUSE_MIN_READ_BUFFER)
        if bufsize < 8192:
            raise ValueError(f"lane engine: receive buffers of {bufsize} bytes are below 8 KiB")
        self.arena = arena
        self.handoff = handoff
        self.wake = wake
        self.buffers = buffers
        self.bufsize = bufsize
        self.stride = (bufsize + arena.page_size - 1) // arena.page_size * arena.page_size
        self.mem = arena.alloc(self.stride * buffers)
        self.reqs = <lane_req *>calloc(buffers, sizeof(lane_req))
        self.free_idx = <uint32_t *>malloc(buffers * sizeof(uint32_t))
        self.waitq = <uint32_t *>malloc(buffers * sizeof(uint32_t))
        self.ns = <lane_ns *>calloc(LANE_MAX_NSID + 1, sizeof(lane_ns))
        self.mtime = <uint64_t *>calloc(LANE_MAX_NSID + 1, sizeof(uint64_t))
        if (self.reqs == NULL or self.free_idx == NULL or self.waitq == NULL or self.ns == NULL
                or self.mtime == NULL):
            raise MemoryError()
        for i in range(buffers):
            self.reqs[i].buf = self.mem.vaddr + <size_t>i * self.stride
            self.reqs[i].iova = self.mem.iova + <uint64_t>i * self.stride
            self.free_idx[i] = buffers - 1 - i
        self.nfree = buffers
        self.ns_objs = {}
        self.handed = set()
        self.api.ctx = <void *>self
        self.api.bufsize = bufsize
        self.api.max_background = buffers - 1 if buffers > 1 else 1
        self.api.reserve = lane_reserve
        self.api.unreserve = lane_unreserve
        self.api.offer = lane_offer
        self.api.reap = lane_reap
        self.api.in_flight = lane_in_flight
        self.api.spin = lane_spin
        self.api.irq_fd = lane_irq_fd
        self.api.bind = lane_bind

    def __dealloc__(self):
        free(self.reqs)
        free(self.free_idx)
        free(self.waitq)
        free(self.ns)
        free(self.mtime)

    # -- the lane thread's side (world lock held, no GIL) --------------------------

    cdef void *reserve(self) noexcept nogil:
        cdef uint32_t i
        if self.nfree == 0:
            self.n_buffer_waits += 1
            return NULL
        self.nfree -= 1
        i = self.free_idx[self.nfree]
        self.reqs[i].state = REQ_RESERVED
        return self.reqs[i].buf

    cdef inline void give_back(self, uint32_t i) noexcept nogil:
        self.reqs[i].state = REQ_FREE
        self.free_idx[self.nfree] = i
        self.nfree += 1

    cdef inline int index_of(self, const uint8_t *buf) noexcept nogil:
        cdef size_t off
        if self.mem is None or buf < self.mem.vaddr:
            return -1
        off = <size_t>(buf - self.mem.vaddr)
        if off % self.stride or off // self.stride >= self.buffers:
            return -1
        return <int>(off // self.stride)

    cdef void unreserve(self, uint8_t *buf) noexcept nogil:
        cdef int i = self.index_of(buf)
        if i >= 0 and self.reqs[i].state == REQ_RESERVED:
            self.give_back(<uint32_t>i)

    cdef void reply(self, uint64_t unique, int err, const void *data, size_t n) noexcept nogil:
        """One FUSE answer, as libfuse's fuse_send_reply_iov() writes it."""
        cdef fuse_out_header h
        cdef iovec iov[2]
        h.len = <uint32_t>(sizeof(fuse_out_header) + n)
        h.error = -err
        h.unique = unique
        iov[0].iov_base = &h
        iov[0].iov_len = sizeof(fuse_out_header)
        iov[1].iov_base = <void *>data
        iov[1].iov_len = n
        while writev(self.fuse_fd, iov, 2 if n else 1) < 0:
            if errno != EINTR:
                # ENOENT: the kernel gave up on the request (interrupted);
                # ENODEV: unmounted.  Nobody is left waiting for it.
                self.n_reply_errors += 1
                break

    cdef int offer(self, uint8_t *buf, size_t n) noexcept nogil:
        cdef fuse_in_header *h = <fuse_in_header *>buf
        cdef int i = self.index_of(buf)
        if n < sizeof(fuse_in_header) or h.len != n:
            return NVMEFS_LANE_DECLINED
        if h.opcode == FUSE_INTERRUPT:     # read into any buffer (the spare too)
            return self.interrupt(buf, n)
        if i < 0 or self.reqs[i].state != REQ_RESERVED:
            return NVMEFS_LANE_DECLINED     # not one of ours: the lane thread's spare buffer
        if not self.attached:
            return NVMEFS_LANE_DECLINED     # a reset is under way: pyfuse3's handlers wait for it
        if h.opcode == FUSE_READ:
            return self.take_read(<uint32_t>i, buf, n)
        if h.opcode == FUSE_WRITE:
            return self.take_write(<uint32_t>i, buf, n)
        return NVMEFS_LANE_DECLINED

    cdef inline lane_ns *ns_of(self, uint64_t fh) noexcept nogil:
        # the file handle is the inode, nsid + 1 (NvmeFS.open)
        if fh < 2 or fh - 1 > LANE_MAX_NSID or self.ns[fh - 1].nsid == 0:
            return NULL
        return &self.ns[fh - 1]

    cdef int interrupt(self, uint8_t *buf, size_t n) noexcept nogil:
        """FUSE_INTERRUPT of a request in flight here or handed to a task:
        it completes within the command's time anyway, and an interrupt
        needs no answer.  Any other goes to libfuse, which knows pyfuse3's
        requests (given one it does not know, libfuse would answer EAGAIN
        and the kernel send it again, until the request is answered)."""
        cdef uint64_t target
        cdef uint32_t i
        cdef bint found = False
        if n < sizeof(fuse_in_header) + sizeof(fuse_interrupt_in):
            return NVMEFS_LANE_DECLINED
        target = (<fuse_interrupt_in *>(buf + sizeof(fuse_in_header))).unique
        for i in range(self.buffers):
            if self.reqs[i].state == REQ_ACTIVE and self.reqs[i].unique == target:
                found = True
                break
        if not found and self.n_handed_open:
            with gil:
                found = target in self.handed
        if found:
            self.n_interrupts += 1
            return NVMEFS_LANE_ANSWERED
        return NVMEFS_LANE_DECLINED

    cdef int take_read(self, uint32_t i, uint8_t *buf, size_t n) noexcept nogil:
        cdef fuse_in_header *h = <fuse_in_header *>buf
        cdef fuse_read_in *ri
        cdef lane_ns *ns
        cdef uint64_t off, size, first, last, bs
        if n < sizeof(fuse_in_header) + sizeof(fuse_read_in):
            return NVMEFS_LANE_DECLINED
        ri = <fuse_read_in *>(buf + sizeof(fuse_in_header))
        ns = self.ns_of(ri.fh)
        if ns == NULL:
            self.n_declined += 1
            return NVMEFS_LANE_DECLINED
        off = ri.offset
        size = ri.size
        if size == 0 or off >= ns.size:
            # at or past the end: an empty read, as from a regular file
            self.reply(h.unique, 0, NULL, 0)
            self.n_empty += 1
            return NVMEFS_LANE_ANSWERED
        if size > ns.size - off:
            size = ns.size - off
        bs = <uint64_t>1 << ns.lba_shift
        first = off >> ns.lba_shift
        last = (off + size + bs - 1) >> ns.lba_shift
        if (last - first) << ns.lba_shift > self.bufsize:
            self.n_declined += 1
            return NVMEFS_LANE_DECLINED
        self.start(i, FUSE_READ, h.unique, ns, first, last - first, <uint32_t>(off - (first << ns.lba_shift)),
                   <uint32_t>size)
        return NVMEFS_LANE_TAKEN

    cdef int take_write(self, uint32_t i, uint8_t *buf, size_t n) noexcept nogil:
        cdef fuse_in_header *h = <fuse_in_header *>buf
        cdef fuse_write_in *wi
        cdef lane_ns *ns
        cdef uint64_t off, size, data_off, first, count
        cdef int rc
        if n < sizeof(fuse_in_header) + FUSE_COMPAT_WRITE_IN_SIZE:
            return NVMEFS_LANE_DECLINED
        wi = <fuse_write_in *>(buf + sizeof(fuse_in_header))
        size = wi.size
        off = wi.offset
        # the data is the request's tail, whatever the fuse_write_in size
        if size == 0 or size > n - sizeof(fuse_in_header) - FUSE_COMPAT_WRITE_IN_SIZE:
            self.n_declined += 1
            return NVMEFS_LANE_DECLINED
        data_off = n - size
        ns = self.ns_of(wi.fh)
        # unaligned (read-modify-write), past the end (ENOSPC, short
        # writes) or not dword-aligned in the buffer: pyfuse3's write()
        if (ns == NULL or off > ns.size or size > ns.size - off or (off | size) & ((1u << ns.lba_shift) - 1)
                or data_off & 3):
            self.n_declined += 1
            return NVMEFS_LANE_DECLINED
        first = off >> ns.lba_shift
        count = size >> ns.lba_shift
        # held until the write ends: a read-modify-write, a fallocate or
        # another write there waits, as for any write (fusefs.RangeLock)
        rc = (<RangeSet>ns.ranges).add(first, first + count)
        if rc == -EBUSY:
            # overlapping one in flight: pyfuse3's write() queues behind it
            self.n_range_busy += 1
            return NVMEFS_LANE_DECLINED
        if rc < 0:
            self.n_declined += 1        # no room left in the set: only trio's side grows it
            return NVMEFS_LANE_DECLINED
        self.start(i, FUSE_WRITE, h.unique, ns, first, count, <uint32_t>data_off, <uint32_t>size)
        return NVMEFS_LANE_TAKEN

    cdef void start(self, uint32_t i, uint8_t opcode, uint64_t unique, lane_ns *ns, uint64_t first,
                    uint64_t count, uint32_t skip, uint32_t size) noexcept nogil:
        cdef lane_req *r = &self.reqs[i]
        cdef uint64_t per = self.piece_lbas(ns)
        r.unique = unique
        r.opcode = opcode
        r.nsid = ns.nsid
        r.first = first
        r.count = count
        r.skip = skip
        r.size = size
        r.npieces = <uint32_t>((count + per - 1) // per)
        r.next_piece = 0
        r.pending = 0
        r.status = 0
        r.failed_cid = 0
        r.broken = 0
        r.state = REQ_ACTIVE
        self.active += 1
        if self.active > self.max_active:
            self.max_active = self.active
        if r.npieces > 1:
            self.n_split += 1
        # behind requests already waiting for SQ room, never ahead of them
        if self.wq_count or self.submit(i) < 0:
            self.wait_for_room(i)

    cdef inline uint64_t piece_lbas(self, lane_ns *ns) noexcept nogil:
        cdef uint64_t per = self.max_transfer >> ns.lba_shift
        if per > 65536:
            per = 65536         # NLB is a 16-bit 0-based field
        return per if per else 1

    cdef int submit(self, uint32_t i) noexcept nogil:
        """Submit the request's remaining pieces, ringing once: 0 when all
        are at the controller, -EAGAIN when the SQ (or its ids) ran out."""
        cdef lane_req *r = &self.reqs[i]
        cdef lane_ns *ns = &self.ns[r.nsid]
        cdef uint64_t per = self.piece_lbas(ns), lba, cnt
        cdef nvme_sqe cmd
        cdef dma_seg seg
        cdef int rc, result = 0
        cdef bint read = r.opcode == FUSE_READ
        while r.next_piece < r.npieces:
            lba = r.first + <uint64_t>r.next_piece * per
            cnt = r.count - <uint64_t>r.next_piece * per
            if cnt > per:
                cnt = per
            memset(&cmd, 0, sizeof(cmd))
            cmd.opc = NVM_READ if read else NVM_WRITE
            cmd.nsid = r.nsid
            cmd.cdw10 = <uint32_t>lba
            cmd.cdw11 = <uint32_t>(lba >> 32)
            cmd.cdw12 = <uint32_t>(cnt - 1)
            seg.iova = r.iova + (0 if read else r.skip) + ((lba - r.first) << ns.lba_shift)
            seg.length = <uint32_t>(cnt << ns.lba_shift)
            seg.flags = 0
            rc = self.qp.submit(&cmd, &seg, 1, DPTR_AUTO, read, i, False)
            if rc == -EAGAIN or rc == -EBUSY:
                self.n_sq_waits += 1
                result = -EAGAIN
                break
            if rc < 0:
                # neither PRP nor SGL can describe it (not expected of one
                # contiguous buffer): the general path's bounce chunks can
                r.broken = 1
                r.npieces = r.next_piece
                break
            # each command's own clock for the watchdog (expired()): a
            # piece that waited for SQ room starts when it is submitted
            self.qp.cids.get(<uint32_t>rc).submit_ns = nvmefs_now_ns()
            r.next_piece += 1
            r.pending += 1
            self.n_commands += 1
        self.qp.ring_sq()
        if r.pending == 0 and r.next_piece == r.npieces:
            self.finish(i)      # broken before its first command
        return result

    cdef inline void wait_for_room(self, uint32_t i) noexcept nogil:
        cdef uint32_t tail = self.wq_head + self.wq_count
        if tail >= self.buffers:
            tail -= self.buffers
        self.waitq[tail] = i
        self.wq_count += 1

    cdef void submit_waiting(self) noexcept nogil:
        cdef uint32_t i
        while self.wq_count:
            i = self.waitq[self.wq_head]
            if self.reqs[i].state == REQ_ACTIVE and self.submit(i) < 0:
                return
            self.wq_head += 1
            if self.wq_head == self.buffers:
                self.wq_head = 0
            self.wq_count -= 1

    cdef int reap(self) noexcept nogil:
        cdef int n, k, ended = 0
        cdef uint32_t i
        cdef uint16_t st
        cdef lane_req *r
        if not self.attached:
            return 0
        n = self.qp.process_completions(0)
        for k in range(n):
            i = <uint32_t>self.qp.out_user[k]
            if i >= self.buffers or self.reqs[i].state != REQ_ACTIVE:
                continue        # the queue pair already drops stale ids; this would be a bug
            r = &self.reqs[i]
            st = self.qp.out_cqe[k].status & 0xFFFE
            if st and not r.status:
                r.status = st
                r.failed_cid = self.qp.out_cqe[k].cid
            r.pending -= 1
            if r.pending == 0 and r.next_piece == r.npieces:
                self.finish(i)
                ended += 1
        if n and self.wq_count:
            self.submit_waiting()
        return ended

    cdef void finish(self, uint32_t i) noexcept nogil:
        cdef lane_req *r = &self.reqs[i]
        cdef fuse_write_out wo
        self.active -= 1
        if r.status or r.broken:
            self.hand_over(i)
            return
        if r.opcode == FUSE_READ:
            self.reply(r.unique, 0, r.buf + r.skip, r.size)
            self.n_reads += 1
            self.bytes_read += r.size
        else:
            self.mtime[r.nsid] = lane_wall_ns()
            self.release_range(r)
            wo.size = r.size
            wo.padding = 0
            self.reply(r.unique, 0, &wo, sizeof(wo))
            self.n_writes += 1
            self.bytes_written += r.size
        self.give_back(i)

    cdef void release_range(self, lane_req *r) noexcept nogil:
        # (a cast, not a local: a typed local would take a reference, which
        # needs the GIL)
        (<RangeSet>self.ns[r.nsid].ranges).remove(r.first, r.first + r.count)
        if (<RangeSet>self.ns[r.nsid].ranges).waiters:
            with gil:
                try:
                    self.wake(self.ns_objs[r.nsid][1])
                except BaseException:
                    _log.exception("lane engine: could not wake the tasks waiting for a range")

    cdef void hand_over(self, uint32_t i) noexcept nogil:
        """The request goes to a trio task (see the class docstring); its
        buffer is free again unless a reset took it (then it waits for the
        controller to be disabled: attach())."""
        cdef lane_req *r = &self.reqs[i]
        self.n_handed += 1
        with gil:
            try:
                data = None
                if r.opcode == FUSE_WRITE:
                    data = PyBytes_FromStringAndSize(<char *>r.buf + r.skip, r.size)
                failed = None
                if r.status and not r.broken and r.state != REQ_LOST:
                    failed = (r.status, self.qp.qid if self.qp is not None else 0, r.failed_cid)
                self.handoff((r.opcode, r.unique, r.nsid, r.first, r.count,
                              r.skip if r.opcode == FUSE_READ else 0, r.size, data, failed))
                self.handed.add(r.unique)
                self.n_handed_open = len(self.handed)
            except BaseException:
                _log.exception("lane engine: could not hand a request over; answering EIO")
                self.reply(r.unique, EIO, NULL, 0)
                if r.opcode == FUSE_WRITE:
                    self.release_range(r)
        if r.state != REQ_LOST:
            self.give_back(i)

    cdef int spin(self) noexcept nogil:
        cdef uint64_t start, now
        if not self.attached or not self.active:
            return 0
        if self.qp.cq_ready():
            return 1
        if not self.spin_ns:
            return 0
        start = nvmefs_now_ns()
        while True:
            now = nvmefs_now_ns()
            if now - start >= self.spin_ns:
                return 0
            spin_pause(now - start)
            if self.qp.cq_ready():
                self.n_spun += 1
                return 1

    # -- trio's side (world lock held) ---------------------------------------------

    def attach(self, QueuePair qp not None, int irq_fd, uint64_t max_transfer, uint64_t spin_ns, namespaces):
        """Serve on ``qp`` (its completion queue signals ``irq_fd``, -1 for
        a polled one).  ``namespaces``: (nsid, lba_size, nlbas, RangeLock)
        for each namespace.  Buffers a reset took are free again: the
        controller was disabled before it was brought up with this queue."""
        cdef uint32_t i, nsid, shift
        if self.attached:
            raise RuntimeError("lane engine: already attached")
        if max_transfer < 4096:
            raise ValueError(f"lane engine: maximum transfer {max_transfer} below 4 KiB")
        memset(self.ns, 0, (LANE_MAX_NSID + 1) * sizeof(lane_ns))
        objs = {}
        for nsid, lba_size, nlbas, lock in namespaces:
            if nsid < 1 or nsid > LANE_MAX_NSID:
                continue        # served by pyfuse3's handlers
            shift = 0
            while (1u << shift) < <uint32_t>lba_size:
                shift += 1
            if (1u << shift) != <uint32_t>lba_size:
                raise ValueError(f"lane engine: LBA size {lba_size} is not a power of two")
            ranges = lock.core
            objs[nsid] = (ranges, lock)
            self.ns[nsid].nsid = nsid
            self.ns[nsid].lba_shift = shift
            self.ns[nsid].nlbas = nlbas
            self.ns[nsid].size = <uint64_t>nlbas << shift
            self.ns[nsid].ranges = <void *>ranges
        self.ns_objs = objs
        for i in range(self.buffers):
            if self.reqs[i].state == REQ_LOST:
                self.give_back(i)
        self.qp = qp
        self.irq = irq_fd
        self.max_transfer = max_transfer
        self.spin_ns = spin_ns
        self.wq_head = self.wq_count = 0
        self.attached = True

    def detach(self):
        """The queue is going away (reset, shutdown): every request in
        flight is handed over (``handoff`` with ``failed`` None: resubmit
        once the controller is back).  Returns how many."""
        cdef uint32_t i, lost = 0
        if not self.attached:
            return 0
        self.attached = False
        for i in range(self.buffers):
            if self.reqs[i].state == REQ_ACTIVE:
                self.reqs[i].state = REQ_LOST
                self.active -= 1
                self.n_lost += 1
                lost += 1
                self.hand_over(i)
        self.wq_head = self.wq_count = 0
        self.qp = None
        self.irq = -1
        return lost

    def expired(self, double timeout):
        """(cid, NVMe opcode) of each command submitted more than
        ``timeout`` seconds ago, each reported once (the watchdog's timeout
        recipe then aborts or resets)."""
        cdef uint32_t idx
        cdef nvme_tracker *t
        cdef uint64_t now = nvmefs_now_ns(), limit = <uint64_t>(timeout * 1e9)
        out = []
        if not self.attached:
            return out
        for idx in range(self.qp.cids.depth):
            t = self.qp.cids.get(idx)
            if t.state == TRK_SUBMITTED and t.submit_ns and now - t.submit_ns > limit:
                t.submit_ns = 0         # reported
                out.append((t.cid, t.opc))
        return out

    def command_in_flight(self, uint16_t cid):
        cdef nvme_tracker *t
        if not self.attached:
            return False
        t = self.qp.cids.get(cid & self.qp.cids.index_mask)
        return t.state == TRK_SUBMITTED and t.cid == cid

    def bind(self, int fd):
        """Where answers go (the lane thread binds /dev/fuse itself)."""
        self.fuse_fd = fd

    # the answers of handed-over requests (trio's thread)

    cdef inline void answered(self, uint64_t unique):
        self.handed.discard(unique)
        self.n_handed_open = len(self.handed)

    def reply_data(self, uint64_t unique, data):
        cdef const uint8_t[::1] view = memoryview(data).cast("B")
        self.answered(unique)
        self.reply(unique, 0, &view[0] if len(view) else NULL, len(view))

    def reply_write(self, uint64_t unique, uint32_t count):
        cdef fuse_write_out wo
        wo.size = count
        wo.padding = 0
        self.answered(unique)
        self.reply(unique, 0, &wo, sizeof(wo))

    def reply_err(self, uint64_t unique, int err):
        self.answered(unique)
        self.reply(unique, err, NULL, 0)

    def mtime_ns(self, uint32_t nsid):
        """Wall-clock ns of the last write answered here, 0 for none."""
        return self.mtime[nsid] if 0 < nsid <= LANE_MAX_NSID else 0

    @property
    def api_address(self):
        """The nvmefs_lane_engine table (lane_engine.h) for the lane thread."""
        return <uintptr_t>&self.api

    @property
    def in_flight(self):
        return self.active

    def stats(self):
        return {
            "reads": self.n_reads, "writes": self.n_writes, "empty_reads": self.n_empty,
            "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
            "commands": self.n_commands, "split": self.n_split, "declined": self.n_declined,
            "range_busy": self.n_range_busy, "interrupts": self.n_interrupts, "handed_over": self.n_handed,
            "lost_to_reset": self.n_lost, "buffer_waits": self.n_buffer_waits, "sq_waits": self.n_sq_waits,
            "spun": self.n_spun, "reply_errors": self.n_reply_errors, "in_flight": self.active,
            "max_in_flight": self.max_active, "buffers": self.buffers, "attached": self.attached,
        }

    # -- what the lane thread does, callable from Python (tests) -----------------------

    def offer_request(self, request):
        """Read ``request`` (the bytes of one FUSE request) into a receive
        buffer and offer it: NVMEFS_LANE_* (0 declined, 1 taken, 2
        answered), or None when no buffer is free."""
        cdef const uint8_t[::1] src = memoryview(request).cast("B")
        cdef uint8_t *buf
        cdef int rc
        if <size_t>len(src) > self.bufsize:
            raise ValueError("request larger than a receive buffer")
        buf = <uint8_t *>self.reserve()
        if buf == NULL:
            return None
        memcpy(buf, &src[0], len(src))
        rc = self.offer(buf, len(src))
        if rc != NVMEFS_LANE_TAKEN:
            self.unreserve(buf)
        return rc

    def poll(self):
        """Reap: how many requests ended."""
        return self.reap()
