/* Hand-written C (see shim.h): the libfuse entry points pyfuse3 calls that
 * this object answers instead, for the armed session only.
 *
 *   fuse_session_new          records the session and wraps its init
 *                             operation (the lanes' FUSE_INIT limits)
 *   fuse_session_fd           the forward queue's pipe: what pyfuse3's loop
 *                             waits on instead of /dev/fuse
 *   fuse_session_receive_buf  the next forwarded request
 *
 * Everything else pyfuse3 calls reaches libfuse unchanged; its replies
 * come back through forward.c's custom I/O writev. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "shim.h"

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);
typedef int (*session_fd_fn)(struct fuse_session *);
typedef int (*receive_buf_fn)(struct fuse_session *, struct fuse_buf *);

static int armed;
static unsigned armed_max_write, armed_max_background;
static struct fuse_session *mount_se;
static atomic_int sessions;
static void (*orig_init)(void *userdata, struct fuse_conn_info *conn);
/* libfuse copies the table into the session (fuse_session_new), so one
 * static copy serves; sessions are created one at a time.  Room for a
 * caller built against a newer header with a longer table. */
static union {
    struct fuse_lowlevel_ops ops;
    unsigned char bytes[4 * sizeof(struct fuse_lowlevel_ops)];
} table;

static void *next_symbol(const char *name)
{
    /* the version pyfuse3 was linked against; RTLD_NEXT skips this object */
    void *f = dlvsym(RTLD_NEXT, name, "FUSE_3.0");
    return f != NULL ? f : dlsym(RTLD_NEXT, name);
}

static int real_session_fd(struct fuse_session *se)
{
    static session_fd_fn f;
    if (f == NULL)
        f = (session_fd_fn)next_symbol("fuse_session_fd");
    return f(se);
}

static int real_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    static receive_buf_fn f;
    if (f == NULL)
        f = (receive_buf_fn)next_symbol("fuse_session_receive_buf");
    return f(se, buf);
}

int nvmefs_shim_arm(unsigned max_write, unsigned max_background)
{
    int rc = nvmefs_forward_open();
    if (rc < 0)
        return rc;
    armed_max_write = max_write;
    armed_max_background = max_background;
    armed = 1;
    return 0;
}

void nvmefs_shim_disarm(void)
{
    armed = 0;
    mount_se = NULL;
}

int nvmefs_shim_sessions(void)
{
    return atomic_load(&sessions);
}

int nvmefs_shim_session_fd(void)
{
    return mount_se != NULL ? real_session_fd(mount_se) : -1;
}

static ssize_t forward_read(int fd, void *buf, size_t len, void *userdata)
{
    /* never called: pyfuse3 receives through fuse_session_receive_buf()
     * below; libfuse insists on a read with a custom writev */
    (void)userdata;
    return read(fd, buf, len);
}

int nvmefs_shim_route_replies(void)
{
    static const struct fuse_custom_io io = {
        .writev = nvmefs_forward_writev,
        .read = forward_read,
    };
    if (mount_se == NULL)
        return -EINVAL;
    /* the same fd: it only makes libfuse write through io.writev (and,
     * having no splice functions, never offer splice in FUSE_INIT) */
    return fuse_session_custom_io(mount_se, &io, real_session_fd(mount_se));
}

static void lanes_init(void *userdata, struct fuse_conn_info *conn)
{
    if (orig_init != NULL)
        orig_init(userdata, conn);
    /* spliced data would sit in a pipe of the thread that read it */
    conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
    /* every write must fit a lane's buffer (the kernel refuses a read()
     * shorter than max_write plus the write headers); libfuse derives
     * max_pages, the largest read, from it */
    if (conn->max_write > armed_max_write)
        conn->max_write = armed_max_write;
    /* the kernel's default of 12 background requests (async direct I/O,
     * readahead, writeback) would hold QD32 libaio to 12 */
    conn->max_background = armed_max_background;
    conn->congestion_threshold = armed_max_background * 3 / 4;
}

int fuse_session_fd(struct fuse_session *se);
int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf);

__attribute__((visibility("default")))
int fuse_session_fd(struct fuse_session *se)
{
    if (se != NULL && se == mount_se)
        return nvmefs_forward_fd();
    return real_session_fd(se);
}

/* pyfuse3's loop reads here once fuse_session_fd() (the pipe) is readable. */
__attribute__((visibility("default")))
int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    int rc;
    if (se == NULL || se != mount_se)
        return real_receive_buf(se, buf);
    rc = nvmefs_forward_take(buf);
    /* every lane has ended: as libfuse's own receive does on ENODEV, or
     * pyfuse3's idle workers spawn one another for ever */
    if (rc == 0)
        fuse_session_exit(se);
    return rc;
}

/* libfuse 3.17 turned fuse_session_new into a macro over a versioned entry
 * point; a pyfuse3 built against such headers never calls this symbol, and
 * the mount then fails clearly (nvmefs_shim_sessions() == 0). */
#undef fuse_session_new

__attribute__((visibility("default")))
struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    session_new_fn real = (session_new_fn)next_symbol("fuse_session_new");
    struct fuse_session *se;
    if (real == NULL)
        return NULL;
    if (!armed || op_size > sizeof table.bytes)
        return real(args, op, op_size, userdata);
    memset(&table, 0, sizeof table);
    memcpy(&table, op, op_size);
    orig_init = table.ops.init;
    table.ops.init = lanes_init;
    /* a shorter table (older header) grows to ours, zero-filled */
    se = real(args, &table.ops, op_size > sizeof table.ops ? op_size : sizeof table.ops, userdata);
    if (se != NULL) {
        mount_se = se;
        armed = 0;
        atomic_fetch_add(&sessions, 1);
    }
    return se;
}
