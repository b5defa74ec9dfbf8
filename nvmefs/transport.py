"""Transports: how the driver reaches a controller.

A transport is the small table of operations everything above the queue
pair uses (the SPDK transport-ops habit): register access on BAR0, the DMA
arena whose bus addresses go into commands, the interrupt eventfd of each
vector, and attaching a queue pair (doorbell wake-ups).  The in-process
model and VFIO (step 4) are two implementations; nothing above this file
knows which one it talks to.  NVMe over TCP (nvmefs/tcp.py) is the third:
a fabrics transport, which also creates and deletes I/O queues its own way
(a connection per queue instead of Create/Delete I/O SQ/CQ).
"""
import errno
import fcntl
import os

from nvmefs import _core, _model

# the admin opcodes that make and remove I/O queues on a PCIe controller
ADM_DELETE_SQ, ADM_CREATE_SQ, ADM_DELETE_CQ, ADM_CREATE_CQ = 0x00, 0x01, 0x04, 0x05


class Transport:
    """Interface.  Subclasses set ``arena``, ``regs`` and ``name``."""

    arena: "_core.DmaArena"
    regs: "_core.RegisterFile"
    name: str = "?"
    prefers_shadow_doorbells = False    # MMIO doorbells are cheap (plain memory for the model)
    fabrics = False                     # NVMe over Fabrics: SGLs for every command
    # seconds the transport may need to reach the controller before CAP.TO
    # starts to count (a fabrics transport reconnecting)
    ready_grace = 0.0

    def read32(self, off):
        return self.regs.read32(off)

    def read64(self, off):
        return self.regs.read64(off)

    def write32(self, off, value):
        self.regs.write32(off, value)

    def write64(self, off, value):
        self.regs.write64(off, value)

    def irq_fd(self, vector):
        """A non-blocking fd that becomes readable when ``vector`` fires."""
        raise NotImplementedError

    def max_vectors(self):
        raise NotImplementedError

    def attach(self, qp):
        """Called for every queue pair created on this transport."""

    async def create_io_queue(self, ctrl, q, ien):
        """Make I/O queue ``q`` (an IoQueue) exist on the controller: Create
        I/O CQ (interrupt vector = qid), then Create I/O SQ."""
        n = q.qp.entries
        await ctrl.admin(ADM_CREATE_CQ, cdw10=q.qid | ((n - 1) << 16),
                         cdw11=1 | (ien << 1) | (q.qid << 16), prp1=q.qp.cq_iova)
        await ctrl.admin(ADM_CREATE_SQ, cdw10=q.qid | ((n - 1) << 16),
                         cdw11=1 | (q.qid << 16), prp1=q.qp.sq_iova)

    async def delete_io_queue(self, ctrl, q):
        await ctrl.admin(ADM_DELETE_SQ, cdw10=q.qid)
        await ctrl.admin(ADM_DELETE_CQ, cdw10=q.qid)

    def interrupt(self):
        """Stop waiting for the controller to come back (the mount is going
        away): a reconnecting transport gives up at once."""

    def fault_reason(self):
        """Why the controller is unreachable, when the transport knows (a
        broken connection), else None."""
        return None

    def stats(self):
        """Transport counters for `nvmefs stats` ({} when there are none)."""
        return {}

    def close(self):
        raise NotImplementedError


class ModelTransport(Transport):
    """The built-in software controller (``_model.ControllerModel``) on a
    sparse image file, or in memory when ``image`` is None."""

    def __init__(self, image=None, *, namespaces=None, create=True,
                 arena_size=1 << 30, max_io_queues=64, dstrd=0, **model_kw):
        self._lock_fd = None
        if image is not None and os.path.exists(image):
            # one controller per image: a second daemon (or a CLI command
            # while mounted) must not run a second model on the same file
            self._lock_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                raise OSError(errno.EBUSY, "image is in use by another nvmefs process") from None
        if namespaces is None and (image is None or create and not os.path.exists(image)):
            namespaces = ((1 << 30, 512),)
        if namespaces is not None:
            model_kw["namespaces"] = namespaces
        try:
            self.arena = _core.DmaArena(arena_size)
            self.regs = _core.RegisterFile(0x1000 + 2 * (max_io_queues + 1) * (4 << dstrd))
            self.model = _model.ControllerModel(self.arena, self.regs, image=image,
                                               create=create, max_io_queues=max_io_queues, dstrd=dstrd,
                                               **model_kw)
            self._max_vectors = max_io_queues + 1
            self.name = (f"model:{image}" + (" (raw)" if self.model.raw else "")) if image else "model:memory"
            self._fds = {}
            self.model.start()
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise

    def write32(self, off, value):
        self.regs.write32(off, value)
        self.model.kick()

    def write64(self, off, value):
        self.regs.write64(off, value)
        self.model.kick()

    def irq_fd(self, vector):
        fd = self._fds.get(vector)
        if fd is None:
            fd = self.model.irq_fd(vector)
            os.set_blocking(fd, False)
            self._fds[vector] = fd
        return fd

    def max_vectors(self):
        return self._max_vectors

    def attach(self, qp):
        qp.set_notifier(*self.model.notifier())

    def close(self):
        self.model.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def open_transport(device=None, *, image=None, arena_size=None, tcp_options=None, **model_kw):
    """The transport a CLI ``--device`` names: ``vfio:BDF`` (or a bare PCI
    address) -> VfioTransport; ``nvme-tcp://HOST[:PORT]/SUBNQN`` ->
    TcpTransport (``tcp_options``: its keyword arguments); ``model`` / None
    -> ModelTransport on ``image`` (``model_kw``).  ``arena_size``: the DMA
    memory a VFIO device pins (it must hold every queue's bounce pool)."""
    if device in (None, "", "model"):
        return ModelTransport(image, **model_kw)
    if device.startswith("model:"):
        return ModelTransport(device[len("model:"):], **model_kw)
    if device.startswith("nvme-tcp:"):
        from nvmefs.tcp import TcpTransport
        return TcpTransport(device, **(tcp_options or {}))
    from nvmefs.vfio import DEFAULT_ARENA, VfioTransport
    bdf = device[len("vfio:"):] if device.startswith("vfio:") else device
    try:
        _core.normalize_bdf(bdf)
    except ValueError:
        raise ValueError(f"--device {device}: expected vfio:DOMAIN:BUS:DEV.FN (e.g. vfio:0000:03:00.0), "
                         "nvme-tcp://HOST[:PORT]/SUBNQN or model[:IMAGE]") from None
    return VfioTransport(bdf, arena_size=arena_size or DEFAULT_ARENA)
