# NVM command set I/O commands of the controller model (NVM Command Set 2.0
# section 3; NVME-NOTES "NVM I/O commands").  Each returns a model status
# (DNR << 15 | SCT << 8 | SC).  Order of checks as QEMU: namespace, opcode,
# transfer size (MDTS), LBA range, then the data pointer.

cdef enum:
    IO_FLUSH = 0x00
    IO_WRITE = 0x01
    IO_READ = 0x02
    IO_COMPARE = 0x05
    IO_WRITE_ZEROES = 0x08
    IO_DSM = 0x09

    RW_FUA = 1 << 30
    WZ_DEAC = 1 << 25
    DSM_AD = 1 << 2


@cython.linetrace(False)
@cython.profile(False)
cdef inline int mdl_check_range(mdl_ns *ns, uint64_t slba, uint64_t nlb) noexcept nogil:
    if slba >= ns.nlba or nlb > ns.nlba - slba:
        return MST_LBA_RANGE | MST_DNR
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_durable(mdl_ctrl *c, bint fua) noexcept nogil:
    """After a write: with the volatile write cache off, or FUA, the data must
    be on stable storage before the completion."""
    if fua or not c.wce:
        return mdl_store_flush(&c.store)
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_io_rw(mdl_ctrl *c, mdl_cmdctx *x, mdl_ns *ns) noexcept nogil:
    cdef nvme_sqe *cmd = x.cmd
    cdef uint64_t slba = cmd.cdw10 | (<uint64_t>cmd.cdw11 << 32)
    cdef uint64_t nlb = (cmd.cdw12 & 0xFFFF) + 1
    cdef uint64_t length = nlb << ns.lba_shift
    cdef uint8_t opc = cmd.opc
    cdef int st, rc
    cdef bint equal
    x.lba = slba
    if c.mdts and length > (<uint64_t>MDL_PAGE << c.mdts):
        return MST_INVALID_FIELD | MST_DNR
    st = mdl_check_range(ns, slba, nlb)
    if st:
        return st
    st = mdl_map_dptr(c.arena, cmd, length, opc == IO_READ, c.sgls, c.scratch, &c.iol)
    if st:
        return st
    if c.null_data and (opc == IO_READ or opc == IO_WRITE):
        # bench mode: every check above ran, the data stays where it is
        if opc == IO_READ:
            c.host_reads += 1
            c.bytes_read += length
        else:
            c.host_writes += 1
            c.bytes_written += length
        return 0
    if opc == IO_READ:
        c.host_reads += 1
        rc = mdl_store_rw(&c.store, ns, slba << ns.lba_shift, c.iol.iov, c.iol.n, False)
        if rc < 0:
            return MST_READ_ERROR
        c.bytes_read += length
        return 0
    if opc == IO_WRITE:
        c.host_writes += 1
        rc = mdl_store_rw(&c.store, ns, slba << ns.lba_shift, c.iol.iov, c.iol.n, True)
        if rc < 0 or mdl_durable(c, (cmd.cdw12 & RW_FUA) != 0) < 0:
            return MST_WRITE_FAULT
        c.bytes_written += length
        return 0
    # Compare: counted as a host read command (SMART), no data units
    c.host_reads += 1
    rc = mdl_store_compare(&c.store, ns, slba << ns.lba_shift, c.iol.iov, c.iol.n, &equal)
    if rc < 0:
        return MST_READ_ERROR
    return 0 if equal else MST_COMPARE_FAIL | MST_DNR


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_io_write_zeroes(mdl_ctrl *c, mdl_cmdctx *x, mdl_ns *ns) noexcept nogil:
    cdef nvme_sqe *cmd = x.cmd
    cdef uint64_t slba = cmd.cdw10 | (<uint64_t>cmd.cdw11 << 32)
    cdef uint64_t nlb = (cmd.cdw12 & 0xFFFF) + 1
    cdef int st
    x.lba = slba
    if c.wzsl and (nlb << ns.lba_shift) > (<uint64_t>MDL_PAGE << c.wzsl):
        return MST_INVALID_FIELD | MST_DNR      # above WZSL
    st = mdl_check_range(ns, slba, nlb)
    if st:
        return st
    if mdl_store_zero(&c.store, ns, slba << ns.lba_shift, nlb << ns.lba_shift,
                      (cmd.cdw12 & WZ_DEAC) != 0) < 0:
        return MST_WRITE_FAULT
    if mdl_durable(c, (cmd.cdw12 & RW_FUA) != 0) < 0:
        return MST_WRITE_FAULT
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_io_dsm(mdl_ctrl *c, mdl_cmdctx *x, mdl_ns *ns) noexcept nogil:
    cdef nvme_sqe *cmd = x.cmd
    cdef uint32_t nr = (cmd.cdw10 & 0xFF) + 1, i, nlb
    cdef uint64_t slba, total = 0
    cdef uint8_t *r = c.abuf
    cdef int st = mdl_map_dptr(c.arena, cmd, nr * 16, False, c.sgls, c.scratch, &c.iol)
    if st:
        return st
    if not (cmd.cdw11 & DSM_AD):
        return 0                                # attributes are hints only
    mdl_iol_copy_in(&c.iol, r, nr * 16)
    if c.dmrl and nr > c.dmrl:
        return MST_INVALID_FIELD | MST_DNR      # above DMRL
    # every range is checked before any is deallocated
    for i in range(nr):
        memcpy(&nlb, r + 16 * i + 4, 4)
        memcpy(&slba, r + 16 * i + 8, 8)
        total += nlb
        if (c.dmrsl and nlb > c.dmrsl) or (c.dmsl and total > c.dmsl):
            x.lba = slba
            return MST_INVALID_FIELD | MST_DNR  # above DMRSL or DMSL
        if nlb and mdl_check_range(ns, slba, nlb):
            x.lba = slba
            return MST_LBA_RANGE | MST_DNR
    for i in range(nr):
        memcpy(&nlb, r + 16 * i + 4, 4)
        memcpy(&slba, r + 16 * i + 8, 8)
        if nlb and mdl_store_zero(&c.store, ns, slba << ns.lba_shift,
                                  <uint64_t>nlb << ns.lba_shift, True) < 0:
            x.lba = slba
            return MST_WRITE_FAULT
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_io_exec(mdl_ctrl *c, mdl_cmdctx *x) noexcept nogil:
    cdef nvme_sqe *cmd = x.cmd
    cdef uint8_t opc = cmd.opc
    cdef uint32_t nsid = cmd.nsid
    cdef mdl_ns *ns
    if cmd.flags & 3:
        return MST_INVALID_FIELD | MST_DNR      # no fused operations (FUSES = 0)
    if opc == IO_FLUSH and nsid == MDL_NSID_ALL and c.vwc:
        # VWC bits 2:1 = 11b: a flush to every namespace
        return MST_WRITE_FAULT if (c.wce and mdl_store_flush(&c.store) < 0) else 0
    if not mdl_nsid_ok(c, nsid):
        # an NSID in 1..NN that is not attached is inactive: Invalid Field
        # (as QEMU answers); outside 1..NN it is invalid
        return (MST_INVALID_FIELD if mdl_nsid_valid(c, nsid) else MST_INVALID_NS) | MST_DNR
    ns = &c.store.ns[nsid - 1]
    if opc == IO_READ or opc == IO_WRITE or opc == IO_COMPARE:
        return mdl_io_rw(c, x, ns)
    if opc == IO_FLUSH:
        if c.vwc and c.wce and mdl_store_flush(&c.store) < 0:
            return MST_WRITE_FAULT
        return 0
    if opc == IO_WRITE_ZEROES:
        return mdl_io_write_zeroes(c, x, ns)
    if opc == IO_DSM:
        return mdl_io_dsm(c, x, ns)
    return MST_INVALID_OPCODE | MST_DNR
