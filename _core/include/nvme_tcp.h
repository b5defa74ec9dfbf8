/* Wire structures of NVMe over TCP (NVMe/TCP transport specification 1.0,
 * the PDUs a host sends and receives) and of the Fabrics commands a host
 * needs (NVMe over Fabrics 1.1: Connect, Property Get/Set).  All fields are
 * little endian; sizes and offsets are checked at compile time.
 *
 * CRC32C (header and data digests) comes from ISA-L (Debian's libisal-dev),
 * which uses the CPU's crc32 instruction; the digest is the usual iSCSI
 * CRC: initial value ~0, final value inverted. */
#ifndef NVMEFS_NVME_TCP_H
#define NVMEFS_NVME_TCP_H

#include <stdint.h>
#include <stddef.h>
#include <isa-l/crc.h>

/* PDU types (spec 3.6.2) */
enum {
    NTCP_ICREQ = 0x00, NTCP_ICRESP = 0x01, NTCP_H2C_TERM = 0x02, NTCP_C2H_TERM = 0x03,
    NTCP_CMD = 0x04, NTCP_RSP = 0x05, NTCP_H2C_DATA = 0x06, NTCP_C2H_DATA = 0x07, NTCP_R2T = 0x09,
};

/* common header flags */
enum {
    NTCP_F_HDGST = 0x01, NTCP_F_DDGST = 0x02,
    NTCP_F_DATA_LAST = 0x04,     /* H2CData / C2HData: last PDU of the transfer */
    NTCP_F_DATA_SUCCESS = 0x08,  /* C2HData: no CapsuleResp follows, the command succeeded */
};

/* Fatal Error Status of a TermReq (spec 3.6.2.4 / 3.6.2.5) */
enum {
    NTCP_FES_INVALID_HEADER = 0x01, NTCP_FES_PDU_SEQUENCE = 0x02, NTCP_FES_HDGST = 0x03,
    NTCP_FES_DATA_RANGE = 0x04, NTCP_FES_DATA_LIMIT = 0x05, NTCP_FES_UNSUPPORTED = 0x06,
};

#define NTCP_DIGEST_LEN 4
#define NTCP_TERM_MAX_DATA 152    /* a TermReq carries at most this much of the offending PDU */

typedef struct __attribute__((packed)) ntcp_ch {
    uint8_t  type;
    uint8_t  flags;
    uint8_t  hlen;
    uint8_t  pdo;
    uint32_t plen;
} ntcp_ch;

typedef struct __attribute__((packed)) ntcp_icreq {
    ntcp_ch  ch;
    uint16_t pfv;
    uint8_t  hpda;
    uint8_t  digest;        /* bit 0 header digest, bit 1 data digest */
    uint32_t maxr2t;        /* 0's based */
    uint8_t  rsvd[112];
} ntcp_icreq;

typedef struct __attribute__((packed)) ntcp_icresp {
    ntcp_ch  ch;
    uint16_t pfv;
    uint8_t  cpda;          /* 0's based dwords: data starts on (cpda + 1) * 4 */
    uint8_t  digest;
    uint32_t maxh2cdata;
    uint8_t  rsvd[112];
} ntcp_icresp;

typedef struct __attribute__((packed)) ntcp_term {
    ntcp_ch  ch;
    uint16_t fes;
    uint32_t fei;
    uint8_t  rsvd[10];
} ntcp_term;

typedef struct __attribute__((packed)) ntcp_cmd {
    ntcp_ch  ch;
    uint8_t  sqe[64];
} ntcp_cmd;

typedef struct __attribute__((packed)) ntcp_rsp {
    ntcp_ch  ch;
    uint8_t  cqe[16];
} ntcp_rsp;

/* H2CData and C2HData share one layout; for C2HData ttag is reserved */
typedef struct __attribute__((packed)) ntcp_data {
    ntcp_ch  ch;
    uint16_t cccid;
    uint16_t ttag;
    uint32_t datao;
    uint32_t datal;
    uint8_t  rsvd[4];
} ntcp_data;

typedef struct __attribute__((packed)) ntcp_r2t {
    ntcp_ch  ch;
    uint16_t cccid;
    uint16_t ttag;
    uint32_t r2to;
    uint32_t r2tl;
    uint8_t  rsvd[4];
} ntcp_r2t;

_Static_assert(sizeof(ntcp_ch) == 8, "common header is 8 bytes");
_Static_assert(sizeof(ntcp_icreq) == 128 && sizeof(ntcp_icresp) == 128, "ICReq/ICResp are 128 bytes");
_Static_assert(offsetof(ntcp_icresp, maxh2cdata) == 12, "MAXH2CDATA at byte 12");
_Static_assert(sizeof(ntcp_term) == 24, "TermReq header is 24 bytes");
_Static_assert(offsetof(ntcp_term, fei) == 10, "FEI at byte 10");
_Static_assert(sizeof(ntcp_cmd) == 72, "CapsuleCmd header is 72 bytes");
_Static_assert(sizeof(ntcp_rsp) == 24, "CapsuleResp is 24 bytes");
_Static_assert(sizeof(ntcp_data) == 24 && sizeof(ntcp_r2t) == 24, "data/R2T headers are 24 bytes");
_Static_assert(offsetof(ntcp_data, datal) == 16 && offsetof(ntcp_r2t, r2tl) == 16, "lengths at byte 16");

/* SGL descriptor identifiers a fabrics capsule uses (base spec 4.1.8) */
#define NTCP_SGL_INCAPSULE  0x01   /* Data Block, subtype Offset: data in the capsule */
#define NTCP_SGL_TRANSPORT  0x5A   /* Transport SGL Data Block, transport specific: R2T/C2HData */

/* Fabrics commands (opcode 7Fh, FCTYPE in byte 4) */
#define NVMF_OPC            0x7F
#define NVMF_PROP_SET       0x00
#define NVMF_CONNECT        0x01
#define NVMF_PROP_GET       0x04

typedef struct __attribute__((packed)) nvmf_connect_data {
    uint8_t  hostid[16];
    uint16_t cntlid;
    uint8_t  rsvd1[238];
    char     subnqn[256];
    char     hostnqn[256];
    uint8_t  rsvd2[256];
} nvmf_connect_data;

_Static_assert(sizeof(nvmf_connect_data) == 1024, "Connect data is 1024 bytes");
_Static_assert(offsetof(nvmf_connect_data, subnqn) == 256, "SUBNQN at byte 256");
_Static_assert(offsetof(nvmf_connect_data, hostnqn) == 512, "HOSTNQN at byte 512");

static inline uint32_t ntcp_crc32c(uint32_t crc, const void *p, size_t n)
{
    /* running value, start with ~0; the digest is ~crc (ntcp_crc_final) */
    while (n > 0x40000000) {
        crc = crc32_iscsi((unsigned char *)p, 0x40000000, crc);
        p = (const uint8_t *)p + 0x40000000;
        n -= 0x40000000;
    }
    return crc32_iscsi((unsigned char *)p, (int)n, crc);
}

static inline uint32_t ntcp_crc_final(uint32_t crc) { return ~crc; }

#endif
