/* Every memory-ordering primitive the driver uses, in one place (the SPDK
 * barrier.h habit).  NVMe ordering rules (NVME-NOTES.md, "Queue rules"):
 *  - an SQ entry must be globally visible before the doorbell store that
 *    publishes it: store-release on the doorbell (plus a full store fence,
 *    because the doorbell of a real device is uncached MMIO, where x86 needs
 *    sfence to order write-combining/non-temporal stores before it);
 *  - a CQ entry's body may be read only after its phase bit was seen:
 *    acquire fence between the phase load and the body loads. */
#ifndef NVMEFS_BARRIER_H
#define NVMEFS_BARRIER_H

#include <stdint.h>

static inline void nvmefs_wmb(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ volatile("sfence" ::: "memory");
#else
    __atomic_thread_fence(__ATOMIC_RELEASE);
#endif
}

static inline void nvmefs_rmb(void)
{
    /* x86 does not reorder loads with loads, so this is a compiler fence
     * there; on weaker architectures it emits the acquire barrier. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
}

/* Polite spinning: lets the sibling hyperthread (or the hypervisor) run. */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

static inline void nvmefs_mb(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* Doorbell store: fence, then a single 32-bit release store the compiler may
 * neither split nor move above the entry copy. */
static inline void nvmefs_doorbell_write(volatile uint32_t *db, uint32_t value)
{
    nvmefs_wmb();
    __atomic_store_n((uint32_t *)db, value, __ATOMIC_RELEASE);
}

static inline uint32_t nvmefs_load_acquire32(const volatile uint32_t *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
}

static inline uint16_t nvmefs_load_acquire16(const volatile uint16_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static inline void nvmefs_store_release32(volatile uint32_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
}

static inline void nvmefs_store_release16(volatile uint16_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

/* 64-bit registers (CAP, ASQ, ACQ) are single accesses on BAR0. */
static inline uint64_t nvmefs_load_acquire64(const volatile uint64_t *p)
{
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE);
}

static inline void nvmefs_store_release64(volatile uint64_t *p, uint64_t v)
{
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
}

#endif
