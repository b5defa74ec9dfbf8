# Backing store of the controller model: one sparse image file, or memory.
#
# Image format, version 1 (all integers little endian):
#
#   offset 0     4096-byte header
#     0    16    magic "NVMEFSIMG1", NUL padded
#     16    4    version (1)
#     20    4    header size (4096)
#     24    4    namespace count (1..16)
#     28    4    flags (bit 0: opened by a model and not closed cleanly)
#     32    8    power cycles (incremented each time a model opens the image)
#     40    8    power-on seconds (accumulated when a model closes the image)
#     48    8    unsafe shutdowns (opened while flag bit 0 was still set)
#     56    8    reserved
#     64   32*n  one entry per namespace:
#                  +0  8  size in bytes (a multiple of 4096; fixed for life)
#                  +8  8  file offset of the namespace data (1 MiB aligned)
#                  +16 4  current LBA format index (0: 512 B, 1: 4096 B)
#                  +20 12 reserved
#   then each namespace's data at its 1 MiB aligned offset, back to back.
#
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
    MDL_CMP_CHUNK = 1 << 17

cdef struct mdl_ns:
    uint64_t size          # bytes, fixed for the namespace's life
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
    uint32_t nns
    mdl_ns ns[16]
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


# --- Python side: image files -----------------------------------------------------

import os as _os
import stat as _stat_mod
import struct as _struct

_IMG_MAGIC = b"NVMEFSIMG1"
_IMG_HDR = _struct.Struct("<16sIIIIQQQQ")
_IMG_NS = _struct.Struct("<QQI12x")
_LBA_SIZES = {512: 0, 4096: 1}


def _image_layout(namespaces):
    """[(size, data_offset, lbaf)] and the file size for ``namespaces``
    ((size_bytes, lba_size) pairs), validated."""
    namespaces = list(namespaces)
    if not 1 <= len(namespaces) <= MDL_MAX_NS:
        raise ValueError(f"{len(namespaces)} namespaces: 1..{MDL_MAX_NS} supported")
    out = []
    off = MDL_IMG_ALIGN
    for i, ns in enumerate(namespaces):
        size, lba = ns
        if lba not in _LBA_SIZES:
            raise ValueError(f"namespace {i + 1}: LBA size {lba} is not 512 or 4096")
        if size <= 0 or size % 4096:
            raise ValueError(f"namespace {i + 1}: size {size} is not a positive multiple of 4096")
        out.append((int(size), off, _LBA_SIZES[lba]))
        off = (off + size + MDL_IMG_ALIGN - 1) // MDL_IMG_ALIGN * MDL_IMG_ALIGN
    last = out[len(out) - 1]
    end = last[1] + last[0]
    return out, end


def _pack_header(layout, flags=0, power_cycles=0, power_on_seconds=0, unsafe=0):
    hdr = bytearray(MDL_IMG_HEADER)
    _IMG_HDR.pack_into(hdr, 0, _IMG_MAGIC, MDL_IMG_VERSION, MDL_IMG_HEADER, len(layout), flags,
                       power_cycles, power_on_seconds, unsafe, 0)
    for i, (size, off, lbaf) in enumerate(layout):
        _IMG_NS.pack_into(hdr, MDL_IMG_NS_OFF + MDL_IMG_NS_SIZE * i, size, off, lbaf)
    return bytes(hdr)


def _parse_header(raw, path):
    if len(raw) < MDL_IMG_HEADER or raw[:len(_IMG_MAGIC)] != _IMG_MAGIC:
        raise ValueError(f"{path}: not an nvmefs image (no NVMEFSIMG1 magic)")
    magic, version, hsize, nns, flags, cycles, pon, unsafe, _r = _IMG_HDR.unpack_from(raw, 0)
    if version != MDL_IMG_VERSION or hsize != MDL_IMG_HEADER:
        raise ValueError(f"{path}: unsupported nvmefs image version {version} (header {hsize} bytes)")
    if not 1 <= nns <= MDL_MAX_NS:
        raise ValueError(f"{path}: corrupt nvmefs image header ({nns} namespaces)")
    nss = []
    for i in range(nns):
        size, off, lbaf = _IMG_NS.unpack_from(raw, MDL_IMG_NS_OFF + MDL_IMG_NS_SIZE * i)
        if lbaf > 1 or size == 0 or size % 4096 or off % MDL_IMG_ALIGN or off < MDL_IMG_HEADER:
            raise ValueError(f"{path}: corrupt nvmefs image header (namespace {i + 1})")
        nss.append({"nsid": i + 1, "size": size, "offset": off, "lbaf": lbaf,
                    "lba_size": 4096 if lbaf else 512, "nlba": size >> (12 if lbaf else 9)})
    return {"version": version, "flags": flags, "power_cycles": cycles,
            "power_on_seconds": pon, "unsafe_shutdowns": unsafe, "namespaces": nss,
            "clean": not (flags & MDL_IMG_DIRTY)}


def create_image(path, namespaces=((1 << 30, 512),), *, exist_ok=False):
    """Create a sparse image file for ``namespaces`` ((size_bytes, lba_size)
    pairs).  Refuses to overwrite an existing file unless ``exist_ok``."""
    layout, end = _image_layout(namespaces)
    flags = _os.O_RDWR | _os.O_CREAT | (0 if exist_ok else _os.O_EXCL)
    fd = _os.open(path, flags, 0o644)
    try:
        _os.ftruncate(fd, 0)
        _os.pwrite(fd, _pack_header(layout), 0)
        _os.ftruncate(fd, end)
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
    """The header of an nvmefs image as a dict (version, namespaces with size,
    LBA size and data offset, power cycles, ...).  ValueError if the file is
    not an nvmefs image."""
    with open(path, "rb") as f:
        raw = f.read(MDL_IMG_HEADER)
        size = f.seek(0, 2)         # st_size is 0 for a block device
    info = _parse_header(raw, path)
    info["file_size"] = size
    for ns in info["namespaces"]:
        if ns["offset"] + ns["size"] > size:
            raise ValueError(f"{path}: image is truncated (namespace {ns['nsid']} ends at "
                             f"{ns['offset'] + ns['size']}, file has {size} bytes)")
    return info
