"""The VFIO transport: a PCIe NVMe controller bound to vfio-pci.

Same operations as ``ModelTransport`` (nvmefs/transport.py), backed by
``_core.VfioDevice`` (_core/vfio.pyx): BAR0 is the register file the queue
pairs ring doorbells on, the DMA arena is mapped once for the device at its
own bus addresses, and each MSI-X vector is an eventfd the queue's trio task
waits on.  Shutting the controller down is the controller layer's job; close()
only releases what the transport holds, so the device can be reopened at once.
"""
import os

from nvmefs import _core
from nvmefs.transport import Transport

DEFAULT_ARENA = 128 << 20
DEFAULT_VECTORS = 65       # admin + 64 I/O queues; QEMU's default msix_qsize


class VfioTransport(Transport):
    """``VfioTransport("0000:03:00.0", arena_size=128 MiB, vectors=65)``."""

    # an MMIO doorbell write traps to the hypervisor on emulated/virtual
    # controllers: use Doorbell Buffer Config when the controller offers it
    prefers_shadow_doorbells = True

    def __init__(self, bdf, *, arena_size=DEFAULT_ARENA, vectors=DEFAULT_VECTORS, sysfs="/sys"):
        self.dev = None
        self.dev = _core.VfioDevice(bdf, sysfs)
        try:
            self.name = f"vfio:{self.dev.bdf}"
            self.arena = _core.DmaArena(arena_size)
            self.dev.map_arena(self.arena)
            self.regs = self.dev.regs
            n = min(vectors, self.dev.msix_count)
            if n < 2:
                raise OSError(f"{self.name}: {self.dev.msix_count} MSI-X vectors; at least 2 are needed "
                              "(admin queue and one I/O queue)")
            self._fds = self.dev.enable_msix(n)
        except BaseException:
            self.dev.close()
            raise

    def irq_fd(self, vector):
        try:
            return self._fds[vector]
        except IndexError:
            raise ValueError(f"{self.name}: no MSI-X vector {vector} "
                             f"({len(self._fds)} enabled)") from None

    def max_vectors(self):
        return len(self._fds)

    def attach(self, qp):
        pass                # a real controller needs no wake-up after doorbells

    def close(self):
        if self.dev is not None:
            self.dev.close()
            self._fds = []


def find_nvme_functions(sysfs="/sys"):
    """PCI addresses of every NVMe function (class 0x010802), sorted."""
    base = os.path.join(sysfs, "bus", "pci", "devices")
    out = []
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for bdf in names:
        try:
            with open(os.path.join(base, bdf, "class")) as f:
                if f.read().strip() == "0x010802":
                    out.append(bdf)
        except OSError:
            pass
    return sorted(out)


def arena_for(io_queues, bounce_bytes=16 << 20, extra=0):
    """DMA memory a controller with ``io_queues`` I/O queues needs: each
    queue's bounce pool, plus rings and per-command list pages (a few MiB a
    queue), plus ``extra`` (what the queues' owner brings: the lanes'
    buffers)."""
    return io_queues * (bounce_bytes + (8 << 20)) + (32 << 20) + extra
