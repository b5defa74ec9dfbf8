# C declarations of the NVMe wire structs (nvme_spec.h); behaviour lives in the .pyx files.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "nvme_spec.h" nogil:
    ctypedef struct nvme_sqe:
        uint8_t  opc
        uint8_t  flags
        uint16_t cid
        uint32_t nsid
        uint32_t cdw2
        uint32_t cdw3
        uint64_t mptr
        uint64_t dptr[2]
        uint32_t cdw10
        uint32_t cdw11
        uint32_t cdw12
        uint32_t cdw13
        uint32_t cdw14
        uint32_t cdw15

    ctypedef struct nvme_cqe:
        uint32_t dw0
        uint32_t dw1
        uint16_t sqhd
        uint16_t sqid
        uint16_t cid
        uint16_t status

    ctypedef struct nvme_sgl_desc:
        uint64_t addr
        uint32_t length
        uint8_t  rsvd[3]
        uint8_t  id

    int NVME_PSDT_PRP
    int NVME_PSDT_SGL
    int NVME_SGL_DATA_BLOCK
    int NVME_SGL_BIT_BUCKET
    int NVME_SGL_SEGMENT
    int NVME_SGL_LAST_SEGMENT
    int NVME_REG_CAP
    int NVME_REG_VS
    int NVME_REG_INTMS
    int NVME_REG_INTMC
    int NVME_REG_CC
    int NVME_REG_CSTS
    int NVME_REG_AQA
    int NVME_REG_ASQ
    int NVME_REG_ACQ
    int NVME_REG_DBS
