# NVMe over TCP, the host side of one connection (one NVMe queue).
#
# The transport (nvmefs/tcp.py) makes a fabrics controller look like the
# PCIe one everything above it already drives: the queue pairs build SQEs in
# local memory (DmaArena) and ring doorbells in a local register file; the
# connection's native thread here plays the part of the PCIe link.  It takes
# each new SQE from the local SQ, sends it as a CapsuleCmd with its data
# (in the capsule, or in H2CData PDUs answering the target's R2Ts), places
# C2HData straight into the command's buffers, and posts the CapsuleResp as
# a CQE (phase bit last, release store) on the local CQ, then writes the
# queue's interrupt eventfd -- the same contract as the software model's
# thread, so lanes, trio queues, the watchdog and resets work unchanged.
#
# Everything on the wire is checked (type, hlen, pdo, plen, flags, digests,
# command ids, transfer tags, data offsets inside the command's buffer);
# a bad PDU ends the connection with an H2C TermReq and the reason is kept
# for the transport, which turns any failed connection into CSTS.CFS: the
# controller's reset path then reconnects and resubmits.
#
# Data pointers: a fabrics command describes its data with SGLs only, so the
# transport's queue pairs build SGLs for every command (sgl_only); the local
# SGL (data blocks, bit buckets, segment lists in the arena) gives both the
# length the capsule's Transport SGL Data Block must state and where the
# bytes live.  Wire command ids are indexes into this connection's slot
# table (the queue's depth, plus two slots of its own: control calls --
# Connect, Property Get/Set -- and Keep Alive); the local id is kept per slot.

from posix.uio cimport iovec
from libc.errno cimport ETIMEDOUT, ECONNRESET
from nvme_tcp cimport *

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *m, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int name, const void *val, unsigned int len)
    enum:
        SOL_SOCKET
        SO_RCVLOWAT
    enum:
        MSG_NOSIGNAL
        SHUT_RDWR

cdef extern from "<sys/uio.h>" nogil:
    ssize_t readv(int fd, const iovec *iov, int n)

cdef extern from "<poll.h>" nogil:
    enum: POLLOUT, POLLERR, POLLHUP

cdef extern from *:
    """
    static inline int tq_claim(uint32_t *p)
    {
        uint32_t expected = 0;
        return __atomic_compare_exchange_n(p, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    """
    bint tq_claim(uint32_t *p) nogil

cdef extern from "<stdio.h>" nogil:
    int snprintf(char *s, size_t n, const char *fmt, ...)

cdef enum:
    TQ_MAX_SEGS = 256           # data pieces of one command (local SGL descriptors)
    TQ_RXBUF = 65536
    TQ_DIRECT = 4096            # data this long is read straight into the buffer
    TQ_CALL_BUF = 8192          # a control call's data (Connect's 1024 bytes, a log page)
    TQ_HDR_MAX = 256            # a PDU header with digest and pad
    TQ_WHY = 256
    TQ_LOWAT_MAX = 262144       # wake for at most this much of a large C2HData at once

# slot states
cdef enum:
    TQS_FREE = 0
    TQS_BUSY = 1

# kinds of slot
cdef enum:
    TQK_IO = 0                  # a command from the local SQ: answered with a local CQE
    TQK_CALL = 1                # a control call from Python
    TQK_KA = 2                  # Keep Alive sent by the thread itself

# send jobs
cdef enum:
    TQJ_CMD = 1
    TQJ_H2C = 2

# receive states
cdef enum:
    RX_CH = 0
    RX_HDR = 1
    RX_PAD = 2
    RX_DATA = 3
    RX_DDGST = 4
    RX_TERM = 5

# generic status codes the connection itself answers with (SCT 0)
cdef enum:
    SC_INVALID_OPCODE = 0x01
    SC_INVALID_FIELD = 0x02
    SC_DATA_XFER_ERROR = 0x04
    SC_SGL_COUNT = 0x0E
    SC_SGL_LENGTH = 0x0F
    SC_SGL_TYPE = 0x11

cdef struct tq_seg:
    uint8_t *p                  # NULL: a bit bucket (read data to drop)
    uint32_t len

cdef struct tq_slot:
    uint8_t state
    uint8_t kind
    uint8_t dir                 # opcode bits 1:0: 1 host to controller, 2 controller to host
    uint8_t incapsule
    uint8_t answered            # the response came; freed once no send job refers to it
    uint8_t jobs                # send jobs still queued or in progress for it
    uint8_t r2t_open            # an R2T's data is still being sent
    uint8_t deferred            # answered while its data was still going out: CQE held until sent
    uint16_t d_status
    uint32_t d_dw0
    uint32_t d_dw1
    uint16_t local_cid
    uint32_t length
    uint32_t c2h_next           # next C2HData offset expected
    uint32_t r2t_next           # next R2T offset expected
    uint32_t nseg
    tq_seg *segs
    uint64_t sent_ns
    uint8_t sqe[64]

cdef struct tq_job:
    uint16_t slot
    uint8_t kind
    uint16_t ttag
    uint32_t off
    uint32_t len

cdef struct tcpq:
    int fd
    uint16_t qid
    uint8_t hdgst
    uint8_t ddgst
    uint8_t cpda
    uint32_t maxh2cdata
    uint32_t incapsule_max
    # the local queue pair (valid once serving is 1)
    nvme_sqe *sq
    nvme_cqe *cq
    uint32_t entries
    volatile uint32_t *sq_db
    volatile uint32_t *cq_db
    uint32_t sq_head
    uint32_t cq_tail
    uint16_t phase
    uint32_t serving
    int kick_fd
    int irq_fd
    int done_fd
    uint32_t irq_pending
    void *arena                 # DmaArena (borrowed: the transport keeps it alive)
    # thread control
    uint32_t stop
    uint32_t failed
    uint32_t failed_claim       # taken (0 -> 1) by whoever fails the connection first
    char why[TQ_WHY]
    lane_pthread thread
    bint started
    # slots: 0..depth-1 for the local SQ, depth = control call, depth+1 = keep alive
    uint32_t depth
    uint32_t nslots
    tq_slot *slots
    tq_seg *segpool
    uint16_t *free_stack
    uint32_t nfree
    # send side
    tq_job *jobs
    uint32_t jhead
    uint32_t jtail
    uint32_t jcap
    bint tx_active
    tq_job txjob                # the job being sent; off/len: what remains of it
    uint8_t txhdr[TQ_HDR_MAX]
    uint8_t txddgst[4]
    iovec txiov[TQ_MAX_SEGS + 3]
    int txn
    int txi
    # receive side
    uint8_t *rxbuf
    uint32_t rpos
    uint32_t rend
    uint8_t rxstate
    uint8_t rxhdr[TQ_HDR_MAX]
    uint32_t rxhlen             # header bytes incl. header digest
    uint32_t rx_left            # bytes left in the current state
    uint32_t rx_off             # data offset in the slot's buffer
    int rx_slot
    uint32_t rx_crc
    uint8_t rx_flags
    uint8_t rx_pending_rsp      # a CapsuleResp waiting for room in the local CQ
    int lowat                   # SO_RCVLOWAT now set (1: the default)
    uint8_t rx_drained          # the last read got less than asked: wait for poll before reading again
    # control call (one at a time; Python waits on done_fd)
    uint32_t call_pending
    uint32_t call_done
    uint8_t call_sqe[64]
    uint8_t call_cqe[16]
    uint8_t *call_buf
    uint32_t call_out_len
    uint32_t call_in_len
    # keep alive (admin queue only)
    uint64_t kato_ns
    uint64_t ka_next_ns
    # counters
    uint64_t n_cmds
    uint64_t n_rsps
    uint64_t n_c2h
    uint64_t n_c2h_success
    uint64_t n_r2t
    uint64_t n_h2c
    uint64_t n_incapsule
    uint64_t n_ka
    uint64_t bytes_out
    uint64_t bytes_in
    uint64_t n_local_errors


cdef inline uint32_t tq_align(uint32_t n, uint8_t cpda) noexcept nogil:
    cdef uint32_t a = (<uint32_t>cpda + 1) * 4
    return (n + a - 1) // a * a


cdef inline void tq_put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline uint32_t tq_get32(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint32_t tq_crc(const uint8_t *p, size_t n) noexcept nogil:
    return ntcp_crc_final(ntcp_crc32c(0xFFFFFFFF, p, n))


cdef void tq_fail(tcpq *c, uint16_t fes, uint32_t fei, const uint8_t *bad, uint32_t badlen,
                  const char *why) noexcept nogil:
    """End the connection: a TermReq first when the target sent something
    malformed (best effort: the socket may be full or gone)."""
    cdef uint8_t term[24 + NTCP_TERM_MAX_DATA]
    cdef ntcp_term *t = <ntcp_term *>term
    cdef uint32_t n
    if not tq_claim(&c.failed_claim):
        return                  # the first failure's reason stays
    if fes:
        n = badlen if badlen < NTCP_TERM_MAX_DATA else NTCP_TERM_MAX_DATA
        memset(term, 0, 24)
        t.ch.type = NTCP_H2C_TERM
        t.ch.hlen = 24
        t.ch.plen = 24 + n
        t.fes = fes
        t.fei = fei
        if n:
            memcpy(term + 24, bad, n)
        # only when nothing half-sent is on the wire: a TermReq cut into
        # another PDU would be garbage to the target
        if not c.tx_active:
            send(c.fd, term, 24 + n, MSG_DONTWAIT | MSG_NOSIGNAL)
    if why != c.why:            # callers that formatted into c.why already
        snprintf(c.why, TQ_WHY, "%s", why)
    lane_store32(&c.failed, 1)
    shutdown(c.fd, SHUT_RDWR)
    lane_wake(c.done_fd)



# --- local data pointers -------------------------------------------------------

cdef int tq_add_seg(tcpq *c, tq_slot *s, uint64_t addr, uint32_t length, bint bucket) noexcept nogil:
    cdef uint8_t *p = NULL
    if length == 0:
        return 0
    if s.nseg == TQ_MAX_SEGS:
        return SC_SGL_COUNT
    if not bucket:
        p = (<DmaArena>c.arena).translate(addr, length)
        if p == NULL:
            return SC_DATA_XFER_ERROR
    s.segs[s.nseg].p = p
    s.segs[s.nseg].len = length
    s.nseg += 1
    s.length += length
    return 0


cdef int tq_map_data(tcpq *c, tq_slot *s) noexcept nogil:
    """Segments and length of the command's data from its local SGL; 0 or
    the status code to answer with."""
    cdef nvme_sqe *e = <nvme_sqe *>s.sqe
    cdef nvme_sgl_desc *d = <nvme_sgl_desc *>&e.dptr[0]
    cdef nvme_sgl_desc *list_
    cdef uint32_t n, i, kind, rc
    cdef int hops = 0
    s.nseg = 0
    s.length = 0
    s.dir = e.opc & 3
    if s.dir == 3:
        return SC_INVALID_OPCODE          # bidirectional commands: no fabrics transport has them
    if s.dir == 0:
        return 0
    if (e.flags >> 6) == 0:
        return SC_INVALID_FIELD           # PRPs: fabrics commands carry SGLs only
    while True:
        kind = d.id >> 4
        if kind == NVME_SGL_DATA_BLOCK:
            return tq_add_seg(c, s, d.addr, d.length, False)
        if kind == NVME_SGL_BIT_BUCKET:
            if s.dir != 2:
                return SC_SGL_TYPE
            return tq_add_seg(c, s, 0, d.length, True)
        if kind != NVME_SGL_SEGMENT and kind != NVME_SGL_LAST_SEGMENT:
            return SC_SGL_TYPE
        if d.length == 0 or d.length % 16:
            return SC_SGL_LENGTH
        hops += 1
        if hops > TQ_MAX_SEGS:
            return SC_SGL_COUNT
        list_ = <nvme_sgl_desc *>(<DmaArena>c.arena).translate(d.addr, d.length)
        if list_ == NULL:
            return SC_DATA_XFER_ERROR
        n = d.length // 16
        for i in range(n):
            kind = list_[i].id >> 4
            if kind == NVME_SGL_DATA_BLOCK or kind == NVME_SGL_BIT_BUCKET:
                if kind == NVME_SGL_BIT_BUCKET and s.dir != 2:
                    return SC_SGL_TYPE
                rc = tq_add_seg(c, s, list_[i].addr, list_[i].length, kind == NVME_SGL_BIT_BUCKET)
                if rc:
                    return rc
            elif (kind == NVME_SGL_SEGMENT or kind == NVME_SGL_LAST_SEGMENT) and i == n - 1 \
                    and (d.id >> 4) == NVME_SGL_SEGMENT:
                # a Segment's last descriptor chains to the next list
                d = &list_[i]
                break
            else:
                return SC_SGL_TYPE
        else:
            return 0


cdef int tq_iov(tq_slot *s, uint32_t off, uint32_t length, iovec *iov, int maxn) noexcept nogil:
    """iovecs for bytes [off, off + length) of the slot's data; -1 when a bit
    bucket lies in the range (no memory to point at)."""
    cdef uint32_t i = 0, take
    cdef int n = 0
    while i < s.nseg and off >= s.segs[i].len:
        off -= s.segs[i].len
        i += 1
    while length and i < s.nseg and n < maxn:
        if s.segs[i].p == NULL:
            return -1 if n == 0 else n
        take = s.segs[i].len - off
        if take > length:
            take = length
        iov[n].iov_base = s.segs[i].p + off
        iov[n].iov_len = take
        n += 1
        length -= take
        off = 0
        i += 1
    return n


cdef uint32_t tq_seg_left(tq_slot *s, uint32_t off) noexcept nogil:
    """Bytes from ``off`` to the end of the segment holding it."""
    cdef uint32_t i = 0
    while i < s.nseg and off >= s.segs[i].len:
        off -= s.segs[i].len
        i += 1
    return s.segs[i].len - off if i < s.nseg else 0


cdef uint32_t tq_data_crc(tq_slot *s, uint32_t off, uint32_t length) noexcept nogil:
    cdef iovec iov[TQ_MAX_SEGS]
    cdef int n = tq_iov(s, off, length, iov, TQ_MAX_SEGS), i
    cdef uint32_t crc = 0xFFFFFFFF
    for i in range(n):
        crc = ntcp_crc32c(crc, iov[i].iov_base, iov[i].iov_len)
    return ntcp_crc_final(crc)


# --- PDU builders (the tests' golden bytes call these too) ---------------------

cdef uint32_t tq_build_icreq(uint8_t *out, bint hdgst, bint ddgst) noexcept nogil:
    cdef ntcp_icreq *r = <ntcp_icreq *>out
    memset(out, 0, 128)
    r.ch.type = NTCP_ICREQ
    r.ch.hlen = 128
    r.ch.plen = 128
    r.pfv = 0
    r.hpda = 0                  # no alignment wanted for C2H data
    r.digest = (1 if hdgst else 0) | (2 if ddgst else 0)
    r.maxr2t = 0                # 0's based: one R2T outstanding per command
    return 128


cdef uint32_t tq_build_cmd(uint8_t *out, const uint8_t *sqe, uint16_t wire_cid, uint32_t length,
                           uint8_t dir, bint incapsule, bint hdgst, bint ddgst, uint8_t cpda) noexcept nogil:
    """CapsuleCmd header (+ header digest + pad) for a command of ``length``
    bytes; returns the header bytes.  The local SQE's data pointer becomes
    the capsule's one SGL descriptor."""
    cdef ntcp_cmd *p = <ntcp_cmd *>out
    cdef nvme_sqe *e = <nvme_sqe *>p.sqe
    cdef nvme_sgl_desc *d = <nvme_sgl_desc *>&e.dptr[0]
    cdef uint32_t hd = NTCP_DIGEST_LEN if hdgst else 0, pdo
    memcpy(p.sqe, sqe, 64)
    e.cid = wire_cid
    e.mptr = 0
    e.flags = (e.flags & 0x3F) | NVME_PSDT_SGL     # a null descriptor when there is no data (as Linux)
    d.addr = 0                  # in-capsule: ICDOFF 0 (nvmet, Linux); else no address at all
    d.length = length
    d.rsvd[0] = 0
    d.rsvd[1] = 0
    d.rsvd[2] = 0
    d.id = NTCP_SGL_INCAPSULE if incapsule else NTCP_SGL_TRANSPORT
    p.ch.type = NTCP_CMD
    p.ch.flags = NTCP_F_HDGST if hdgst else 0
    p.ch.hlen = 72
    if incapsule and length:
        pdo = tq_align(72 + hd, cpda)
        p.ch.pdo = <uint8_t>pdo
        p.ch.plen = pdo + length + (NTCP_DIGEST_LEN if ddgst else 0)
        if ddgst:
            p.ch.flags |= NTCP_F_DDGST
    else:
        pdo = 72 + hd
        p.ch.pdo = 0
        p.ch.plen = 72 + hd
    if hdgst:
        tq_put32(out + 72, tq_crc(out, 72))
    if pdo > 72 + hd:
        memset(out + 72 + hd, 0, pdo - 72 - hd)
    return pdo


cdef uint32_t tq_build_h2c(uint8_t *out, uint16_t cccid, uint16_t ttag, uint32_t datao, uint32_t datal,
                           bint last, bint hdgst, bint ddgst, uint8_t cpda) noexcept nogil:
    cdef ntcp_data *p = <ntcp_data *>out
    cdef uint32_t hd = NTCP_DIGEST_LEN if hdgst else 0
    cdef uint32_t pdo = tq_align(24 + hd, cpda)
    memset(out, 0, 24)
    p.ch.type = NTCP_H2C_DATA
    p.ch.flags = (NTCP_F_HDGST if hdgst else 0) | (NTCP_F_DDGST if ddgst else 0) | \
                 (NTCP_F_DATA_LAST if last else 0)
    p.ch.hlen = 24
    p.ch.pdo = <uint8_t>pdo
    p.ch.plen = pdo + datal + (NTCP_DIGEST_LEN if ddgst else 0)
    p.cccid = cccid
    p.ttag = ttag
    p.datao = datao
    p.datal = datal
    if hdgst:
        tq_put32(out + 24, tq_crc(out, 24))
    if pdo > 24 + hd:
        memset(out + 24 + hd, 0, pdo - 24 - hd)
    return pdo


# --- send side -----------------------------------------------------------------

cdef inline bint tq_push_job(tcpq *c, uint16_t slot, uint8_t kind, uint16_t ttag, uint32_t off,
                             uint32_t length) noexcept nogil:
    cdef tq_job *j
    if c.jtail - c.jhead >= c.jcap:
        return False
    j = &c.jobs[c.jtail % c.jcap]
    j.slot = slot
    j.kind = kind
    j.ttag = ttag
    j.off = off
    j.len = length
    c.jtail += 1
    c.slots[slot].jobs += 1
    return True


cdef void tq_slot_free(tcpq *c, uint32_t idx) noexcept nogil:
    cdef tq_slot *s = &c.slots[idx]
    s.state = TQS_FREE
    if s.kind == TQK_IO:
        c.free_stack[c.nfree] = <uint16_t>idx
        c.nfree += 1


cdef int tq_start_pdu(tcpq *c) noexcept nogil:
    """Lay out the next PDU of the current job in txhdr/txiov."""
    cdef tq_job *j = &c.txjob
    cdef tq_slot *s = &c.slots[j.slot]
    cdef uint32_t hl, chunk
    cdef int n
    if j.kind == TQJ_CMD:
        hl = tq_build_cmd(c.txhdr, s.sqe, j.slot, s.length, s.dir, s.incapsule, c.hdgst, c.ddgst, c.cpda)
        chunk = s.length if s.incapsule else 0
        c.n_cmds += 1
    else:
        chunk = j.len if j.len < c.maxh2cdata else c.maxh2cdata
        hl = tq_build_h2c(c.txhdr, j.slot, j.ttag, j.off, chunk, chunk == j.len, c.hdgst, c.ddgst, c.cpda)
        c.n_h2c += 1
    c.txiov[0].iov_base = c.txhdr
    c.txiov[0].iov_len = hl
    c.txn = 1
    if chunk:
        n = tq_iov(s, j.off if j.kind == TQJ_H2C else 0, chunk, &c.txiov[1], TQ_MAX_SEGS)
        if n <= 0:
            return -1
        c.txn += n
        if c.ddgst:
            tq_put32(c.txddgst, tq_data_crc(s, j.off if j.kind == TQJ_H2C else 0, chunk))
            c.txiov[c.txn].iov_base = c.txddgst
            c.txiov[c.txn].iov_len = 4
            c.txn += 1
    if j.kind == TQJ_H2C:
        j.off += chunk
        j.len -= chunk
    else:
        j.len = 0
    c.txi = 0
    c.tx_active = True
    return 0


cdef void tq_job_done(tcpq *c) noexcept nogil:
    cdef tq_slot *s = &c.slots[c.txjob.slot]
    c.tx_active = False
    s.jobs -= 1
    if c.txjob.kind == TQJ_H2C:
        s.r2t_open = 0
    if s.answered and s.jobs == 0:
        if s.deferred:
            # the buffer is ours no longer once the host sees the CQE: only
            # now is nothing of it left to send
            s.deferred = 0
            tq_post(c, s.local_cid, s.d_status, s.d_dw0, s.d_dw1)
        tq_slot_free(c, c.txjob.slot)


cdef int tq_send(tcpq *c) noexcept nogil:
    """Send until the socket is full; 1 when data is left for POLLOUT."""
    cdef msghdr m
    cdef ssize_t n
    cdef size_t left
    while True:
        if not c.tx_active:
            if c.jhead == c.jtail:
                return 0
            c.txjob = c.jobs[c.jhead % c.jcap]
            c.jhead += 1
            if tq_start_pdu(c) < 0:
                tq_fail(c, 0, 0, NULL, 0, "internal error: a send job points outside its command's data")
                return 0
        memset(&m, 0, sizeof(m))
        m.msg_iov = &c.txiov[c.txi]
        m.msg_iovlen = c.txn - c.txi
        n = sendmsg(c.fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                return 1
            snprintf(c.why, TQ_WHY, "connection lost while sending (errno %d)", errno)
            tq_fail(c, 0, 0, NULL, 0, c.why)
            return 0
        c.bytes_out += n
        while n > 0:
            left = c.txiov[c.txi].iov_len
            if <size_t>n >= left:
                n -= left
                c.txi += 1
            else:
                c.txiov[c.txi].iov_base = <uint8_t *>c.txiov[c.txi].iov_base + n
                c.txiov[c.txi].iov_len = left - n
                n = 0
        if c.txi == c.txn:
            if c.txjob.kind == TQJ_H2C and c.txjob.len:
                if tq_start_pdu(c) < 0:
                    tq_fail(c, 0, 0, NULL, 0, "internal error: H2CData outside its command's data")
                    return 0
            else:
                tq_job_done(c)


# --- local queue -----------------------------------------------------------------

cdef inline bint tq_cq_full(tcpq *c) noexcept nogil:
    cdef uint32_t next = c.cq_tail + 1
    if next == c.entries:
        next = 0
    return next == nvmefs_load_acquire32(c.cq_db)


cdef void tq_post(tcpq *c, uint16_t cid, uint16_t status, uint32_t dw0, uint32_t dw1) noexcept nogil:
    cdef nvme_cqe *e = &c.cq[c.cq_tail]
    e.dw0 = dw0
    e.dw1 = dw1
    e.sqhd = <uint16_t>c.sq_head
    e.sqid = c.qid
    e.cid = cid
    # the status word (phase) last: the host's phase check, then its load
    # fence, must find the rest of the entry written
    nvmefs_store_release16(&e.status, <uint16_t>((status & 0xFFFE) | c.phase))
    c.cq_tail += 1
    if c.cq_tail == c.entries:
        c.cq_tail = 0
        c.phase ^= 1
    c.irq_pending = 1


cdef inline void tq_slot_begin(tq_slot *s, uint8_t kind) noexcept nogil:
    """A slot taken for a new command: nothing answered, sent or received yet."""
    s.kind = kind
    s.state = TQS_BUSY
    s.answered = 0
    s.deferred = 0
    s.jobs = 0
    s.r2t_open = 0
    s.c2h_next = 0
    s.r2t_next = 0


cdef void tq_fetch(tcpq *c) noexcept nogil:
    """Take new SQEs from the local SQ while a slot and job room are free."""
    cdef uint32_t tail = nvmefs_load_acquire32(c.sq_db), idx
    cdef tq_slot *s
    cdef int sc
    if tail >= c.entries:
        tq_fail(c, 0, 0, NULL, 0, "host wrote an SQ tail doorbell beyond the queue")
        return
    while c.sq_head != tail and c.nfree and c.jtail - c.jhead < c.jcap and not tq_cq_full(c):
        c.nfree -= 1
        idx = c.free_stack[c.nfree]
        s = &c.slots[idx]
        memcpy(s.sqe, &c.sq[c.sq_head], 64)
        c.sq_head += 1
        if c.sq_head == c.entries:
            c.sq_head = 0
        s.local_cid = (<nvme_sqe *>s.sqe).cid
        tq_slot_begin(s, TQK_IO)
        sc = tq_map_data(c, s)
        if sc:
            c.n_local_errors += 1
            tq_post(c, s.local_cid, <uint16_t>(sc << 1) | 0x8000, 0, 0)   # DNR: it would fail again
            tq_slot_free(c, idx)
            continue
        s.incapsule = s.dir == 1 and s.length and s.length <= c.incapsule_max
        if s.incapsule:
            c.n_incapsule += 1
        tq_push_job(c, <uint16_t>idx, TQJ_CMD, 0, 0, 0)


cdef void tq_start_private(tcpq *c, uint32_t idx, uint8_t kind, const uint8_t *sqe, uint32_t out_len,
                           uint32_t in_len) noexcept nogil:
    cdef tq_slot *s = &c.slots[idx]
    memcpy(s.sqe, sqe, 64)
    tq_slot_begin(s, kind)
    s.nseg = 0
    s.length = 0
    s.dir = 1 if out_len else (2 if in_len else 0)
    s.sent_ns = nvmefs_now_ns()
    if out_len or in_len:
        s.segs[0].p = c.call_buf
        s.segs[0].len = out_len if out_len else in_len
        s.nseg = 1
        s.length = s.segs[0].len
    s.incapsule = s.dir == 1
    tq_push_job(c, <uint16_t>idx, TQJ_CMD, 0, 0, 0)


# --- receive side ----------------------------------------------------------------

cdef int tq_read_failed(tcpq *c, ssize_t n) noexcept nogil:
    """A read that returned ``n`` <= 0: 0 nothing to read now, -1 the
    connection is gone (closed by the target, or an error)."""
    if n == 0:
        tq_fail(c, 0, 0, NULL, 0, "connection closed by the target")
        return -1
    if errno == EAGAIN or errno == EINTR:
        c.rx_drained = 1
        return 0
    snprintf(c.why, TQ_WHY, "connection lost while receiving (errno %d)", errno)
    tq_fail(c, 0, 0, NULL, 0, c.why)
    return -1


cdef int tq_fill(tcpq *c) noexcept nogil:
    """More bytes into rxbuf: 1 read some, 0 nothing now, -1 failed."""
    cdef ssize_t n
    if c.rpos == c.rend:
        c.rpos = 0
        c.rend = 0
    elif c.rpos > TQ_RXBUF // 2:
        memmove(c.rxbuf, c.rxbuf + c.rpos, c.rend - c.rpos)
        c.rend -= c.rpos
        c.rpos = 0
    if c.rend == TQ_RXBUF or c.rx_drained:
        return 0
    n = recv(c.fd, c.rxbuf + c.rend, TQ_RXBUF - c.rend, MSG_DONTWAIT)
    if n > 0:
        # less than asked: the socket is empty now, and poll() says when it
        # is not (saves the read that would only return EAGAIN)
        c.rx_drained = <size_t>n < TQ_RXBUF - c.rend
        c.rend += n
        c.bytes_in += n
        return 1
    return tq_read_failed(c, n)


cdef tq_slot *tq_lookup(tcpq *c, uint16_t cccid) noexcept nogil:
    if cccid >= c.nslots or c.slots[cccid].state != TQS_BUSY or c.slots[cccid].answered:
        return NULL
    return &c.slots[cccid]


cdef bint tq_deliver(tcpq *c, uint16_t cccid, const uint8_t *cqe) noexcept nogil:
    """The command in slot ``cccid`` is answered (a CapsuleResp's CQE, or
    NULL for C2HData with SUCCESS).  False while the local CQ has no room."""
    cdef tq_slot *s = &c.slots[cccid]
    cdef const nvme_cqe *r = <const nvme_cqe *>cqe
    if s.kind == TQK_IO:
        if tq_cq_full(c):
            return False
        if s.jobs:
            # a target may end a write early (an error) while its data is
            # still being sent from the host's buffer: hold the CQE
            s.deferred = 1
            s.d_status = r.status if r != NULL else 0
            s.d_dw0 = r.dw0 if r != NULL else 0
            s.d_dw1 = r.dw1 if r != NULL else 0
        elif r != NULL:
            tq_post(c, s.local_cid, r.status, r.dw0, r.dw1)
        else:
            tq_post(c, s.local_cid, 0, 0, 0)
    elif s.kind == TQK_CALL:
        if r != NULL:
            memcpy(c.call_cqe, cqe, 16)
        else:
            memset(c.call_cqe, 0, 16)
        lane_store32(&c.call_done, 1)
        lane_wake(c.done_fd)
    c.n_rsps += 1
    s.answered = 1
    if s.jobs == 0:
        tq_slot_free(c, cccid)
    return True


cdef int tq_header(tcpq *c) noexcept nogil:
    """A whole header is in rxhdr: check it and set up what follows.
    0 ok, -1 failed."""
    cdef ntcp_ch *ch = <ntcp_ch *>c.rxhdr
    cdef ntcp_data *d
    cdef ntcp_r2t *r
    cdef tq_slot *s
    cdef uint32_t hd = NTCP_DIGEST_LEN if c.hdgst else 0, dd
    cdef uint16_t cccid
    if c.hdgst and ch.type != NTCP_C2H_TERM:
        if tq_get32(c.rxhdr + ch.hlen) != tq_crc(c.rxhdr, ch.hlen):
            tq_fail(c, NTCP_FES_HDGST, 0, c.rxhdr, c.rxhlen, "header digest error in a PDU from the target")
            return -1
    if ch.type == NTCP_RSP:
        cccid = (<nvme_cqe *>(c.rxhdr + 8)).cid
        if tq_lookup(c, cccid) == NULL:
            tq_fail(c, NTCP_FES_INVALID_HEADER, 8 + 12, c.rxhdr, c.rxhlen,
                    "CapsuleResp for a command id that is not outstanding")
            return -1
        c.rx_slot = cccid
        c.rx_pending_rsp = 1
        c.rxstate = RX_CH
        return 0
    if ch.type == NTCP_R2T:
        r = <ntcp_r2t *>c.rxhdr
        s = tq_lookup(c, r.cccid)
        if s == NULL or s.dir != 1 or s.incapsule or s.kind == TQK_KA:
            tq_fail(c, NTCP_FES_INVALID_HEADER, 8, c.rxhdr, c.rxhlen,
                    "R2T for a command id that is not an outstanding write")
            return -1
        if s.r2t_open:
            tq_fail(c, NTCP_FES_DATA_LIMIT, 8, c.rxhdr, c.rxhlen, "R2T beyond MAXR2T (one per command)")
            return -1
        if r.r2tl == 0 or r.r2to != s.r2t_next or r.r2to > s.length or r.r2tl > s.length - r.r2to:
            tq_fail(c, NTCP_FES_DATA_RANGE, 12, c.rxhdr, c.rxhlen,
                    "R2T outside the command's data (or out of order)")
            return -1
        if not tq_push_job(c, r.cccid, TQJ_H2C, r.ttag, r.r2to, r.r2tl):
            tq_fail(c, 0, 0, NULL, 0, "internal error: send queue full")
            return -1
        s.r2t_open = 1
        s.r2t_next = r.r2to + r.r2tl
        c.n_r2t += 1
        c.rxstate = RX_CH
        return 0
    if ch.type == NTCP_C2H_DATA:
        d = <ntcp_data *>c.rxhdr
        s = tq_lookup(c, d.cccid)
        if s == NULL or s.dir != 2:
            tq_fail(c, NTCP_FES_INVALID_HEADER, 8, c.rxhdr, c.rxhlen,
                    "C2HData for a command id that is not an outstanding read")
            return -1
        dd = NTCP_DIGEST_LEN if ch.flags & NTCP_F_DDGST else 0
        if d.datal == 0 or ch.plen != <uint32_t>ch.pdo + d.datal + dd:
            tq_fail(c, NTCP_FES_INVALID_HEADER, 4, c.rxhdr, c.rxhlen, "C2HData PLEN does not match its DATAL")
            return -1
        if d.datao != s.c2h_next or d.datao > s.length or d.datal > s.length - d.datao:
            tq_fail(c, NTCP_FES_DATA_RANGE, 12, c.rxhdr, c.rxhlen,
                    "C2HData outside the command's buffer (or out of order)")
            return -1
        if (ch.flags & NTCP_F_DATA_SUCCESS) and not (ch.flags & NTCP_F_DATA_LAST):
            tq_fail(c, NTCP_FES_INVALID_HEADER, 1, c.rxhdr, c.rxhlen, "C2HData SUCCESS without LAST_PDU")
            return -1
        if (ch.flags & NTCP_F_DATA_SUCCESS) and d.datao + d.datal != s.length:
            tq_fail(c, NTCP_FES_PDU_SEQUENCE, 1, c.rxhdr, c.rxhlen, "C2HData SUCCESS before all the data")
            return -1
        c.rx_slot = d.cccid
        c.rx_off = d.datao
        c.rx_flags = ch.flags
        c.rx_crc = 0xFFFFFFFF
        c.rx_left = ch.pdo - c.rxhlen
        c.rxstate = RX_PAD
        c.n_c2h += 1
        return 0
    return -1


cdef int tq_check_ch(tcpq *c) noexcept nogil:
    """The 8-byte common header: type, flags, hlen, pdo, plen for what the
    host may receive.  Sets rxhlen; 0 ok, -1 failed."""
    cdef ntcp_ch *ch = <ntcp_ch *>c.rxhdr
    cdef uint32_t hd = NTCP_DIGEST_LEN if c.hdgst else 0, dd
    cdef bint has_data = ch.type == NTCP_C2H_DATA
    if ch.type == NTCP_C2H_TERM:
        if ch.hlen != 24 or ch.plen < 24 or ch.plen > 24 + NTCP_TERM_MAX_DATA:
            tq_fail(c, NTCP_FES_INVALID_HEADER, 2, c.rxhdr, 8, "malformed C2HTermReq from the target")
            return -1
        c.rxhlen = ch.plen
        return 0
    if ch.type != NTCP_RSP and ch.type != NTCP_C2H_DATA and ch.type != NTCP_R2T:
        tq_fail(c, NTCP_FES_INVALID_HEADER, 0, c.rxhdr, 8, "PDU of a type a host never receives")
        return -1
    if ch.hlen != 24:
        tq_fail(c, NTCP_FES_INVALID_HEADER, 2, c.rxhdr, 8, "PDU with a wrong HLEN")
        return -1
    # digests are what ICReq/ICResp agreed, on every PDU they apply to
    if ((ch.flags & NTCP_F_HDGST) != 0) != (c.hdgst != 0) or \
            (ch.flags & NTCP_F_DDGST and not (c.ddgst and has_data)) or \
            (has_data and c.ddgst and not (ch.flags & NTCP_F_DDGST)):
        tq_fail(c, NTCP_FES_INVALID_HEADER, 1, c.rxhdr, 8, "PDU digest flags differ from the negotiated ones")
        return -1
    if ch.type == NTCP_C2H_DATA:
        if ch.pdo < 24 + hd or ch.pdo % 4:
            tq_fail(c, NTCP_FES_INVALID_HEADER, 3, c.rxhdr, 8, "C2HData with a wrong PDO")
            return -1
    elif ch.pdo != 0 or ch.plen != 24 + hd:
        tq_fail(c, NTCP_FES_INVALID_HEADER, 4 if ch.pdo == 0 else 3, c.rxhdr, 8,
                "CapsuleResp/R2T with a wrong PDO or PLEN")
        return -1
    if ch.type != NTCP_C2H_DATA and ch.flags & (NTCP_F_DATA_LAST | NTCP_F_DATA_SUCCESS):
        tq_fail(c, NTCP_FES_INVALID_HEADER, 1, c.rxhdr, 8, "PDU with flags of another type")
        return -1
    c.rxhlen = 24 + hd
    return 0


cdef int tq_rx_data(tcpq *c) noexcept nogil:
    """Copy/read C2HData bytes into the command's buffer; 1 progress, 0 wait, -1 failed."""
    cdef tq_slot *s = &c.slots[c.rx_slot]
    cdef iovec iov[64]
    cdef uint32_t avail = c.rend - c.rpos, take, k
    cdef int n, i
    cdef ssize_t got
    if avail:
        take = avail if avail < c.rx_left else c.rx_left
        n = tq_iov(s, c.rx_off, take, iov, 64)
        if n < 0:
            # bit bucket: the bytes count for the digest, then go
            k = tq_seg_left(s, c.rx_off)
            take = take if take < k else k
            if c.ddgst:
                c.rx_crc = ntcp_crc32c(c.rx_crc, c.rxbuf + c.rpos, take)
            c.rpos += take
            c.rx_off += take
            c.rx_left -= take
            return 1
        k = 0
        for i in range(n):
            memcpy(iov[i].iov_base, c.rxbuf + c.rpos + k, iov[i].iov_len)
            k += iov[i].iov_len
        if c.ddgst:
            c.rx_crc = ntcp_crc32c(c.rx_crc, c.rxbuf + c.rpos, k)
        c.rpos += k
        c.rx_off += k
        c.rx_left -= k
        return 1
    if c.rx_left >= TQ_DIRECT and not c.rx_drained:
        n = tq_iov(s, c.rx_off, c.rx_left, iov, 64)
        if n > 0:
            got = readv(c.fd, iov, n)
            if got > 0:
                c.bytes_in += got
                k = 0
                for i in range(n):
                    k += iov[i].iov_len
                c.rx_drained = <uint32_t>got < k
                if c.ddgst:
                    k = <uint32_t>got
                    for i in range(n):
                        take = iov[i].iov_len if iov[i].iov_len < k else k
                        c.rx_crc = ntcp_crc32c(c.rx_crc, iov[i].iov_base, take)
                        k -= take
                        if k == 0:
                            break
                c.rx_off += <uint32_t>got
                c.rx_left -= <uint32_t>got
                return 1
            return tq_read_failed(c, got)
    return tq_fill(c)


cdef inline void tq_set_lowat(tcpq *c, int n) noexcept nogil:
    # A large C2HData arrives in many small segments; waking the thread for
    # each costs more than the copy.  Inside such a PDU poll() waits until
    # this much (or all that is left of it) is queued.
    if n != c.lowat:
        setsockopt(c.fd, SOL_SOCKET, SO_RCVLOWAT, &n, sizeof(n))
        c.lowat = n


cdef void tq_c2h_done(tcpq *c) noexcept nogil:
    cdef tq_slot *s = &c.slots[c.rx_slot]
    s.c2h_next = c.rx_off
    tq_set_lowat(c, 1)
    if c.rx_flags & NTCP_F_DATA_SUCCESS:
        c.n_c2h_success += 1
        c.rx_pending_rsp = 2            # answered without a CapsuleResp
    c.rxstate = RX_CH


cdef void tq_recv(tcpq *c) noexcept nogil:
    cdef uint32_t avail, need
    cdef int rc
    cdef ntcp_term *t
    cdef ntcp_rsp *rsp
    while not c.failed:
        if c.rx_pending_rsp:
            rsp = <ntcp_rsp *>c.rxhdr
            if not tq_deliver(c, <uint16_t>c.rx_slot, rsp.cqe if c.rx_pending_rsp == 1 else NULL):
                return                   # no room in the local CQ: the host drains it first
            c.rx_pending_rsp = 0
        avail = c.rend - c.rpos
        if c.rxstate == RX_CH:
            if avail < 8:
                if tq_fill(c) <= 0:
                    return
                continue
            memcpy(c.rxhdr, c.rxbuf + c.rpos, 8)
            if tq_check_ch(c) < 0:
                return
            c.rpos += 8
            c.rxstate = RX_TERM if (<ntcp_ch *>c.rxhdr).type == NTCP_C2H_TERM else RX_HDR
            continue
        if c.rxstate == RX_HDR or c.rxstate == RX_TERM:
            need = c.rxhlen - 8
            if avail < need:
                if tq_fill(c) <= 0:
                    return
                continue
            memcpy(c.rxhdr + 8, c.rxbuf + c.rpos, need)
            c.rpos += need
            if c.rxstate == RX_TERM:
                t = <ntcp_term *>c.rxhdr
                snprintf(c.why, TQ_WHY, "the target ended the connection (C2HTermReq, fatal error status 0x%x, "
                         "information 0x%x)", t.fes, t.fei)
                tq_fail(c, 0, 0, NULL, 0, c.why)
                return
            if tq_header(c) < 0:
                return
            continue
        if c.rxstate == RX_PAD:
            if c.rx_left:
                if avail == 0:
                    if tq_fill(c) <= 0:
                        return
                    continue
                need = avail if avail < c.rx_left else c.rx_left
                c.rpos += need
                c.rx_left -= need
                continue
            c.rx_left = (<ntcp_data *>c.rxhdr).datal
            c.rxstate = RX_DATA
            continue
        if c.rxstate == RX_DATA:
            if c.rx_left:
                rc = tq_rx_data(c)
                if rc == 0:
                    # never more than what is left of this PDU's data: the
                    # digest and the next PDU may be all that follows
                    tq_set_lowat(c, 1 if c.rx_left < TQ_DIRECT else
                                 (c.rx_left if c.rx_left < TQ_LOWAT_MAX else TQ_LOWAT_MAX))
                if rc <= 0:
                    return
                continue
            tq_set_lowat(c, 1)
            if c.rx_flags & NTCP_F_DDGST:
                c.rxstate = RX_DDGST
            else:
                tq_c2h_done(c)
            continue
        if c.rxstate == RX_DDGST:
            if avail < 4:
                if tq_fill(c) <= 0:
                    return
                continue
            if tq_get32(c.rxbuf + c.rpos) != ntcp_crc_final(c.rx_crc):
                tq_fail(c, 0, 0, NULL, 0, "data digest error in C2HData from the target")
                return
            c.rpos += 4
            tq_c2h_done(c)
            continue


# --- the connection's thread -----------------------------------------------------------

cdef void tq_keepalive(tcpq *c, uint64_t now) noexcept nogil:
    cdef uint32_t idx = c.depth + 1
    cdef uint8_t sqe[64]
    if c.kato_ns == 0 or now < c.ka_next_ns:
        return
    if c.slots[idx].state == TQS_BUSY:
        if now - c.slots[idx].sent_ns > c.kato_ns:
            tq_fail(c, 0, 0, NULL, 0, "the target stopped answering (no Keep Alive answer within KATO)")
        else:
            c.ka_next_ns = c.slots[idx].sent_ns + c.kato_ns + 1    # sleep until then, not spin
        return
    memset(sqe, 0, 64)
    sqe[0] = 0x18               # Keep Alive
    tq_start_private(c, idx, TQK_KA, sqe, 0, 0)
    c.n_ka += 1
    c.ka_next_ns = now + c.kato_ns // 2


cdef void *tq_main(void *arg) noexcept nogil:
    cdef tcpq *c = <tcpq *>arg
    cdef pollfd fds[2]
    cdef int wait_out, timeout, idx
    cdef uint64_t now, kicks
    while not lane_load32(&c.stop) and not c.failed:
        if lane_load32(&c.call_pending):
            idx = c.depth
            if c.slots[idx].state == TQS_FREE:
                lane_store32(&c.call_pending, 0)
                tq_start_private(c, idx, TQK_CALL, c.call_sqe, c.call_out_len, c.call_in_len)
        now = nvmefs_now_ns()
        tq_keepalive(c, now)
        if lane_load32(&c.serving):
            tq_fetch(c)
        wait_out = tq_send(c)
        tq_recv(c)
        if c.irq_pending:
            c.irq_pending = 0
            if c.irq_fd >= 0:
                lane_wake(c.irq_fd)
        if c.failed:
            break
        if c.jhead != c.jtail and not c.tx_active:
            continue            # a response queued an H2C job: send it now
        fds[0].fd = c.fd
        # a response waiting for room in the local CQ: more input cannot be
        # taken before the host reaps, so do not wake for it
        fds[0].events = (0 if c.rx_pending_rsp else POLLIN) | (POLLOUT if wait_out else 0)
        fds[0].revents = 0
        fds[1].fd = c.kick_fd
        fds[1].events = POLLIN
        fds[1].revents = 0
        timeout = 100
        if c.rx_pending_rsp:
            timeout = 1         # waiting for the host to make room in the CQ
        elif c.kato_ns:
            if c.ka_next_ns <= now:
                timeout = 0
            elif (c.ka_next_ns - now) // 1000000 < <uint64_t>timeout:
                timeout = <int>((c.ka_next_ns - now) // 1000000) + 1
        poll(fds, 2, timeout)
        if fds[0].revents:
            c.rx_drained = 0
        if fds[1].revents:
            # one read takes an eventfd's whole count
            read(c.kick_fd, &kicks, sizeof(kicks))
    lane_wake(c.done_fd)
    return NULL


# --- blocking helpers for the handshake ---------------------------------------------

cdef int tq_io_all(int fd, uint8_t *buf, size_t n, bint sending, uint64_t deadline_ns) noexcept nogil:
    """Send or receive exactly n bytes before the deadline; 0, -ETIMEDOUT,
    -ECONNRESET (peer closed) or -errno."""
    cdef pollfd p
    cdef ssize_t got
    cdef uint64_t now
    while n:
        if sending:
            got = send(fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL)
        else:
            got = recv(fd, buf, n, MSG_DONTWAIT)
        if got > 0:
            buf += got
            n -= got
            continue
        if got == 0:
            return -ECONNRESET
        if errno != EAGAIN and errno != EINTR:
            return -errno
        now = nvmefs_now_ns()
        if now >= deadline_ns:
            return -ETIMEDOUT
        p.fd = fd
        p.events = POLLOUT if sending else POLLIN
        p.revents = 0
        poll(&p, 1, <int>((deadline_ns - now) // 1000000) + 1)
    return 0



class TcpError(OSError):
    """A connection to an NVMe/TCP target failed or broke (the reason is the message)."""


cdef class TcpQueue:
    """One NVMe/TCP connection (one queue) and its thread.  Build with
    ``TcpQueue(sock_fd, qid, ...)``; ``handshake()``, ``start()``, then
    ``call()`` for Fabrics/admin commands of the transport's own and
    ``serve()`` to carry a local queue pair.  The fd is owned from then on."""
    cdef tcpq *c
    cdef DmaArena arena_ref
    cdef RegisterFile regs_ref

    def __cinit__(self):
        self.c = NULL

    def __init__(self, int fd, uint16_t qid, DmaArena arena not None, RegisterFile regs not None, *,
                 uint32_t depth, bint hdgst=False, bint ddgst=False):
        cdef tcpq *c = <tcpq *>calloc(1, sizeof(tcpq))
        cdef uint32_t i
        if c == NULL:
            raise MemoryError()
        self.c = c
        c.fd = fd
        c.kick_fd = -1
        c.irq_fd = -1
        c.done_fd = lane_eventfd()
        c.qid = qid
        c.hdgst = hdgst
        c.ddgst = ddgst
        c.depth = depth
        c.nslots = depth + 2
        c.arena = <void *>arena
        self.arena_ref = arena
        self.regs_ref = regs
        c.slots = <tq_slot *>calloc(c.nslots, sizeof(tq_slot))
        c.segpool = <tq_seg *>calloc(<size_t>c.nslots * TQ_MAX_SEGS, sizeof(tq_seg))
        c.free_stack = <uint16_t *>calloc(c.nslots, sizeof(uint16_t))
        c.jcap = 2 * c.nslots + 4
        c.jobs = <tq_job *>calloc(c.jcap, sizeof(tq_job))
        c.rxbuf = <uint8_t *>malloc(TQ_RXBUF)
        c.call_buf = <uint8_t *>calloc(1, TQ_CALL_BUF)
        if c.done_fd < 0 or c.slots == NULL or c.segpool == NULL or c.free_stack == NULL \
                or c.jobs == NULL or c.rxbuf == NULL or c.call_buf == NULL:
            raise MemoryError()
        for i in range(c.nslots):
            c.slots[i].segs = &c.segpool[<size_t>i * TQ_MAX_SEGS]
        for i in range(depth):
            c.free_stack[i] = <uint16_t>(depth - 1 - i)     # lowest ids first
        c.nfree = depth
        c.maxh2cdata = 4096
        c.incapsule_max = 0
        c.lowat = 1

    def __dealloc__(self):
        cdef tcpq *c = self.c
        if c == NULL:
            return
        if c.started:
            lane_store32(&c.stop, 1)
            if c.kick_fd >= 0:
                lane_wake(c.kick_fd)
            with nogil:
                lane_thread_join(c.thread)
        if c.fd >= 0:
            close(c.fd)
        if c.done_fd >= 0:
            close(c.done_fd)
        free(c.slots)
        free(c.segpool)
        free(c.free_stack)
        free(c.jobs)
        free(c.rxbuf)
        free(c.call_buf)
        free(c)
        self.c = NULL

    def handshake(self, double timeout):
        """ICReq / ICResp (before the thread starts).  Returns the target's
        (cpda, maxh2cdata); raises TcpError on anything but a valid answer
        agreeing to the digests asked for."""
        cdef uint8_t req[128]
        cdef uint8_t resp[128]
        cdef ntcp_icresp *r = <ntcp_icresp *>resp
        cdef tcpq *c = self.c
        cdef int rc
        cdef uint64_t deadline = nvmefs_now_ns() + <uint64_t>(timeout * 1e9)
        tq_build_icreq(req, c.hdgst, c.ddgst)
        with nogil:
            rc = tq_io_all(c.fd, req, 128, True, deadline)
            if rc == 0:
                rc = tq_io_all(c.fd, resp, 8, False, deadline)
        if rc == 0 and r.ch.type == NTCP_C2H_TERM:
            raise TcpError("the target refused the connection (C2HTermReq to ICReq)")
        if rc == 0 and (r.ch.type != NTCP_ICRESP or r.ch.hlen != 128 or r.ch.plen != 128):
            raise TcpError(f"the target did not answer ICReq with an ICResp (PDU type {r.ch.type}, "
                           f"hlen {r.ch.hlen}, plen {r.ch.plen})")
        if rc == 0:
            with nogil:
                rc = tq_io_all(c.fd, resp + 8, 120, False, deadline)
        if rc == -ETIMEDOUT:
            raise TcpError(f"no ICResp within {timeout:g} s")
        if rc == -ECONNRESET:
            raise TcpError("the target closed the connection during the ICReq/ICResp exchange")
        if rc < 0:
            raise TcpError(-rc, f"ICReq/ICResp exchange failed: {_os.strerror(-rc)}")
        if r.pfv != 0:
            raise TcpError(f"the target speaks NVMe/TCP PDU format version {r.pfv}, not 0")
        if r.digest != ((1 if c.hdgst else 0) | (2 if c.ddgst else 0)):
            raise TcpError(f"the target did not agree to the digests asked for (asked "
                           f"{'hdgst ' if c.hdgst else ''}{'ddgst' if c.ddgst else ''}or none, "
                           f"ICResp digest bits 0x{r.digest:x})")
        if r.cpda > 31 or r.maxh2cdata < 4096 or r.maxh2cdata % 4:
            raise TcpError(f"ICResp out of range (CPDA {r.cpda}, MAXH2CDATA {r.maxh2cdata})")
        c.cpda = r.cpda
        c.maxh2cdata = r.maxh2cdata
        return r.cpda, r.maxh2cdata

    def start(self, int kick_fd, int cpu=-1):
        """Start the connection's thread, woken by ``kick_fd`` (the queue
        pair's doorbell notifier; owned by the caller)."""
        cdef int rc
        self.c.kick_fd = kick_fd
        rc = lane_thread_start(&self.c.thread, tq_main, self.c, cpu)
        if rc < 0:
            raise OSError(-rc, "cannot start the NVMe/TCP connection thread")
        self.c.started = True

    def call(self, bytes sqe not None, bytes data=None, uint32_t read_len=0, double timeout=5.0):
        """One command of the transport's own (Connect, Property Get/Set, a
        log page) on this connection: (16-byte CQE, data read).  Raises
        TcpError when the connection failed or nothing came in time (which
        fails the connection: its call slot stays taken)."""
        cdef tcpq *c = self.c
        cdef uint32_t out_len = len(data) if data is not None else 0
        cdef pollfd p
        cdef uint64_t deadline = nvmefs_now_ns() + <uint64_t>(timeout * 1e9), now
        if len(sqe) != 64 or out_len > TQ_CALL_BUF or read_len > TQ_CALL_BUF or (out_len and read_len):
            raise ValueError("call(): a 64-byte SQE and at most 8 KiB of data in one direction")
        if not c.started:
            raise TcpError("connection not started")
        if c.failed:
            raise TcpError(c.why.decode())
        memcpy(c.call_sqe, <const char *>sqe, 64)
        if out_len:
            memcpy(c.call_buf, <const char *>data, out_len)
        c.call_out_len = out_len
        c.call_in_len = read_len
        lane_store32(&c.call_done, 0)
        lane_store32(&c.call_pending, 1)
        lane_wake(c.kick_fd)
        with nogil:
            while not lane_load32(&c.call_done) and not lane_load32(&c.failed):
                now = nvmefs_now_ns()
                if now >= deadline:
                    break
                p.fd = c.done_fd
                p.events = POLLIN
                p.revents = 0
                poll(&p, 1, <int>((deadline - now) // 1000000) + 1)
                lane_drain(c.done_fd)
        if lane_load32(&c.call_done):
            return (PyBytes_FromStringAndSize(<char *>c.call_cqe, 16),
                    PyBytes_FromStringAndSize(<char *>c.call_buf, read_len))
        if c.failed:
            raise TcpError(c.why.decode())
        self.fail(f"no answer within {timeout:g} s")
        raise TcpError(f"no answer within {timeout:g} s")

    def set_limits(self, uint32_t incapsule_max):
        """In-capsule data the target takes on this queue (IOCCSZ; 8 KiB on admin)."""
        self.c.incapsule_max = incapsule_max

    def set_keepalive(self, double kato):
        """Send Keep Alive every KATO/2 (admin queue); no answer within
        KATO fails the connection."""
        self.c.kato_ns = <uint64_t>(kato * 1e9)
        self.c.ka_next_ns = nvmefs_now_ns() + self.c.kato_ns // 2
        lane_wake(self.c.kick_fd)

    def serve(self, uint64_t sq_iova, uint64_t cq_iova, uint32_t entries, uint32_t dstrd, int irq_fd):
        """Carry the local queue pair (SQ/CQ of ``entries`` at these bus
        addresses; doorbells of this qid in the register file) from now on."""
        cdef tcpq *c = self.c
        cdef DmaArena a = self.arena_ref
        # a local queue deeper than the connection is fine: SQEs wait in it
        # until a slot is free (the admin queue; the target's SQSIZE bounds us)
        if entries < 2:
            raise ValueError(f"queue of {entries} entries")
        c.sq = <nvme_sqe *>a.translate(sq_iova, <uint64_t>entries * 64)
        c.cq = <nvme_cqe *>a.translate(cq_iova, <uint64_t>entries * 16)
        if c.sq == NULL or c.cq == NULL:
            raise ValueError("queue memory outside the arena")
        c.entries = entries
        c.sq_db = self.regs_ref.doorbell(c.qid, False, dstrd)
        c.cq_db = self.regs_ref.doorbell(c.qid, True, dstrd)
        # a new queue starts at 0, whatever an earlier one left in the
        # doorbell registers (Create I/O SQ/CQ does this on a PCIe device)
        nvmefs_store_release32(c.sq_db, 0)
        nvmefs_store_release32(c.cq_db, 0)
        c.sq_head = 0
        c.cq_tail = 0
        c.phase = 1
        c.irq_fd = irq_fd
        lane_store32(&c.serving, 1)
        lane_wake(c.kick_fd)

    def fail(self, str why):
        """End the connection now (a reset, or a control call that timed out)."""
        b = why.encode()[:TQ_WHY - 1]
        if tq_claim(&self.c.failed_claim):
            snprintf(self.c.why, TQ_WHY, "%s", <const char *>b)
            lane_store32(&self.c.failed, 1)
            shutdown(self.c.fd, SHUT_RDWR)
            if self.c.kick_fd >= 0:
                lane_wake(self.c.kick_fd)

    def stop(self):
        """Stop the thread and wait for it: afterwards nothing of this
        connection touches host memory."""
        cdef tcpq *c = self.c
        if c.started:
            lane_store32(&c.stop, 1)
            lane_wake(c.kick_fd)
            with nogil:
                lane_thread_join(c.thread)
            c.started = False
        if tq_claim(&c.failed_claim):
            snprintf(c.why, TQ_WHY, "connection stopped")
            lane_store32(&c.failed, 1)

    @property
    def failed(self):
        """None, or why the connection ended."""
        return self.c.why.decode(errors="replace") if lane_load32(&self.c.failed) else None

    @property
    def maxh2cdata(self):
        return self.c.maxh2cdata

    @property
    def cpda(self):
        return self.c.cpda

    def stats(self):
        cdef tcpq *c = self.c
        return {"qid": c.qid, "capsules": c.n_cmds, "responses": c.n_rsps, "c2h_data": c.n_c2h,
                "c2h_success": c.n_c2h_success, "r2t": c.n_r2t, "h2c_data": c.n_h2c,
                "incapsule_writes": c.n_incapsule, "keep_alives": c.n_ka, "bytes_out": c.bytes_out,
                "bytes_in": c.bytes_in, "local_errors": c.n_local_errors,
                "in_flight": c.depth - c.nfree, "failed": self.failed}


# --- golden bytes for the tests: the same builders the connection uses -------------

def tcp_crc32c(data):
    """CRC32C digest of ``data`` as NVMe/TCP puts it on the wire."""
    cdef const uint8_t[::1] v = bytes(data)
    return tq_crc(&v[0] if len(v) else NULL, len(v))


def pdu_icreq(bint hdgst=False, bint ddgst=False):
    cdef uint8_t out[128]
    tq_build_icreq(out, hdgst, ddgst)
    return PyBytes_FromStringAndSize(<char *>out, 128)


def pdu_capsule(bytes sqe not None, uint16_t wire_cid, uint32_t length, *, bytes data=None,
                bint hdgst=False, bint ddgst=False, uint8_t cpda=0):
    """A CapsuleCmd for the 64-byte local ``sqe``: with ``data`` the data is
    in the capsule, else ``length`` bytes move by R2T/C2HData."""
    cdef uint8_t out[TQ_HDR_MAX]
    cdef uint32_t hl
    cdef bint incapsule = data is not None
    if len(sqe) != 64 or (incapsule and len(data) != length):
        raise ValueError("64-byte SQE; data of the stated length")
    hl = tq_build_cmd(out, <const uint8_t *><const char *>sqe, wire_cid, length, (sqe[0] & 3),
                      incapsule, hdgst, ddgst, cpda)
    pdu = PyBytes_FromStringAndSize(<char *>out, hl)
    if incapsule and length:
        pdu += data
        if ddgst:
            pdu += tcp_crc32c(data).to_bytes(4, "little")
    return pdu


def pdu_h2c(uint16_t cccid, uint16_t ttag, uint32_t datao, bytes data not None, bint last, *,
            bint hdgst=False, bint ddgst=False, uint8_t cpda=0):
    cdef uint8_t out[TQ_HDR_MAX]
    cdef uint32_t hl = tq_build_h2c(out, cccid, ttag, datao, len(data), last, hdgst, ddgst, cpda)
    pdu = PyBytes_FromStringAndSize(<char *>out, hl) + data
    if ddgst:
        pdu += tcp_crc32c(data).to_bytes(4, "little")
    return pdu


cdef uint32_t _tq_always = 1


def always_kick_address():
    """An idle flag that is always set (QueuePair.set_notifier): every
    doorbell write wakes the connection's thread, which sleeps in poll()."""
    return <uintptr_t>&_tq_always
