# Admin commands of the controller model (NVMe base 2.0 section 5;
# NVME-NOTES "Admin commands").  Each returns a model status
# (DNR << 15 | SCT << 8 | SC) and may set the completion's DW0 in ``x``.
# Checks follow the specification; where it leaves the DNR bit or the order
# of checks open, QEMU's emulated controller (hw/nvme/ctrl.c) is the guide.

cdef enum:
    ADM_DELETE_SQ = 0x00
    ADM_CREATE_SQ = 0x01
    ADM_GET_LOG = 0x02
    ADM_DELETE_CQ = 0x04
    ADM_CREATE_CQ = 0x05
    ADM_IDENTIFY = 0x06
    ADM_ABORT = 0x08
    ADM_SET_FEATURES = 0x09
    ADM_GET_FEATURES = 0x0A
    ADM_AER = 0x0C
    ADM_NS_MGMT = 0x0D
    ADM_NS_ATTACH = 0x15
    ADM_DBBUF = 0x7C
    ADM_FORMAT = 0x80

    FID_ARBITRATION = 0x01
    FID_POWER = 0x02
    FID_TEMP_THRESHOLD = 0x04
    FID_ERROR_RECOVERY = 0x05
    FID_VWC = 0x06
    FID_NUM_QUEUES = 0x07
    FID_IRQ_COALESCING = 0x08
    FID_IV_CONFIG = 0x09
    FID_WRITE_ATOMICITY = 0x0A
    FID_ASYNC_EVENT = 0x0B

    MDL_VID = 0xFFFE          # not a registered PCI vendor: a software device
    MDL_CNTLID = 1


@cython.linetrace(False)
@cython.profile(False)
cdef inline void put16(uint8_t *p, uint16_t v) noexcept nogil:
    memcpy(p, &v, 2)

@cython.linetrace(False)
@cython.profile(False)
cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)

@cython.linetrace(False)
@cython.profile(False)
cdef inline void put64(uint8_t *p, uint64_t v) noexcept nogil:
    memcpy(p, &v, 8)

@cython.linetrace(False)
@cython.profile(False)
cdef inline void put128(uint8_t *p, uint64_t v) noexcept nogil:
    memcpy(p, &v, 8)
    memset(p + 8, 0, 8)


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_admin_to_host(mdl_ctrl *c, mdl_cmdctx *x, const uint8_t *buf, uint64_t length) noexcept nogil:
    """Map the command's PRPs for ``length`` bytes and copy ``buf`` there."""
    cdef int st = mdl_map_dptr(c.arena, x.cmd, length, True, 0, c.scratch, &c.iol)
    if st:
        return st
    mdl_iol_copy_out(&c.iol, buf, length)
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_admin_from_host(mdl_ctrl *c, mdl_cmdctx *x, uint8_t *buf, uint64_t length) noexcept nogil:
    """Map the command's PRPs for ``length`` bytes and copy them into ``buf``."""
    cdef int st = mdl_map_dptr(c.arena, x.cmd, length, False, 0, c.scratch, &c.iol)
    if st:
        return st
    mdl_iol_copy_in(&c.iol, buf, length)
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef inline bint mdl_nsid_ok(mdl_ctrl *c, uint32_t nsid) noexcept nogil:
    """An active NSID: allocated and attached to this controller."""
    return mdl_ns_active(&c.store, nsid)


@cython.linetrace(False)
@cython.profile(False)
cdef inline bint mdl_nsid_valid(mdl_ctrl *c, uint32_t nsid) noexcept nogil:
    """In 1..NN, whether allocated or not."""
    return nsid >= 1 and nsid <= c.store.nns


# --- queues ---------------------------------------------------------------------------

@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_create_cq(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef nvme_sqe *cmd = x.cmd
    cdef uint32_t qid = cmd.cdw10 & 0xFFFF, qsize = cmd.cdw10 >> 16
    cdef uint32_t pc = cmd.cdw11 & 1, ien = (cmd.cdw11 >> 1) & 1, iv = cmd.cdw11 >> 16
    cdef uint64_t base = cmd.dptr[0]
    cdef mdl_cq *cq
    cdef nvme_cqe *ring
    if qid == 0 or qid > c.nq or c.cq[qid].valid:
        return MST_QID_INVALID | MST_DNR
    if qsize == 0 or qsize > c.mqes:
        return MST_QSIZE_INVALID | MST_DNR
    if base == 0:
        return MST_INVALID_FIELD | MST_DNR
    if base & MDL_PAGE_MASK:
        return MST_PRP_OFFSET | MST_DNR
    if iv >= c.nvec:
        return MST_IV_INVALID | MST_DNR
    if not pc:
        return MST_INVALID_FIELD | MST_DNR     # CAP.CQR = 1: contiguous queues only
    ring = <nvme_cqe *>mdl_tr(c.arena, base, <uint64_t>(qsize + 1) * 16)
    if ring == NULL:
        return MST_DATA_XFER
    cq = &c.cq[qid]
    memset(cq, 0, sizeof(mdl_cq))
    cq.ring = ring
    cq.base = base
    cq.size = qsize + 1
    cq.phase = 1
    cq.ien = ien
    cq.iv = iv
    mdl_zero_doorbells(c, qid)
    if c.dbbuf:
        mdl_shadow_store(c, qid, 1, 0)
        mdl_eventidx_store(c, qid, 1, 0)
    cq.valid = 1
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_create_sq(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef nvme_sqe *cmd = x.cmd
    cdef uint32_t qid = cmd.cdw10 & 0xFFFF, qsize = cmd.cdw10 >> 16
    cdef uint32_t pc = cmd.cdw11 & 1, cqid = cmd.cdw11 >> 16
    cdef uint64_t base = cmd.dptr[0]
    cdef mdl_sq *sq
    cdef nvme_sqe *ring
    if cqid == 0 or cqid > c.nq or not c.cq[cqid].valid:
        return MST_CQ_INVALID | MST_DNR
    if qid == 0 or qid > c.nq or c.sq[qid].valid:
        return MST_QID_INVALID | MST_DNR
    if qsize == 0 or qsize > c.mqes:
        return MST_QSIZE_INVALID | MST_DNR
    if base == 0:
        return MST_INVALID_FIELD | MST_DNR
    if base & MDL_PAGE_MASK:
        return MST_PRP_OFFSET | MST_DNR
    if not pc:
        return MST_INVALID_FIELD | MST_DNR
    ring = <nvme_sqe *>mdl_tr(c.arena, base, <uint64_t>(qsize + 1) * 64)
    if ring == NULL:
        return MST_DATA_XFER
    sq = &c.sq[qid]
    memset(sq, 0, sizeof(mdl_sq))
    sq.ring = ring
    sq.base = base
    sq.size = qsize + 1
    sq.cqid = <uint16_t>cqid
    c.sq[qid].db_last = 0
    mdl_reg_store(c, mdl_db_off(c, qid, 0), 0)
    if c.dbbuf:
        mdl_shadow_store(c, qid, 0, 0)
        mdl_eventidx_store(c, qid, 0, 0)
    c.cq[cqid].nsq += 1
    sq.valid = 1
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_delete_sq(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef uint32_t qid = x.cmd.cdw10 & 0xFFFF
    cdef uint32_t i = 0
    cdef mdl_held *h
    if qid == 0 or qid > c.nq or not c.sq[qid].valid:
        return MST_QID_INVALID | MST_DNR
    # commands still held for this SQ end with "aborted due to SQ deletion"
    while i < c.nheld:
        h = &c.held[i]
        if h.sqid == qid:
            if h.kind == HELD_POST:
                mdl_post(c, h.sqid, h.cid, h.dw0, h.st)
            else:
                mdl_count_error(c, h.sqid, h.cid, MST_ABORT_SQ_DEL, h.lba, h.nsid)
                mdl_post(c, h.sqid, h.cid, 0, MST_ABORT_SQ_DEL)
            mdl_held_remove(c, i)
            continue
        i += 1
    c.cq[c.sq[qid].cqid].nsq -= 1
    c.sq[qid].valid = 0
    c.sq[qid].db_last = 0
    c.sq[qid].bad_last = 0
    mdl_reg_store(c, mdl_db_off(c, qid, 0), 0)
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_delete_cq(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef uint32_t qid = x.cmd.cdw10 & 0xFFFF
    if qid == 0 or qid > c.nq or not c.cq[qid].valid:
        # the specification's Invalid Queue Identifier (QEMU answers CQ Invalid)
        return MST_QID_INVALID | MST_DNR
    if c.cq[qid].nsq:
        return MST_QDEL_INVALID              # no DNR, as QEMU: it works once the SQs are gone
    c.cq[qid].valid = 0
    c.cq[qid].db_last = 0
    c.cq[qid].bad_last = 0
    mdl_reg_store(c, mdl_db_off(c, qid, 1), 0)
    return 0


# --- Identify -------------------------------------------------------------------------

@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_identify_ctrl(mdl_ctrl *c, uint8_t *b) noexcept nogil:
    cdef const char *fr = b"1.0     "
    cdef const char *nqn = b"nqn.2024-01.io.nvmefs:ctrl:"
    cdef size_t n
    put16(b + 0, MDL_VID)
    put16(b + 2, MDL_VID)
    memcpy(b + 4, c.serial, 20)
    memcpy(b + 24, c.model, 40)
    memcpy(b + 64, fr, 8)
    b[72] = 6                                   # RAB
    b[77] = <uint8_t>c.mdts
    put16(b + 78, MDL_CNTLID)
    cdef uint64_t unalloc = 0
    put32(b + 80, 0x00010400)                   # VER 1.4.0
    if c.store.mgmt:
        put32(b + 92, 1 << 8)                   # OAES: Namespace Attribute Notices
    # OACS: Format NVM, Namespace Management and Attachment (not on a raw
    # image: one namespace over the whole file), Doorbell Buffer Config
    put16(b + 256, (1 << 1) | (1 << 8) | ((1 << 3) if c.store.mgmt else 0))
    b[258] = MDL_ACL
    b[259] = MDL_AERL
    b[260] = 0x03                               # FRMW: one slot, read only
    b[261] = 0x06                               # LPA: Commands Supported and Effects, extended data
    b[262] = MDL_ERRLOG_ENTRIES - 1             # ELPE, 0-based
    b[263] = 0                                  # NPSS: one power state
    put16(b + 266, 343)                         # WCTEMP 70 C
    put16(b + 268, 358)                         # CCTEMP 85 C
    if c.store.mgmt:
        mdl_store_place(&c.store, 0, &unalloc)
        put128(b + 280, c.store.capacity)       # TNVMCAP
        put128(b + 296, unalloc)                # UNVMCAP
    b[512] = 0x66                               # SQES
    b[513] = 0x44                               # CQES
    put16(b + 514, <uint16_t>(c.mqes if c.mqes < 0xFFFF else 0xFFFF))   # MAXCMD
    put32(b + 516, c.store.nns)                 # NN: every NSID, allocated or not
    put16(b + 520, (1 << 0) | (1 << 2) | (1 << 3))   # ONCS: Compare, DSM, Write Zeroes
    b[525] = 0x07 if c.vwc else 0x00            # VWC present, flush to NSID FFFFFFFFh supported
    put32(b + 536, c.sgls)
    n = strlen(nqn)
    memcpy(b + 768, nqn, n)
    memcpy(b + 768 + n, c.serial, 20)
    put16(b + 2048, 2500)                       # power state 0: 25 W


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_identify_ns(mdl_ctrl *c, uint32_t nsid, uint8_t *b) noexcept nogil:
    cdef mdl_ns *ns = &c.store.ns[nsid - 1]
    put64(b + 0, ns.nlba)                       # NSZE
    put64(b + 8, ns.nlba)                       # NCAP
    put64(b + 16, ns.nlba)                      # NUSE
    b[24] = 0                                   # NSFEAT
    b[25] = 1                                   # NLBAF (0-based): two formats
    b[26] = <uint8_t>ns.lbaf                    # FLBAS
    b[33] = 0x09                                # DLFEAT: deallocated reads zero; WZ DEAC
    put128(b + 48, ns.size)                     # NVMCAP
    put32(b + 128, (9 << 16) | (2 << 24))       # LBAF0: 512 B, good performance
    put32(b + 132, 12 << 16)                    # LBAF1: 4096 B, best performance


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_identify_ns_common(uint8_t *b) noexcept nogil:
    """Identify Namespace for NSID FFFFFFFFh: what every namespace shares
    (the LBA formats a Namespace Management create may ask for), sizes zero."""
    b[25] = 1
    put32(b + 128, (9 << 16) | (2 << 24))
    put32(b + 132, 12 << 16)


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_identify(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef uint32_t cns = x.cmd.cdw10 & 0xFF, nsid = x.cmd.nsid, i, n = 0
    cdef uint32_t cntid = x.cmd.cdw10 >> 16
    cdef uint8_t *b = c.abuf
    memset(b, 0, 4096)
    if cns == 0x00 or cns == 0x11:
        # 00h: an active NSID's structure; 11h: an allocated one's, attached
        # or not.  Any other NSID in 1..NN reads as zeroes (NVMe 1.4 5.15.2.1)
        if nsid == MDL_NSID_ALL and c.store.mgmt:
            mdl_identify_ns_common(b)
        elif not mdl_nsid_valid(c, nsid):
            return MST_INVALID_NS | MST_DNR
        elif mdl_nsid_ok(c, nsid) or (cns == 0x11 and mdl_ns_allocated(&c.store, nsid)):
            mdl_identify_ns(c, nsid, b)
    elif cns == 0x01:
        mdl_identify_ctrl(c, b)
    elif cns == 0x02 or cns == 0x10:
        # active (02h) or allocated (10h) NSIDs above NSID, ascending
        if nsid >= MDL_NSID_ALL - 1:
            return MST_INVALID_NS | MST_DNR
        if cns == 0x10 and not c.store.mgmt:
            return MST_INVALID_FIELD | MST_DNR
        for i in range(nsid + 1, c.store.nns + 1):
            if mdl_nsid_ok(c, i) or (cns == 0x10 and mdl_ns_allocated(&c.store, i)):
                put32(b + 4 * n, i)
                n += 1
    elif (cns == 0x12 or cns == 0x13) and c.store.mgmt:
        # controller lists: the controllers attached to NSID (12h), or all
        # of the subsystem's (13h), with IDs >= CNTID; this one is all there is
        if cns == 0x12 and not mdl_ns_allocated(&c.store, nsid):
            return MST_INVALID_FIELD | MST_DNR
        if cntid <= MDL_CNTLID and (cns == 0x13 or c.store.ns[nsid - 1].attached):
            put16(b, 1)
            put16(b + 2, MDL_CNTLID)
    elif cns == 0x03:
        # namespace identification descriptor list: one UUID (NIDT 3)
        if not mdl_nsid_ok(c, nsid):
            return MST_INVALID_NS | MST_DNR
        b[0] = 3
        b[1] = 16
        memcpy(b + 4, c.serial, 12)
        put32(b + 16, nsid)
        b[4 + 6] = (b[4 + 6] & 0x0F) | 0x40     # version 4 layout
        b[4 + 8] = (b[4 + 8] & 0x3F) | 0x80
    elif cns == 0x06:
        # I/O command set specific Identify Controller (as QEMU 7.2 answers
        # it at VER 1.4): only the NVM command set
        if x.cmd.cdw11 >> 24 != 0:
            return MST_INVALID_FIELD | MST_DNR
        b[1] = c.wzsl
        b[3] = c.dmrl
        put32(b + 4, c.dmrsl)
        put64(b + 8, c.dmsl)
    else:
        return MST_INVALID_FIELD | MST_DNR
    return mdl_admin_to_host(c, x, b, 4096)


# --- log pages ------------------------------------------------------------------------

@cython.linetrace(False)
@cython.profile(False)
cdef uint32_t mdl_smart_log(mdl_ctrl *c, uint8_t *b) noexcept nogil:
    cdef uint64_t now = nvmefs_now_ns()
    cdef uint64_t secs = c.store.power_on_seconds + (now - c.start_ns) // 1000000000
    memset(b, 0, 512)
    b[0] = 0x08 if c.fatal else 0               # critical warning: read only / fatal
    put16(b + 1, 300)                           # composite temperature, kelvin
    b[3] = 100                                  # available spare
    b[4] = 10                                   # spare threshold
    b[5] = 0                                    # percentage used
    # data units are thousands of 512-byte units, rounded up
    put128(b + 32, ((c.bytes_read >> 9) + 999) // 1000)
    put128(b + 48, ((c.bytes_written >> 9) + 999) // 1000)
    put128(b + 64, c.host_reads)
    put128(b + 80, c.host_writes)
    put128(b + 96, c.busy_ns // (<uint64_t>60 * 1000000000))   # controller busy time, minutes
    put128(b + 112, c.store.power_cycles)
    put128(b + 128, secs // 3600)
    put128(b + 144, c.store.unsafe_shutdowns)
    put128(b + 160, c.media_errors)
    put128(b + 176, c.error_count)
    return 512


cdef enum:
    EFF_CSUPP = 1 << 0          # command supported
    EFF_LBCC = 1 << 1           # logical block content change
    EFF_NCC = 1 << 2            # namespace capability change
    EFF_NIC = 1 << 3            # namespace inventory change
    EFF_CSE_ANY = 2 << 16       # no other command to any namespace while it runs


@cython.linetrace(False)
@cython.profile(False)
cdef uint32_t mdl_effects_log(mdl_ctrl *c, uint8_t *b) noexcept nogil:
    """Commands Supported and Effects (log page 05h, NVMe 2.0 5.16.1.6):
    admin entries at 0, I/O entries at 1024, one dword per opcode; exactly
    the commands mdl_admin_exec and mdl_io_exec serve."""
    cdef uint32_t i
    cdef uint8_t admin_ops[11]
    admin_ops[:] = [ADM_DELETE_SQ, ADM_CREATE_SQ, ADM_GET_LOG, ADM_DELETE_CQ, ADM_CREATE_CQ, ADM_IDENTIFY,
                    ADM_ABORT, ADM_SET_FEATURES, ADM_GET_FEATURES, ADM_AER, ADM_DBBUF]
    memset(b, 0, 4096)
    for i in range(11):
        put32(b + 4 * admin_ops[i], EFF_CSUPP)
    # Format NVM rewrites the blocks, may change the LBA size (Identify
    # Namespace), and runs alone
    put32(b + 4 * ADM_FORMAT, EFF_CSUPP | EFF_LBCC | EFF_NCC | EFF_NIC | EFF_CSE_ANY)
    if c.store.mgmt:
        # a namespace appears or goes (NIC) and the capacity left changes (NCC)
        put32(b + 4 * ADM_NS_MGMT, EFF_CSUPP | EFF_NCC | EFF_NIC)
        put32(b + 4 * ADM_NS_ATTACH, EFF_CSUPP | EFF_NIC)
    # I/O (model_io.pyx): Flush, Write, Read, Compare, Write Zeroes, Dataset Management
    put32(b + 1024 + 4 * 0x00, EFF_CSUPP | EFF_LBCC)
    put32(b + 1024 + 4 * 0x01, EFF_CSUPP | EFF_LBCC)
    put32(b + 1024 + 4 * 0x02, EFF_CSUPP)
    put32(b + 1024 + 4 * 0x05, EFF_CSUPP)
    put32(b + 1024 + 4 * 0x08, EFF_CSUPP | EFF_LBCC)
    put32(b + 1024 + 4 * 0x09, EFF_CSUPP | EFF_LBCC)
    return 4096


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_get_log(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef nvme_sqe *cmd = x.cmd
    cdef uint32_t lid = cmd.cdw10 & 0xFF, rae = (cmd.cdw10 >> 15) & 1
    cdef uint64_t numd = ((<uint64_t>(cmd.cdw11 & 0xFFFF) << 16) | (cmd.cdw10 >> 16)) + 1
    cdef uint64_t length = numd * 4
    cdef uint64_t off = cmd.cdw12 | (<uint64_t>cmd.cdw13 << 32)
    cdef uint32_t size, i, n
    cdef uint8_t *b = c.abuf
    if off & 3:
        return MST_INVALID_FIELD | MST_DNR
    if c.mdts and length > (<uint64_t>MDL_PAGE << c.mdts):
        return MST_INVALID_FIELD | MST_DNR      # MDTS bounds every data transfer
    if lid == 0x01:
        size = MDL_ERRLOG_ENTRIES * 64
        for i in range(<uint32_t>MDL_ERRLOG_ENTRIES):
            memcpy(b + 64 * i, &c.errlog[64 * ((c.errlog_head + i) % MDL_ERRLOG_ENTRIES)], 64)
    elif lid == 0x02:
        if x.cmd.nsid != 0 and x.cmd.nsid != MDL_NSID_ALL and not mdl_nsid_ok(c, x.cmd.nsid):
            return MST_INVALID_NS | MST_DNR
        size = mdl_smart_log(c, b)
    elif lid == 0x03:
        size = 512
        memset(b, 0, 512)
        b[0] = 1                                # AFI: slot 1 active
        memcpy(b + 8, b"1.0     ", 8)
    elif lid == 0x04 and c.store.mgmt:
        # Changed Namespace List: the NSIDs whose attributes changed since
        # it was last read, ascending (at most 16 here, never the FFFFFFFFh
        # overflow entry)
        size = 4096
        memset(b, 0, 4096)
        n = 0
        for i in range(c.store.nns):
            if c.ns_changed >> i & 1:
                put32(b + 4 * n, i + 1)
                n += 1
    elif lid == 0x05:
        size = mdl_effects_log(c, b)
    else:
        return MST_LOG_INVALID | MST_DNR
    if off >= size:
        return MST_INVALID_FIELD | MST_DNR
    if length > size - off:
        length = size - off
    cdef int st = mdl_admin_to_host(c, x, b + off, length)
    if st == 0 and lid == 0x01 and not rae:
        c.aen_error_masked = 0
    if st == 0 and lid == 0x04 and not rae:
        # read: the list starts again, and the next change posts an event
        c.ns_changed = 0
        c.aen_ns_masked = 0
    return st


# --- features -------------------------------------------------------------------------

@cython.linetrace(False)
@cython.profile(False)
cdef bint mdl_io_queues_exist(mdl_ctrl *c) noexcept nogil:
    cdef uint32_t q
    for q in range(1, c.nq + 1):
        if c.sq[q].valid or c.cq[q].valid:
            return True
    return False


@cython.linetrace(False)
@cython.profile(False)
cdef inline bint mdl_feature_known(uint32_t fid) noexcept nogil:
    # the mandatory features of NVMe 1.4 (Figure 271) and the optional ones served
    return (fid == FID_ARBITRATION or fid == FID_POWER or fid == FID_TEMP_THRESHOLD
            or fid == FID_ERROR_RECOVERY or fid == FID_VWC or fid == FID_NUM_QUEUES
            or fid == FID_IRQ_COALESCING or fid == FID_IV_CONFIG or fid == FID_WRITE_ATOMICITY
            or fid == FID_ASYNC_EVENT)


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_feature_scope(mdl_ctrl *c, uint32_t fid, uint32_t nsid, bint setting) noexcept nogil:
    """The NSID check of Get/Set Features: only Error Recovery is per
    namespace here (an active NSID, or FFFFFFFFh to set every namespace, as
    QEMU takes it); a Set of any other feature names no namespace (Feature
    Not Namespace Specific is a Set Features status; a Get ignores it)."""
    if fid != FID_ERROR_RECOVERY:
        if setting and nsid != 0 and nsid != MDL_NSID_ALL:
            return MST_FEAT_NOT_NS | MST_DNR
        return 0
    if nsid == MDL_NSID_ALL:
        return 0 if setting else MST_INVALID_FIELD | MST_DNR
    if not mdl_nsid_valid(c, nsid):
        return MST_INVALID_NS | MST_DNR
    if not mdl_nsid_ok(c, nsid):
        return MST_INVALID_FIELD | MST_DNR
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_temp_select(uint32_t dw11, bint *under) noexcept nogil:
    """Temperature Threshold's TMPSEL/THSEL: the composite temperature (0h,
    or Fh: every sensor there is) over or under."""
    cdef uint32_t tmpsel = (dw11 >> 16) & 0xF, thsel = (dw11 >> 20) & 3
    if (tmpsel != 0 and tmpsel != 0xF) or thsel > 1:
        return MST_INVALID_FIELD | MST_DNR
    under[0] = thsel == 1
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_set_features(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef uint32_t fid = x.cmd.cdw10 & 0xFF, dw11 = x.cmd.cdw11, i, iv
    cdef bint under
    cdef int st
    if x.cmd.cdw10 >> 31:
        return MST_NOT_SAVEABLE | MST_DNR
    if not mdl_feature_known(fid):
        return MST_INVALID_FIELD | MST_DNR
    st = mdl_feature_scope(c, fid, x.cmd.nsid, True)
    if st:
        return st
    if fid == FID_NUM_QUEUES:
        if (dw11 & 0xFFFF) == 0xFFFF or (dw11 >> 16) == 0xFFFF:
            return MST_INVALID_FIELD | MST_DNR
        if mdl_io_queues_exist(c):
            return MST_CMD_SEQ
        x.dw0 = (c.nq - 1) | ((c.nq - 1) << 16)
    elif fid == FID_VWC:
        if not c.vwc:
            return MST_INVALID_FIELD | MST_DNR
        c.wce = dw11 & 1
        if not c.wce:
            mdl_store_flush(&c.store)
    elif fid == FID_IRQ_COALESCING:
        c.coalescing = dw11 & 0xFFFF
    elif fid == FID_ASYNC_EVENT:
        c.aec = dw11
    elif fid == FID_ARBITRATION:
        c.arbitration = dw11            # round robin only (CAP.AMS 0): weights are kept, not used
    elif fid == FID_POWER:
        if dw11 & 0x1F:
            return MST_INVALID_FIELD | MST_DNR   # power state above NPSS (one state, 0)
        c.power_state = dw11 & 0xFF
    elif fid == FID_TEMP_THRESHOLD:
        st = mdl_temp_select(dw11, &under)
        if st:
            return st
        if under:
            c.temp_under = dw11 & 0xFFFF
        else:
            c.temp_over = dw11 & 0xFFFF
    elif fid == FID_ERROR_RECOVERY:
        if dw11 & (1 << 16):
            return MST_INVALID_FIELD | MST_DNR   # DULBE: NSFEAT bit 2 is clear
        for i in range(c.store.nns):
            if x.cmd.nsid == i + 1 or (x.cmd.nsid == MDL_NSID_ALL and mdl_nsid_ok(c, i + 1)):
                c.error_recovery[i] = dw11 & 0xFFFF
    elif fid == FID_IV_CONFIG:
        iv = dw11 & 0xFFFF
        if iv >= c.nvec:
            return MST_INVALID_FIELD | MST_DNR
        # the admin queue's vector is never coalesced
        c.iv_cd[iv] = 1 if iv == 0 else (dw11 >> 16) & 1
    else:
        c.write_atomicity = dw11 & 1
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_get_features(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef uint32_t fid = x.cmd.cdw10 & 0xFF, sel = (x.cmd.cdw10 >> 8) & 7, dw11 = x.cmd.cdw11, iv
    cdef bint under
    cdef int st
    if sel > 3:
        return MST_INVALID_FIELD | MST_DNR
    if not mdl_feature_known(fid):
        return MST_INVALID_FIELD | MST_DNR
    st = mdl_feature_scope(c, fid, x.cmd.nsid, False)
    if st:
        return st
    if sel == 3:
        # changeable, not saveable; per namespace for Error Recovery
        x.dw0 = 0x4 | (0x2 if fid == FID_ERROR_RECOVERY else 0)
        return 0
    if fid == FID_NUM_QUEUES:
        x.dw0 = (c.nq - 1) | ((c.nq - 1) << 16)
    elif fid == FID_VWC:
        if not c.vwc:
            return MST_INVALID_FIELD | MST_DNR
        x.dw0 = c.wce if sel == 0 else 1        # default and saved value: enabled
    elif fid == FID_IRQ_COALESCING:
        x.dw0 = 0 if sel else c.coalescing
    elif fid == FID_ASYNC_EVENT:
        x.dw0 = 0 if sel else c.aec
    elif fid == FID_ARBITRATION:
        x.dw0 = 0 if sel else c.arbitration
    elif fid == FID_POWER:
        x.dw0 = 0 if sel else c.power_state
    elif fid == FID_TEMP_THRESHOLD:
        st = mdl_temp_select(dw11, &under)
        if st:
            return st
        if sel:
            x.dw0 = 0 if under else 343
        else:
            x.dw0 = c.temp_under if under else c.temp_over
    elif fid == FID_ERROR_RECOVERY:
        x.dw0 = 0 if sel else c.error_recovery[x.cmd.nsid - 1]
    elif fid == FID_IV_CONFIG:
        iv = dw11 & 0xFFFF
        if iv >= c.nvec:
            return MST_INVALID_FIELD | MST_DNR
        x.dw0 = iv | (<uint32_t>(1 if iv == 0 else (0 if sel else c.iv_cd[iv])) << 16)
    else:
        x.dw0 = 0 if sel else c.write_atomicity
    return 0


# --- abort, events, shadow doorbells, format -------------------------------------------

@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_abort(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef uint16_t sqid = x.cmd.cdw10 & 0xFFFF, cid = x.cmd.cdw10 >> 16
    cdef int i = mdl_held_find(c, sqid, cid)
    cdef mdl_held *h
    x.dw0 = 1                                   # bit 0 set: not aborted
    if i < 0:
        return 0
    h = &c.held[i]
    if h.kind == HELD_POST or (h.kind == HELD_AER and h.release_ns):
        return 0                                # already completed, waiting for CQ room
    if h.kind == HELD_AER:
        c.aers -= 1
    h.st = MST_ABORT_REQ
    h.dw0 = 0
    h.release_ns = 1
    c.aborted += 1
    x.dw0 = 0
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_aer(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    if c.aers > MDL_AERL:
        return MST_AER_LIMIT                    # no DNR, as QEMU
    if mdl_held_add(c, HELD_AER, x.sqid, x.cmd.cid, x.cmd.opc, 0, 0, 0, 0, 0) < 0:
        return MST_INTERNAL
    c.aers += 1
    mdl_aen_dispatch(c)
    return MST_HELD


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_dbbuf_config(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef uint64_t dbs = x.cmd.dptr[0], eis = x.cmd.dptr[1]
    cdef uint64_t length = (2 * (<uint64_t>c.nq + 1)) * c.stride
    cdef uint32_t q
    if length < MDL_PAGE:
        length = MDL_PAGE
    if dbs == 0 or eis == 0 or (dbs & MDL_PAGE_MASK) or (eis & MDL_PAGE_MASK):
        return MST_INVALID_FIELD | MST_DNR
    c.dbs = mdl_tr(c.arena, dbs, length)
    c.eis = mdl_tr(c.arena, eis, length)
    if c.dbs == NULL or c.eis == NULL:
        c.dbs = NULL
        c.eis = NULL
        return MST_DATA_XFER
    c.dbs_len = length
    # seed the shadow with the current values, as QEMU does, so the host's
    # next shadow write continues from what the controller has seen
    for q in range(1, c.nq + 1):
        if c.sq[q].valid:
            mdl_shadow_store(c, q, 0, c.sq[q].tail)
            mdl_eventidx_store(c, q, 0, c.sq[q].tail)
            c.sq[q].sh_last = c.sq[q].tail
        if c.cq[q].valid:
            mdl_shadow_store(c, q, 1, c.cq[q].head)
            mdl_eventidx_store(c, q, 1, c.cq[q].head)
            c.cq[q].sh_last = c.cq[q].head
    c.dbbuf = 1
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_format(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef uint32_t nsid = x.cmd.nsid, dw10 = x.cmd.cdw10
    cdef uint32_t lbaf = dw10 & 0xF, mset = (dw10 >> 4) & 1, pi = (dw10 >> 5) & 7
    cdef uint32_t ses = (dw10 >> 9) & 7, i, first, last, was
    if nsid == MDL_NSID_ALL:
        first = 0
        last = c.store.nns
    elif mdl_nsid_ok(c, nsid):
        first = nsid - 1
        last = nsid
    else:
        # inactive (in 1..NN, not attached): Invalid Field, as I/O to it
        return (MST_INVALID_FIELD if mdl_nsid_valid(c, nsid) else MST_INVALID_NS) | MST_DNR
    if lbaf > 1:
        return MST_FORMAT_INVALID | MST_DNR
    if mset or pi:
        return MST_FORMAT_INVALID | MST_DNR     # no metadata, no protection information
    if ses > 1:
        return MST_INVALID_FIELD | MST_DNR      # no cryptographic erase
    if c.store.raw and lbaf != c.store.ns[0].lbaf:
        return MST_FORMAT_INVALID | MST_DNR     # a raw image has no header to keep an LBA size in
    for i in range(first, last):
        if not mdl_nsid_ok(c, i + 1):
            continue                            # FFFFFFFFh: every active namespace
        was = c.store.ns[i].lbaf
        if ses == 1 and mdl_store_zero(&c.store, &c.store.ns[i], 0, c.store.ns[i].size, True) < 0:
            return MST_INTERNAL
        if mdl_store_set_format(&c.store, i, lbaf) < 0:
            return MST_INTERNAL
        if was != lbaf:
            mdl_ns_changed(c, i + 1)            # its Identify Namespace data changed
    return 0


# --- namespace management and attachment (NVMe 1.4 5.20, 5.19) ------------------------

@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_ns_changed(mdl_ctrl *c, uint32_t nsid) noexcept nogil:
    """An attached namespace appeared, went, or changed its Identify data:
    list it in log 04h and, when the host enabled namespace attribute notices
    (Set Features 0Bh bit 8), post one Notice event (type 2h, info 00h, log
    04h) -- then no more until the host has read the log."""
    c.ns_changed |= <uint32_t>1 << (nsid - 1)
    if (c.aec >> 8) & 1 and not c.aen_ns_masked:
        c.aen_ns_masked = 1
        mdl_aen(c, 2, 0x00, 0x04)


@cython.linetrace(False)
@cython.profile(False)
cdef inline uint64_t get64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_ns_delete_one(mdl_ctrl *c, uint32_t nsid) noexcept nogil:
    cdef bint was = c.store.ns[nsid - 1].attached
    if mdl_store_ns_delete(&c.store, nsid - 1) < 0:
        return MST_INTERNAL
    if was:
        mdl_ns_changed(c, nsid)
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_ns_mgmt(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef uint32_t sel = x.cmd.cdw10 & 0xF, nsid = x.cmd.nsid, lbaf, newid = 0, i
    cdef uint8_t *b = c.abuf
    cdef uint64_t nsze, ncap, size
    cdef uint32_t shift
    cdef uint16_t u16a, u16b
    cdef uint32_t u32
    cdef int st, rc
    if x.cmd.cdw11 >> 24:
        return MST_INVALID_FIELD | MST_DNR      # CSI: the NVM command set only
    if sel == 0:
        # create: the host sends the Identify Namespace fields it chooses
        if nsid != 0:
            return MST_INVALID_FIELD | MST_DNR
        st = mdl_admin_from_host(c, x, b, 4096)
        if st:
            return st
        nsze = get64(b)
        ncap = get64(b + 8)
        lbaf = b[26] & 0xF
        memcpy(&u32, b + 92, 4)                 # ANAGRPID
        memcpy(&u16a, b + 100, 2)               # NVMSETID
        memcpy(&u16b, b + 102, 2)               # ENDGID
        if (b[26] >> 5) & 3 or lbaf > 1:
            return MST_FORMAT_INVALID | MST_DNR
        if b[29] or b[30] & 1 or u32 or u16a or u16b:
            # no protection information, no sharing between controllers
            # (CMIC 0), no ANA groups, NVM sets or endurance groups
            return MST_INVALID_FIELD | MST_DNR
        if nsze == 0 or ncap > nsze:
            return MST_INVALID_FIELD | MST_DNR
        if ncap < nsze:
            return MST_THIN_UNSUPPORTED | MST_DNR   # NSFEAT bit 0 is clear
        shift = 12 if lbaf else 9
        if nsze > (<uint64_t>0xFFFFFFFFFFFFFFFF >> shift):
            return MST_NS_INSUFFICIENT_CAP | MST_DNR
        size = nsze << shift
        if size & 4095:
            # a namespace can switch between 512 B and 4 KiB LBAs (Format
            # NVM), so its size is whole 4 KiB blocks
            return MST_INVALID_FIELD | MST_DNR
        rc = mdl_store_ns_create(&c.store, size, lbaf, &newid)
        if rc == MDL_NS_NO_ID:
            return MST_NSID_UNAVAILABLE | MST_DNR
        if rc == MDL_NS_NO_SPACE:
            return MST_NS_INSUFFICIENT_CAP | MST_DNR
        if rc < 0:
            return MST_INTERNAL
        x.dw0 = newid
        return 0
    if sel == 1:
        if nsid == MDL_NSID_ALL:
            for i in range(1, c.store.nns + 1):
                if mdl_ns_allocated(&c.store, i):
                    st = mdl_ns_delete_one(c, i)
                    if st:
                        return st
            return 0
        if not mdl_nsid_valid(c, nsid):
            return MST_INVALID_NS | MST_DNR
        if not mdl_ns_allocated(&c.store, nsid):
            return MST_INVALID_FIELD | MST_DNR
        return mdl_ns_delete_one(c, nsid)
    return MST_INVALID_FIELD | MST_DNR


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_ns_attach(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef uint32_t sel = x.cmd.cdw10 & 0xF, nsid = x.cmd.nsid, i
    cdef uint16_t n, id
    cdef uint8_t *b = c.abuf
    cdef bint on
    cdef int st
    if sel > 1:
        return MST_INVALID_FIELD | MST_DNR
    if nsid == MDL_NSID_ALL or not mdl_nsid_valid(c, nsid):
        return MST_INVALID_NS | MST_DNR
    if not mdl_ns_allocated(&c.store, nsid):
        return MST_INVALID_FIELD | MST_DNR
    st = mdl_admin_from_host(c, x, b, 4096)
    if st:
        return st
    # the Controller List: a count, then that many controller IDs; this
    # subsystem has one controller, so the list names it once
    memcpy(&n, b, 2)
    if n != 1:
        return MST_CTRL_LIST_INVALID | MST_DNR
    memcpy(&id, b + 2, 2)
    if id != MDL_CNTLID:
        return MST_CTRL_LIST_INVALID | MST_DNR
    on = sel == 0
    if on and c.store.ns[nsid - 1].attached:
        return MST_NS_ALREADY_ATTACHED | MST_DNR
    if not on and not c.store.ns[nsid - 1].attached:
        return MST_NS_NOT_ATTACHED | MST_DNR
    if mdl_store_ns_attach(&c.store, nsid - 1, on) < 0:
        return MST_INTERNAL
    mdl_ns_changed(c, nsid)
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_admin_exec(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef uint8_t opc = x.cmd.opc
    if not (opc == ADM_DELETE_SQ or opc == ADM_CREATE_SQ or opc == ADM_GET_LOG
            or opc == ADM_DELETE_CQ or opc == ADM_CREATE_CQ or opc == ADM_IDENTIFY
            or opc == ADM_ABORT or opc == ADM_SET_FEATURES or opc == ADM_GET_FEATURES
            or opc == ADM_AER or opc == ADM_DBBUF or opc == ADM_FORMAT
            or ((opc == ADM_NS_MGMT or opc == ADM_NS_ATTACH) and c.store.mgmt)):
        return MST_INVALID_OPCODE | MST_DNR
    # admin data pointers are PRPs (QEMU refuses SGLs here too); no fused ops
    if (x.cmd.flags >> 6) & 3 or x.cmd.flags & 3:
        return MST_INVALID_FIELD | MST_DNR
    if opc == ADM_IDENTIFY:
        return mdl_identify(c, x)
    if opc == ADM_GET_LOG:
        return mdl_get_log(c, x)
    if opc == ADM_CREATE_CQ:
        return mdl_create_cq(c, x)
    if opc == ADM_CREATE_SQ:
        return mdl_create_sq(c, x)
    if opc == ADM_DELETE_SQ:
        return mdl_delete_sq(c, x)
    if opc == ADM_DELETE_CQ:
        return mdl_delete_cq(c, x)
    if opc == ADM_SET_FEATURES:
        return mdl_set_features(c, x)
    if opc == ADM_GET_FEATURES:
        return mdl_get_features(c, x)
    if opc == ADM_ABORT:
        return mdl_abort(c, x)
    if opc == ADM_AER:
        return mdl_aer(c, x)
    if opc == ADM_DBBUF:
        return mdl_dbbuf_config(c, x)
    if opc == ADM_NS_MGMT:
        return mdl_ns_mgmt(c, x)
    if opc == ADM_NS_ATTACH:
        return mdl_ns_attach(c, x)
    return mdl_format(c, x)
