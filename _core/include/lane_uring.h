/* FUSE over io_uring for the lanes (_core/lane_uring.pyx): the kernel ABI
 * (include/uapi/linux/fuse.h 7.42, fs/fuse/dev_uring.c) that Debian's 7.38
 * <linux/fuse.h> does not have yet, and the few liburing calls a lane
 * makes, as inline C (liburing 2.3 has no helper for IORING_OP_URING_CMD,
 * so the 128-byte SQEs are filled here).
 *
 * A ring entry is two buffers the kernel fills with a request and the lane
 * fills with its answer: a 288-byte header (the fuse_in_header or
 * fuse_out_header, the request's first argument, the payload size and the
 * commit id) and a payload (the rest: write data, names; read data and
 * every out argument).  REGISTER hands an entry to the queue of one CPU
 * (qid); COMMIT_AND_FETCH answers the request in it and hands it back. */
#ifndef NVMEFS_LANE_URING_H
#define NVMEFS_LANE_URING_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <liburing.h>
#include <linux/fuse.h>

#define LU_OVER_IO_URING_FLAGS2 (1u << 9)   /* FUSE_OVER_IO_URING, bit 41 of the INIT flags */
#define LU_CMD_REGISTER 1
#define LU_CMD_COMMIT_AND_FETCH 2

struct lu_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;             /* the request's unique */
    uint32_t payload_sz;            /* bytes of the payload in use, either way */
    uint32_t padding;
    uint64_t reserved;
};

struct lu_req_header {
    char in_out[128];               /* fuse_in_header in, fuse_out_header out */
    char op_in[128];                /* the request's first argument */
    struct lu_ent_in_out ent;
};

struct lu_cmd_req {                 /* the command area of a 128-byte SQE */
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

_Static_assert(sizeof(struct fuse_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct lu_req_header) == 288, "fuse_uring_req_header");
_Static_assert(offsetof(struct lu_req_header, ent) == 256, "ring_ent_in_out");
_Static_assert(offsetof(struct lu_ent_in_out, payload_sz) == 16, "payload_sz");
_Static_assert(sizeof(struct lu_cmd_req) == 24, "fuse_uring_cmd_req");
_Static_assert(offsetof(struct io_uring_sqe, cmd) == 48, "the SQE's command area");

typedef struct {
    struct io_uring ring;
    int ok;
    unsigned pending;               /* SQEs prepared, not yet submitted */
} lu_ring;

/* A ring for ``entries`` entries (one SQE each at most at a time), with
 * the fuse fd registered as fixed file 0.  0 or -errno. */
static inline int lu_init(lu_ring *r, unsigned entries, int fuse_fd)
{
    struct io_uring_params p;
    int rc;
    memset(r, 0, sizeof *r);
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SQE128;  /* FUSE's commands need the 80-byte area */
    rc = io_uring_queue_init_params(entries, &r->ring, &p);
    if (rc < 0)
        return rc;
    rc = io_uring_register_files(&r->ring, &fuse_fd, 1);
    if (rc < 0) {
        io_uring_queue_exit(&r->ring);
        return rc;
    }
    r->ok = 1;
    return 0;
}

static inline int lu_fd(lu_ring *r)
{
    return r->ok ? r->ring.ring_fd : -1;
}

/* One FUSE command on entry ``user``: REGISTER with its two iovecs, or
 * COMMIT_AND_FETCH of ``commit_id``.  0 or -EBUSY (no SQE). */
static inline int lu_prep(lu_ring *r, unsigned cmd, uint64_t user, struct iovec *iov, uint16_t qid,
                          uint64_t commit_id)
{
    struct io_uring_sqe *sqe;
    struct lu_cmd_req *c;
    if (!r->ok)
        return -EBADF;
    sqe = io_uring_get_sqe(&r->ring);
    if (sqe == NULL) {
        io_uring_submit(&r->ring);
        r->pending = 0;
        sqe = io_uring_get_sqe(&r->ring);
        if (sqe == NULL)
            return -EBUSY;
    }
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->flags = IOSQE_FIXED_FILE;
    sqe->fd = 0;
    sqe->cmd_op = cmd;
    if (cmd == LU_CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)iov;
        sqe->len = 2;
    }
    sqe->user_data = user;
    c = (struct lu_cmd_req *)sqe->cmd;
    c->commit_id = commit_id;
    c->qid = qid;
    r->pending++;
    return 0;
}

static inline int lu_submit(lu_ring *r)
{
    int rc;
    if (!r->pending)
        return 0;
    rc = io_uring_submit(&r->ring);
    /* what the kernel did not take stays in the SQ for the next submit */
    if (rc >= 0)
        r->pending = (unsigned)rc >= r->pending ? 0 : r->pending - (unsigned)rc;
    return rc;
}

/* The next completion: 1 and its entry and result, or 0. */
static inline int lu_peek(lu_ring *r, uint64_t *user, int *res)
{
    struct io_uring_cqe *cqe;
    if (!r->ok || io_uring_peek_cqe(&r->ring, &cqe) != 0)
        return 0;
    *user = cqe->user_data;
    *res = cqe->res;
    io_uring_cqe_seen(&r->ring, cqe);
    return 1;
}

static inline unsigned lu_ready(lu_ring *r)
{
    return r->ok ? io_uring_cq_ready(&r->ring) : 0;
}

/* Ends the ring; the kernel cancels the entries it still holds. */
static inline void lu_exit(lu_ring *r)
{
    if (r->ok)
        io_uring_queue_exit(&r->ring);
    r->ok = 0;
}

#endif
