/* Wire structures of the NVMe base and NVM command set specifications
 * (see shared NVME-NOTES.md).  Sizes are checked at compile time so that a
 * packing mistake can never reach a controller. */
#ifndef NVMEFS_NVME_SPEC_H
#define NVMEFS_NVME_SPEC_H

#include <stdint.h>
#include <stddef.h>

typedef struct nvme_sqe {
    uint8_t  opc;
    uint8_t  flags;        /* FUSE [1:0], PSDT [7:6] */
    uint16_t cid;
    uint32_t nsid;
    uint32_t cdw2;
    uint32_t cdw3;
    uint64_t mptr;
    uint64_t dptr[2];      /* PRP1/PRP2, or one 16-byte SGL descriptor */
    uint32_t cdw10;
    uint32_t cdw11;
    uint32_t cdw12;
    uint32_t cdw13;
    uint32_t cdw14;
    uint32_t cdw15;
} nvme_sqe;

typedef struct nvme_cqe {
    uint32_t dw0;
    uint32_t dw1;
    uint16_t sqhd;
    uint16_t sqid;
    uint16_t cid;
    uint16_t status;       /* phase bit 0, SC [8:1], SCT [11:9], CRD [13:12], M 14, DNR 15 */
} nvme_cqe;

typedef struct nvme_sgl_desc {
    uint64_t addr;
    uint32_t length;
    uint8_t  rsvd[3];
    uint8_t  id;           /* type [7:4], subtype [3:0] */
} nvme_sgl_desc;

_Static_assert(sizeof(nvme_sqe) == 64, "SQ entry must be 64 bytes");
_Static_assert(sizeof(nvme_cqe) == 16, "CQ entry must be 16 bytes");
_Static_assert(sizeof(nvme_sgl_desc) == 16, "SGL descriptor must be 16 bytes");
_Static_assert(offsetof(nvme_sqe, dptr) == 24, "DPTR at DW6");
_Static_assert(offsetof(nvme_sqe, cdw10) == 40, "CDW10 at byte 40");
_Static_assert(offsetof(nvme_cqe, sqhd) == 8, "SQHD at DW2");
_Static_assert(offsetof(nvme_cqe, status) == 14, "status at DW3 bits 31:17");
_Static_assert(offsetof(nvme_sgl_desc, id) == 15, "SGL identifier in byte 15");

#define NVME_PSDT_PRP  0x00
#define NVME_PSDT_SGL  0x40   /* SGL for data, MPTR a pointer (PSDT 01 in flags bits 7:6) */

#define NVME_SGL_DATA_BLOCK   0x0
#define NVME_SGL_BIT_BUCKET   0x1
#define NVME_SGL_SEGMENT      0x2
#define NVME_SGL_LAST_SEGMENT 0x3

/* Controller register offsets (BAR0) */
#define NVME_REG_CAP   0x00
#define NVME_REG_VS    0x08
#define NVME_REG_INTMS 0x0c
#define NVME_REG_INTMC 0x10
#define NVME_REG_CC    0x14
#define NVME_REG_CSTS  0x1c
#define NVME_REG_AQA   0x24
#define NVME_REG_ASQ   0x28
#define NVME_REG_ACQ   0x30
#define NVME_REG_DBS   0x1000

#endif
