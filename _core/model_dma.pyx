# Controller side of the data pointer: walk a command's PRPs or SGL into an
# iovec list of host memory, with every check a controller makes (NVMe base
# 2.0 4.1 "PRP entry", 4.3 "Scatter Gather List"; NVME-NOTES "PRP rules",
# "SGL descriptors").
#
# Host memory is reached only through DmaArena.translate(): a bus address
# the arena does not map is what an IOMMU fault is to a real device, and the
# command ends with Data Transfer Error.  The NVMe page size is 4 KiB
# (CAP.MPSMIN = MPSMAX = 0), whatever the arena's own page size.
#
# Status values inside the model are  DNR << 15 | SCT << 8 | SC.

cdef enum:
    MDL_PAGE = 4096
    MDL_PAGE_MASK = 4095
    MDL_SCRATCH = 65536
    MDL_SGL_MAX_DESC = 1 << 20       # bound on a (possibly cyclic) descriptor chain
    MDL_SGLS_BIT_BUCKET = 1 << 16

cdef enum mdl_status:
    MST_SUCCESS = 0x000
    MST_DNR = 0x8000
    MST_INVALID_OPCODE = 0x001
    MST_INVALID_FIELD = 0x002
    MST_CID_CONFLICT = 0x003
    MST_DATA_XFER = 0x004
    MST_INTERNAL = 0x006
    MST_ABORT_REQ = 0x007
    MST_ABORT_SQ_DEL = 0x008
    MST_INVALID_NS = 0x00B
    MST_CMD_SEQ = 0x00C
    MST_SGL_SEG_INVALID = 0x00D
    MST_SGL_NUM_DESC = 0x00E
    MST_SGL_DATA_LEN = 0x00F
    MST_SGL_TYPE = 0x011
    MST_PRP_OFFSET = 0x013
    MST_LBA_RANGE = 0x080
    MST_CQ_INVALID = 0x100
    MST_QID_INVALID = 0x101
    MST_QSIZE_INVALID = 0x102
    MST_AER_LIMIT = 0x105
    MST_IV_INVALID = 0x108
    MST_LOG_INVALID = 0x109
    MST_FORMAT_INVALID = 0x10A
    MST_QDEL_INVALID = 0x10C
    MST_NOT_SAVEABLE = 0x10D
    MST_FEAT_NOT_NS = 0x10F
    MST_NS_INSUFFICIENT_CAP = 0x115
    MST_NSID_UNAVAILABLE = 0x116
    MST_NS_ALREADY_ATTACHED = 0x118
    MST_NS_NOT_ATTACHED = 0x11A
    MST_THIN_UNSUPPORTED = 0x11B
    MST_CTRL_LIST_INVALID = 0x11C
    MST_WRITE_FAULT = 0x280
    MST_READ_ERROR = 0x281
    MST_COMPARE_FAIL = 0x285
    MST_HELD = 0x10000               # not a status: the command completes later


cdef struct mdl_iovlist:
    mdl_iovec *iov
    uint32_t n
    uint32_t cap
    uint64_t total


@cython.linetrace(False)
@cython.profile(False)
cdef inline uint8_t *mdl_tr(void *arena, uint64_t iova, uint64_t length) noexcept nogil:
    # the arena object is kept alive by the ControllerModel that owns the thread
    return (<DmaArena>arena).translate(iova, length)


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_iol_push(mdl_iovlist *l, uint8_t *p, uint64_t length, bint merge) noexcept nogil:
    cdef mdl_iovec *grown
    cdef uint32_t cap
    if length == 0:
        return 0
    if merge and l.n and <uint8_t *>l.iov[l.n - 1].iov_base + l.iov[l.n - 1].iov_len == p:
        l.iov[l.n - 1].iov_len += length
        l.total += length
        return 0
    if l.n == l.cap:
        cap = l.cap * 2 if l.cap else 64
        grown = <mdl_iovec *>realloc(l.iov, cap * sizeof(mdl_iovec))
        if grown == NULL:
            return -ENOMEM
        l.iov = grown
        l.cap = cap
    l.iov[l.n].iov_base = p
    l.iov[l.n].iov_len = length
    l.n += 1
    l.total += length
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_map_prp(void *arena, uint64_t prp1, uint64_t prp2, uint64_t length,
                     mdl_iovlist *out) noexcept nogil:
    cdef uint64_t first, rem, n, ent, lst
    cdef uint32_t i, nents
    cdef uint8_t *p
    cdef const uint64_t *lp
    if prp1 & 3:
        return MST_PRP_OFFSET | MST_DNR
    first = MDL_PAGE - (prp1 & MDL_PAGE_MASK)
    if first > length:
        first = length
    p = mdl_tr(arena, prp1, first)
    if p == NULL:
        return MST_DATA_XFER
    if mdl_iol_push(out, p, first, True) < 0:
        return MST_INTERNAL
    rem = length - first
    if rem == 0:
        return 0
    if rem <= MDL_PAGE:
        # PRP2 is the second data page itself
        if prp2 & MDL_PAGE_MASK:
            return MST_PRP_OFFSET | MST_DNR
        p = mdl_tr(arena, prp2, rem)
        if p == NULL:
            return MST_DATA_XFER
        return MST_INTERNAL if mdl_iol_push(out, p, rem, True) < 0 else 0
    # PRP2 is a list pointer: qword aligned, may start inside its page
    if prp2 & 7:
        return MST_PRP_OFFSET | MST_DNR
    lst = prp2
    while True:
        nents = <uint32_t>((MDL_PAGE - (lst & MDL_PAGE_MASK)) >> 3)
        lp = <const uint64_t *>mdl_tr(arena, lst, <uint64_t>nents * 8)
        if lp == NULL:
            return MST_DATA_XFER
        for i in range(nents):
            ent = lp[i]
            if ent & MDL_PAGE_MASK:
                return MST_PRP_OFFSET | MST_DNR
            if i == nents - 1 and rem > MDL_PAGE:
                lst = ent           # the last entry of a full list chains to the next list
                break
            n = rem if rem < MDL_PAGE else MDL_PAGE
            p = mdl_tr(arena, ent, n)
            if p == NULL:
                return MST_DATA_XFER
            if mdl_iol_push(out, p, n, True) < 0:
                return MST_INTERNAL
            rem -= n
            if rem == 0:
                return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_sgl_data(void *arena, const nvme_sgl_desc *d, uint64_t need, bint bb_ok,
                      uint8_t *scratch, mdl_iovlist *out) noexcept nogil:
    """One Data Block or Bit Bucket descriptor."""
    cdef uint8_t typ = d.id >> 4
    cdef uint64_t length = d.length, chunk
    cdef uint8_t *p
    if (d.id & 0xF) != 0:
        return MST_SGL_TYPE | MST_DNR           # offset subtypes are for fabrics
    if length == 0:
        return 0
    if out.total + length > need:
        # SGLS bit 18 is clear: an SGL may not describe more than the transfer
        return MST_SGL_DATA_LEN | MST_DNR
    if typ == NVME_SGL_BIT_BUCKET:
        if not bb_ok:
            return MST_SGL_TYPE | MST_DNR
        while length:
            chunk = length if length < MDL_SCRATCH else MDL_SCRATCH
            if mdl_iol_push(out, scratch, chunk, False) < 0:
                return MST_INTERNAL
            length -= chunk
        return 0
    if d.addr + length < d.addr:
        return MST_SGL_DATA_LEN | MST_DNR
    p = mdl_tr(arena, d.addr, length)
    if p == NULL:
        return MST_DATA_XFER
    return MST_INTERNAL if mdl_iol_push(out, p, length, True) < 0 else 0


@cython.linetrace(False)
@cython.profile(False)
cdef inline bint mdl_sgl_is_seg(uint8_t typ) noexcept nogil:
    return typ == NVME_SGL_SEGMENT or typ == NVME_SGL_LAST_SEGMENT


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_map_sgl(void *arena, const nvme_sgl_desc *sgl1, uint64_t need, bint bb_ok,
                     uint8_t *scratch, mdl_iovlist *out) noexcept nogil:
    cdef nvme_sgl_desc seg = sgl1[0], d
    cdef uint8_t typ = seg.id >> 4
    cdef const nvme_sgl_desc *lp
    cdef uint32_t i, n
    cdef uint64_t ndesc = 0
    cdef bint last
    cdef int st
    if typ == NVME_SGL_DATA_BLOCK or typ == NVME_SGL_BIT_BUCKET:
        st = mdl_sgl_data(arena, &seg, need, bb_ok, scratch, out)
        if st:
            return st
        return 0 if out.total == need else MST_SGL_DATA_LEN | MST_DNR
    if not mdl_sgl_is_seg(typ) or (seg.id & 0xF) != 0:
        return MST_SGL_TYPE | MST_DNR
    while True:
        last = (seg.id >> 4) == NVME_SGL_LAST_SEGMENT
        if seg.length == 0 or seg.length % 16:
            return MST_SGL_SEG_INVALID | MST_DNR
        n = seg.length // 16
        ndesc += n
        if ndesc > MDL_SGL_MAX_DESC:
            return MST_SGL_NUM_DESC | MST_DNR
        lp = <const nvme_sgl_desc *>mdl_tr(arena, seg.addr, seg.length)
        if lp == NULL:
            return MST_DATA_XFER
        for i in range(n):
            d = lp[i]
            typ = d.id >> 4
            if mdl_sgl_is_seg(typ):
                # only the last descriptor of a Segment's list may link on,
                # and a Last Segment's list holds no segment descriptors
                if last or i != n - 1:
                    return MST_SGL_SEG_INVALID | MST_DNR
                if (d.id & 0xF) != 0:
                    return MST_SGL_TYPE | MST_DNR
                seg = d
                break
            if typ != NVME_SGL_DATA_BLOCK and typ != NVME_SGL_BIT_BUCKET:
                return MST_SGL_TYPE | MST_DNR
            st = mdl_sgl_data(arena, &d, need, bb_ok, scratch, out)
            if st:
                return st
        else:
            # the list ended without a link: the SGL is complete
            break
    return 0 if out.total == need else MST_SGL_DATA_LEN | MST_DNR


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_map_dptr(void *arena, const nvme_sqe *cmd, uint64_t length, bint to_host,
                      uint32_t sgls, uint8_t *scratch, mdl_iovlist *out) noexcept nogil:
    """Map the command's data pointer for ``length`` bytes.  ``to_host``: the
    controller writes host memory (a read), the only case bit buckets allow.
    Returns a model status (0 = mapped)."""
    cdef uint8_t psdt = (cmd.flags >> 6) & 3
    out.n = 0
    out.total = 0
    if length == 0:
        return 0
    if psdt == 0:
        return mdl_map_prp(arena, cmd.dptr[0], cmd.dptr[1], length, out)
    if psdt == 3 or (sgls & 3) == 0:
        return MST_INVALID_FIELD | MST_DNR
    return mdl_map_sgl(arena, <const nvme_sgl_desc *>&cmd.dptr[0], length,
                       to_host and (sgls & MDL_SGLS_BIT_BUCKET) != 0, scratch, out)


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_iol_copy_out(mdl_iovlist *l, const uint8_t *src, uint64_t length) noexcept nogil:
    """Controller buffer -> host memory (Identify, log pages)."""
    cdef uint32_t i
    cdef uint64_t take
    for i in range(l.n):
        if length == 0:
            return
        take = l.iov[i].iov_len if l.iov[i].iov_len < length else length
        memcpy(l.iov[i].iov_base, src, take)
        src += take
        length -= take


@cython.linetrace(False)
@cython.profile(False)
cdef void mdl_iol_copy_in(mdl_iovlist *l, uint8_t *dst, uint64_t length) noexcept nogil:
    """Host memory -> controller buffer (Dataset Management ranges)."""
    cdef uint32_t i
    cdef uint64_t take
    for i in range(l.n):
        if length == 0:
            return
        take = l.iov[i].iov_len if l.iov[i].iov_len < length else length
        memcpy(dst, l.iov[i].iov_base, take)
        dst += take
        length -= take
