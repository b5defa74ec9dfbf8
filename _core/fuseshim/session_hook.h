/* Adds a fallocate handler to the libfuse session pyfuse3 creates.
 *
 * pyfuse3 (3.5) registers no fallocate operation, and libfuse answers
 * FUSE_FALLOCATE with ENOSYS, after which the kernel never sends it again
 * and every fallocate(2) on the mount gets EOPNOTSUPP.  This object is
 * loaded RTLD_GLOBAL before pyfuse3 first calls fuse_session_new(), so that
 * call resolves to the wrapper below, which passes libfuse a copy of
 * pyfuse3's operation table with our fallocate filled in.
 *
 * The same copy can put read and write handlers ahead of pyfuse3's: the
 * mount's direct lane answers a request that one polled NVMe command can
 * serve inside libfuse's dispatch, without a coroutine per request, and
 * hands every other request to pyfuse3's own handler.
 *
 * With the lane thread armed, the wrapper also takes /dev/fuse away from
 * pyfuse3's loop: a thread reads it and answers reads and writes without
 * any trio scheduling, handing the rest to pyfuse3 (session_hook.c).
 */
#ifndef NVMEFS_SESSION_HOOK_H
#define NVMEFS_SESSION_HOOK_H

#define FUSE_USE_VERSION 32
#include <fuse_lowlevel.h>

typedef void (*nvmefs_fallocate_fn)(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                                    off_t length, struct fuse_file_info *fi);

typedef void (*nvmefs_read_fn)(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                               struct fuse_file_info *fi);
typedef void (*nvmefs_write_buf_fn)(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                                    struct fuse_file_info *fi);

void nvmefs_fuse_set_fallocate(nvmefs_fallocate_fn fn);
/* Read and write handlers that run ahead of pyfuse3's (the direct lane:
 * see nvmefs/fusefs.py); they fall back to the ones pyfuse3 registered,
 * which the two functions below call. */
void nvmefs_fuse_set_io(nvmefs_read_fn read, nvmefs_write_buf_fn write_buf);
void nvmefs_fuse_orig_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
void nvmefs_fuse_orig_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                                struct fuse_file_info *fi);
/* sessions created through the wrapper since load (0: the hook never ran) */
int nvmefs_fuse_sessions_hooked(void);
/* sessions whose read and write went to the direct lane's handlers */
int nvmefs_fuse_lane_sessions(void);

/* The lane thread (see session_hook.c): arm before the session is created;
 * nvmefs_lane_threaded() then says whether it got its pipe. */
void nvmefs_lane_arm(int on);
int nvmefs_lane_threaded(void);
/* Runs until unmounted (returns 0) or nvmefs_lane_stop(); -errno on error. */
int nvmefs_lane_loop(void);
void nvmefs_lane_stop(void);
void nvmefs_lane_close(void);
/* In a read/write handler: 1 when it runs in the lane thread, which then
 * hands the request to pyfuse3's loop once the handler returns (the
 * handler must free the request with fuse_reply_none and not answer it). */
int nvmefs_lane_decline(void);
/* received, answered in the thread, declined there, handed to pyfuse3 */
void nvmefs_lane_stats(unsigned long *out);
/* The lane engine (lane_engine.h) the thread drives instead of libfuse's
 * dispatch for reads and writes; NULL for none.  Set before the session is
 * created (its FUSE_INIT keeps max_write within the engine's buffers). */
struct nvmefs_lane_engine;
void nvmefs_lane_set_engine(struct nvmefs_lane_engine *e);
void nvmefs_world_trio_acquire(void);
void nvmefs_world_trio_release(void);
void nvmefs_world_lane_acquire(void);
void nvmefs_world_lane_release(void);

#endif
