/* Adds a fallocate handler to the libfuse session pyfuse3 creates.
 *
 * pyfuse3 (3.5) registers no fallocate operation, and libfuse answers
 * FUSE_FALLOCATE with ENOSYS, after which the kernel never sends it again
 * and every fallocate(2) on the mount gets EOPNOTSUPP.  This object is
 * loaded RTLD_GLOBAL before pyfuse3 first calls fuse_session_new(), so that
 * call resolves to the wrapper below, which passes libfuse a copy of
 * pyfuse3's operation table with our fallocate filled in.
 */
#ifndef NVMEFS_FUSE_SHIM_H
#define NVMEFS_FUSE_SHIM_H

#define FUSE_USE_VERSION 32
#include <fuse_lowlevel.h>

typedef void (*nvmefs_fallocate_fn)(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                                    off_t length, struct fuse_file_info *fi);

void nvmefs_fuse_set_fallocate(nvmefs_fallocate_fn fn);
/* sessions created through the wrapper since load (0: the hook never ran) */
int nvmefs_fuse_sessions_hooked(void);

#endif
