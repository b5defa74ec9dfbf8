# VFIO device access: a PCIe NVMe controller bound to vfio-pci.
#
# VfioDevice opens the container (/dev/vfio/vfio, type1v2 IOMMU), the
# device's IOMMU group and the device fd; maps BAR0 for true 32/64-bit
# register access (wrapped in a RegisterFile, so queue pairs ring doorbells
# on it exactly as on the model's); enables bus mastering in config space;
# maps a whole DmaArena once with VFIO_IOMMU_MAP_DMA at the arena's own bus
# addresses (never per I/O: type1 limits the number of mappings, 65535 by
# default); and routes MSI-X vectors to eventfds.  Cold path only: nothing
# here runs per command.  Errors name the fix (one line each).

from libc.errno cimport EACCES, ENOENT, EPERM, ENODEV, ENXIO
from vfio_sys cimport *
from posix.mman cimport MAP_FIXED

import os as _os

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2


cdef int _raise_errno(str what) except -1:
    # errno first: any Python call may overwrite it
    cdef int e = errno
    raise OSError(e, f"{what}: {_os.strerror(e)}")


def normalize_bdf(str bdf):
    """'3:00.0' / '03:00.0' / '0000:03:00.0' -> '0000:03:00.0'."""
    import re
    m = re.fullmatch(r"(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])", bdf.strip())
    if m is None:
        raise ValueError(f"'{bdf}' is not a PCI address (expected DOMAIN:BUS:DEVICE.FUNCTION, "
                         "e.g. 0000:03:00.0)")
    return f"{int(m.group(1) or '0', 16):04x}:{int(m.group(2), 16):02x}:{int(m.group(3), 16):02x}.{m.group(4)}"


def diagnose(str bdf, str sysfs="/sys"):
    """Why ``bdf`` cannot be opened with VFIO, as (errno, one-line message),
    or None when sysfs shows nothing wrong.  Checked before touching
    /dev/vfio so the common set-up mistakes get a message naming the fix."""
    dev = f"{sysfs}/bus/pci/devices/{bdf}"
    if not _os.path.exists(dev):
        return ENODEV, f"no PCI device {bdf} (see lspci -D)"
    drv = f"{dev}/driver"
    bind = (f"bind it to vfio-pci: echo vfio-pci > {dev}/driver_override; "
            f"echo {bdf} > {drv}/unbind; echo {bdf} > {sysfs}/bus/pci/drivers_probe")
    if _os.path.islink(drv):
        name = _os.path.basename(_os.readlink(drv))
        if name != "vfio-pci":
            return EBUSY, f"{bdf} is bound to driver {name}, not vfio-pci: {bind}"
    else:
        if not _os.path.exists(f"{sysfs}/bus/pci/drivers/vfio-pci"):
            return ENODEV, f"vfio-pci is not loaded: modprobe vfio-pci, then {bind}"
        return ENODEV, f"{bdf} is not bound to any driver: {bind}"
    if not _os.path.islink(f"{dev}/iommu_group"):
        return ENODEV, (f"{bdf} has no IOMMU group: enable the IOMMU "
                        "(kernel command line intel_iommu=on or amd_iommu=on)")
    return None


cdef class VfioDevice:
    """A PCI function bound to vfio-pci.  ``VfioDevice(bdf)``; ``close()``
    releases everything (also on garbage collection) so the device can be
    opened again at once."""
    cdef int container_fd
    cdef int group_fd
    cdef int device_fd
    cdef readonly str bdf
    cdef readonly int group
    cdef uint8_t *bar0
    cdef readonly size_t bar0_size
    cdef uint64_t config_offset
    cdef readonly uint32_t msix_count
    cdef list irq_fds
    cdef bint bar_mapped        # False after close(): bar0 is then anonymous memory
    cdef list mappings          # [(iova, size, arena)]

    def __cinit__(self):
        self.container_fd = -1
        self.group_fd = -1
        self.device_fd = -1
        self.bar0 = NULL
        self.irq_fds = []
        self.mappings = []

    def __init__(self, str bdf, str sysfs="/sys"):
        self.bdf = normalize_bdf(bdf)
        why = diagnose(self.bdf, sysfs)
        if why is not None:
            raise OSError(why[0], why[1])
        dev = f"{sysfs}/bus/pci/devices/{self.bdf}"
        self.group = int(_os.path.basename(_os.readlink(f"{dev}/iommu_group")))
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    cdef int _open(self) except -1:
        cdef vfio_group_status gs
        cdef vfio_device_info di
        cdef vfio_region_info ri
        cdef vfio_irq_info ii
        cdef bytes path
        cdef bytes cbdf = self.bdf.encode()
        cdef int e
        cdef void *p

        path = b"/dev/vfio/vfio"
        self.container_fd = c_open(path, O_RDWR | O_CLOEXEC)
        if self.container_fd < 0:
            e = errno
            if e == ENOENT:
                raise OSError(e, "/dev/vfio/vfio is missing: modprobe vfio-pci")
            if e == EACCES or e == EPERM:
                raise OSError(e, "permission denied on /dev/vfio/vfio: run as root or grant access to it")
            raise OSError(e, f"cannot open /dev/vfio/vfio: {_os.strerror(e)}")
        if ioctl(self.container_fd, VFIO_GET_API_VERSION) != VFIO_API_VERSION:
            raise OSError(EINVAL, "unknown VFIO API version")
        if ioctl(self.container_fd, VFIO_CHECK_EXTENSION, <unsigned long>VFIO_TYPE1v2_IOMMU) <= 0:
            raise OSError(EINVAL, "the kernel's VFIO has no type1v2 IOMMU: modprobe vfio_iommu_type1")

        path = f"/dev/vfio/{self.group}".encode()
        self.group_fd = c_open(path, O_RDWR | O_CLOEXEC)
        if self.group_fd < 0:
            e = errno
            if e == EACCES or e == EPERM:
                raise OSError(e, f"permission denied on /dev/vfio/{self.group}: run as root or grant "
                                 f"the group device (chown USER /dev/vfio/{self.group}; ulimit -l for DMA)")
            if e == EBUSY:
                raise OSError(e, f"IOMMU group {self.group} of {self.bdf} is in use by another process")
            if e == ENOENT:
                raise OSError(e, f"/dev/vfio/{self.group} is missing: bind {self.bdf} to vfio-pci")
            raise OSError(e, f"cannot open /dev/vfio/{self.group}: {_os.strerror(e)}")
        memset(&gs, 0, sizeof(gs))
        gs.argsz = sizeof(gs)
        if ioctl(self.group_fd, VFIO_GROUP_GET_STATUS, &gs) < 0:
            _raise_errno(f"VFIO_GROUP_GET_STATUS on group {self.group}")
        if not gs.flags & VFIO_GROUP_FLAGS_VIABLE:
            raise OSError(EBUSY, f"IOMMU group {self.group} is not viable: bind every device in "
                                 f"/sys/kernel/iommu_groups/{self.group}/devices to vfio-pci")
        if ioctl(self.group_fd, VFIO_GROUP_SET_CONTAINER, &self.container_fd) < 0:
            _raise_errno(f"VFIO_GROUP_SET_CONTAINER")
        if ioctl(self.container_fd, VFIO_SET_IOMMU, <unsigned long>VFIO_TYPE1v2_IOMMU) < 0:
            e = errno
            if e == EPERM:
                raise OSError(e, "VFIO_SET_IOMMU refused (EPERM): the IOMMU has no interrupt remapping; "
                                 "enable it (intremap) or load vfio_iommu_type1 allow_unsafe_interrupts=1")
            raise OSError(e, f"VFIO_SET_IOMMU: {_os.strerror(e)}")
        # the C ioctl: the argument is the device name, the result the new fd
        self.device_fd = ioctl(self.group_fd, VFIO_GROUP_GET_DEVICE_FD, <char *>cbdf)
        if self.device_fd < 0:
            _raise_errno(f"VFIO_GROUP_GET_DEVICE_FD {self.bdf}")

        memset(&di, 0, sizeof(di))
        di.argsz = sizeof(di)
        if ioctl(self.device_fd, VFIO_DEVICE_GET_INFO, &di) < 0:
            _raise_errno(f"VFIO_DEVICE_GET_INFO")
        if not di.flags & VFIO_DEVICE_FLAGS_PCI:
            raise OSError(EINVAL, f"{self.bdf} is not a PCI device")

        self._region(VFIO_PCI_CONFIG_REGION_INDEX, &ri)
        self.config_offset = ri.offset
        self._region(VFIO_PCI_BAR0_REGION_INDEX, &ri)
        if not ri.flags & VFIO_REGION_INFO_FLAG_MMAP or ri.size < 0x1000:
            raise OSError(EINVAL, f"BAR0 of {self.bdf} cannot be mapped (size {ri.size}, flags {ri.flags:#x})")
        p = mmap(NULL, ri.size, PROT_READ | PROT_WRITE, MAP_SHARED, self.device_fd, ri.offset)
        if p == MAP_FAILED:
            _raise_errno(f"mmap of BAR0")
        self.bar0 = <uint8_t *>p
        self.bar0_size = ri.size
        self.bar_mapped = True

        memset(&ii, 0, sizeof(ii))
        ii.argsz = sizeof(ii)
        ii.index = VFIO_PCI_MSIX_IRQ_INDEX
        if ioctl(self.device_fd, VFIO_DEVICE_GET_IRQ_INFO, &ii) < 0:
            _raise_errno(f"VFIO_DEVICE_GET_IRQ_INFO")
        self.msix_count = ii.count if ii.flags & VFIO_IRQ_INFO_EVENTFD else 0

        # memory decoding and bus mastering: vfio-pci leaves the latter off,
        # and without it every queue DMA of the controller is dropped
        cmd = self.config_read16(PCI_COMMAND)
        self.config_write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
        return 0

    cdef int _region(self, int index, vfio_region_info *ri) except -1:
        memset(ri, 0, sizeof(vfio_region_info))
        ri.argsz = sizeof(vfio_region_info)
        ri.index = index
        if ioctl(self.device_fd, VFIO_DEVICE_GET_REGION_INFO, ri) < 0:
            _raise_errno(f"VFIO_DEVICE_GET_REGION_INFO {index}")
        return 0

    cdef int _live(self) except -1:
        if self.device_fd < 0:
            raise ValueError(f"VFIO device {self.bdf} is closed")
        return 0

    # -- config space --------------------------------------------------------------

    def config_read(self, uint32_t off, uint32_t width):
        """A 1/2/4-byte little-endian read of PCI config space."""
        cdef uint32_t v = 0
        self._live()
        if width not in (1, 2, 4) or off % width:
            raise ValueError("config access width 1, 2 or 4, naturally aligned")
        if pread(self.device_fd, &v, width, self.config_offset + off) != width:
            _raise_errno(f"config read at {off:#x}")
        return v

    def config_write(self, uint32_t off, uint32_t width, uint32_t value):
        self._live()
        if width not in (1, 2, 4) or off % width:
            raise ValueError("config access width 1, 2 or 4, naturally aligned")
        if pwrite(self.device_fd, &value, width, self.config_offset + off) != width:
            _raise_errno(f"config write at {off:#x}")

    def config_read16(self, uint32_t off):
        return self.config_read(off, 2)

    def config_write16(self, uint32_t off, uint32_t value):
        self.config_write(off, 2, value)

    # -- BAR0 -------------------------------------------------------------------------

    @property
    def regs(self):
        """BAR0 as a RegisterFile (it keeps this object, and so the address
        range, alive; after close() it reads zeroes)."""
        self._live()
        return RegisterFile.wrap(self.bar0, self.bar0_size, self)

    # -- DMA -------------------------------------------------------------------------

    def map_arena(self, DmaArena arena not None):
        """Map the whole arena for device DMA at its bus addresses, once."""
        cdef vfio_iommu_type1_dma_map m
        self._live()
        # pinned pages must not become copy-on-write in a forked child
        madvise(arena.base, arena.size, MADV_DONTFORK)
        memset(&m, 0, sizeof(m))
        m.argsz = sizeof(m)
        m.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
        m.vaddr = <uintptr_t>arena.base
        m.iova = arena.iova_base
        m.size = arena.size
        if ioctl(self.container_fd, VFIO_IOMMU_MAP_DMA, &m) < 0:
            e = errno
            hint = " (raise ulimit -l or run as root)" if e == ENOMEM or e == EPERM else ""
            raise OSError(e, f"VFIO_IOMMU_MAP_DMA of {arena.size} bytes at IOVA {arena.iova_base:#x}: "
                             f"{_os.strerror(e)}{hint}")
        self.mappings.append((arena.iova_base, arena.size, arena))

    cdef int _unmap_all(self) noexcept:
        cdef vfio_iommu_type1_dma_unmap u
        cdef DmaArena arena
        for iova, size, a in self.mappings:
            memset(&u, 0, sizeof(u))
            u.argsz = sizeof(u)
            u.iova = iova
            u.size = size
            if self.container_fd >= 0:
                ioctl(self.container_fd, VFIO_IOMMU_UNMAP_DMA, &u)
            arena = a
            if arena.base != NULL:
                madvise(arena.base, arena.size, MADV_DOFORK)
        self.mappings = []
        return 0

    # -- MSI-X ------------------------------------------------------------------------

    def enable_msix(self, uint32_t count):
        """Route MSI-X vectors 0..count-1 to new non-blocking eventfds;
        returns the fds (owned by this device)."""
        cdef vfio_irq_set *s
        cdef size_t n
        cdef uint32_t i
        cdef int fd
        self._live()
        if count == 0 or count > self.msix_count:
            raise ValueError(f"{self.bdf} has {self.msix_count} MSI-X vectors, {count} asked")
        self.disable_msix()
        n = sizeof(vfio_irq_set) + count * sizeof(int32_t)
        s = <vfio_irq_set *>calloc(1, n)
        if s == NULL:
            raise MemoryError()
        try:
            for i in range(count):
                fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
                if fd < 0:
                    _raise_errno(f"eventfd")
                self.irq_fds.append(fd)
                (<int32_t *>s.data)[i] = fd
            s.argsz = <uint32_t>n
            s.flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
            s.index = VFIO_PCI_MSIX_IRQ_INDEX
            s.start = 0
            s.count = count
            if ioctl(self.device_fd, VFIO_DEVICE_SET_IRQS, s) < 0:
                _raise_errno(f"VFIO_DEVICE_SET_IRQS (MSI-X x{count})")
        except BaseException:
            self._close_irq_fds()
            raise
        finally:
            free(s)
        return list(self.irq_fds)

    def disable_msix(self):
        cdef vfio_irq_set s
        if self.irq_fds and self.device_fd >= 0:
            memset(&s, 0, sizeof(s))
            s.argsz = sizeof(s)
            s.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER
            s.index = VFIO_PCI_MSIX_IRQ_INDEX
            ioctl(self.device_fd, VFIO_DEVICE_SET_IRQS, &s)
        self._close_irq_fds()

    cdef _close_irq_fds(self):
        for fd in self.irq_fds:
            close(fd)
        self.irq_fds = []

    # -- release -----------------------------------------------------------------------

    @property
    def closed(self):
        return self.device_fd < 0

    def close(self):
        """Disable interrupts, unmap DMA and BAR0, close every fd (idempotent).
        The controller must already be shut down or disabled: after this
        the device can no longer reach the arena."""
        self.disable_msix()
        if self.device_fd >= 0:
            # stop the function from mastering the bus into memory we return
            try:
                cmd = self.config_read16(PCI_COMMAND)
                self.config_write16(PCI_COMMAND, cmd & ~PCI_COMMAND_MASTER)
            except OSError:
                pass
        self._unmap_all()
        if self.bar0 != NULL and self.bar_mapped:
            # RegisterFiles handed out may outlive the device: swap the BAR for
            # anonymous memory at the same address (a stale access reads
            # zeroes instead of faulting) and drop the mapping's hold on the
            # device file, so the device can be opened again at once
            if mmap(self.bar0, self.bar0_size, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED:
                munmap(self.bar0, self.bar0_size)
                self.bar0 = NULL
            self.bar_mapped = False
        if self.device_fd >= 0:
            close(self.device_fd)
            self.device_fd = -1
        if self.group_fd >= 0:
            close(self.group_fd)
            self.group_fd = -1
        if self.container_fd >= 0:
            close(self.container_fd)
            self.container_fd = -1

    def __dealloc__(self):
        cdef int fd
        if self.irq_fds is not None:        # GC may have cleared it already
            for fd in self.irq_fds:
                close(fd)
        if self.bar0 != NULL:
            munmap(self.bar0, self.bar0_size)
        # the kernel unmaps DMA and releases the group when the fds close
        if self.device_fd >= 0:
            close(self.device_fd)
        if self.group_fd >= 0:
            close(self.group_fd)
        if self.container_fd >= 0:
            close(self.container_fd)
