/* Hand-written C (see shim.h): the requests the lanes forward to pyfuse3,
 * and the way pyfuse3's replies find the channel each came from.
 *
 * A lane calls nvmefs_forward() from its own thread: the request is copied,
 * its reply channel recorded by unique id, and queued; one byte in a pipe
 * tells pyfuse3's loop (which polls the pipe as its fuse_session_fd()) that
 * a request waits, so pyfuse3 sees requests in arrival order.  libfuse
 * writes every reply through nvmefs_forward_writev() (custom I/O), which
 * sends it on the recorded channel: the kernel finds a request only on the
 * channel that read it.  This is the control plane's path; the mutex here
 * is never taken for a read or a write. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/fuse.h>

#include "shim.h"

struct fwd {
    struct fwd *next;
    void *mem;
    size_t size;
};

/* unique -> channel of a request pyfuse3 holds */
struct route {
    struct route *next;
    uint64_t unique;
    int fd;
    uint32_t opcode;
};

#define ROUTE_BUCKETS 1024

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct fwd *head, *tail;
static struct route *routes[ROUTE_BUCKETS];
static int pipe_fd[2] = {-1, -1};
static atomic_ulong st_forwarded, st_routed, st_unrouted;

/* FUSE over io_uring (the lanes' rings, _core/lane_uring.pyx): libfuse
 * 3.14 does not know it, so its FUSE_INIT answer is amended here when the
 * kernel offered it and the lanes asked; then the lanes are told, and
 * register their entries (which the kernel refuses before the answer). */
#define OVER_IO_URING_FLAGS2 (1u << 9)      /* FUSE_OVER_IO_URING: INIT flag bit 41 */
static void (*uring_hook)(void *ctx, int ok);
static void *uring_ctx;
static int uring_offered;

/* FUSE clears SB_NOSEC, so every buffered write() first asks the server
 * for security.capability (file_remove_privs), a round trip per write:
 * half of what a --page-cache mount spent on 4 KiB writes.  With
 * FUSE_HANDLE_KILLPRIV_V2 the kernel sets SB_NOSEC (fs/fuse/inode.c
 * process_init_reply) and marks the inode S_NOSEC once a write found
 * nothing to kill, until its attributes are fetched again (fuse clears
 * S_NOSEC then; every 300 s here, nvmefs/fusefs.py attr_timeout).  What
 * the flag asks of the server -- drop suid/sgid and capabilities on
 * write, truncate and chown -- is empty here: the namespace files are
 * 0644, mode and owner changes are refused (nvmefs/fusefs.py setattr) and
 * no security.* attribute can be set.
 * libfuse 3.14 cannot ask for it (3.17 can), so it is added here. */
static int killpriv_v2_offered;

static unsigned bucket(uint64_t unique)
{
    return (unsigned)((unique >> 1) * 0x9E3779B97F4A7C15ull >> 54) % ROUTE_BUCKETS;
}

int nvmefs_forward_open(void)
{
    if (pipe_fd[0] >= 0)
        return 0;
    /* non-blocking on both ends: a lane never waits on pyfuse3 here, and
     * pyfuse3's loop reads only once poll() said so */
    if (pipe2(pipe_fd, O_CLOEXEC | O_NONBLOCK) < 0)
        return -errno;
    /* room for every request in flight at once, so that a lane's write of
     * the byte does not fail under load */
    fcntl(pipe_fd[1], F_SETPIPE_SZ, 1 << 20);
    return 0;
}

int nvmefs_forward_fd(void)
{
    return pipe_fd[0];
}

static int needs_reply(uint32_t opcode)
{
    return opcode != FUSE_FORGET && opcode != FUSE_BATCH_FORGET && opcode != FUSE_INTERRUPT;
}

void nvmefs_forward_want_uring(void (*hook)(void *ctx, int ok), void *ctx)
{
    uring_hook = hook;
    uring_ctx = ctx;
}

int nvmefs_forward_uring_offered(void)
{
    return uring_offered;
}

static void note_init(const void *req, size_t len)
{
    const struct fuse_init_in *ii = (const void *)((const char *)req + sizeof(struct fuse_in_header));
    if (len < sizeof(struct fuse_in_header) + sizeof *ii)
        return;                 /* an old kernel: no flags2 */
    uring_offered = (ii->flags & FUSE_INIT_EXT) && (ii->flags2 & OVER_IO_URING_FLAGS2);
    killpriv_v2_offered = (ii->flags & FUSE_HANDLE_KILLPRIV_V2) != 0;
}

/* libfuse's answer to FUSE_INIT, asking for FUSE_HANDLE_KILLPRIV_V2 and
 * io_uring too when the kernel offered them; the hook learns whether
 * io_uring was asked (and written). */
static ssize_t write_init_reply(int fd, struct iovec *iov, int count)
{
    const struct fuse_out_header *out = iov[0].iov_base;
    struct fuse_init_out io;
    struct iovec patched[2];
    ssize_t n;
    int fits = out->error == 0 && count == 2
               && iov[1].iov_len >= offsetof(struct fuse_init_out, flags2) + sizeof io.flags2
               && iov[1].iov_len <= sizeof io;
    int ask = fits && uring_hook != NULL && uring_offered;
    if (!fits || !(ask || killpriv_v2_offered)) {
        n = writev(fd, iov, count);
        if (uring_hook != NULL)
            uring_hook(uring_ctx, 0);
        return n;
    }
    memset(&io, 0, sizeof io);
    memcpy(&io, iov[1].iov_base, iov[1].iov_len);
    if (killpriv_v2_offered)
        io.flags |= FUSE_HANDLE_KILLPRIV_V2;
    if (ask) {
        io.flags |= FUSE_INIT_EXT;
        io.flags2 |= OVER_IO_URING_FLAGS2;
    }
    patched[0] = iov[0];
    patched[1].iov_base = &io;
    patched[1].iov_len = iov[1].iov_len;
    n = writev(fd, patched, 2);
    /* the kernel processed the answer within the write: registering now is
     * in order */
    if (uring_hook != NULL)
        uring_hook(uring_ctx, ask && n > 0);
    return n;
}

int nvmefs_forward(const void *req, size_t len, int reply_fd)
{
    const struct fuse_in_header *in = req;
    struct fwd *f = malloc(sizeof *f);
    struct route *r = NULL;
    void *mem = malloc(len);
    char one = 1;
    ssize_t n;
    int err;

    if (needs_reply(in->opcode))
        r = malloc(sizeof *r);
    if (f == NULL || mem == NULL || (needs_reply(in->opcode) && r == NULL)) {
        err = ENOMEM;
        goto fail;
    }
    memcpy(mem, req, len);
    if (in->opcode == FUSE_INIT)
        note_init(req, len);
    f->next = NULL;
    f->mem = mem;
    f->size = len;
    pthread_mutex_lock(&mu);
    if (pipe_fd[1] < 0) {
        pthread_mutex_unlock(&mu);
        err = ENOTCONN;
        goto fail;
    }
    if (r != NULL) {
        unsigned b = bucket(in->unique);
        r->unique = in->unique;
        r->fd = reply_fd;
        r->opcode = in->opcode;
        r->next = routes[b];
        routes[b] = r;
    }
    if (tail != NULL)
        tail->next = f;
    else
        head = f;
    tail = f;
    /* the byte after the record: a reader woken by it finds the record */
    while ((n = write(pipe_fd[1], &one, 1)) < 0 && errno == EINTR)
        ;
    if (n != 1) {
        /* pyfuse3's loop has stopped taking requests: take this one back */
        struct fwd **pp = &head, *prev = NULL;
        err = errno == EAGAIN ? EIO : errno;
        while (*pp != f) {
            prev = *pp;
            pp = &(*pp)->next;
        }
        *pp = NULL;
        tail = prev;
        if (r != NULL) {
            struct route **rp = &routes[bucket(in->unique)];
            while (*rp != r)
                rp = &(*rp)->next;
            *rp = r->next;
        }
        pthread_mutex_unlock(&mu);
        goto fail;
    }
    pthread_mutex_unlock(&mu);
    atomic_fetch_add(&st_forwarded, 1);
    return 0;
fail:
    free(f);
    free(mem);
    free(r);
    return -err;
}

int nvmefs_forwarded(uint64_t unique)
{
    struct route *r;
    int found = 0;
    pthread_mutex_lock(&mu);
    for (r = routes[bucket(unique)]; r != NULL; r = r->next)
        if (r->unique == unique) {
            found = 1;
            break;
        }
    pthread_mutex_unlock(&mu);
    return found;
}

void nvmefs_forward_end(void)
{
    pthread_mutex_lock(&mu);
    if (pipe_fd[1] >= 0) {
        /* end of file for pyfuse3's loop, once it has taken what is queued */
        close(pipe_fd[1]);
        pipe_fd[1] = -1;
    }
    pthread_mutex_unlock(&mu);
}

int nvmefs_forward_take(struct fuse_buf *buf)
{
    struct fwd *f;
    char c;
    ssize_t n = read(pipe_fd[0], &c, 1);
    size_t size;

    if (n == 0)
        return 0;               /* every lane has ended: unmounted */
    if (n < 0)
        return -errno;
    pthread_mutex_lock(&mu);
    f = head;
    if (f != NULL) {
        head = f->next;
        if (head == NULL)
            tail = NULL;
    }
    pthread_mutex_unlock(&mu);
    if (f == NULL)
        return -EIO;            /* a byte without a record: cannot happen */
    /* pyfuse3 keeps one buffer per worker and frees the last one itself */
    free(buf->mem);
    buf->mem = f->mem;
    buf->size = f->size;
    buf->flags = 0;
    size = f->size;
    free(f);
    return (int)size;
}

ssize_t nvmefs_forward_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    const struct fuse_out_header *out = iov[0].iov_base;
    /* an interrupt's reply (odd unique) belongs to its request's channel */
    uint64_t unique = out->unique & ~(uint64_t)1;
    struct route **rp, *r = NULL;
    uint32_t opcode = 0;
    (void)userdata;
    if (out->unique != 0) {         /* 0: a notification, any channel takes it */
        int routed = 0;
        pthread_mutex_lock(&mu);
        for (rp = &routes[bucket(unique)]; *rp != NULL; rp = &(*rp)->next) {
            if ((*rp)->unique != unique)
                continue;
            fd = (*rp)->fd;
            opcode = (*rp)->opcode;
            routed = 1;
            if (unique == out->unique) {    /* the request's own reply: the route is done */
                r = *rp;
                *rp = r->next;
            }
            break;
        }
        pthread_mutex_unlock(&mu);
        free(r);
        atomic_fetch_add(routed ? &st_routed : &st_unrouted, 1);
    }
    if (opcode == FUSE_INIT && unique == out->unique)
        return write_init_reply(fd, iov, count);
    return writev(fd, iov, count);
}

void nvmefs_forward_close(void)
{
    struct fwd *f;
    struct route *r;
    int i;
    pthread_mutex_lock(&mu);
    /* the lanes it would call are gone with the mount */
    uring_hook = NULL;
    uring_ctx = NULL;
    uring_offered = 0;
    killpriv_v2_offered = 0;
    while ((f = head) != NULL) {
        head = f->next;
        free(f->mem);
        free(f);
    }
    tail = NULL;
    for (i = 0; i < ROUTE_BUCKETS; i++)
        while ((r = routes[i]) != NULL) {
            routes[i] = r->next;
            free(r);
        }
    for (i = 0; i < 2; i++)
        if (pipe_fd[i] >= 0) {
            close(pipe_fd[i]);
            pipe_fd[i] = -1;
        }
    pthread_mutex_unlock(&mu);
}

void nvmefs_forward_stats(unsigned long *out)
{
    out[0] = atomic_load(&st_forwarded);
    out[1] = atomic_load(&st_routed);
    out[2] = atomic_load(&st_unrouted);
}
