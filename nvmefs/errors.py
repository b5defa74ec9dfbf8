"""Exceptions of nvmefs, and the one converter from an NVMe completion status
to an exception (error_from_status).

The status table and its errno policy live in the Cython core
(_core/status.pyx); this module only dresses a decoded status with the
command's context.  nvmefs._core is imported lazily so that the exception
classes stay importable (and catchable) without the built extension.
"""

from __future__ import annotations

__all__ = [
    "ADMIN_OPCODES",
    "IO_OPCODES",
    "ControllerError",
    "NvmeError",
    "PrpLayoutError",
    "QueueBusy",
    "SglLayoutError",
    "UsageError",
    "error_from_status",
    "opcode_name",
    "unwrap",
]

ADMIN_OPCODES = {
    0x00: "Delete I/O SQ",
    0x01: "Create I/O SQ",
    0x02: "Get Log Page",
    0x04: "Delete I/O CQ",
    0x05: "Create I/O CQ",
    0x06: "Identify",
    0x08: "Abort",
    0x09: "Set Features",
    0x0A: "Get Features",
    0x0C: "Async Event Request",
    0x0D: "Namespace Management",
    0x15: "Namespace Attachment",
    0x7C: "Doorbell Buffer Config",
    0x80: "Format NVM",
}

IO_OPCODES = {
    0x00: "Flush",
    0x01: "Write",
    0x02: "Read",
    0x05: "Compare",
    0x08: "Write Zeroes",
    0x09: "Dataset Management",
}


def opcode_name(opcode: int, *, admin: bool = False) -> str:
    """The command's name; admin and I/O opcodes overlap, so say which."""
    table = ADMIN_OPCODES if admin else IO_OPCODES
    name = table.get(opcode)
    return name if name is not None else f"opcode 0x{opcode:02X}"


def os_text(exc):
    """An OSError's message without the "[Errno N]" prefix."""
    return exc.strerror if isinstance(exc, OSError) and exc.errno and exc.strerror else str(exc)


class ConnectFailed(Exception):
    """A remote controller could not be reached (exit status 1)."""


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def unwrap(exc):
    """The single real error inside trio's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class QueueBusy(Exception):
    """The submission queue is full or every command id is outstanding: reap
    completions, then submit again."""


class ControllerError(Exception):
    """The controller is fatal (CSTS.CFS), not answering, or timed out; it
    needs a reset.  Carries a one-line message."""


class PrpLayoutError(ValueError):
    """A buffer layout that cannot be expressed with PRPs."""


class SglLayoutError(ValueError):
    """A buffer layout that cannot be expressed with the controller's SGLs."""


class NvmeError(OSError):
    """A command completed with an error status.

    An OSError whose errno follows the status table, so a FUSE handler can
    pass ``exc.errno`` on as it is.  Built by error_from_status.
    """

    def __init__(self, errno: int, description: str, *, status: int, sct: int, sc: int,
                 name: str, dnr: bool = False, more: bool = False, crd: int = 0,
                 transient: bool = False, retryable: bool = False,
                 opcode: int | None = None, cid: int | None = None,
                 qid: int | None = None, nsid: int | None = None,
                 lba: int | None = None, admin: bool = False):
        super().__init__(errno, description)
        self.description = description
        self.status = status
        self.sct = sct
        self.sc = sc
        self.name = name
        self.dnr = dnr
        self.more = more
        self.crd = crd
        self.transient = transient
        self.retryable = retryable
        self.opcode = opcode
        self.cid = cid
        self.qid = qid
        self.nsid = nsid
        self.lba = lba
        self.admin = admin

    def _fields(self) -> dict:
        return {k: getattr(self, k) for k in (
            "status", "sct", "sc", "name", "dnr", "more", "crd", "transient", "retryable",
            "opcode", "cid", "qid", "nsid", "lba", "admin")}

    def __reduce__(self):
        # OSError's default reduce replays self.args, which lacks the
        # keyword-only fields, so unpickling would fail
        return (_rebuild_nvme_error, (type(self), self.errno, self.description, self._fields()))

    def __str__(self) -> str:
        flags = ""
        if self.dnr:
            flags += ", DNR"
        if self.more:
            flags += ", MORE"
        if self.crd:
            flags += f", CRD {self.crd}"
        ctx = []
        if self.opcode is not None:
            ctx.append(opcode_name(self.opcode, admin=self.admin))
        for label in ("qid", "cid", "nsid", "lba"):
            value = getattr(self, label)
            if value is not None:
                ctx.append(f"{label} {value}")
        where = f" on {' '.join(ctx)}" if ctx else ""
        return (f"nvme: {self.name} (SCT 0x{self.sct:X} SC 0x{self.sc:02X}{flags})"
                f"{where}: {self.description}")


def _rebuild_nvme_error(cls, errno, description, fields):
    return cls(errno, description, **fields)


def error_from_status(status16: int, *, opcode: int | None = None, cid: int | None = None,
                      qid: int | None = None, nsid: int | None = None,
                      lba: int | None = None, admin: bool | None = None) -> NvmeError:
    """The NvmeError for a CQE status field (nvme_cqe.status, phase bit 0
    included).  ``admin`` picks the opcode table; by default a command on
    queue 0, the admin queue, is an admin command.  Raises ValueError for a
    successful status: there is no error to convert."""
    from nvmefs._core import decode_status

    info = decode_status(status16)
    if info.success:
        raise ValueError(f"status 0x{status16:04X} is a successful completion, not an error")
    if admin is None:
        admin = qid == 0
    return NvmeError(
        info.errno, info.description, status=status16, sct=info.sct, sc=info.sc,
        name=info.name, dnr=info.dnr, more=info.more, crd=info.crd,
        transient=info.transient, retryable=info.retryable, opcode=opcode, cid=cid,
        qid=qid, nsid=nsid, lba=lba, admin=admin)
