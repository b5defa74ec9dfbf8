"""Transports: how the driver reaches a controller.

A transport is the small table of operations everything above the queue
pair uses (the SPDK transport-ops habit): register access on BAR0, the DMA
arena whose bus addresses go into commands, the interrupt eventfd of each
vector, and attaching a queue pair (doorbell wake-ups).  The in-process
model and VFIO (step 4) are two implementations; nothing above this file
knows which one it talks to.
"""
import errno
import fcntl
import os

from nvmefs import _core, _model


class Transport:
    """Interface.  Subclasses set ``arena``, ``regs`` and ``name``."""

    arena: "_core.DmaArena"
    regs: "_core.RegisterFile"
    name: str = "?"
    prefers_shadow_doorbells = False    # MMIO doorbells are cheap (plain memory for the model)

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
