# cython: language_level=3
# The nvmefs driver core, one extension built from the component files
# below, included in dependency order (the uvloop layout: STYLE.md).  C-only
# declarations live in include/ (.h and .pxd); what the device side
# (_model.pyx) may use is declared in nvmefs/_core.pxd.

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t, uintptr_t
from libc.string cimport memcpy, memset, memmove
from libc.stdlib cimport malloc, calloc, free
from posix.stdlib cimport posix_memalign
from libc.errno cimport errno, EAGAIN, EBUSY, EINVAL, ENOMEM, ESTALE, E2BIG, EOPNOTSUPP
from posix.unistd cimport write, read, close
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FAILED
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_FromStringAndSize

from nvme_spec cimport *
from barrier cimport *

cdef extern from "<sys/mman.h>" nogil:
    int MAP_NORESERVE

import logging
_log = logging.getLogger("nvmefs.core")

SQE_SIZE = sizeof(nvme_sqe)
CQE_SIZE = sizeof(nvme_cqe)
SGL_DESC_SIZE = sizeof(nvme_sgl_desc)

include "dma.pyx"
include "mmio.pyx"
include "status.pyx"
include "cid.pyx"
include "prp.pyx"
include "sgl.pyx"
include "qpair.pyx"
include "ranges.pyx"
include "fastpath.pyx"
include "lane.pyx"
include "lane_io.pyx"
include "lane_uring.pyx"
include "vfio.pyx"
include "tcp.pyx"
include "builders.pyx"
