# C declarations for the VFIO transport (_core/vfio.pyx): <linux/vfio.h>
# (package linux-libc-dev), ioctl, eventfd, pread/pwrite.  Kept apart from the
# logic (STYLE.md: C declarations apart from logic).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char *path, int flags, ...)
    int O_RDWR
    int O_CLOEXEC

cdef extern from "<sys/types.h>" nogil:
    ctypedef long off_t
    ctypedef long ssize_t

cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, off_t offset)
    ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)

cdef extern from "<sys/mman.h>" nogil:
    int MAP_SHARED
    int MADV_DONTFORK
    int MADV_DOFORK
    int madvise(void *addr, size_t length, int advice)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

cdef extern from "<linux/vfio.h>" nogil:
    int VFIO_API_VERSION
    int VFIO_TYPE1v2_IOMMU
    unsigned long VFIO_GET_API_VERSION
    unsigned long VFIO_CHECK_EXTENSION
    unsigned long VFIO_SET_IOMMU
    unsigned long VFIO_GROUP_GET_STATUS
    unsigned long VFIO_GROUP_SET_CONTAINER
    unsigned long VFIO_GROUP_UNSET_CONTAINER
    unsigned long VFIO_GROUP_GET_DEVICE_FD
    unsigned long VFIO_DEVICE_GET_INFO
    unsigned long VFIO_DEVICE_GET_REGION_INFO
    unsigned long VFIO_DEVICE_GET_IRQ_INFO
    unsigned long VFIO_DEVICE_SET_IRQS
    unsigned long VFIO_DEVICE_RESET
    unsigned long VFIO_IOMMU_MAP_DMA
    unsigned long VFIO_IOMMU_UNMAP_DMA

    uint32_t VFIO_GROUP_FLAGS_VIABLE
    uint32_t VFIO_DEVICE_FLAGS_PCI
    uint32_t VFIO_DEVICE_FLAGS_RESET
    uint32_t VFIO_REGION_INFO_FLAG_READ
    uint32_t VFIO_REGION_INFO_FLAG_WRITE
    uint32_t VFIO_REGION_INFO_FLAG_MMAP
    uint32_t VFIO_IRQ_INFO_EVENTFD
    uint32_t VFIO_IRQ_SET_DATA_NONE
    uint32_t VFIO_IRQ_SET_DATA_EVENTFD
    uint32_t VFIO_IRQ_SET_ACTION_TRIGGER
    uint32_t VFIO_DMA_MAP_FLAG_READ
    uint32_t VFIO_DMA_MAP_FLAG_WRITE
    int VFIO_PCI_BAR0_REGION_INDEX
    int VFIO_PCI_CONFIG_REGION_INDEX
    int VFIO_PCI_MSIX_IRQ_INDEX

    struct vfio_group_status:
        uint32_t argsz
        uint32_t flags

    struct vfio_device_info:
        uint32_t argsz
        uint32_t flags
        uint32_t num_regions
        uint32_t num_irqs

    struct vfio_region_info:
        uint32_t argsz
        uint32_t flags
        uint32_t index
        uint32_t cap_offset
        uint64_t size
        uint64_t offset

    struct vfio_irq_info:
        uint32_t argsz
        uint32_t flags
        uint32_t index
        uint32_t count

    struct vfio_irq_set:
        uint32_t argsz
        uint32_t flags
        uint32_t index
        uint32_t start
        uint32_t count
        uint8_t data[0]

    struct vfio_iommu_type1_dma_map:
        uint32_t argsz
        uint32_t flags
        uint64_t vaddr
        uint64_t iova
        uint64_t size

    struct vfio_iommu_type1_dma_unmap:
        uint32_t argsz
        uint32_t flags
        uint64_t iova
        uint64_t size
