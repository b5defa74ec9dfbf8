/* What the lanes (_core/lane.pyx) need from C that Cython cannot say:
 * single-producer single-consumer rings, the lane thread's start with its
 * CPU affinity, a caller's CPU mask, and the /dev/fuse channel clone.
 * Fences come from barrier.h, as everywhere else. */
#ifndef NVMEFS_LANE_SYS_H
#define NVMEFS_LANE_SYS_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/types.h>
#include <linux/fuse.h>

/* One producer thread, one consumer thread, fixed-size records.  head and
 * tail live on their own cache lines: the two sides never write the same
 * line.  The release store of tail publishes the record; the release
 * store of head gives the slot back. */
typedef struct {
    uint32_t head;                  /* consumer's */
    char pad0[60];
    uint32_t tail;                  /* producer's */
    char pad1[60];
    uint32_t mask;
    uint32_t esize;
    unsigned char *slots;
} lane_ring;

static inline int lane_ring_init(lane_ring *r, uint32_t capacity, uint32_t esize)
{
    uint32_t cap = 1;
    while (cap < capacity)
        cap <<= 1;
    memset(r, 0, sizeof *r);
    r->slots = calloc(cap, esize);
    if (r->slots == NULL)
        return -ENOMEM;
    r->mask = cap - 1;
    r->esize = esize;
    return 0;
}

static inline void lane_ring_free(lane_ring *r)
{
    free(r->slots);
    r->slots = NULL;
}

static inline int lane_ring_push(lane_ring *r, const void *e)
{
    uint32_t t = r->tail;
    if (t - __atomic_load_n(&r->head, __ATOMIC_ACQUIRE) > r->mask)
        return 0;
    memcpy(r->slots + (size_t)(t & r->mask) * r->esize, e, r->esize);
    __atomic_store_n(&r->tail, t + 1, __ATOMIC_RELEASE);
    return 1;
}

static inline int lane_ring_pop(lane_ring *r, void *e)
{
    uint32_t h = r->head;
    if (h == __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE))
        return 0;
    memcpy(e, r->slots + (size_t)(h & r->mask) * r->esize, r->esize);
    __atomic_store_n(&r->head, h + 1, __ATOMIC_RELEASE);
    return 1;
}

static inline int lane_ring_ready(lane_ring *r)
{
    return __atomic_load_n(&r->head, __ATOMIC_RELAXED) != __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
}

static inline uint32_t lane_load32(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline uint32_t lane_dec32(uint32_t *p)
{
    return __atomic_sub_fetch(p, 1, __ATOMIC_ACQ_REL);
}

static inline uint32_t lane_inc32(uint32_t *p)
{
    return __atomic_add_fetch(p, 1, __ATOMIC_ACQ_REL);
}

/* decrement *p unless that would take it to `floor` or below: 1 if it did */
static inline int lane_dec32_above(uint32_t *p, uint32_t floor)
{
    uint32_t v = __atomic_load_n(p, __ATOMIC_ACQUIRE);
    while (v > floor + 1)
        if (__atomic_compare_exchange_n(p, &v, v - 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 1;
    return 0;
}

static inline void lane_store32(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline uint64_t lane_load64(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void lane_store64(uint64_t *p, uint64_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline void lane_wake(int fd)
{
    uint64_t one = 1;
    while (write(fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

static inline void lane_drain(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof v) > 0)
        ;
}

/* A thread bound to one CPU (cpu < 0: anywhere).  0 or -errno. */
static inline int lane_thread_start(pthread_t *t, void *(*fn)(void *), void *arg, int cpu)
{
    pthread_attr_t attr;
    cpu_set_t set;
    int rc = pthread_attr_init(&attr);
    if (rc)
        return -rc;
    if (cpu >= 0 && cpu < CPU_SETSIZE) {
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        rc = pthread_attr_setaffinity_np(&attr, sizeof set, &set);
    }
    if (rc == 0)
        rc = pthread_create(t, &attr, fn, arg);
    pthread_attr_destroy(&attr);
    return -rc;
}

static inline int lane_thread_join(pthread_t t)
{
    return -pthread_join(t, NULL);
}

static inline int lane_current_cpu(void)
{
    return sched_getcpu();
}

/* Which lane should serve a request of thread ``tid``: the caller's own
 * when its CPU mask includes ``self_cpu``, else the first lane on a CPU
 * the caller may run on (lane_of_cpu[cpu], -1 for none); -1 for "here".
 * A thread that cannot be asked (gone, another pid namespace) is served
 * here. */
static inline int lane_route_tid(int tid, int self_cpu, const int16_t *lane_of_cpu, int ncpu)
{
    cpu_set_t set;
    int cpu;
    if (tid <= 0 || sched_getaffinity(tid, sizeof set, &set) != 0)
        return -1;
    if (self_cpu >= 0 && self_cpu < CPU_SETSIZE && CPU_ISSET(self_cpu, &set))
        return -1;
    for (cpu = 0; cpu < ncpu && cpu < CPU_SETSIZE; cpu++)
        if (CPU_ISSET(cpu, &set) && lane_of_cpu[cpu] >= 0)
            return lane_of_cpu[cpu];
    return -1;
}

/* A new channel of the FUSE connection behind ``session_fd``: the kernel
 * hands any pending request to whichever channel reads first, and takes a
 * reply only on the channel its request was read from. */
static inline int lane_fuse_clone(int session_fd)
{
    uint32_t src = (uint32_t)session_fd;
    int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -errno;
    if (ioctl(fd, FUSE_DEV_IOC_CLONE, &src) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

static inline int lane_eventfd(void)
{
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

#endif
