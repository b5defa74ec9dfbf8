# cython: language_level=3
# The device side, built apart from the driver core: the software NVMe
# controller (model_*.pyx), the echo device, and the bench loops that drive
# the core's queues against them.  It reaches the core only through what
# nvmefs/_core.pxd declares (DMA memory, the register file, queue pairs and
# the builders); the driver core never cimports it, and only the model
# transport (nvmefs/transport.py) and the image helpers import it.

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t, uintptr_t
from libc.string cimport memcpy, memset, memcmp, memmove, strlen
from libc.stdlib cimport malloc, calloc, free, realloc
from libc.errno cimport errno, EAGAIN, EBUSY, EINVAL, ENOMEM
from posix.unistd cimport write, read, close
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_SHARED, MAP_ANONYMOUS, MAP_FAILED

from nvme_spec cimport *
from barrier cimport *
from nvmefs._core cimport *

cdef extern from "<sys/mman.h>" nogil:
    int MAP_NORESERVE

import logging
_log = logging.getLogger("nvmefs.model")

include "model_store.pyx"
include "model_dma.pyx"
include "model_ctrl.pyx"
include "model_admin.pyx"
include "model_io.pyx"
include "echo_device.pyx"
include "bench_loops.pyx"
