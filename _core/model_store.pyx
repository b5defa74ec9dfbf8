# Backing store of the controller model: one sparse image file, or memory.
#
# Image format, version 1 (all integers little endian):
#
#   offset 0     4096-byte header
#     0    16    magic "NVMEFSIMG1", NUL padded
#     16    4    version (1)
#     20    4    header size (4096)
#     24    4    namespace table entries (1..16; entries past it are unallocated)
#     28    4    flags (bit 0: opened by a model and not closed cleanly)
#     32    8    power cycles (incremented each time a model opens the image)
#     40    8    power-on seconds (accumulated when a model closes the image)
#     48    8    unsafe shutdowns (opened while flag bit 0 was still set)
#     56    8    NVM capacity in bytes: the data area is [1 MiB, 1 MiB + capacity)
#                (0 in images made before namespace management: up to the file's end)
#     64   32*n  one entry per namespace ID (NSID = index + 1):
#                  +0  8  size in bytes (a multiple of 4096; 0: the NSID is unallocated)
#                  +8  8  file offset of the namespace data (1 MiB aligned)
#                  +16 4  current LBA format index (0: 512 B, 1: 4096 B)
#                  +20 4  flags (bit 0: allocated but not attached to the controller)
#                  +24 8  reserved
#   then each namespace's data at its 1 MiB aligned offset inside the data area.
#
# Namespace Management (create, delete) and Attachment change one entry with
# one 32-byte write and an fsync; a new namespace takes the lowest gap of the
# data area that holds it (1 MiB aligned), and its range is deallocated when
# it is created and again when it is deleted, so it reads zeroes and a sparse
# image gives the space back.

# Raw images: a file (or block device) without the magic is a raw disk
# image, served as one namespace over the whole of it from offset 0, as
# QEMU's -device nvme-ns,drive= does.  Nothing is ever written to it but the
# host's data: no header, so power cycles and unsafe shutdowns are not
# recorded across opens, and Format NVM may erase but not change the LBA
# size (there is nowhere to keep it; pass --lba-size when mounting).
#
# The file is sized with ftruncate and stays sparse: deallocated ranges
# (Dataset Management, Write Zeroes with DEAC, Format with user data erase)
# are punched out with fallocate(PUNCH_HOLE | KEEP_SIZE) and read back as
# zeroes.  Opening an existing image takes the namespace layout from the
# header, which is authoritative: a ``namespaces`` argument is then ignored
# (Format NVM may have changed the LBA sizes since the image was created).
#
# The memory store maps each namespace anonymously with MAP_NORESERVE, so an
# untouched namespace costs nothing; deallocation gives pages back with
# MADV_DONTNEED.  Data moves through iovec lists built from the host's PRPs
# or SGLs (model_dma.pyx); nothing ever copies a whole namespace.  On an
# image, writes are one memcpy into a shared mapping of the file (guarded
# against SIGBUS, see model_sys.h; pwritev when the mapping faults or could
# not be made), reads are preadv: a read fault on a hole of a tmpfs file
# would allocate the page, where preadv returns zeroes and allocates nothing
# (a 1 TiB sparse image read end to end must not fill memory).  Writes made
# through the mapping are in the page cache like pwritev's, and fdatasync
# (Flush, FUA, the volatile write cache off) writes them back the same way.

cimport libc.errno as _merrno

cdef extern from "model_sys.h" nogil:
    ctypedef struct mdl_iovec "struct iovec":
        void *iov_base
        size_t iov_len
    ssize_t mdl_preadv "preadv"(int fd, const mdl_iovec *iov, int iovcnt, int64_t off)
    ssize_t mdl_pwritev "pwritev"(int fd, const mdl_iovec *iov, int iovcnt, int64_t off)
    ssize_t mdl_pread "pread"(int fd, void *buf, size_t n, int64_t off)
    ssize_t mdl_pwrite "pwrite"(int fd, const void *buf, size_t n, int64_t off)
    int mdl_fdatasync "fdatasync"(int fd)
    int mdl_fsync "fsync"(int fd)
    int mdl_fallocate "fallocate"(int fd, int mode, int64_t off, int64_t length)
    int mdl_madvise "madvise"(void *addr, size_t length, int advice)
    int MDL_FALLOC_PUNCH "FALLOC_FL_PUNCH_HOLE"
    int MDL_FALLOC_KEEP "FALLOC_FL_KEEP_SIZE"
    int MDL_FALLOC_ZERO "FALLOC_FL_ZERO_RANGE"
    int MDL_MADV_DONTNEED "MADV_DONTNEED"
    int MDL_IOV_MAX
    uint32_t MDL_NSID_ALL
    int mdl_errno()
    int mdl_load_int(const int *p)
    void mdl_store_int(int *p, int v)
    int mdl_xchg_int(int *p, int v)
    uint32_t mdl_load_u32(const uint32_t *p)
    void mdl_store_u32(uint32_t *p, uint32_t v)
    void mdl_cpu_relax()
    int mdl_eventfd_signal(int fd)
    void mdl_eventfd_drain(int fd)
    int mdl_wait_readable(int fd, int timeout_ms)
    int mdl_map_write(uint8_t *dst, const mdl_iovec *iov, uint32_t n)
    void mdl_bus_guard_install()

cdef enum:
    MDL_MAX_NS = 16
    MDL_IMG_HEADER = 4096
    MDL_IMG_ALIGN = 1 << 20
    MDL_IMG_NS_OFF = 64
    MDL_IMG_NS_SIZE = 32
    MDL_IMG_VERSION = 1
    MDL_IMG_DIRTY = 1
    MDL_IMG_NS_DETACHED = 1
    MDL_CMP_CHUNK = 1 << 17

cdef struct mdl_ns:
    uint64_t size          # bytes, fixed for the namespace's life; 0: NSID unallocated
    uint8_t attached       # to this (the only) controller: an active NSID
    uint64_t data_off      # file offset of LBA 0
    uint32_t lbaf          # 0: 512 B, 1: 4096 B
    uint32_t lba_shift
    uint64_t nlba
    uint8_t *mem           # memory store: the namespace's mapping

cdef struct mdl_store:
    int fd                 # image file, -1 for the memory store
    uint8_t *map           # the image's namespaces, mapped shared (writes); NULL: pwritev only
    uint64_t map_off       # file offset of map[0]
    uint64_t map_len
    uint32_t nns           # NSIDs 1..nns exist (NN): 16, or 1 for a raw image
    mdl_ns ns[16]
    uint64_t capacity      # NVM capacity (TNVMCAP), bytes
    uint8_t mgmt           # namespaces can be created and deleted (not a raw image)
    uint64_t power_cycles
    uint64_t power_on_seconds
    uint64_t unsafe_shutdowns
    uint8_t raw            # a raw image or block device: no header, one namespace at offset 0


@cython.linetrace(False)
@cython.profile(False)
cdef inline void mdl_ns_set_format(mdl_ns *ns, uint32_t lbaf) noexcept nogil:
    ns.lbaf = lbaf
    ns.lba_shift = 12 if lbaf == 1 else 9
    ns.nlba = ns.size >> ns.lba_shift


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_store_rw(mdl_store *s, mdl_ns *ns, uint64_t off, mdl_iovec *iov, uint32_t n,
                      bint write) noexcept nogil:
    """Move the bytes of ``iov`` to (write) or from the namespace at byte
    ``off``.  ``iov`` is scratch: partial transfers advance it in place.
    0 or -errno."""
    cdef uint32_t i = 0, cnt
    cdef ssize_t r
    cdef uint8_t *p
    if s.fd < 0:
        p = ns.mem + off
        for i in range(n):
            if write:
                memcpy(p, iov[i].iov_base, iov[i].iov_len)
            else:
                memcpy(iov[i].iov_base, p, iov[i].iov_len)
            p += iov[i].iov_len
        return 0
    off += ns.data_off
    if write and s.map != NULL and mdl_map_write(s.map + (off - s.map_off), iov, n) == 0:
        return 0
    while i < n:
        cnt = n - i
        if cnt > <uint32_t>MDL_IOV_MAX:
            cnt = MDL_IOV_MAX
        if write:
            r = mdl_pwritev(s.fd, &iov[i], cnt, off)
        else:
            r = mdl_preadv(s.fd, &iov[i], cnt, off)
        if r < 0:
            if mdl_errno() == _merrno.EINTR:
                continue
            return -mdl_errno()
        if r == 0:
            return -_merrno.EIO     # the image is shorter than its header says
        off += <uint64_t>r
        while r > 0 and i < n:
            if <size_t>r >= iov[i].iov_len:
                r -= iov[i].iov_len
                i += 1
            else:
                iov[i].iov_base = <uint8_t *>iov[i].iov_base + r
                iov[i].iov_len -= r
                r = 0
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_store_zero(mdl_store *s, mdl_ns *ns, uint64_t off, uint64_t length,
                        bint dealloc) noexcept nogil:
    """Make [off, off+length) read as zeroes; ``dealloc`` gives the space back
    (a hole / dropped pages).  0 or -errno."""
    cdef uint64_t a, b, chunk
    cdef int rc
    cdef ssize_t r
    cdef uint8_t *zeros
    if length == 0:
        return 0
    if s.fd < 0:
        # private anonymous pages read back as zeroes after MADV_DONTNEED
        a = (off + 4095) & ~(<uint64_t>4095)
        b = (off + length) & ~(<uint64_t>4095)
        if b > a:
            memset(ns.mem + off, 0, a - off)
            mdl_madvise(ns.mem + a, b - a, MDL_MADV_DONTNEED)
            memset(ns.mem + b, 0, off + length - b)
        else:
            memset(ns.mem + off, 0, length)
        return 0
    off += ns.data_off
    if dealloc:
        rc = mdl_fallocate(s.fd, MDL_FALLOC_PUNCH | MDL_FALLOC_KEEP, off, length)
    else:
        rc = mdl_fallocate(s.fd, MDL_FALLOC_ZERO | MDL_FALLOC_KEEP, off, length)
        if rc < 0:
            rc = mdl_fallocate(s.fd, MDL_FALLOC_PUNCH | MDL_FALLOC_KEEP, off, length)
    if rc == 0:
        return 0
    # a file system without hole punching: write the zeroes
    zeros = <uint8_t *>calloc(1, 1 << 20)
    if zeros == NULL:
        return -_merrno.ENOMEM
    while length:
        chunk = length if length < (1 << 20) else (1 << 20)
        r = mdl_pwrite(s.fd, zeros, chunk, off)
        if r <= 0:
            rc = -mdl_errno() if r < 0 else -_merrno.EIO
            if rc == -_merrno.EINTR:
                continue
            free(zeros)
            return rc
        off += <uint64_t>r
        length -= <uint64_t>r
    free(zeros)
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_store_flush(mdl_store *s) noexcept nogil:
    if s.fd < 0:
        return 0
    if mdl_fdatasync(s.fd) < 0:
        return -mdl_errno()
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_store_compare(mdl_store *s, mdl_ns *ns, uint64_t off, const mdl_iovec *iov,
                           uint32_t n, bint *equal) noexcept nogil:
    """Compare the host buffers with the namespace from ``off``.  0 or -errno."""
    cdef uint8_t *tmp = NULL
    cdef uint32_t i
    cdef size_t done, take
    cdef ssize_t r
    equal[0] = True
    if s.fd >= 0:
        tmp = <uint8_t *>malloc(MDL_CMP_CHUNK)
        if tmp == NULL:
            return -_merrno.ENOMEM
    for i in range(n):
        done = 0
        while done < iov[i].iov_len:
            take = iov[i].iov_len - done
            if s.fd < 0:
                if memcmp(ns.mem + off, <uint8_t *>iov[i].iov_base + done, take) != 0:
                    equal[0] = False
                    return 0
            else:
                if take > MDL_CMP_CHUNK:
                    take = MDL_CMP_CHUNK
                r = mdl_pread(s.fd, tmp, take, ns.data_off + off)
                if r <= 0:
                    free(tmp)
                    return -mdl_errno() if r < 0 else -_merrno.EIO
                take = <size_t>r
                if memcmp(tmp, <uint8_t *>iov[i].iov_base + done, take) != 0:
                    equal[0] = False
                    free(tmp)
                    return 0
            done += take
            off += take
    free(tmp)
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_store_set_format(mdl_store *s, uint32_t nsi, uint32_t lbaf) noexcept nogil:
    """Switch a namespace's LBA format and record it in the image header."""
    cdef uint32_t v = lbaf
    if s.raw:
        # nowhere to record it, and the first bytes are the user's data
        return 0 if lbaf == s.ns[nsi].lbaf else -_merrno.EINVAL
    mdl_ns_set_format(&s.ns[nsi], lbaf)
    if s.fd < 0:
        return 0
    if mdl_pwrite(s.fd, &v, 4, MDL_IMG_NS_OFF + MDL_IMG_NS_SIZE * nsi + 16) != 4:
        return -mdl_errno()
    if mdl_fsync(s.fd) < 0:
        return -mdl_errno()
    return 0


# --- namespace management -------------------------------------------------------

cdef enum:
    MDL_NS_NO_ID = 1           # every NSID is allocated
    MDL_NS_NO_SPACE = 2        # no gap of the data area holds the namespace


@cython.linetrace(False)
@cython.profile(False)
cdef inline bint mdl_ns_allocated(mdl_store *s, uint32_t nsid) noexcept nogil:
    return nsid >= 1 and nsid <= s.nns and s.ns[nsid - 1].size != 0


@cython.linetrace(False)
@cython.profile(False)
cdef inline bint mdl_ns_active(mdl_store *s, uint32_t nsid) noexcept nogil:
    return mdl_ns_allocated(s, nsid) and s.ns[nsid - 1].attached


@cython.linetrace(False)
@cython.profile(False)
cdef inline uint64_t mdl_align_mib(uint64_t v) noexcept nogil:
    return (v + MDL_IMG_ALIGN - 1) & ~(<uint64_t>MDL_IMG_ALIGN - 1)


@cython.linetrace(False)
@cython.profile(False)
cdef uint64_t mdl_store_place(mdl_store *s, uint64_t size, uint64_t *unallocated) noexcept nogil:
    """The lowest 1 MiB aligned file offset of the data area where ``size``
    bytes fit between the allocated namespaces (0: nowhere; the memory store
    answers 1 when the capacity left is enough); ``unallocated`` gets the
    bytes of every gap (UNVMCAP)."""
    cdef uint64_t used = 0, cur, end, best = 0, o, e
    cdef uint32_t i, j, n = 0
    cdef uint32_t order[16]
    if s.fd < 0:
        for i in range(s.nns):
            used += s.ns[i].size
        unallocated[0] = s.capacity - used if s.capacity > used else 0
        return 1 if size and size <= unallocated[0] else 0
    # allocated namespaces by data offset (at most 16: insertion sort)
    for i in range(s.nns):
        if s.ns[i].size == 0:
            continue
        j = n
        while j > 0 and s.ns[order[j - 1]].data_off > s.ns[i].data_off:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i
        n += 1
    unallocated[0] = 0
    cur = MDL_IMG_ALIGN
    end = MDL_IMG_ALIGN + s.capacity
    for j in range(n + 1):
        o = s.ns[order[j]].data_off if j < n else end
        if o > cur:
            if best == 0 and size and o - cur >= size:
                best = cur
            unallocated[0] += o - cur
        if j < n:
            e = mdl_align_mib(o + s.ns[order[j]].size)
            if e > cur:
                cur = e
    return best


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_store_write_entry(mdl_store *s, uint32_t nsi) noexcept nogil:
    """Record namespace table entry ``nsi`` in the image header (one 32-byte
    write, then fsync: the entry is old or new after a crash)."""
    cdef uint8_t e[32]
    cdef uint32_t v, slots = MDL_MAX_NS
    cdef mdl_ns *ns = &s.ns[nsi]
    if s.fd < 0:
        return 0
    memset(e, 0, 32)
    memcpy(e, &ns.size, 8)
    if ns.size:
        memcpy(e + 8, &ns.data_off, 8)
        v = ns.lbaf
        memcpy(e + 16, &v, 4)
        v = 0 if ns.attached else MDL_IMG_NS_DETACHED
        memcpy(e + 20, &v, 4)
    if mdl_pwrite(s.fd, e, 32, MDL_IMG_NS_OFF + MDL_IMG_NS_SIZE * nsi) != 32:
        return -mdl_errno()
    # every entry is in the table from now on (the ones past an old count are zero)
    if mdl_pwrite(s.fd, &slots, 4, 24) != 4:
        return -mdl_errno()
    if mdl_fsync(s.fd) < 0:
        return -mdl_errno()
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_store_ns_create(mdl_store *s, uint64_t size, uint32_t lbaf, uint32_t *nsid) noexcept nogil:
    """Allocate a namespace of ``size`` bytes (a multiple of 4096), not
    attached, reading zeroes.  0, MDL_NS_NO_ID, MDL_NS_NO_SPACE or -errno."""
    cdef uint32_t i
    cdef uint64_t off, unalloc
    cdef void *p
    cdef mdl_ns *ns
    cdef int rc
    for i in range(s.nns):
        if s.ns[i].size == 0:
            break
    else:
        return MDL_NS_NO_ID
    off = mdl_store_place(s, size, &unalloc)
    if off == 0:
        return MDL_NS_NO_SPACE
    ns = &s.ns[i]
    memset(ns, 0, sizeof(mdl_ns))
    if s.fd < 0:
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if p == MAP_FAILED:
            return -_merrno.ENOMEM
        ns.mem = <uint8_t *>p
    else:
        ns.data_off = off
        # whatever an earlier namespace left there (a delete cut short by
        # a crash) is not the new namespace's
        ns.size = size
        rc = mdl_store_zero(s, ns, 0, size, True)
        if rc < 0:
            ns.size = 0
            return rc
    ns.size = size
    mdl_ns_set_format(ns, lbaf)
    ns.attached = 0
    rc = mdl_store_write_entry(s, i)
    if rc < 0:
        if ns.mem != NULL:
            munmap(ns.mem, size)
        memset(ns, 0, sizeof(mdl_ns))
        return rc
    nsid[0] = i + 1
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_store_ns_delete(mdl_store *s, uint32_t nsi) noexcept nogil:
    """Free namespace ``nsi``: the header entry first, then its blocks are
    given back (a crash in between leaves stale blocks in a gap, which the
    next create deallocates).  0 or -errno."""
    cdef mdl_ns keep = s.ns[nsi]
    cdef int rc
    s.ns[nsi].size = 0
    s.ns[nsi].attached = 0
    rc = mdl_store_write_entry(s, nsi)
    if rc < 0:
        s.ns[nsi] = keep
        return rc
    if keep.mem != NULL:
        munmap(keep.mem, keep.size)
    else:
        mdl_store_zero(s, &keep, 0, keep.size, True)
    memset(&s.ns[nsi], 0, sizeof(mdl_ns))
    return 0


@cython.linetrace(False)
@cython.profile(False)
cdef int mdl_store_ns_attach(mdl_store *s, uint32_t nsi, bint on) noexcept nogil:
    cdef uint8_t old = s.ns[nsi].attached
    cdef int rc
    s.ns[nsi].attached = on
    rc = mdl_store_write_entry(s, nsi)
    if rc < 0:
        s.ns[nsi].attached = old
    return rc


# --- Python side: image files -----------------------------------------------------

import os as _os
import stat as _stat_mod
import struct as _struct

_IMG_MAGIC = b"NVMEFSIMG1"
_IMG_HDR = _struct.Struct("<16sIIIIQQQQ")
_IMG_NS = _struct.Struct("<QQII8x")
_LBA_SIZES = {512: 0, 4096: 1}


def _image_layout(namespaces, capacity=None):
    """[(size, data_offset, lbaf)] for ``namespaces`` ((size_bytes, lba_size)
    pairs) placed back to back, and the NVM capacity: ``capacity`` if given
    (at least what the namespaces take), else exactly what they take."""
    namespaces = list(namespaces)
    if len(namespaces) > MDL_MAX_NS:
        raise ValueError(f"{len(namespaces)} namespaces: at most {MDL_MAX_NS} supported")
    out = []
    off = MDL_IMG_ALIGN
    end = MDL_IMG_ALIGN
    for i, ns in enumerate(namespaces):
        size, lba = ns
        if lba not in _LBA_SIZES:
            raise ValueError(f"namespace {i + 1}: LBA size {lba} is not 512 or 4096")
        if size <= 0 or size % 4096:
            raise ValueError(f"namespace {i + 1}: size {size} is not a positive multiple of 4096")
        out.append((int(size), off, _LBA_SIZES[lba]))
        end = off + size
        off = (off + size + MDL_IMG_ALIGN - 1) // MDL_IMG_ALIGN * MDL_IMG_ALIGN
    need = end - MDL_IMG_ALIGN
    if capacity is None:
        if not out:
            raise ValueError("an image without namespaces needs a capacity")
        capacity = need
    elif capacity < need or capacity <= 0 or capacity % 4096:
        raise ValueError(f"capacity {capacity}: a positive multiple of 4096 that holds the "
                         f"namespaces ({need} bytes)")
    return out, capacity


def _pack_fixed(count, flags, power_cycles, power_on_seconds, unsafe, capacity):
    """The first 64 bytes of the header (everything but the namespace table)."""
    return _IMG_HDR.pack(_IMG_MAGIC, MDL_IMG_VERSION, MDL_IMG_HEADER, count, flags,
                         power_cycles, power_on_seconds, unsafe, capacity)


def _pack_header(layout, capacity):
    hdr = bytearray(MDL_IMG_HEADER)
    hdr[:MDL_IMG_NS_OFF] = _pack_fixed(max(len(layout), 1), 0, 0, 0, 0, capacity)
    for i, (size, off, lbaf) in enumerate(layout):
        _IMG_NS.pack_into(hdr, MDL_IMG_NS_OFF + MDL_IMG_NS_SIZE * i, size, off, lbaf, 0)
    return bytes(hdr)


def _parse_header(raw, path):
    if len(raw) < MDL_IMG_HEADER or raw[:len(_IMG_MAGIC)] != _IMG_MAGIC:
        raise ValueError(f"{path}: not an nvmefs image (no NVMEFSIMG1 magic)")
    magic, version, hsize, nns, flags, cycles, pon, unsafe, capacity = _IMG_HDR.unpack_from(raw, 0)
    if version != MDL_IMG_VERSION or hsize != MDL_IMG_HEADER:
        raise ValueError(f"{path}: unsupported nvmefs image version {version} (header {hsize} bytes)")
    if not 1 <= nns <= MDL_MAX_NS:
        raise ValueError(f"{path}: corrupt nvmefs image header ({nns} namespace entries)")
    nss = []
    for i in range(nns):
        size, off, lbaf, nsflags = _IMG_NS.unpack_from(raw, MDL_IMG_NS_OFF + MDL_IMG_NS_SIZE * i)
        if size == 0:
            continue                    # an unallocated NSID
        if lbaf > 1 or size % 4096 or off % MDL_IMG_ALIGN or off < MDL_IMG_HEADER or nsflags > 1:
            raise ValueError(f"{path}: corrupt nvmefs image header (namespace {i + 1})")
        nss.append({"nsid": i + 1, "size": size, "offset": off, "lbaf": lbaf,
                    "lba_size": 4096 if lbaf else 512, "nlba": size >> (12 if lbaf else 9),
                    "attached": not nsflags & MDL_IMG_NS_DETACHED})
    ranges = sorted((ns["offset"], ns["offset"] + ns["size"], ns["nsid"]) for ns in nss)
    for (_a, end, first), (start, _b, second) in zip(ranges, ranges[1:]):
        if start < end:
            raise ValueError(f"{path}: corrupt nvmefs image header (namespaces {first} and "
                             f"{second} overlap)")
    return {"version": version, "flags": flags, "power_cycles": cycles,
            "power_on_seconds": pon, "unsafe_shutdowns": unsafe, "namespaces": nss,
            "entries": nns, "capacity": capacity, "clean": not (flags & MDL_IMG_DIRTY)}


def create_image(path, namespaces=((1 << 30, 512),), *, capacity=None, exist_ok=False):
    """Create a sparse image file for ``namespaces`` ((size_bytes, lba_size)
    pairs, attached), with ``capacity`` bytes of NVM in all (default: just
    what the namespaces take; more leaves room for Namespace Management).
    Refuses to overwrite an existing file unless ``exist_ok``."""
    layout, capacity = _image_layout(namespaces, capacity)
    flags = _os.O_RDWR | _os.O_CREAT | (0 if exist_ok else _os.O_EXCL)
    fd = _os.open(path, flags, 0o644)
    try:
        _os.ftruncate(fd, 0)
        _os.pwrite(fd, _pack_header(layout, capacity), 0)
        _os.ftruncate(fd, MDL_IMG_ALIGN + capacity)
        _os.fsync(fd)
    finally:
        _os.close(fd)
    return read_image_header(path)


RAW_MIN_BYTES = 4096


def probe_image(path):
    """What ``path`` holds: the header of an nvmefs image (``format``
    "nvmefs", see read_image_header), or ``format`` "raw" with its size
    (``file_size``) and whether it is a block device.  A file without the
    magic is raw; a file with it and a bad header is an error, never raw."""
    st = _os.stat(path)
    blk = _stat_mod.S_ISBLK(st.st_mode)
    if not (blk or _stat_mod.S_ISREG(st.st_mode)):
        raise ValueError(f"{path}: not a regular file or a block device")
    with open(path, "rb") as f:
        raw = f.read(MDL_IMG_HEADER)
        size = f.seek(0, 2)
    if raw[:len(_IMG_MAGIC)] == _IMG_MAGIC:
        info = read_image_header(path)
        info["format"] = "nvmefs"
        info["block_device"] = blk
        return info
    return {"format": "raw", "file_size": size, "block_device": blk}


def create_raw_image(path, size):
    """A new sparse raw image of ``size`` bytes (no header)."""
    if size < RAW_MIN_BYTES or size % 512:
        raise ValueError(f"raw image size {size}: a multiple of 512, at least {RAW_MIN_BYTES}")
    fd = _os.open(path, _os.O_RDWR | _os.O_CREAT | _os.O_EXCL, 0o644)
    try:
        _os.ftruncate(fd, size)
        _os.fsync(fd)
    finally:
        _os.close(fd)


def read_image_header(path):
    """The header of an nvmefs image as a dict (version, the allocated
    namespaces with size, LBA size, data offset and whether attached, the NVM
    capacity, power cycles, ...).  ValueError if the file is not an nvmefs
    image or is shorter than its header says."""
    with open(path, "rb") as f:
        raw = f.read(MDL_IMG_HEADER)
        size = f.seek(0, 2)         # st_size is 0 for a block device
    info = _parse_header(raw, path)
    info["file_size"] = size
    if info["capacity"] == 0:
        # made before the capacity was recorded: the data area ends with the file
        info["capacity"] = max(size - MDL_IMG_ALIGN, 0)
    elif MDL_IMG_ALIGN + info["capacity"] > size:
        raise ValueError(f"{path}: image is truncated (its capacity ends at "
                         f"{MDL_IMG_ALIGN + info['capacity']}, file has {size} bytes)")
    for ns in info["namespaces"]:
        if ns["offset"] + ns["size"] > MDL_IMG_ALIGN + info["capacity"]:
            raise ValueError(f"{path}: image is truncated (namespace {ns['nsid']} ends at "
                             f"{ns['offset'] + ns['size']}, file has {size} bytes)")
    return info
