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

#endif
