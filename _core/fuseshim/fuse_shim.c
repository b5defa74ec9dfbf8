/* Hand-written C, not Cython output (that is _fuseshim.c, which is ignored).
 * See fuse_shim.h for what it does and why. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <string.h>

#include "fuse_shim.h"

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static nvmefs_fallocate_fn fallocate_handler;
static atomic_int sessions_hooked;
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

int nvmefs_fuse_sessions_hooked(void)
{
    return atomic_load(&sessions_hooked);
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
    /* a shorter table (older header) grows to ours, zero-filled */
    return real(args, &table.ops, op_size > sizeof table.ops ? op_size : sizeof table.ops, userdata);
}
