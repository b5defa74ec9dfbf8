/* Hand-written C, not Cython output (that is _fuseshim.c, which is ignored).
 * See session_hook.h for what it does and why. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <errno.h>
#include <string.h>

#include "session_hook.h"

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static nvmefs_fallocate_fn fallocate_handler;
static nvmefs_read_fn read_handler, orig_read;
static nvmefs_write_buf_fn write_buf_handler, orig_write_buf;
static atomic_int sessions_hooked, lane_sessions;
/* libfuse copies the table into the session (fuse_session_new), so one
 * static copy serves every session; sessions are created one at a time.
 * Room for a caller built against a newer header with a longer table. */
static union {
    struct fuse_lowlevel_ops ops;
    unsigned char bytes[4 * sizeof(struct fuse_lowlevel_ops)];
} table;

void nvmefs_fuse_set_fallocate(nvmefs_fallocate_fn fn)
{
    fallocate_handler = fn;
}

void nvmefs_fuse_set_io(nvmefs_read_fn read, nvmefs_write_buf_fn write_buf)
{
    read_handler = read;
    write_buf_handler = write_buf;
}

/* Only reached from our handlers, which exist only in a session whose
 * table had pyfuse3's to save; answer rather than drop the request. */
void nvmefs_fuse_orig_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    if (orig_read != NULL)
        orig_read(req, ino, size, off, fi);
    else
        fuse_reply_err(req, ENOSYS);
}

void nvmefs_fuse_orig_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                                struct fuse_file_info *fi)
{
    if (orig_write_buf != NULL)
        orig_write_buf(req, ino, bufv, off, fi);
    else
        fuse_reply_err(req, ENOSYS);
}

int nvmefs_fuse_sessions_hooked(void)
{
    return atomic_load(&sessions_hooked);
}

int nvmefs_fuse_lane_sessions(void)
{
    return atomic_load(&lane_sessions);
}

/* libfuse 3.17 turned fuse_session_new into a macro over a versioned entry
 * point; a pyfuse3 built against such headers never calls this symbol, and
 * the mount then reports fallocate as unavailable (sessions_hooked == 0). */
#undef fuse_session_new

__attribute__((visibility("default")))
struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    /* the version pyfuse3 was linked against; RTLD_NEXT skips this object */
    session_new_fn real = (session_new_fn)dlvsym(RTLD_NEXT, "fuse_session_new", "FUSE_3.0");
    if (real == NULL)
        real = (session_new_fn)dlsym(RTLD_NEXT, "fuse_session_new");
    if (real == NULL)
        return NULL;
    if (op_size > sizeof table.bytes)       /* cannot copy it whole: leave it alone */
        return real(args, op, op_size, userdata);
    memset(&table, 0, sizeof table);
    memcpy(&table, op, op_size);
    if (table.ops.fallocate == NULL && fallocate_handler != NULL) {
        table.ops.fallocate = fallocate_handler;
        atomic_fetch_add(&sessions_hooked, 1);
    }
    /* both or neither: a write lane without the read lane's fallbacks (or
     * the reverse) would be a table we did not test */
    if (read_handler != NULL && write_buf_handler != NULL && table.ops.read != NULL
        && table.ops.write_buf != NULL) {
        orig_read = table.ops.read;
        orig_write_buf = table.ops.write_buf;
        table.ops.read = read_handler;
        table.ops.write_buf = write_buf_handler;
        atomic_fetch_add(&lane_sessions, 1);
    }
    /* a shorter table (older header) grows to ours, zero-filled */
    return real(args, &table.ops, op_size > sizeof table.ops ? op_size : sizeof table.ops, userdata);
}
