# Memory-ordering helpers (barrier.h). All fences of the driver are here.
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "barrier.h" nogil:
    void nvmefs_wmb()
    void nvmefs_rmb()
    void nvmefs_mb()
    void cpu_relax()
    void nvmefs_doorbell_write(volatile uint32_t *db, uint32_t value)
    uint32_t nvmefs_load_acquire32(const volatile uint32_t *p)
    uint16_t nvmefs_load_acquire16(const volatile uint16_t *p)
    void nvmefs_store_release32(volatile uint32_t *p, uint32_t v)
    void nvmefs_store_release16(volatile uint16_t *p, uint16_t v)
    uint64_t nvmefs_load_acquire64(const volatile uint64_t *p)
    void nvmefs_store_release64(volatile uint64_t *p, uint64_t v)

cdef extern from "clock.h" nogil:
    uint64_t nvmefs_now_ns()
