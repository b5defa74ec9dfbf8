/* The lane thread (_core/fuseshim/session_hook.c) and the lane engine
 * (_core/lane.pyx) meet here: a table of operations, as a transport is
 * (STYLE.md), so that the FUSE shim does not link the driver core nor the
 * core libfuse.  The thread calls every operation but bind() holding the
 * world lock and never holding the GIL. */
#ifndef NVMEFS_LANE_ENGINE_H
#define NVMEFS_LANE_ENGINE_H
#include <stddef.h>

/* offer() results */
enum {
    NVMEFS_LANE_DECLINED = 0,   /* not the engine's: hand it to pyfuse3 (the buffer stays reserved) */
    NVMEFS_LANE_TAKEN = 1,      /* in flight: the engine keeps the buffer and answers later */
    NVMEFS_LANE_ANSWERED = 2,   /* answered already: the buffer stays reserved */
};

struct nvmefs_lane_engine {
    void *ctx;
    /* every receive buffer holds this much: the kernel's largest request
     * (max_write plus headers; the shim's FUSE_INIT keeps max_write within) */
    size_t bufsize;
    /* how many requests the kernel may have outstanding in the background
     * (async reads and writes: libaio, readahead, writeback); one fewer
     * than the buffers, so that one is free to read the next request */
    unsigned max_background;
    /* a receive buffer (DMA memory) for the next read of /dev/fuse, or NULL
     * while every one is in flight */
    void *(*reserve)(void *ctx);
    void (*unreserve)(void *ctx, void *buf);
    /* a request read into a reserved buffer: FUSE_READ, FUSE_WRITE and
     * FUSE_INTERRUPT are offered; NVMEFS_LANE_* */
    int (*offer)(void *ctx, void *buf, size_t len);
    /* answer the requests whose commands completed; how many ended */
    int (*reap)(void *ctx);
    /* requests whose commands are at the controller */
    int (*in_flight)(void *ctx);
    /* hybrid polling: watch the completion queue for the spin window;
     * 1 as soon as a completion is there */
    int (*spin)(void *ctx);
    /* the completion queue's interrupt eventfd, -1 for a polled queue */
    int (*irq_fd)(void *ctx);
    /* where answers go: /dev/fuse */
    void (*bind)(void *ctx, int fuse_fd);
};

#endif
