# NVMe/TCP wire structures and CRC32C (nvme_tcp.h).
from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef extern from "nvme_tcp.h" nogil:
    enum:
        NTCP_ICREQ
        NTCP_ICRESP
        NTCP_H2C_TERM
        NTCP_C2H_TERM
        NTCP_CMD
        NTCP_RSP
        NTCP_H2C_DATA
        NTCP_C2H_DATA
        NTCP_R2T
        NTCP_F_HDGST
        NTCP_F_DDGST
        NTCP_F_DATA_LAST
        NTCP_F_DATA_SUCCESS
        NTCP_FES_INVALID_HEADER
        NTCP_FES_PDU_SEQUENCE
        NTCP_FES_HDGST
        NTCP_FES_DATA_RANGE
        NTCP_FES_DATA_LIMIT
        NTCP_FES_UNSUPPORTED
        NTCP_DIGEST_LEN
        NTCP_TERM_MAX_DATA
        NTCP_SGL_INCAPSULE
        NTCP_SGL_TRANSPORT
        NVMF_OPC
        NVMF_PROP_SET
        NVMF_CONNECT
        NVMF_PROP_GET

    ctypedef struct ntcp_ch:
        uint8_t type
        uint8_t flags
        uint8_t hlen
        uint8_t pdo
        uint32_t plen

    ctypedef struct ntcp_icreq:
        ntcp_ch ch
        uint16_t pfv
        uint8_t hpda
        uint8_t digest
        uint32_t maxr2t

    ctypedef struct ntcp_icresp:
        ntcp_ch ch
        uint16_t pfv
        uint8_t cpda
        uint8_t digest
        uint32_t maxh2cdata

    ctypedef struct ntcp_term:
        ntcp_ch ch
        uint16_t fes
        uint32_t fei

    ctypedef struct ntcp_cmd:
        ntcp_ch ch
        uint8_t sqe[64]

    ctypedef struct ntcp_rsp:
        ntcp_ch ch
        uint8_t cqe[16]

    ctypedef struct ntcp_data:
        ntcp_ch ch
        uint16_t cccid
        uint16_t ttag
        uint32_t datao
        uint32_t datal

    ctypedef struct ntcp_r2t:
        ntcp_ch ch
        uint16_t cccid
        uint16_t ttag
        uint32_t r2to
        uint32_t r2tl

    uint32_t ntcp_crc32c(uint32_t crc, const void *p, size_t n)
    uint32_t ntcp_crc_final(uint32_t crc)
