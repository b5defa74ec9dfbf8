# FUSE over io_uring: the lanes' second way of taking requests (Linux 6.14+,
# fs/fuse/dev_uring.c; the ABI is in include/lane_uring.h).
#
# The kernel keeps one queue per possible CPU and puts a request on the
# queue of the CPU its caller runs on -- the lanes' own shape.  Each lane
# has one io_uring whose entries are registered on the queue of its CPU
# (and on the queues of CPUs no lane runs on, so that every queue has
# entries: until each has, every request of the mount waits).  A fetched
# entry holds the request; its answer goes back with COMMIT_AND_FETCH,
# which hands the entry back for the next one: one system call per answer
# and request instead of a write and a read on /dev/fuse, and the commits
# of one loop turn go in one submit.
#
# Each entry's payload is a DMA buffer, laid out so that the NVMe commands
# point into it: a write's data is where the kernel put it (the request's
# headers are copied in front of it), a read's data lands where the kernel
# copies the answer from.  Requests other than data go to pyfuse3 as
# before (forward.c); their answers come back over a socketpair, since the
# kernel takes them only as this entry's commit, which only this lane's
# thread may submit.  /dev/fuse stays read for the life of the mount:
# FORGET and INTERRUPT always come there, and all of it does if the kernel
# does not switch to the rings.
#
# Order (verified here on 6.18): the rings and entries exist before the
# FUSE_INIT answer that asks for io_uring (forward.c patches libfuse's), and
# the entries are registered only after it was written (before, REGISTER
# gets -EAGAIN).  At unmount every registered entry ends with -ENOTCONN.

from libc.errno cimport ECONNABORTED

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    enum: MSG_DONTWAIT


cdef inline uint8_t *lane_ent_payload(lane_t *ln, uint32_t e) noexcept nogil:
    return <uint8_t *>ln.ents[e].iov[1].iov_base


cdef void lane_ring_commit(lane_t *ln, uint32_t e, uint64_t unique, int err, const void *data,
                           size_t n) noexcept nogil:
    """The answer to the request in entry ``e``: out header in the entry's
    header, out arguments at the start of its payload, then the commit."""
    cdef lane_rent *ent = &ln.ents[e]
    cdef fuse_out_header *oh = <fuse_out_header *>ent.hdr.in_out
    cdef uint8_t *payload = lane_ent_payload(ln, e)
    if ent.state != RE_BUSY and ent.state != RE_FWD:
        ln.n_reply_errors += 1      # ended under it (unmounted): nobody waits
        return
    if ent.state == RE_FWD:
        ln.nfwd -= 1
    if err or n == 0:
        n = 0
    elif n > ent.iov[1].iov_len:
        err = EIO
        n = 0
    elif <const uint8_t *>data != payload:
        # a read whose byte window starts inside an LBA (and the small
        # answers, from the stack): the rest is where the kernel reads it
        memmove(payload, data, n)
    oh.len = <uint32_t>(sizeof(fuse_out_header) + n)
    oh.error = -err
    oh.unique = unique
    ent.hdr.ent.payload_sz = <uint32_t>n
    if lu_prep(&ln.uring, LU_CMD_COMMIT_AND_FETCH, e, NULL, ent.qid, ent.commit_id) < 0:
        ln.n_reply_errors += 1
        ent.state = RE_DEAD
        if ln.nent_alive:
            ln.nent_alive -= 1
        return
    ent.state = RE_KERNEL
    ent.last_cmd = LU_CMD_COMMIT_AND_FETCH
    ln.n_ring_commits += 1


cdef void lane_ring_take(lane_t *ln, uint32_t e) noexcept nogil:
    """A request arrived in entry ``e``: put it together as a read() of
    /dev/fuse would have, and serve it (data) or hand it to pyfuse3."""
    cdef lane_rent *ent = &ln.ents[e]
    cdef fuse_in_header *ih = <fuse_in_header *>ent.hdr.in_out
    cdef uint32_t psz = ent.hdr.ent.payload_sz, arg0, op = ih.opcode, n = ih.len
    cdef uint8_t *payload = lane_ent_payload(ln, e)
    cdef uint8_t *req
    cdef int rc
    ent.state = RE_BUSY
    ent.unique = ih.unique
    ent.commit_id = ent.hdr.ent.commit_id
    ln.n_ring_requests += 1
    ln.n_received += 1
    if ent.qid < ln.sh.nqid:
        ln.sh.qid_requests[ent.qid] += 1
    if n < sizeof(fuse_in_header) + psz or n - sizeof(fuse_in_header) - psz > 128 \
            or psz > ent.iov[1].iov_len:
        lane_ring_commit(ln, e, ih.unique, EIO, NULL, 0)
        return
    arg0 = n - <uint32_t>sizeof(fuse_in_header) - psz
    if lane_is_data(op):
        if not ln.nfreereq:
            # setup_uring() added a slot per entry: cannot happen
            lane_ring_commit(ln, e, ih.unique, EIO, NULL, 0)
            return
        if op == FUSE_WRITE:
            # headers in front of the data, which stays where the kernel put it
            req = payload - sizeof(fuse_in_header) - arg0
        else:
            # READ, FALLOCATE, FLUSH, FSYNC carry no payload; a read's data
            # overwrites the headers once they are parsed
            req = payload
        memmove(req + sizeof(fuse_in_header), ent.hdr.op_in, arg0)
        memcpy(req, ih, sizeof(fuse_in_header))
        if op == FUSE_READ and ent.qid < ln.sh.nqid:
            ln.sh.qid_reads[ent.qid] += 1
        lane_serve_at(ln, req, ent.iova - <uint64_t>(payload - req), n, ln.id, LANE_NONE,
                      -2 - <int32_t>e, req)
        return
    # anything else: to pyfuse3, as one contiguous request
    req = ln.fwdbuf
    memcpy(req, ih, sizeof(fuse_in_header))
    memcpy(req + sizeof(fuse_in_header), ent.hdr.op_in, arg0)
    memcpy(req + sizeof(fuse_in_header) + arg0, payload, psz)
    if op == FUSE_GETXATTR and lane_xattr_is_none(req, n):
        ln.n_xattr_none += 1
        lane_ring_commit(ln, e, ih.unique, ENODATA, NULL, 0)
        return
    if ln.sh.forward == NULL:
        lane_ring_commit(ln, e, ih.unique, ENOSYS, NULL, 0)
        return
    ent.state = RE_FWD
    ln.nfwd += 1
    rc = ln.sh.forward(req, n, ln.reply_w)
    if rc < 0:
        lane_ring_commit(ln, e, ih.unique, -rc, NULL, 0)
        return
    ln.n_forwarded += 1
    ln.n_ring_forwarded += 1


cdef bint lane_take_replies(lane_t *ln) noexcept nogil:
    """pyfuse3's answers to ring requests: each is committed on its entry.
    One that matches none (an INTERRUPT's) goes to /dev/fuse as before."""
    cdef ssize_t got
    cdef fuse_out_header *oh
    cdef uint32_t e
    cdef bint any = False
    cdef iovec iov[1]
    while True:
        got = recv(ln.reply_r, ln.rbuf, ln.rbuf_size, MSG_DONTWAIT)
        if got < <ssize_t>sizeof(fuse_out_header):
            return any
        any = True
        oh = <fuse_out_header *>ln.rbuf
        for e in range(ln.nent):
            if ln.ents[e].state == RE_FWD and ln.ents[e].unique == oh.unique:
                lane_ring_commit(ln, e, oh.unique, -oh.error, ln.rbuf + sizeof(fuse_out_header),
                                 <size_t>got - sizeof(fuse_out_header))
                break
        else:
            ln.n_ring_reply_misses += 1
            iov[0].iov_base = ln.rbuf
            iov[0].iov_len = <size_t>got
            writev(ln.fd, iov, 1)


cdef void lane_uring_register(lane_t *ln) noexcept nogil:
    cdef uint32_t e
    cdef lane_rent *ent
    ln.registered = 1
    for e in range(ln.nent):
        ent = &ln.ents[e]
        if ln.sh.uring_fault:
            ent.iov[1].iov_len = 4096   # below max_write: the kernel refuses it
        if lu_prep(&ln.uring, LU_CMD_REGISTER, e, ent.iov, ent.qid, 0) < 0:
            ent.state = RE_DEAD
            ln.n_register_errors += 1
            continue
        ent.state = RE_KERNEL
        ent.last_cmd = LU_CMD_REGISTER
        ln.nent_alive += 1
    lu_submit(&ln.uring)


cdef bint lane_uring_step(lane_t *ln) noexcept nogil:
    """Register once FUSE_INIT said so; take fetched requests, ended
    entries and pyfuse3's answers.  True if anything happened."""
    cdef uint64_t user
    cdef int res
    cdef bint any = False
    cdef lane_rent *ent
    if not ln.registered:
        if lane_load32(&ln.sh.uring_state) != URING_GO:
            return False
        lane_uring_register(ln)
        any = True
    while lu_peek(&ln.uring, &user, &res):
        any = True
        if user >= ln.nent:
            continue
        ent = &ln.ents[user]
        if res == 0:
            lane_ring_take(ln, <uint32_t>user)
            continue
        if res == -ENOTCONN or res == -ECONNABORTED:
            # the connection ended (unmount, abort): nothing comes any more
            ln.conn_gone = 1
            ln.n_ring_ended += 1
        elif ent.last_cmd == LU_CMD_COMMIT_AND_FETCH and ent.state == RE_KERNEL:
            # the kernel took no answer (its request is gone with it) and
            # no longer holds the entry: register it again, so that this
            # CPU's queue keeps its entries
            ln.n_commit_errors += 1
            if lu_prep(&ln.uring, LU_CMD_REGISTER, user, ent.iov, ent.qid, 0) == 0:
                ent.last_cmd = LU_CMD_REGISTER
                continue
        else:
            # a REGISTER the kernel refused: it serves the mount over
            # /dev/fuse instead
            ln.n_register_errors += 1
            if ln.register_err == 0:
                ln.register_err = res
        if ent.state != RE_DEAD and ln.nent_alive:
            ln.nent_alive -= 1
        ent.state = RE_DEAD
    if ln.nfwd and lane_take_replies(ln):
        any = True
    return any


cdef void lane_uring_init_answered(void *ctx, int ok) noexcept nogil:
    """The FUSE shim has written the FUSE_INIT answer (forward.c): with
    io_uring asked for (``ok``) the lanes register their entries now."""
    cdef lane_shared *sh = <lane_shared *>ctx
    cdef uint32_t k
    lane_store32(&sh.uring_state, URING_GO if ok else URING_DECLINED)
    for k in range(sh.nlanes):
        lane_wake(sh.lanes[k].wake_fd)
