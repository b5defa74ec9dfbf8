/* The FUSE shim: what lets pyfuse3 serve the requests the lanes do not.
 *
 * The lanes (_core/lane.pyx) read every request from /dev/fuse, each on a
 * channel of its own.  pyfuse3 still serves the non-data ones (lookups,
 * getattr, open, release, xattrs ...), in trio, with libfuse's dispatch:
 *
 *   interpose.c  symbol interposition.  fuse_session_new() gets the lanes'
 *                FUSE_INIT limits; fuse_session_fd() and
 *                fuse_session_receive_buf() give pyfuse3's loop the
 *                forwarded requests instead of /dev/fuse.
 *   forward.c    the queue of requests forwarded to pyfuse3 (a pipe byte
 *                per request), and the routing of pyfuse3's replies to the
 *                channel each request came from (libfuse's custom I/O
 *                writev): the kernel takes a reply only on that channel.
 *
 * This object is loaded RTLD_GLOBAL before pyfuse3 first calls
 * fuse_session_new() (nvmefs/fuseshim.py), so that pyfuse3's calls resolve
 * here.  It links libfuse; the driver core does not. */
#ifndef NVMEFS_SHIM_H
#define NVMEFS_SHIM_H

#define FUSE_USE_VERSION 34
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <fuse_lowlevel.h>

/* interpose.c */
/* The next session created is the mount's: its FUSE_INIT offers at most
 * max_write bytes per write (the lanes' buffers) and max_background
 * requests in the background, and pyfuse3 reads it from the forward
 * queue.  0, or -errno (the queue could not be made). */
int nvmefs_shim_arm(unsigned max_write, unsigned max_background);
/* the armed session's own /dev/fuse fd (the one the mount opened), -1 */
int nvmefs_shim_session_fd(void);
/* after the mount: pyfuse3's replies go through forward.c's routing */
int nvmefs_shim_route_replies(void);
/* after pyfuse3.close(): forget the session */
void nvmefs_shim_disarm(void);
/* sessions the wrapper saw since load (0: the hook never ran) */
int nvmefs_shim_sessions(void);

/* forward.c */
int nvmefs_forward_open(void);
/* Queue a request (copied) for pyfuse3; its reply goes to reply_fd.
 * Thread-safe.  0, or -errno (the caller answers the request). */
int nvmefs_forward(const void *req, size_t len, int reply_fd);
/* whether pyfuse3 holds request ``unique`` (not yet answered) */
int nvmefs_forwarded(uint64_t unique);
/* no more requests will come: pyfuse3's loop ends once it took the rest */
void nvmefs_forward_end(void);
int nvmefs_forward_fd(void);
/* pyfuse3's fuse_session_receive_buf: the next request, its size, 0 at
 * the end, -errno */
int nvmefs_forward_take(struct fuse_buf *buf);
ssize_t nvmefs_forward_writev(int fd, struct iovec *iov, int count, void *userdata);
void nvmefs_forward_close(void);
/* FUSE over io_uring: when the kernel offers it, the FUSE_INIT answer asks
 * for it and hook(ctx, 1) runs once it is written (hook(ctx, 0): not asked);
 * hook NULL: never asked */
void nvmefs_forward_want_uring(void (*hook)(void *ctx, int ok), void *ctx);
/* whether the kernel's FUSE_INIT offered io_uring (enable_uring=Y) */
int nvmefs_forward_uring_offered(void);
/* forwarded, replies routed, replies with no route (sent on the session fd) */
void nvmefs_forward_stats(unsigned long *out);

#endif
