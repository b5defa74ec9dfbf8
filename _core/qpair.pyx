# A submission/completion queue pair (defects 2, 3 and 6).
#
# Ownership: a queue pair belongs to one submitting thread at a time (the
# trio thread that created it, or the bench loop).  There is no lock, global
# or per queue, on submit or reap; parallelism comes from one pair per CPU.
#
# SQ flow control: the SQ holds at most entries-1 commands; the head is the
# SQHD the controller last reported in a completion (NVME-NOTES "Queue
# rules").  A full SQ returns -EAGAIN, exhausted ids -EBUSY; the caller waits
# for completions and retries.  Nothing is ever overwritten.
#
# Ordering: submit copies the whole 64-byte entry, then the tail doorbell is
# written with a store fence + release store (nvmefs_doorbell_write).  Reap
# loads the phase with acquire semantics and fences before reading the body.

# dptr_mode (DPTR_AUTO/PRP/SGL): nvmefs/_core.pxd
cdef enum:
    DEFAULT_MAX_TRANSFER = 2 * 1024 * 1024
    DEFAULT_MAX_SGL_SEGMENTS = 256


cdef extern from "<sched.h>" nogil:
    int sched_yield()

# Hybrid polling spins this long on the CPU before it starts yielding it
# each round (a polled command usually completes within a few us).
DEF SPIN_YIELD_AFTER_NS = 8000


cdef inline void spin_pause(uint64_t spun_ns) noexcept nogil:
    """One round of a hybrid-polling wait that has lasted ``spun_ns``.
    Past a command's usual time, perhaps the device's thread (the built-in
    controller) waits for this very CPU: offer it (with nobody waiting,
    sched_yield returns at once)."""
    if spun_ns > SPIN_YIELD_AFTER_NS:
        sched_yield()
    else:
        cpu_relax()


cdef class QueuePair:
    """``QueuePair(arena, regs, qid, entries, dstrd=0, max_transfer=2 MiB,
    max_sgl_segments=256)``: rings of ``entries`` slots, ``entries-1``
    commands in flight at most."""
    # fields and inline methods: nvmefs/_core.pxd (shared with the model)

    def __cinit__(self, DmaArena arena not None, RegisterFile regs not None, uint16_t qid,
                  uint32_t entries, uint32_t dstrd=0, uint32_t max_transfer=DEFAULT_MAX_TRANSFER,
                  uint32_t max_sgl_segments=DEFAULT_MAX_SGL_SEGMENTS):
        self.out_cqe = NULL
        self.out_user = NULL
        self.py_segs = NULL
        self.idle_flag = NULL
        self.kick_fd = -1
        self.sh_sq = self.sh_cq = self.ei_sq = self.ei_cq = NULL
        if entries < 2 or entries > 65536:
            raise ValueError(f"queue size {entries} outside 2..65536")
        if regs.doorbell(qid, 1, dstrd) + 1 > <volatile uint32_t *>(regs.base + regs.size):
            raise ValueError(f"queue {qid} doorbells lie outside the register file")
        self.arena = arena
        self.regs = regs
        self.qid = qid
        self.entries = entries
        self.depth = entries - 1
        self.page_size = arena.page_size
        self.cids = CidTable(self.depth)
        self.sq_buf = arena.alloc(entries * sizeof(nvme_sqe))
        self.cq_buf = arena.alloc(entries * sizeof(nvme_cqe))
        self.sq_iova = (<DmaBuffer>self.sq_buf).iova
        self.cq_iova = (<DmaBuffer>self.cq_buf).iova
        self.sq = <nvme_sqe *>(<DmaBuffer>self.sq_buf).vaddr
        self.cq = <nvme_cqe *>(<DmaBuffer>self.cq_buf).vaddr
        self.sq_db = regs.doorbell(qid, 0, dstrd)
        self.cq_db = regs.doorbell(qid, 1, dstrd)
        self.phase = 1
        self.sgl_threshold = SGL_THRESHOLD_DEFAULT
        if max_transfer < self.page_size:
            max_transfer = self.page_size
        self.max_transfer = max_transfer
        # worst case PRP entries: an unaligned start touches one extra page
        cdef uint64_t prp_entries = max_transfer // self.page_size + 1
        cdef uint32_t lp = prp_list_pages_for(prp_entries - 1, self.page_size)
        cdef uint32_t sp = sgl_list_pages_for(max(max_sgl_segments, 1), self.page_size)
        self.list_pages_per_cmd = max(lp, sp)
        # all list pages of the queue in one allocation, sliced per tracker (defect 8)
        self.list_buf = arena.alloc(<size_t>self.depth * self.list_pages_per_cmd * self.page_size)
        cdef uint32_t i
        cdef nvme_tracker *t
        for i in range(self.depth):
            t = self.cids.get(i)
            t.list_pages = self.list_pages_per_cmd
            t.list_iova = (<DmaBuffer>self.list_buf).iova + <uint64_t>i * self.list_pages_per_cmd * self.page_size
            t.list_vaddr = (<DmaBuffer>self.list_buf).vaddr + <size_t>i * self.list_pages_per_cmd * self.page_size
        self.out_cqe = <nvme_cqe *>malloc(self.entries * sizeof(nvme_cqe))
        self.out_user = <uint64_t *>malloc(self.entries * sizeof(uint64_t))
        # sized for exactly what load_segments() admits
        self.py_segs = <dma_seg *>malloc(self.list_pages_per_cmd * (self.page_size >> 4) * sizeof(dma_seg))
        if self.out_cqe == NULL or self.out_user == NULL or self.py_segs == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.out_cqe)
        free(self.out_user)
        free(self.py_segs)

    # --- hot path ------------------------------------------------------------------


    cdef int submit(self, nvme_sqe *cmd, const dma_seg *segs, uint32_t nseg, int mode,
                    bint is_read, uint64_t user, bint ring) noexcept nogil:
        """Place ``cmd`` (its data pointer built from ``segs``) in the SQ.
        Returns the tracker index, -EAGAIN (SQ full), -EBUSY (no free id), or
        the builder's -errno (fault in last_fault)."""
        cdef int idx, rc, how
        cdef nvme_tracker *t
        if self.sq_full():
            self.sq_full_events += 1
            return -EAGAIN
        idx = self.cids.alloc()
        if idx < 0:
            return idx
        t = self.cids.get(idx)
        if nseg:
            if self.sgl_only:
                # NVMe over Fabrics: SGLs for every command, admin ones too
                how = USE_SGL
            elif mode == DPTR_AUTO:
                how = choose_dptr(self.sgls, segs, nseg, self.page_size, self.qid == 0, is_read,
                                  self.sgl_threshold)
                if how < 0:
                    self.cids.release(idx)
                    self.last_dptr = how
                    return how
            else:
                how = USE_SGL if mode == DPTR_SGL else USE_PRP
            if how == USE_SGL:
                rc = sgl_build(segs, nseg, self.page_size, (self.sgls & 3) == SGLS_DWORD_ALIGNED,
                               t.list_iova, t.list_vaddr, t.list_pages,
                               <nvme_sgl_desc *>&cmd.dptr[0], &self.last_fault, &self.last_fault_seg)
                cmd.flags = (cmd.flags & 0x3f) | NVME_PSDT_SGL
            else:
                rc = prp_build(segs, nseg, self.page_size, t.list_iova, t.list_vaddr, t.list_pages,
                               &cmd.dptr[0], &cmd.dptr[1], &self.last_fault, &self.last_fault_seg)
                cmd.flags = cmd.flags & 0x3f
            self.last_dptr = how
            if rc < 0:
                self.cids.release(idx)
                return rc
            if how == USE_SGL:
                self.sgl_commands += 1
            else:
                self.prp_commands += 1
        elif self.sgl_only:
            # no data: an empty SGL Data Block (a fabrics command has no PRPs)
            sgl_set(<nvme_sgl_desc *>&cmd.dptr[0], 0, 0, NVME_SGL_DATA_BLOCK)
            cmd.flags = (cmd.flags & 0x3f) | NVME_PSDT_SGL
        cmd.cid = t.cid
        t.user = user
        t.opc = cmd.opc
        t.state = TRK_SUBMITTED
        if self.test_doorbell_first:
            self._defective_publish(cmd)
        else:
            memcpy(&self.sq[self.sq_tail], cmd, sizeof(nvme_sqe))
            self.sq_tail += 1
            if self.sq_tail == self.entries:
                self.sq_tail = 0
        self.submitted += 1
        if ring:
            self.ring_sq()
        return idx

    cdef void _defective_publish(self, nvme_sqe *cmd) noexcept nogil:
        # Reproduces the reviewed driver's defect 6 for the ordering test: the
        # doorbell moves before the entry is written.  Never used otherwise.
        cdef uint32_t slot = self.sq_tail
        cdef uint32_t *dst = <uint32_t *>&self.sq[slot]
        cdef const uint32_t *src = <const uint32_t *>cmd
        cdef int k
        self.sq_tail += 1
        if self.sq_tail == self.entries:
            self.sq_tail = 0
        nvmefs_store_release32(self.sq_db, self.sq_tail)
        self.sq_tail_rung = self.sq_tail
        for k in range(16):
            nvmefs_store_release32(<volatile uint32_t *>&dst[k], src[k])


    cdef int process_completions(self, uint32_t max_n) noexcept nogil:
        """Consume new CQEs (up to ``max_n``, 0 = all), copying each into its
        tracker's slot and into out_cqe/out_user, and free the trackers.  The
        CQ head doorbell is written once per call.  Returns the number of
        valid completions; stale/duplicate ones are counted and dropped."""
        cdef uint32_t n = 0
        cdef bint consumed = False
        cdef nvme_cqe *e
        cdef nvme_cqe c
        cdef int idx
        cdef nvme_tracker *t
        cdef uint32_t cq_old = self.cq_head
        while max_n == 0 or n < max_n:
            e = &self.cq[self.cq_head]
            if (nvmefs_load_acquire16(&e.status) & 1) != self.phase:
                break
            # the body may be read only after the phase bit was seen
            nvmefs_rmb()
            c = e[0]
            consumed = True
            self.cq_head += 1
            if self.cq_head == self.entries:
                self.cq_head = 0
                self.phase ^= 1
            if c.sqhd < self.entries:
                self.sq_head = c.sqhd
            else:
                self.bad_sqhd += 1
            if c.sqid != self.qid:
                self.wrong_sqid += 1
                continue
            idx = self.cids.lookup(c.cid)
            if idx < 0:
                continue
            t = self.cids.get(idx)
            t.cpl = c
            self.out_cqe[n] = c
            self.out_user[n] = t.user
            if c.status >> 1:
                self.errors += 1
            self.cids.release(idx)
            n += 1
        if consumed:
            if self.sh_cq == NULL or self.shadow_publish(self.sh_cq, self.ei_cq, self.cq_head, cq_old):
                nvmefs_doorbell_write(self.cq_db, self.cq_head)
                self.cq_doorbell_writes += 1
            else:
                self.shadow_skips += 1
            self.notify()
        self.completed += n
        return n


    # --- Python surface ------------------------------------------------------------

    def spin_for_completion(self, uint64_t max_ns):
        """Busy-wait up to ``max_ns`` for the next CQE (hybrid polling: a
        thread that is about to sleep on the interrupt fd checks the phase
        bit for a few microseconds first, which on a VM is much cheaper than
        being woken).  True when a completion is ready."""
        cdef uint64_t start, now, deadline
        if self.cq_ready():
            return True
        start = nvmefs_now_ns()
        deadline = start + max_ns
        while True:
            now = nvmefs_now_ns()
            if now >= deadline:
                return False
            spin_pause(now - start)
            if self.cq_ready():
                return True

    cdef long long poll_one(self, uint8_t opc, uint32_t nsid, uint64_t slba, uint32_t cdw12,
                            uint64_t iova, uint32_t nbytes, bint is_read, uint64_t spin_ns) except? -0x7fffffffffff:
        """The single-command fast path (hybrid polling without trio round
        trips): on a queue with nothing in flight, submit one command on one
        contiguous buffer, ring, and watch the CQ for up to ``spin_ns``.
        Returns ``status | cid << 16`` when it completed in that time
        (status: the 16-bit status field without the phase bit, 0 =
        success), else ``-1 - cid``: the command stays in flight and its
        completion comes out of reap() like any other.  Raises QueueBusy
        when commands are in flight (their completions would be consumed
        here)."""
        cdef nvme_sqe cmd
        cdef dma_seg seg
        cdef int rc, n, i
        cdef uint16_t cid
        cdef uint64_t start, now, deadline
        if self.cids.free_count != self.cids.depth:
            from nvmefs.errors import QueueBusy
            raise QueueBusy(f"queue {self.qid}: commands in flight")
        memset(&cmd, 0, sizeof(cmd))
        cmd.opc = opc
        cmd.nsid = nsid
        cmd.cdw10 = <uint32_t>slba
        cmd.cdw11 = <uint32_t>(slba >> 32)
        cmd.cdw12 = cdw12
        seg.iova = iova
        seg.length = nbytes
        seg.flags = 0
        rc = self.submit(&cmd, &seg, 1 if nbytes else 0, DPTR_AUTO, is_read, 0, True)
        if rc < 0:
            raise_submit_error(self, rc)
        cid = self.cids.get(rc).cid
        # the GIL stays held: nothing else in this process may run meanwhile
        start = nvmefs_now_ns()
        deadline = start + spin_ns
        while True:
            if self.cq_ready():
                # nothing else is in flight: the CQE is ours, or a stale one
                # that process_completions() drops and counts
                n = self.process_completions(0)
                for i in range(n):
                    if self.out_cqe[i].cid == cid:
                        return (self.out_cqe[i].status & 0xFFFE) | (<long long>cid << 16)
            now = nvmefs_now_ns()
            if now >= deadline:
                return -1 - <long long>cid
            spin_pause(now - start)

    cdef object poll_read(self, uint32_t nsid, uint64_t slba, uint32_t cdw12, uint32_t lba_size,
                          DmaBuffer buf, size_t off, uint32_t nbytes, size_t skip, size_t size,
                          uint64_t spin_ns):
        """A Read of ``nbytes`` into ``buf`` at ``off`` through poll_one();
        on success returns bytes [skip, skip+size) of the data (the FUSE
        read path: one copy, straight into the reply object).  Other outcomes
        return poll_one()'s integer."""
        cdef long long rc
        if off + nbytes > buf.size or skip + size > nbytes:
            raise ValueError("poll_read: window outside the buffer")
        if ((cdw12 & 0xFFFF) + 1) * <uint64_t>lba_size != nbytes:
            raise ValueError("poll_read: NLB does not describe the buffer")
        rc = self.poll_one(0x02, nsid, slba, cdw12, buf.iova + off, nbytes, True, spin_ns)
        if rc & 0xFFFF or rc < 0:
            return rc
        return PyBytes_FromStringAndSize(<char *>buf.vaddr + off + skip, size)

    cdef long long poll_write(self, uint32_t nsid, uint64_t slba, uint32_t cdw12, uint32_t lba_size,
                              DmaBuffer buf, size_t off, const uint8_t *src, size_t n,
                              uint64_t spin_ns) except? -0x7fffffffffff:
        """Copy ``n`` bytes from ``src`` into ``buf`` at ``off`` and Write
        them at ``slba`` through poll_one(); returns poll_one()'s integer."""
        if off + n > buf.size or n == 0 or n > 0xFFFFFFFF:
            raise ValueError("poll_write: data outside the buffer")
        if ((cdw12 & 0xFFFF) + 1) * <uint64_t>lba_size != n:
            raise ValueError("poll_write: NLB does not describe the data")
        memcpy(buf.vaddr + off, src, n)
        return self.poll_one(0x01, nsid, slba, cdw12, buf.iova + off, <uint32_t>n, False, spin_ns)

    cdef uint32_t load_segments(self, object segments) except? 0:
        if segments is None:
            return 0
        return <uint32_t>segments_from_py(segments, self.py_segs,
                                          self.list_pages_per_cmd * (self.page_size >> 4))

    def submit_command(self, uint8_t opc, uint32_t nsid=0, uint32_t cdw10=0, uint32_t cdw11=0,
                       uint32_t cdw12=0, uint32_t cdw13=0, uint32_t cdw14=0, uint32_t cdw15=0,
                       segments=None, uint64_t user=0, str dptr="auto", bint is_read=False,
                       bint ring=True, uint64_t mptr=0, uint32_t cdw2=0, uint32_t cdw3=0,
                       uint64_t prp1=0, uint64_t prp2=0):
        """Submit one command.  ``segments``: (bus address, length[, bit_bucket])
        tuples.  Returns the CID; raises QueueBusy when the SQ is full or no id
        is free (wait for completions), PrpLayoutError / SglLayoutError for
        buffers the chosen data pointer cannot describe.  Without segments,
        ``prp1``/``prp2`` go into DPTR as given (queue bases of Create I/O
        SQ/CQ, which are not data transfers)."""
        cdef nvme_sqe cmd
        memset(&cmd, 0, sizeof(cmd))
        cmd.dptr[0] = prp1
        cmd.dptr[1] = prp2
        cmd.opc = opc
        cmd.nsid = nsid
        cmd.cdw2 = cdw2
        cmd.cdw3 = cdw3
        cmd.mptr = mptr
        cmd.cdw10 = cdw10
        cmd.cdw11 = cdw11
        cmd.cdw12 = cdw12
        cmd.cdw13 = cdw13
        cmd.cdw14 = cdw14
        cmd.cdw15 = cdw15
        cdef int mode = DPTR_AUTO if dptr == "auto" else DPTR_PRP if dptr == "prp" else DPTR_SGL
        if dptr not in ("auto", "prp", "sgl"):
            raise ValueError(f"dptr must be auto, prp or sgl, not {dptr!r}")
        cdef uint32_t nseg = self.load_segments(segments)
        cdef int rc = self.submit(&cmd, self.py_segs, nseg, mode, is_read, user, ring)
        if rc >= 0:
            return self.cids.get(rc).cid
        raise_submit_error(self, rc)

    def ring(self):
        """Write the SQ tail doorbell if commands were queued with ring=False."""
        self.ring_sq()

    def reap(self, uint32_t max_n=0):
        """New completions as (user, cid, status, dw0, dw1) tuples; status is the
        CQE's 16-bit status field with the phase bit cleared (0 = success), as
        decode_status() and errors.error_from_status() take it."""
        cdef uint64_t stale0 = self.cids.stale_completions + self.wrong_sqid
        cdef int n = self.process_completions(max_n if max_n < self.entries else self.entries - 1)
        cdef int i
        if self.cids.stale_completions + self.wrong_sqid != stale0:
            _log.warning("queue %d: dropped %d stale or duplicate completion(s) (%d in total)",
                         self.qid, self.cids.stale_completions + self.wrong_sqid - stale0,
                         self.cids.stale_completions + self.wrong_sqid)
        return [(self.out_user[i], self.out_cqe[i].cid, self.out_cqe[i].status & 0xFFFE,
                 self.out_cqe[i].dw0, self.out_cqe[i].dw1) for i in range(n)]

    @property
    def sq_free(self):
        """Slots the submitter can still fill before the SQ is full."""
        return (self.sq_head + self.entries - self.sq_tail - 1) % self.entries

    @property
    def outstanding(self):
        return self.cids.depth - self.cids.free_count

    @property
    def last_choice(self):
        return "sgl" if self.last_dptr == USE_SGL else "prp"

    def tracker_list(self, uint16_t cid):
        """(bus address, pages) of the list memory owned by this CID's tracker."""
        cdef nvme_tracker *t = self.cids.get(cid & self.cids.index_mask)
        return t.list_iova, t.list_pages

    def sq_entry(self, uint32_t slot):
        """The raw 64 bytes of an SQ slot (tests)."""
        return PyBytes_FromStringAndSize(<char *>&self.sq[slot % self.entries], sizeof(nvme_sqe))

    def set_notifier(self, uintptr_t idle_flag_address, int kick_fd):
        """Wake a sleeping device after doorbell writes (see notify()); the
        address and fd come from ControllerModel.notifier() and must outlive
        this queue pair."""
        self.idle_flag = <volatile uint32_t *>idle_flag_address
        self.kick_fd = kick_fd

    def set_shadow(self, DmaBuffer shadow not None, DmaBuffer eventidx not None, uint32_t dstrd=0,
                   bint always_ring=False):
        """Use shadow doorbells in ``shadow`` / ``eventidx`` (the two pages
        given to Doorbell Buffer Config).  ``always_ring``: keep writing the
        MMIO doorbell too (the admin queue, which Linux leaves on MMIO but
        some controllers also read from the shadow page)."""
        cdef size_t stride = <size_t>4 << dstrd
        cdef size_t sq_off = 2 * self.qid * stride, cq_off = (2 * self.qid + 1) * stride
        if cq_off + 4 > shadow.size or cq_off + 4 > eventidx.size:
            raise ValueError(f"queue {self.qid}: its shadow doorbells lie outside the buffer pages")
        self.sh_keep = (shadow, eventidx)
        self.sh_sq = <volatile uint32_t *>(shadow.vaddr + sq_off)
        self.sh_cq = <volatile uint32_t *>(shadow.vaddr + cq_off)
        self.ei_sq = <volatile uint32_t *>(eventidx.vaddr + sq_off)
        self.ei_cq = <volatile uint32_t *>(eventidx.vaddr + cq_off)
        self.sh_always_ring = always_ring
        nvmefs_store_release32(self.sh_sq, self.sq_tail_rung)
        nvmefs_store_release32(self.sh_cq, self.cq_head)

    def _set_doorbell_first(self, bint on):
        self.test_doorbell_first = on

    def stats(self):
        return {
            "qid": self.qid, "entries": self.entries, "submitted": self.submitted,
            "completed": self.completed, "in_flight": self.outstanding,
            "sq_full_waits": self.sq_full_events, "cid_exhausted": self.cids.exhausted,
            "doorbells": self.doorbell_writes, "cq_doorbells": self.cq_doorbell_writes,
            "prp": self.prp_commands, "sgl": self.sgl_commands, "errors": self.errors,
            "shadow_skips": self.shadow_skips,
            "stale_completions": self.cids.stale_completions + self.wrong_sqid,
            "bad_sqhd": self.bad_sqhd,
        }


cdef int raise_submit_error(QueuePair qp, int rc) except -1:
    from nvmefs.errors import QueueBusy, PrpLayoutError, SglLayoutError
    if rc == -EAGAIN:
        raise QueueBusy(f"queue {qp.qid}: submission queue full ({qp.entries - 1} commands)")
    if rc == -EBUSY:
        raise QueueBusy(f"queue {qp.qid}: all {qp.cids.depth} command ids outstanding")
    if qp.last_dptr == USE_SGL:
        raise SglLayoutError(sgl_fault_message(qp.last_fault, qp.last_fault_seg, qp.py_segs))
    if qp.last_dptr == -EOPNOTSUPP:
        raise SglLayoutError("bit bucket segments need a read on a controller with SGL bit bucket support")
    if qp.last_dptr == -EINVAL:
        raise PrpLayoutError("buffer layout is neither PRP- nor SGL-expressible on this controller; "
                             "use a bounce buffer")
    raise PrpLayoutError(prp_fault_message(qp.last_fault, qp.last_fault_seg, qp.py_segs, qp.page_size))
