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
 * static copy serves every session; sessions are created one at a time */
static struct fuse_lowlevel_ops ops;

void nvmefs_fuse_set_fallocate(nvmefs_fallocate_fn fn)
{
    fallocate_handler = fn;
}

int nvmefs_fuse_sessions_hooked(void)
{
    return atomic_load(&sessions_hooked);
}

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
    memset(&ops, 0, sizeof ops);
    /* a caller built against an older header passes a shorter table */
    memcpy(&ops, op, op_size < sizeof ops ? op_size : sizeof ops);
    if (ops.fallocate == NULL && fallocate_handler != NULL) {
        ops.fallocate = fallocate_handler;
        atomic_fetch_add(&sessions_hooked, 1);
    }
    return real(args, &ops, sizeof ops, userdata);
}
