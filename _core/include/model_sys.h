/* System and atomic helpers of the in-process controller model (model_*.pyx).
 * The model thread never touches Python objects; everything it calls is here
 * or in barrier.h. */
#ifndef NVMEFS_MODEL_SYS_H
#define NVMEFS_MODEL_SYS_H

#include <stdint.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <linux/falloc.h>

/* preadv/pwritev take at most IOV_MAX (1024 on Linux) vectors per call */
#define MDL_IOV_MAX 1024
/* the broadcast namespace id */
#define MDL_NSID_ALL 0xFFFFFFFFu

static inline int mdl_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void mdl_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int mdl_xchg_int(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }
static inline uint32_t mdl_load_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void mdl_store_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static inline void mdl_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* An "interrupt" or a kick: eventfd counters are 8-byte writes. */
static inline int mdl_eventfd_signal(int fd)
{
    uint64_t one = 1;
    return write(fd, &one, sizeof(one)) == (ssize_t)sizeof(one) ? 0 : -errno;
}

static inline void mdl_eventfd_drain(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof(v)) == (ssize_t)sizeof(v)) {}
}

/* Block until fd is readable or timeout_ms passed; -errno on failure. */
static inline int mdl_wait_readable(int fd, int timeout_ms)
{
    struct pollfd p = { .fd = fd, .events = POLLIN, .revents = 0 };
    int r = poll(&p, 1, timeout_ms);
    return r < 0 ? -errno : r;
}

static inline int mdl_errno(void) { return errno; }

static inline int mdl_clock_gettime_ns(int clk, uint64_t *ns)
{
    struct timespec ts;
    if (clock_gettime((clockid_t)clk, &ts) != 0)
        return -1;
    *ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    return 0;
}

/* Writes into an image go through its shared mapping (one memcpy; no system
 * call and no page cache lookup per page, which pwritev costs).  A page the
 * file system cannot back -- ENOSPC on a sparse image, an I/O error --
 * raises SIGBUS on the copying thread instead of returning an error.  The
 * guard turns that into -EFAULT for this copy; the caller then redoes the
 * transfer with pwritev, which reports the real errno as a status.
 * SA_NODEFER: the guard leaves the handler by siglongjmp without restoring
 * the signal mask (sigsetjmp(env, 0) saves none: no system call per copy),
 * so SIGBUS must not be blocked while the handler runs. */
static __thread sigjmp_buf *volatile mdl_bus_guard;
static struct sigaction mdl_bus_prev;
static pthread_once_t mdl_bus_once = PTHREAD_ONCE_INIT;

static void mdl_bus_handler(int sig, siginfo_t *si, void *uc)
{
    sigjmp_buf *g = mdl_bus_guard;
    (void)si; (void)uc;
    if (g) {
        mdl_bus_guard = NULL;
        siglongjmp(*g, 1);
    }
    /* Not a guarded copy: put the previous disposition back and return; the
     * faulting access runs again and reaches it (faulthandler, or the
     * default core dump). */
    sigaction(sig, &mdl_bus_prev, NULL);
}

static void mdl_bus_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = mdl_bus_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &mdl_bus_prev);
}

static inline void mdl_bus_guard_install(void) { pthread_once(&mdl_bus_once, mdl_bus_install); }

/* Copy the iovecs to dst, back to back; 0, or -EFAULT when the mapping
 * faulted (part of the data may have been written). */
static __attribute__((noinline)) int mdl_map_write(uint8_t *dst, const struct iovec *iov, uint32_t n)
{
    sigjmp_buf env;
    uint32_t i;
    if (sigsetjmp(env, 0))
        return -EFAULT;
    mdl_bus_guard = &env;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    for (i = 0; i < n; i++) {
        memcpy(dst, iov[i].iov_base, iov[i].iov_len);
        dst += iov[i].iov_len;
    }
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    mdl_bus_guard = NULL;
    return 0;
}

#endif
