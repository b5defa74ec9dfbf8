# A lane's data requests, from the FUSE request to its NVMe commands and
# back to the reply (lane.pyx has the thread, the mailbox and the rings).
#
# Every request is a short list of phases, each a numbered set of commands
# that lreq_build() can make again from the request alone -- so a command
# is retried by number, and a phase is started over after a reset:
#
#   READ      the LBAs covering the byte window, into the buffer; the reply
#             is the window.
#   WRITE     LBA-aligned: the commands point at the data inside the request
#             (PRP1 may carry a dword offset, NVME-NOTES "PRP rules").
#   RMW       unaligned: phase 0 reads the partial edge LBAs, then the data
#             moves into place between them and phase 1 writes them all.
#   FALLOCATE phase 0 reads partial edge LBAs and zeroes the whole ones
#             (Write Zeroes, Dataset Management deallocate, or writes of a
#             zero buffer), phase 1 writes the edges back zeroed.
#   FLUSH     one Flush (FUSE_FLUSH on close, FUSE_FSYNC).
#
# Writes and fallocates hold their LBA range (ranges.pyx) from start to
# answer, shared by all lanes, so a read-modify-write never puts stale
# bytes back over another write, and overlapping writes run one after the
# other in arrival order instead of being refused.
#
# Each command's size is bounded by MDTS (max_transfer) and NLB's 16 bits;
# PRP or SGL is the queue pair's rule (choose_dptr).  A failed command is
# resubmitted when the status rule says so (retryable, or Abort Requested
# without DNR: the host aborted it after a timeout), at most `retries`
# times with a growing delay; otherwise the request is answered EIO.  Both
# are reported to the control plane as events with the decoded status.

cdef enum:
    M_WZ = 1                    # Write Zeroes (DEAC when punching)
    M_DSM = 2                   # Dataset Management deallocate
    M_ZEROS = 3                 # Writes of the zero buffer
    FALLOC_KEEP_SIZE = 0x01
    FALLOC_PUNCH_HOLE = 0x02
    FALLOC_ZERO_RANGE = 0x10
    NVM_FLUSH = 0x00
    NVM_WRITE = 0x01
    NVM_READ = 0x02
    NVM_WRITE_ZEROES = 0x08
    NVM_DSM = 0x09
    NVM_DEAC = 1 << 25
    DSM_ATTR_DEALLOCATE = 1 << 2
    DSM_PAYLOAD = 4096          # 256 ranges of 16 bytes
    NVM_MAX_NLB = 65536
    USER_SLOT_BITS = 20
    USER_TIMED_OUT = 62
    USER_TIMED_OUT2 = 63


cdef inline uint64_t user_pack(uint32_t slot, uint32_t idx, uint8_t phase, uint8_t attempt) noexcept nogil:
    return (<uint64_t>slot | (<uint64_t>idx << USER_SLOT_BITS) | (<uint64_t>(phase & 0xF) << 52)
            | (<uint64_t>(attempt & 0xF) << 56))


cdef inline lane_ns *lane_ns_of(lane_t *ln, uint64_t nodeid) noexcept nogil:
    # inode = nsid + 1 (the root directory is inode 1): nvmefs/fusefs.py
    if nodeid < 2 or nodeid - 1 > LANE_MAX_NSID or ln.ns[nodeid - 1].nsid == 0:
        return NULL
    return &ln.ns[nodeid - 1]


cdef inline uint32_t lane_per(lane_t *ln, uint32_t shift) noexcept nogil:
    cdef uint64_t per = ln.max_transfer >> shift
    if per > NVM_MAX_NLB:
        per = NVM_MAX_NLB
    return <uint32_t>per if per else 1


cdef inline uint64_t umin(uint64_t a, uint64_t b) noexcept nogil:
    return a if a < b else b


cdef inline uint32_t div_up(uint64_t a, uint64_t b) noexcept nogil:
    return <uint32_t>((a + b - 1) // b)


# -- a new request ------------------------------------------------------------------

cdef void lane_serve(lane_t *ln, uint8_t *buf, size_t n, uint32_t home, uint32_t bufidx,
                     int32_t reply_fd) noexcept nogil:
    """Take a data request whose buffer (index ``bufidx`` of lane ``home``)
    is now this lane's until it is answered."""
    cdef uint64_t iova = 0
    if bufidx != LANE_NONE:
        iova = ln.sh.lanes[home].bufiova + <uint64_t>bufidx * ln.stride
    lane_serve_at(ln, buf if bufidx != LANE_NONE else NULL, iova, n, home, bufidx, reply_fd, buf)


cdef void lane_serve_at(lane_t *ln, uint8_t *buf, uint64_t iova, size_t n, uint32_t home, uint32_t bufidx,
                        int32_t reply_fd, uint8_t *req) noexcept nogil:
    """The request at ``req``, its DMA buffer ``buf`` at bus address
    ``iova`` (NULL: none; a ring entry's payload has no pool index)."""
    cdef fuse_in_header *h = <fuse_in_header *>req
    cdef uint32_t slot
    cdef lreq *r
    cdef lane_ns *ns
    ln.nfreereq -= 1
    slot = ln.freereq[ln.nfreereq]
    r = &ln.req[slot]
    memset(r, 0, sizeof(lreq))
    r.unique = h.unique
    r.nodeid = h.nodeid
    r.buf = buf
    r.reply_fd = reply_fd
    r.home = home
    r.bufidx = bufidx
    r.iova = iova
    r.fuse_op = <uint8_t>h.opcode
    r.link = LANE_NONE
    r.state = S_RUN
    ln.active += 1
    if ln.active > ln.max_active:
        ln.max_active = ln.active
    if h.opcode == FUSE_FLUSH or h.opcode == FUSE_FSYNC:
        # a Flush carries no data: the buffer goes back at once
        r.kind = K_FLUSH
        ln.n_flush += 1
        if bufidx != LANE_NONE:
            lane_give_buffer(ln, home, bufidx)
        r.bufidx = LANE_NONE
        r.buf = NULL
    if ln.failed:
        r.err = EIO
        lane_finish(ln, slot)
        return
    ns = lane_ns_of(ln, r.nodeid)
    if ns == NULL:
        # the root directory has nothing to flush; a namespace that went
        # (detached, deleted, not found by a bring-up) answers EIO to data,
        # but close() and fsync() of a file still open on it succeed: a
        # detach or delete flushed it first (nvmefs/admin.py), every write
        # after it failed, and a Flush has no namespace to go to
        r.err = 0 if r.kind == K_FLUSH else EIO
        lane_finish(ln, slot)
        return
    r.nsid = ns.nsid
    r.shift = ns.lba_shift
    if r.kind == K_FLUSH:
        r.ncmds = 1
        lane_start_phase(ln, slot)
    elif r.fuse_op == FUSE_READ:
        lane_take_read(ln, slot, n, ns)
    elif r.fuse_op == FUSE_WRITE:
        lane_take_write(ln, slot, n, ns)
    else:
        lane_take_fallocate(ln, slot, n, ns)


cdef void lane_take_read(lane_t *ln, uint32_t slot, size_t n, lane_ns *ns) noexcept nogil:
    cdef lreq *r = &ln.req[slot]
    cdef fuse_read_in *ri = <fuse_read_in *>(r.buf + sizeof(fuse_in_header))
    cdef uint64_t off, size, last
    cdef uint64_t bs = <uint64_t>1 << ns.lba_shift
    if n < sizeof(fuse_in_header) + sizeof(fuse_read_in):
        r.err = EIO
        lane_finish(ln, slot)
        return
    off = ri.offset
    size = ri.size
    r.kind = K_READ
    if size == 0 or off >= ns.size:
        ln.n_empty += 1         # at or past the end: an empty read, as from a regular file
        lane_finish(ln, slot)
        return
    if size > ns.size - off:
        size = ns.size - off
    r.first = off >> ns.lba_shift
    last = (off + size + bs - 1) >> ns.lba_shift
    r.count = last - r.first
    r.skip = <uint32_t>(off - (r.first << ns.lba_shift))
    r.size = <uint32_t>size
    if (r.count << ns.lba_shift) > ln.readsize:
        r.err = EIO             # larger than max_pages allows: the kernel never sends it
        lane_finish(ln, slot)
        return
    r.per = lane_per(ln, ns.lba_shift)
    r.ncmds = div_up(r.count, r.per)
    if r.ncmds > 1:
        ln.n_split += 1
    lane_start_phase(ln, slot)


cdef void lane_take_write(lane_t *ln, uint32_t slot, size_t n, lane_ns *ns) noexcept nogil:
    cdef lreq *r = &ln.req[slot]
    cdef fuse_write_in *wi = <fuse_write_in *>(r.buf + sizeof(fuse_in_header))
    cdef uint64_t off, size, last, bs = <uint64_t>1 << ns.lba_shift
    cdef bint head, tail
    r.kind = K_WRITE
    # the data is the request's tail, whatever the size of fuse_write_in
    if n < sizeof(fuse_in_header) + 24 or wi.size > n - sizeof(fuse_in_header) - 24:
        r.err = EIO
        lane_finish(ln, slot)
        return
    off = wi.offset
    size = wi.size
    r.data_off = <uint32_t>(n - size)
    if size and off >= ns.size:
        r.err = ENOSPC
        lane_finish(ln, slot)
        return
    if size > ns.size - off:
        size = ns.size - off        # a short write up to the end, as a block device does
        if wi.write_flags & FUSE_WRITE_CACHE:
            # the page cache's writeback takes no notice of a short count:
            # the part past the end would vanish and fsync succeed.  Write
            # what fits, then fail it, so that fsync() reports the loss.
            r.past_end = 1
    r.off = off
    r.size = <uint32_t>size
    if size == 0:
        lane_finish(ln, slot)
        return
    r.first = off >> ns.lba_shift
    last = (off + size + bs - 1) >> ns.lba_shift
    r.count = last - r.first
    head = (off & (bs - 1)) != 0
    tail = ((off + size) & (bs - 1)) != 0
    if head or tail or (r.data_off & 3):
        if bs > ln.sh.max_lba or (r.count << ns.lba_shift) > ln.readsize - LANE_HDR_ROOM:
            r.err = EIO         # the buffers leave no room for this LBA size
            lane_finish(ln, slot)
            return
        r.kind = K_RMW
        if head:
            r.edge_lba[r.nedge] = r.first
            r.nedge += 1
        if tail and (last - 1 != r.first or not head):
            r.edge_lba[r.nedge] = last - 1
            r.nedge += 1
        # a dword-misaligned but LBA-aligned write reads nothing back
        r.ncmds = r.nedge
        ln.n_rmw += 1
    else:
        r.per = lane_per(ln, ns.lba_shift)
        r.ncmds = div_up(r.count, r.per)
        if r.ncmds > 1:
            ln.n_split += 1
    lane_take_range(ln, slot)


cdef void lane_take_fallocate(lane_t *ln, uint32_t slot, size_t n, lane_ns *ns) noexcept nogil:
    """PUNCH_HOLE|KEEP_SIZE zeroes and deallocates, ZERO_RANGE zeroes, as a
    block device does (Linux blkdev_fallocate); other modes EOPNOTSUPP
    (every block of a namespace exists already); growing the file ENOSPC."""
    cdef lreq *r = &ln.req[slot]
    cdef fuse_fallocate_in *fi = <fuse_fallocate_in *>(r.buf + sizeof(fuse_in_header))
    cdef uint64_t off, end, bs = <uint64_t>1 << ns.lba_shift, per
    cdef uint32_t mode
    cdef bint zero
    r.kind = K_FALLOC
    if n < sizeof(fuse_in_header) + sizeof(fuse_fallocate_in):
        r.err = EIO
        lane_finish(ln, slot)
        return
    mode = fi.mode
    off = fi.offset
    r.punch = mode == (FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE)
    zero = (mode & ~FALLOC_KEEP_SIZE) == FALLOC_ZERO_RANGE
    if not r.punch and not zero:
        r.err = EOPNOTSUPP
        lane_finish(ln, slot)
        return
    if fi.length == 0 or off + fi.length < off:
        r.err = EINVAL
        lane_finish(ln, slot)
        return
    end = off + fi.length
    if end > ns.size:
        if not mode & FALLOC_KEEP_SIZE:
            r.err = ENOSPC
            lane_finish(ln, slot)
            return
        end = ns.size
    ln.n_falloc += 1
    if off >= end:
        lane_finish(ln, slot)
        return
    if bs > ln.sh.max_lba:
        r.err = EIO
        lane_finish(ln, slot)
        return
    r.off = off
    r.size = <uint32_t>umin(end - off, <uint64_t>0xFFFFFFFF)
    r.first = off >> ns.lba_shift
    r.count = ((end + bs - 1) >> ns.lba_shift) - r.first
    r.mid_a = (off + bs - 1) >> ns.lba_shift
    r.mid_b = end >> ns.lba_shift
    if r.mid_a >= r.mid_b:
        # no whole LBA: one or two partial ones
        r.mid_a = r.mid_b = 0
        r.edge_lba[0] = r.first
        r.nedge = 1
        if r.count > 1:
            r.edge_lba[1] = r.first + 1
            r.nedge = 2
    else:
        if off < (r.mid_a << ns.lba_shift):
            r.edge_lba[r.nedge] = r.first
            r.nedge += 1
        if end > (r.mid_b << ns.lba_shift):
            r.edge_lba[r.nedge] = r.mid_b
            r.nedge += 1
    # Write Zeroes first (DEAC when punching): its zeroes are guaranteed,
    # whereas deallocate is advisory and taken only without Write Zeroes
    # when DLFEAT promises zeroes; without either, zeroes are written
    if ns.wz_lbas:
        r.method = M_WZ
        r.per = ns.wz_lbas
    elif r.punch and ns.dsm:
        r.method = M_DSM
        per = <uint64_t>ns.dsm_ranges * ns.dsm_range_lbas
        if ns.dsm_lbas and per > ns.dsm_lbas:
            per = ns.dsm_lbas
        r.per = <uint32_t>umin(per, <uint64_t>0xFFFFFFFF)
        # each command's ranges live in its own page of the buffer
        r.cap = <uint32_t>(ln.readsize // DSM_PAYLOAD)
    else:
        r.method = M_ZEROS
        per = umin(ln.max_transfer, ln.sh.zero_len) >> ns.lba_shift
        r.per = <uint32_t>umin(per, NVM_MAX_NLB)
        if r.per == 0:
            r.per = 1
    r.ncmds = r.nedge + (div_up(r.mid_b - r.mid_a, r.per) if r.mid_b > r.mid_a else 0)
    lane_take_range(ln, slot)


# -- the range lock --------------------------------------------------------------------

cdef bint lane_waiting_overlaps(lane_t *ln, lreq *r) noexcept nogil:
    cdef uint32_t i = ln.rq_head
    cdef lreq *w
    while i != LANE_NONE:
        w = &ln.req[i]
        if w.nsid == r.nsid and r.first < w.first + w.count and w.first < r.first + r.count:
            return True
        i = w.link
    return False


cdef void lane_take_range(lane_t *ln, uint32_t slot) noexcept nogil:
    cdef lreq *r = &ln.req[slot]
    # behind an overlapping one of this lane that waits already: in order
    if ln.rq_head == LANE_NONE or not lane_waiting_overlaps(ln, r):
        if (<RangeSet>ln.sh.ranges[r.nsid]).take(r.first, r.first + r.count, ln.id) == 0:
            r.state = S_RUN
            r.ranged = 1
            lane_start_phase(ln, slot)
            return
    ln.n_range_waits += 1
    r.state = S_RANGE
    fifo_push(ln, &ln.rq_head, &ln.rq_tail, slot)


cdef void lane_retry_ranges(lane_t *ln) noexcept nogil:
    """A range came back somewhere: try the parked requests in order."""
    cdef uint32_t i = ln.rq_head, nxt
    cdef uint32_t keep_head = LANE_NONE, keep_tail = LANE_NONE
    cdef lreq *r
    ln.rq_head = ln.rq_tail = LANE_NONE
    while i != LANE_NONE:
        r = &ln.req[i]
        nxt = r.link
        if r.err:
            lane_finish(ln, i)
        else:
            # rq_head holds those already kept back: check order against them
            ln.rq_head = keep_head
            if ((keep_head == LANE_NONE or not lane_waiting_overlaps(ln, r))
                    and (<RangeSet>ln.sh.ranges[r.nsid]).take(r.first, r.first + r.count, ln.id) == 0):
                r.state = S_RUN
                r.ranged = 1
                lane_start_phase(ln, i)
            else:
                fifo_push(ln, &keep_head, &keep_tail, i)
        i = nxt
    ln.rq_head = keep_head
    ln.rq_tail = keep_tail


cdef void lane_give_range(lane_t *ln, lreq *r) noexcept nogil:
    cdef uint32_t k
    cdef lane_t *o
    cdef int waiters
    r.ranged = 0
    waiters = (<RangeSet>ln.sh.ranges[r.nsid]).give(r.first, r.first + r.count, ln.wakebuf)
    if waiters <= 0:
        return
    for k in range(ln.sh.nlanes):
        if ln.wakebuf[k]:
            ln.wakebuf[k] = 0
            o = ln.sh.lanes[k]
            lane_store32(&o.range_wait, 1)
            if k != ln.id:
                nvmefs_mb()
                if lane_load32(&o.sleeping):
                    lane_wake(o.wake_fd)


# -- commands -------------------------------------------------------------------------

cdef int lreq_build(lane_t *ln, lreq *r, uint8_t phase, uint32_t idx, nvme_sqe *cmd, dma_seg *seg,
                    uint32_t *nseg, bint *is_read) noexcept nogil:
    """Command ``idx`` of phase ``phase`` of ``r``: the same command every
    time it is asked for.  0, or -EINVAL for an index past the phase."""
    cdef uint64_t lba, cnt, a, left, rl, range_lbas
    cdef uint32_t m, k, nr
    cdef uint8_t *payload
    cdef uint64_t *ent
    memset(cmd, 0, sizeof(nvme_sqe))
    cmd.nsid = r.nsid
    nseg[0] = 0
    is_read[0] = False
    seg.flags = 0
    if r.kind == K_FLUSH:
        cmd.opc = NVM_FLUSH
        return 0
    if (r.kind == K_RMW and phase == 0) or (r.kind == K_FALLOC and idx < r.nedge):
        if idx >= r.nedge:
            return -EINVAL
        # an edge LBA: read into (phase 0) or written from (phase 1) its scratch
        cmd.opc = NVM_READ if phase == 0 else NVM_WRITE
        lba = r.edge_lba[idx]
        cmd.cdw10 = <uint32_t>lba
        cmd.cdw11 = <uint32_t>(lba >> 32)
        seg.iova = r.iova + ln.readsize + <uint64_t>idx * ln.sh.max_lba
        seg.length = <uint32_t>1 << r.shift
        nseg[0] = 1
        is_read[0] = phase == 0
        return 0
    if r.kind == K_FALLOC:
        m = idx - r.nedge
        a = r.mid_a + <uint64_t>m * r.per
        if a >= r.mid_b:
            return -EINVAL
        cnt = umin(<uint64_t>r.per, r.mid_b - a)
        cmd.cdw10 = <uint32_t>a
        cmd.cdw11 = <uint32_t>(a >> 32)
        if r.method == M_WZ:
            cmd.opc = NVM_WRITE_ZEROES
            cmd.cdw12 = <uint32_t>(cnt - 1) | (NVM_DEAC if r.punch else 0)
        elif r.method == M_ZEROS:
            cmd.opc = NVM_WRITE
            cmd.cdw12 = <uint32_t>(cnt - 1)
            seg.iova = ln.sh.zero_iova
            seg.length = <uint32_t>(cnt << r.shift)
            nseg[0] = 1
        else:
            # Dataset Management: ranges of at most DMRSL LBAs, this
            # command's page of the buffer (r.cap keeps pages apart)
            cmd.opc = NVM_DSM
            cmd.cdw10 = 0
            cmd.cdw11 = DSM_ATTR_DEALLOCATE
            payload = r.buf + <size_t>(m % r.cap) * DSM_PAYLOAD
            range_lbas = ln.ns[r.nsid].dsm_range_lbas
            if range_lbas == 0:
                range_lbas = 0xFFFFFFFF
            nr = 0
            left = cnt
            while left and nr < 256:
                rl = umin(left, range_lbas)
                ent = <uint64_t *>(payload + 16 * nr)
                ent[0] = <uint64_t>rl << 32           # context attributes 0, length in LBAs
                ent[1] = a
                a += rl
                left -= rl
                nr += 1
            cmd.cdw10 = nr - 1
            seg.iova = r.iova + <size_t>(m % r.cap) * DSM_PAYLOAD
            seg.length = 16 * nr
            nseg[0] = 1
        return 0
    # the data phase of READ, WRITE and RMW
    lba = r.first + <uint64_t>idx * r.per
    if lba >= r.first + r.count:
        return -EINVAL
    cnt = umin(<uint64_t>r.per, r.first + r.count - lba)
    cmd.cdw10 = <uint32_t>lba
    cmd.cdw11 = <uint32_t>(lba >> 32)
    cmd.cdw12 = <uint32_t>(cnt - 1)
    seg.length = <uint32_t>(cnt << r.shift)
    nseg[0] = 1
    if r.kind == K_READ:
        cmd.opc = NVM_READ
        seg.iova = r.iova + ((lba - r.first) << r.shift)
        is_read[0] = True
    elif r.kind == K_WRITE:
        cmd.opc = NVM_WRITE
        seg.iova = r.iova + r.data_off + ((lba - r.first) << r.shift)
    else:
        cmd.opc = NVM_WRITE
        seg.iova = r.iova + LANE_HDR_ROOM + ((lba - r.first) << r.shift)
    return 0


cdef int lane_submit_cmd(lane_t *ln, uint32_t slot, uint32_t idx, uint8_t attempt) noexcept nogil:
    cdef lreq *r = &ln.req[slot]
    cdef nvme_sqe cmd
    cdef dma_seg seg
    cdef uint32_t nseg
    cdef bint is_read
    cdef int rc = lreq_build(ln, r, r.phase, idx, &cmd, &seg, &nseg, &is_read)
    if rc < 0:
        return rc
    rc = (<QueuePair>ln.qp).submit(&cmd, &seg, nseg, DPTR_AUTO, is_read, user_pack(slot, idx, r.phase, attempt), False)
    if rc == -EAGAIN or rc == -EBUSY:
        ln.n_sq_waits += 1
        return -EAGAIN
    if rc < 0:
        return rc
    # each command's own clock for the timeout check, from its submission
    (<QueuePair>ln.qp).cids.get(<uint32_t>rc).submit_ns = ln.now if ln.now else nvmefs_now_ns()
    r.pending += 1
    ln.inflight += 1
    ln.n_commands += 1
    return 0


cdef void lane_enqueue(lane_t *ln, uint32_t slot, bint front) noexcept nogil:
    cdef lreq *r = &ln.req[slot]
    if r.queued:
        return
    r.queued = 1
    if front and ln.wq_head != LANE_NONE:
        r.link = ln.wq_head
        ln.wq_head = slot
    else:
        fifo_push(ln, &ln.wq_head, &ln.wq_tail, slot)


cdef void lane_start_phase(lane_t *ln, uint32_t slot) noexcept nogil:
    cdef lreq *r = &ln.req[slot]
    r.next = 0
    r.pending = 0
    r.delayed = 0
    # behind requests already waiting for SQ room, never ahead of them
    if ln.wq_head != LANE_NONE or lane_submit(ln, slot) < 0:
        lane_enqueue(ln, slot, False)


cdef int lane_submit(lane_t *ln, uint32_t slot) noexcept nogil:
    """Submit what ``slot`` may submit now, ringing once.  -EAGAIN when
    the SQ (or its ids) ran out or no queue is attached: the caller queues
    it.  0 otherwise -- and then ``slot`` may have been answered and freed:
    the caller must not look at it again."""
    cdef lreq *r = &ln.req[slot]
    cdef int rc
    if r.err:
        r.next = r.ncmds
        lane_progress(ln, slot)
        return 0
    if not ln.attached:
        return -EAGAIN
    while r.next < r.ncmds:
        if r.cap and r.pending >= r.cap:
            break               # a completion of its own submits more
        rc = lane_submit_cmd(ln, slot, r.next, 0)
        if rc == -EAGAIN:
            (<QueuePair>ln.qp).ring_sq()
            return -EAGAIN
        if rc < 0:
            # neither PRP nor SGL can describe it: not expected of the
            # lanes' buffers, and never worth a retry
            r.err = EIO
            r.next = r.ncmds
            ln.n_errors += 1
            lane_post(ln, EV_ERROR, r, ln.qid, 0, 0, 0, 0, -rc, r.first, <uint32_t>r.count)
            break
        r.next += 1
    (<QueuePair>ln.qp).ring_sq()
    lane_progress(ln, slot)
    return 0


cdef void lane_submit_waiting(lane_t *ln) noexcept nogil:
    cdef uint32_t slot
    cdef lreq *r
    while ln.wq_head != LANE_NONE and ln.attached:
        slot = ln.wq_head
        r = &ln.req[slot]
        ln.wq_head = r.link
        if ln.wq_head == LANE_NONE:
            ln.wq_tail = LANE_NONE
        r.queued = 0
        if lane_submit(ln, slot) < 0:
            lane_enqueue(ln, slot, True)
            return


cdef void lane_progress(lane_t *ln, uint32_t slot) noexcept nogil:
    """After a change in what ``slot`` has in flight: more to submit, the
    phase done, or (with an error) the end once nothing is at the
    controller any more.  ``slot`` may be answered and freed on return."""
    cdef lreq *r = &ln.req[slot]
    if r.state != S_RUN or r.queued:
        return                  # parked for its range, or the wait queue comes back to it
    if r.pending or r.delayed:
        if r.next < r.ncmds and not r.err and not (r.cap and r.pending >= r.cap):
            if lane_submit(ln, slot) < 0:
                lane_enqueue(ln, slot, False)
        return
    if r.err:
        lane_finish(ln, slot)
    elif r.next < r.ncmds:
        if lane_submit(ln, slot) < 0:
            lane_enqueue(ln, slot, False)
    else:
        lane_phase_done(ln, slot)


cdef int lane_reap(lane_t *ln) noexcept nogil:
    cdef int n = (<QueuePair>ln.qp).process_completions(0), k
    cdef uint64_t user
    cdef uint32_t slot, idx
    cdef uint8_t phase, attempt
    cdef uint16_t st
    cdef lreq *r
    for k in range(n):
        user = (<QueuePair>ln.qp).out_user[k]
        slot = <uint32_t>(user & ((1 << USER_SLOT_BITS) - 1))
        idx = <uint32_t>((user >> USER_SLOT_BITS) & <uint64_t>0xFFFFFFFF)
        phase = (user >> 52) & 0xF
        attempt = (user >> 56) & 0xF
        ln.inflight -= 1
        if slot >= ln.nreq:
            continue            # the queue pair drops stale ids: this would be a bug
        r = &ln.req[slot]
        if r.state != S_RUN or r.phase != phase or r.pending == 0:
            continue
        r.pending -= 1
        st = (<QueuePair>ln.qp).out_cqe[k].status & 0xFFFE
        if st:
            lane_failed(ln, slot, idx, attempt, st, (<QueuePair>ln.qp).out_cqe[k].cid)
        lane_progress(ln, slot)
    return n


cdef inline bint status_resubmit(uint16_t st) noexcept nogil:
    """The general path's rule (namespace.py _resubmit): a retryable
    status (transient, no DNR), or Abort Requested without DNR -- the host
    aborts only commands that timed out, and Linux resubmits those."""
    cdef bint transient = False
    cdef uint8_t sct = status_sct(st), sc = status_sc(st)
    if status_dnr(st):
        return False
    if sct == 0 and sc == 0x07:
        return True
    status_lookup(sct, sc, NULL, NULL, NULL, &transient)
    return transient


cdef void lane_failed(lane_t *ln, uint32_t slot, uint32_t idx, uint8_t attempt, uint16_t st,
                      uint16_t cid) noexcept nogil:
    cdef lreq *r = &ln.req[slot]
    cdef nvme_sqe cmd
    cdef dma_seg seg
    cdef uint32_t nseg
    cdef bint is_read
    cdef uint64_t delay, lba
    cdef lane_delayed *d
    cdef uint8_t crd
    lreq_build(ln, r, r.phase, idx, &cmd, &seg, &nseg, &is_read)
    lba = <uint64_t>cmd.cdw10 | (<uint64_t>cmd.cdw11 << 32)
    if not r.err and attempt < ln.retries and status_resubmit(st) and ln.ndl < ln.dlcap:
        # 2, 4, 8 ms ... or the controller's Command Retry Delay (CRD)
        delay = <uint64_t>2000000 << attempt
        crd = status_crd(st)
        if crd and ln.crdt_ns[crd - 1] > delay:
            delay = ln.crdt_ns[crd - 1]
        d = &ln.dl[ln.ndl]
        ln.ndl += 1
        d.slot = slot
        d.idx = idx
        d.phase = r.phase
        d.attempt = attempt + 1
        d.due = ln.now + delay
        r.delayed += 1
        ln.n_retries += 1
        lane_post(ln, EV_RETRY, r, ln.qid, cid, cmd.opc, st, attempt + 1, 0, lba, (cmd.cdw12 & 0xFFFF) + 1)
        return
    ln.n_errors += 1
    lane_post(ln, EV_ERROR, r, ln.qid, cid, cmd.opc, st, attempt, EIO, lba, (cmd.cdw12 & 0xFFFF) + 1)
    if not r.err:
        r.err = EIO             # answered EIO once the rest of it is back
    r.next = r.ncmds


cdef void lane_retry_due(lane_t *ln) noexcept nogil:
    cdef uint32_t i = 0, slot
    cdef lane_delayed *d
    cdef lreq *r
    cdef bint rung = False
    while i < ln.ndl:
        d = &ln.dl[i]
        slot = d.slot
        r = &ln.req[slot]
        if r.state == S_RUN and r.phase == d.phase and not r.err:
            if d.due > ln.now:
                i += 1
                continue
            if lane_submit_cmd(ln, slot, d.idx, d.attempt) == -EAGAIN:
                i += 1          # the SQ is full: again next round
                continue
            rung = True
        r.delayed -= 1
        ln.dl[i] = ln.dl[ln.ndl - 1]
        ln.ndl -= 1
        lane_progress(ln, slot)
    if rung:
        (<QueuePair>ln.qp).ring_sq()


cdef void lane_check_timeouts(lane_t *ln) noexcept nogil:
    """Commands at the controller past the timeout (abort them), and past
    twice the timeout (reset): each told to the control plane once."""
    cdef uint32_t idx
    cdef nvme_tracker *t
    cdef uint64_t age, tick = ln.timeout_ns // 8
    if tick < 10000000:
        tick = 10000000
    if tick > 250000000:
        tick = 250000000
    ln.next_timeout_check = ln.now + tick
    if not ln.timeout_ns or not ln.inflight:
        return
    for idx in range((<QueuePair>ln.qp).cids.depth):
        t = (<QueuePair>ln.qp).cids.get(idx)
        if t.state != TRK_SUBMITTED or not t.submit_ns or ln.now < t.submit_ns:
            continue
        age = ln.now - t.submit_ns
        if age > ln.timeout_ns and not (t.user >> USER_TIMED_OUT) & 1:
            t.user |= <uint64_t>1 << USER_TIMED_OUT
            ln.n_timeouts += 1
            lane_post(ln, EV_TIMEOUT, NULL, ln.qid, t.cid, t.opc, 0, 0, 0, 0, 0)
        elif age > 2 * ln.timeout_ns and not (t.user >> USER_TIMED_OUT2) & 1:
            t.user |= <uint64_t>1 << USER_TIMED_OUT2
            lane_post(ln, EV_TIMEOUT2, NULL, ln.qid, t.cid, t.opc, 0, 0, 0, 0, 0)


# -- phases and answers ------------------------------------------------------------------

cdef uint8_t *lane_scratch_of(lane_t *ln, lreq *r, uint64_t lba) noexcept nogil:
    cdef uint32_t k
    for k in range(r.nedge):
        if r.edge_lba[k] == lba:
            return r.buf + ln.readsize + <size_t>k * ln.sh.max_lba
    return NULL


cdef void lane_phase_done(lane_t *ln, uint32_t slot) noexcept nogil:
    cdef lreq *r = &ln.req[slot]
    cdef uint64_t bs = <uint64_t>1 << r.shift, head, end, a, b
    cdef uint8_t *region
    cdef uint8_t *s
    cdef uint32_t k
    if r.kind == K_RMW and r.phase == 0:
        # The data moves to its place among the LBAs it covers, the edge
        # LBAs' other bytes come from what was read; one write then.
        head = r.off - (r.first << r.shift)
        end = head + r.size
        region = r.buf + LANE_HDR_ROOM
        memmove(region + head, r.buf + r.data_off, r.size)
        if head:
            memcpy(region, lane_scratch_of(ln, r, r.first), head)
        if end & (bs - 1):
            s = lane_scratch_of(ln, r, r.first + r.count - 1)
            memcpy(region + end, s + (end & (bs - 1)), bs - (end & (bs - 1)))
        r.phase = 1
        r.per = lane_per(ln, r.shift)
        r.ncmds = div_up(r.count, r.per)
        lane_start_phase(ln, slot)
        return
    if r.kind == K_FALLOC and r.phase == 0 and r.nedge:
        # zero the asked-for bytes of each partial LBA, then write it back
        for k in range(r.nedge):
            s = r.buf + ln.readsize + <size_t>k * ln.sh.max_lba
            a = r.edge_lba[k] << r.shift
            b = a + bs
            if a < r.off:
                a = r.off
            if b > r.off + r.size:
                b = r.off + r.size
            if a < b:
                memset(s + (a - (r.edge_lba[k] << r.shift)), 0, b - a)
        r.phase = 1
        r.ncmds = r.nedge
        lane_start_phase(ln, slot)
        return
    lane_finish(ln, slot)


cdef void lane_finish(lane_t *ln, uint32_t slot) noexcept nogil:
    """Answer ``slot`` (exactly once) and free it."""
    cdef lreq *r = &ln.req[slot]
    cdef fuse_write_out wo
    if r.ranged:
        lane_give_range(ln, r)
    if r.err == 0 and r.past_end:
        r.err = ENOSPC
    if r.err:
        lane_reply(ln, r.reply_fd, r.unique, r.err, NULL, 0)
    elif r.kind == K_READ:
        lane_reply(ln, r.reply_fd, r.unique, 0, r.buf + r.skip, r.size)
        ln.n_read += 1
        ln.bytes_read += r.size
    elif r.kind == K_WRITE or r.kind == K_RMW:
        if r.size:
            lane_store64(&ln.sh.mtime[r.nsid], lane_wall_ns())
        wo.size = r.size
        wo.padding = 0
        lane_reply(ln, r.reply_fd, r.unique, 0, &wo, sizeof(wo))
        ln.n_write += 1
        ln.bytes_written += r.size
    else:
        if r.kind == K_FALLOC:
            lane_store64(&ln.sh.mtime[r.nsid], lane_wall_ns())
        lane_reply(ln, r.reply_fd, r.unique, 0, NULL, 0)
    if r.quarantine:
        # a controller that could not be disabled may still write here:
        # the buffer is never used again
        ln.n_quarantined += 1
        r.state = S_FREE
        ln.freereq[ln.nfreereq] = slot
        ln.nfreereq += 1
        ln.active -= 1
        return
    lane_free_slot(ln, slot)
