/* Hand-written C, not Cython output (that is _fuseshim.c, which is ignored).
 * See session_hook.h for what it does and why. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <errno.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>
#include <poll.h>
#include <fcntl.h>
#include <stdint.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <sys/eventfd.h>
#include <linux/fuse.h>

#include "session_hook.h"
#include "lane_engine.h"

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static nvmefs_fallocate_fn fallocate_handler;
static nvmefs_read_fn read_handler, orig_read;
static nvmefs_write_buf_fn write_buf_handler, orig_write_buf;
static atomic_int sessions_hooked, lane_sessions;
static void (*orig_init)(void *userdata, struct fuse_conn_info *conn);
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


/* ---- the lane thread ------------------------------------------------------
 *
 * With the thread armed, /dev/fuse has one reader: nvmefs_lane_loop(), run
 * by a Python thread.  READ and WRITE requests are dispatched there
 * (fuse_session_process_buf, which calls our read/write handlers with the
 * world lock held: see below).  Every other request -- and a read or write
 * the lane declines -- is handed to pyfuse3's own loop unchanged: its
 * fuse_session_fd() is a pipe that gets one byte per handed-over request,
 * and its fuse_session_receive_buf() takes the request's buffer from a
 * queue.  So pyfuse3 still sees every request the lane does not answer, in
 * arrival order, and answers it with its own handlers in its trio thread.
 *
 * The world lock makes the lane thread's work on the driver exclusive with
 * everything the trio thread runs: the trio thread holds it except while
 * it waits for I/O (a trio Instrument releases it in before_io_wait and
 * takes it back in after_io_wait; nvmefs/fuseshim.py).  The lane's Python
 * code therefore sees the driver between two trio scheduling steps, as it
 * did when it ran inside pyfuse3's dispatch, whatever the GIL switches.
 */

static int thread_armed;
static struct fuse_session *threaded_se;    /* the session whose /dev/fuse the lane thread reads */
static int fwd_pipe[2] = {-1, -1};
static int stop_fd = -1;
static atomic_int stopping;
static _Thread_local int tls_in_lane, tls_forward;
static atomic_ulong st_received, st_answered, st_forwarded, st_declined;
/* with an engine, reads and writes never go through libfuse in this
 * thread (see engine_loop()) */
static struct nvmefs_lane_engine *engine;

struct fwd {
    struct fwd *next;
    void *mem;
    size_t size;
};
static pthread_mutex_t fwd_mu = PTHREAD_MUTEX_INITIALIZER;
static struct fwd *fwd_head, *fwd_tail;

static pthread_mutex_t world_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t world_cv = PTHREAD_COND_INITIALIZER;
static int world_owner;         /* 0 free, 1 trio thread, 2 lane thread */
static int lane_wants, trio_wants;
/* set when the lane lets go while the trio thread waits: the lane may not
 * take the lock back before the trio thread has had it once (under load
 * the lane would otherwise win every time: it asks again within a
 * microsecond, and waking the trio thread takes tens) */
static int trio_turn;

typedef int (*session_fd_fn)(struct fuse_session *);
typedef int (*receive_buf_fn)(struct fuse_session *, struct fuse_buf *);
typedef void (*process_buf_fn)(struct fuse_session *, const struct fuse_buf *);

static void *next_symbol(const char *name)
{
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

static void real_process_buf(struct fuse_session *se, const struct fuse_buf *buf)
{
    static process_buf_fn f;
    if (f == NULL)
        f = (process_buf_fn)next_symbol("fuse_session_process_buf");
    f(se, buf);
}

void nvmefs_world_trio_acquire(void)
{
    pthread_mutex_lock(&world_mu);
    trio_wants = 1;
    /* a waiting lane goes first: its requests are short, and the trio
     * thread would otherwise take the lock back after every zero-timeout
     * I/O check of a busy loop and starve it */
    while (world_owner != 0 || (lane_wants && !trio_turn))
        pthread_cond_wait(&world_cv, &world_mu);
    trio_wants = 0;
    trio_turn = 0;
    world_owner = 1;
    pthread_mutex_unlock(&world_mu);
}

void nvmefs_world_trio_release(void)
{
    pthread_mutex_lock(&world_mu);
    world_owner = 0;
    if (lane_wants)
        pthread_cond_broadcast(&world_cv);
    pthread_mutex_unlock(&world_mu);
}

void nvmefs_world_lane_acquire(void)
{
    pthread_mutex_lock(&world_mu);
    lane_wants = 1;
    while (world_owner != 0 || trio_turn)
        pthread_cond_wait(&world_cv, &world_mu);
    lane_wants = 0;
    world_owner = 2;
    pthread_mutex_unlock(&world_mu);
}

void nvmefs_world_lane_release(void)
{
    pthread_mutex_lock(&world_mu);
    world_owner = 0;
    if (trio_wants) {
        trio_turn = 1;
        pthread_cond_broadcast(&world_cv);
    }
    pthread_mutex_unlock(&world_mu);
}

void nvmefs_lane_arm(int on)
{
    thread_armed = on;
}

int nvmefs_lane_threaded(void)
{
    return threaded_se != NULL;
}

void nvmefs_lane_set_engine(struct nvmefs_lane_engine *e)
{
    engine = e;
}

static void lane_init(void *userdata, struct fuse_conn_info *conn)
{
    if (orig_init != NULL)
        orig_init(userdata, conn);
    /* a spliced request's data sits in a pipe of the thread that read it:
     * it could not be handed to pyfuse3's thread */
    conn->want &= ~FUSE_CAP_SPLICE_READ;
    /* every request must fit the engine's receive buffers (the kernel
     * refuses a read() shorter than max_write plus the write headers);
     * the 4 KiB of header room is libfuse's FUSE_BUFFER_HEADER_SIZE */
    if (engine != NULL && conn->max_write > engine->bufsize - 4096)
        conn->max_write = engine->bufsize - 4096;
    /* the kernel's default of 12 background requests held QD32 libaio
     * below what the engine serves (A/B, 4 KiB randread QD32: 106-134k
     * IOPS at 12, 138-176k at 47) */
    if (engine != NULL)
        conn->max_background = engine->max_background;
}

static int lane_open(struct fuse_session *se)
{
    /* the write end non-blocking: a full pipe means pyfuse3's loop is gone */
    if (pipe2(fwd_pipe, O_CLOEXEC) != 0 || fcntl(fwd_pipe[1], F_SETFL, O_NONBLOCK) < 0)
        goto undo;
    stop_fd = eventfd(0, EFD_CLOEXEC);
    if (stop_fd < 0)
        goto undo;
    atomic_store(&st_received, 0);
    atomic_store(&st_answered, 0);
    atomic_store(&st_forwarded, 0);
    atomic_store(&st_declined, 0);
    atomic_store(&stopping, 0);
    threaded_se = se;
    return 0;
undo:
    for (int i = 0; i < 2; i++)
        if (fwd_pipe[i] >= 0) {
            close(fwd_pipe[i]);
            fwd_pipe[i] = -1;
        }
    return -1;
}

/* Answer a request we could not hand on (no memory, pyfuse3's loop gone),
 * straight on /dev/fuse: otherwise its caller would wait until unmount. */
static void answer_raw(int fd, uint64_t unique, int err)
{
    struct fuse_out_header out = {.len = sizeof out, .error = -err, .unique = unique};
    while (write(fd, &out, sizeof out) < 0 && errno == EINTR)
        ;
}

/* Hand a request's buffer (malloc'd, now owned here) to pyfuse3's loop.
 * 0, or -errno when it could not: the request was then answered with that
 * error, and the buffer freed. */
static int forward(int fuse_fd, void *mem, size_t size)
{
    const struct fuse_in_header *in = mem;
    struct fwd *f = malloc(sizeof *f);
    char one = 1;
    int err = 0;
    ssize_t n;
    if (f == NULL) {
        err = ENOMEM;
        goto fail;
    }
    f->next = NULL;
    f->mem = mem;
    f->size = size;
    pthread_mutex_lock(&fwd_mu);
    if (fwd_tail != NULL)
        fwd_tail->next = f;
    else
        fwd_head = f;
    fwd_tail = f;
    pthread_mutex_unlock(&fwd_mu);
    /* counted before pyfuse3 can see it (nvmefs stats reads these there) */
    atomic_fetch_add(&st_forwarded, 1);
    /* the byte after the record: a reader woken by it finds the record */
    while ((n = write(fwd_pipe[1], &one, 1)) < 0 && errno == EINTR)
        ;
    if (n == 1)
        return 0;
    /* 64 Ki requests waiting: pyfuse3's loop has stopped taking them */
    err = errno == EAGAIN ? EIO : errno;
    pthread_mutex_lock(&fwd_mu);        /* take the record back: it is the tail */
    struct fwd **pp = &fwd_head, *prev = NULL;
    while (*pp != f) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    *pp = NULL;
    fwd_tail = prev;
    pthread_mutex_unlock(&fwd_mu);
    atomic_fetch_sub(&st_forwarded, 1);
    free(f);
fail:
    if (in->opcode != FUSE_FORGET && in->opcode != FUSE_BATCH_FORGET)   /* these get no answer */
        answer_raw(fuse_fd, in->unique, err);
    free(mem);
    return -err;
}

int nvmefs_lane_decline(void)
{
    if (!tls_in_lane)
        return 0;
    tls_forward = 1;
    return 1;
}

/* ---- with the lane engine (_core/lane.pyx, lane_engine.h) ------------------
 *
 * The thread reads every request into one of the engine's receive buffers
 * (DMA memory: a write's data is where its command will read it from) and
 * offers reads, writes and interrupts to the engine, which submits at once
 * and answers on /dev/fuse when the completion comes; it reaps between
 * reads, so at queue depth N there are N commands at the controller, not
 * one.  A request the engine declines is copied out and handed to pyfuse3
 * as above.  Engine calls are made holding the world lock. */

/* Wait until /dev/fuse (want_fuse), a completion or the stop event needs
 * the thread; 0, or -errno. */
static int engine_wait(struct nvmefs_lane_engine *e, int fuse_fd, int want_fuse, int want_stop, int timeout_ms)
{
    struct pollfd p[3];
    int n = 0, busy, irq, r;
    uint64_t junk;

    nvmefs_world_lane_acquire();
    busy = e->in_flight(e->ctx);
    /* hybrid polling: a command usually completes within microseconds,
     * sooner than this thread would be woken */
    r = busy ? e->spin(e->ctx) : 0;
    irq = e->irq_fd(e->ctx);
    nvmefs_world_lane_release();
    if (r)
        return 0;
    if (busy && irq >= 0) {
        /* drain, then look once more: a completion posted after the look
         * signals the eventfd again, so the poll below cannot miss it */
        while (read(irq, &junk, sizeof junk) > 0)
            ;
        nvmefs_world_lane_acquire();
        r = e->reap(e->ctx);
        nvmefs_world_lane_release();
        if (r)
            return 0;
        p[n].fd = irq;
        p[n++].events = POLLIN;
    }
    if (want_fuse) {
        p[n].fd = fuse_fd;
        p[n++].events = POLLIN;
    }
    if (want_stop) {
        p[n].fd = stop_fd;
        p[n++].events = POLLIN;
    }
    if (busy && irq < 0) {
        /* a polled queue: nothing signals its completions, watch it */
        timeout_ms = 0;
        sched_yield();
    }
    if (poll(p, n, timeout_ms) < 0 && errno != EINTR)
        return -errno;
    return 0;
}

static int engine_loop(struct fuse_session *se, struct nvmefs_lane_engine *e, int fd)
{
    void *cur = NULL, *mem, *into;
    /* When every receive buffer is in flight (or lost to a reset that
     * never brought the controller back), requests are read into this
     * one: the engine cannot take them, pyfuse3 can (lookups, stats, the
     * general path's reads and writes), and waiting for a buffer instead
     * would stall them all behind commands that may never complete. */
    void *spare = malloc(e->bufsize);
    int err = 0, taken;
    ssize_t r;

    if (spare == NULL)
        return -ENOMEM;
    nvmefs_world_lane_acquire();
    e->bind(e->ctx, fd);
    nvmefs_world_lane_release();
    while (!atomic_load(&stopping)) {
        nvmefs_world_lane_acquire();
        e->reap(e->ctx);
        if (cur == NULL)
            cur = e->reserve(e->ctx);
        /* every buffer in flight: under load a completion frees one within
         * the spin window, sooner than pyfuse3 would serve the request */
        if (cur == NULL && e->in_flight(e->ctx) && e->spin(e->ctx)) {
            e->reap(e->ctx);
            cur = e->reserve(e->ctx);
        }
        nvmefs_world_lane_release();
        into = cur != NULL ? cur : spare;
        r = read(fd, into, e->bufsize);
        if (r < 0) {
            if (errno == EAGAIN) {
                if ((err = engine_wait(e, fd, 1, 1, -1)) < 0)
                    break;
                continue;
            }
            if (errno == EINTR || errno == ENOENT)     /* ENOENT: interrupted before we read it */
                continue;
            if (errno != ENODEV)
                err = -errno;
            else        /* unmounted: as libfuse's own receive does, or pyfuse3's workers never end */
                fuse_session_exit(se);
            break;
        }
        if ((size_t)r < sizeof(struct fuse_in_header)) {
            err = -EIO;             /* libfuse's "short read on fuse device" */
            break;
        }
        atomic_fetch_add(&st_received, 1);
        const struct fuse_in_header *in = into;
        if (in->opcode == FUSE_READ || in->opcode == FUSE_WRITE || in->opcode == FUSE_INTERRUPT) {
            nvmefs_world_lane_acquire();
            taken = e->offer(e->ctx, into, (size_t)r);
            nvmefs_world_lane_release();
            if (taken != NVMEFS_LANE_DECLINED) {
                if (taken == NVMEFS_LANE_TAKEN)
                    cur = NULL;
                atomic_fetch_add(&st_answered, 1);
                continue;
            }
            if (in->opcode != FUSE_INTERRUPT)
                atomic_fetch_add(&st_declined, 1);
        }
        /* pyfuse3 frees what it is given: a copy, the buffer stays ours */
        mem = malloc((size_t)r);
        if (mem == NULL) {
            if (in->opcode != FUSE_FORGET && in->opcode != FUSE_BATCH_FORGET)
                answer_raw(fd, in->unique, ENOMEM);
            continue;
        }
        memcpy(mem, into, (size_t)r);
        forward(fd, mem, (size_t)r);
    }
    /* The commands in flight still DMA into the buffers and their callers
     * wait for the answers: wait for them, within a bound (a controller
     * that stopped answering is the watchdog's business, and its thread
     * is joining this one). */
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        nvmefs_world_lane_acquire();
        e->reap(e->ctx);
        int busy = e->in_flight(e->ctx);
        if (cur != NULL) {
            e->unreserve(e->ctx, cur);
            cur = NULL;
        }
        nvmefs_world_lane_release();
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (!busy || now.tv_sec - t0.tv_sec >= 5)
            break;
        if (engine_wait(e, fd, 0, 0, 10) < 0)
            break;
    }
    /* answers of requests handed to trio after this (a drain that gave
     * up) must not reach whatever file reuses the fd number once libfuse
     * closes /dev/fuse */
    nvmefs_world_lane_acquire();
    e->bind(e->ctx, -1);
    nvmefs_world_lane_release();
    free(spare);
    return err;
}

int nvmefs_lane_loop(void)
{
    struct fuse_session *se = threaded_se;
    struct fuse_buf fbuf;
    struct pollfd p[2];
    int err = 0, r;

    if (se == NULL)
        return -EINVAL;     /* no pipe was ever handed to pyfuse3 */
    memset(&fbuf, 0, sizeof fbuf);
    p[0].fd = real_session_fd(se);
    p[0].events = POLLIN;
    p[1].fd = stop_fd;
    p[1].events = POLLIN;
    /* Non-blocking /dev/fuse (the session is mounted by now), so that
     * nvmefs_lane_stop() can end a thread that would otherwise sit in
     * read() until the next request: it polls only when there is nothing
     * to read (under load, one syscall per request).  Nobody else reads
     * this file description any more. */
    int fl = fcntl(p[0].fd, F_GETFL);
    if (fl < 0 || fcntl(p[0].fd, F_SETFL, fl | O_NONBLOCK) < 0)
        err = -errno;
    if (err == 0 && engine != NULL) {
        err = engine_loop(se, engine, p[0].fd);
        goto done;
    }
    tls_in_lane = 1;
    while (err == 0) {
        if (atomic_load(&stopping))
            break;
        r = real_receive_buf(se, &fbuf);
        if (r == -EAGAIN) {
            r = poll(p, 2, -1);
            if (r < 0 && errno != EINTR) {
                err = -errno;
                break;
            }
            if (r > 0 && p[1].revents)
                break;
            continue;
        }
        if (r == -EINTR)
            continue;
        if (r <= 0) {           /* 0: unmounted, or the session was told to exit */
            err = r;
            break;
        }
        atomic_fetch_add(&st_received, 1);
        if (fbuf.flags & FUSE_BUF_IS_FD) {     /* lane_init turned splice off: not expected */
            err = -EPROTO;
            break;
        }
        const struct fuse_in_header *in = fbuf.mem;
        if ((size_t)r >= sizeof *in && (in->opcode == FUSE_READ || in->opcode == FUSE_WRITE)) {
            nvmefs_world_lane_acquire();
            tls_forward = 0;
            real_process_buf(se, &fbuf);
            nvmefs_world_lane_release();
            if (!tls_forward) {
                atomic_fetch_add(&st_answered, 1);
                continue;
            }
            atomic_fetch_add(&st_declined, 1);
        }
        /* libfuse allocates a fresh buffer for the next request */
        forward(p[0].fd, fbuf.mem, (size_t)r);
        fbuf.mem = NULL;
    }
    tls_in_lane = 0;
    free(fbuf.mem);
done:
    /* end of file for pyfuse3's loop, once it has taken what is queued */
    close(fwd_pipe[1]);
    fwd_pipe[1] = -1;
    return err;
}

void nvmefs_lane_stop(void)
{
    uint64_t one = 1;
    atomic_store(&stopping, 1);
    if (stop_fd >= 0)
        while (write(stop_fd, &one, sizeof one) < 0 && errno == EINTR)
            ;
}

/* After the lane thread has ended and pyfuse3's loop with it. */
void nvmefs_lane_close(void)
{
    struct fwd *f;
    threaded_se = NULL;
    thread_armed = 0;
    while ((f = fwd_head) != NULL) {
        fwd_head = f->next;
        free(f->mem);
        free(f);
    }
    fwd_tail = NULL;
    for (int i = 0; i < 2; i++)
        if (fwd_pipe[i] >= 0) {
            close(fwd_pipe[i]);
            fwd_pipe[i] = -1;
        }
    if (stop_fd >= 0) {
        close(stop_fd);
        stop_fd = -1;
    }
}

void nvmefs_lane_stats(unsigned long *out)
{
    out[0] = atomic_load(&st_received);
    out[1] = atomic_load(&st_answered);
    out[2] = atomic_load(&st_declined);
    out[3] = atomic_load(&st_forwarded);
}

__attribute__((visibility("default")))
int fuse_session_fd(struct fuse_session *se)
{
    if (se != NULL && se == threaded_se)
        return fwd_pipe[0];
    return real_session_fd(se);
}

/* pyfuse3's loop reads here once fuse_session_fd() (the pipe) is readable. */
__attribute__((visibility("default")))
int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    struct fwd *f;
    char c;
    ssize_t n;
    size_t size;

    if (se == NULL || se != threaded_se)
        return real_receive_buf(se, buf);
    n = read(fwd_pipe[0], &c, 1);
    if (n == 0)
        return 0;               /* the lane thread has ended: unmounted */
    if (n < 0)
        return -errno;
    pthread_mutex_lock(&fwd_mu);
    f = fwd_head;
    if (f != NULL) {
        fwd_head = f->next;
        if (fwd_head == NULL)
            fwd_tail = NULL;
    }
    pthread_mutex_unlock(&fwd_mu);
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
        if (thread_armed) {
            orig_init = table.ops.init;
            table.ops.init = lane_init;
        }
    }
    /* a shorter table (older header) grows to ours, zero-filled */
    struct fuse_session *se = real(args, &table.ops, op_size > sizeof table.ops ? op_size : sizeof table.ops,
                                   userdata);
    if (se != NULL && thread_armed && table.ops.init == lane_init)
        lane_open(se);      /* on failure pyfuse3 reads /dev/fuse itself, as without the thread */
    return se;
}
