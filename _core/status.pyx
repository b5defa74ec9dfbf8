# NVMe completion status decoding (NVME-NOTES.md "Status codes"; NVMe Base
# 2.0 "Status Field Definition" and the NVM Command Set's status values).
#
# One static C table, filled once at module init, plus an [SCT][SC] index so
# the lookup is O(1) and nogil.  Python sees decode_status / status_table /
# make_status; nvmefs/errors.py is the one place that turns a status into an
# exception.
#
# errno policy: Linux nvme_error_status() where it reads well to a userspace
# caller, otherwise the clearer errno; every departure is commented at its
# row.  "transient" is this driver's retry policy: a retry (after the CRD
# delay) may succeed when DNR is clear.  Host bugs, media errors and
# conditions that need a reset, a reconnect or another path are not
# transient, whatever DNR says.

from libc.stdint cimport uint8_t, uint16_t
from libc.string cimport memset
cimport libc.errno as _cerr

cdef extern from "<errno.h>":
    # missing from Cython's libc/errno.pxd; prefixed so it cannot clash with
    # a name cimported by _core.pyx or another included file
    enum: _STATUS_ECANCELED "ECANCELED"

cdef struct nvme_status_row:
    uint8_t sct
    uint8_t sc
    const char *name
    const char *desc
    int err
    bint transient

cdef enum:
    STATUS_TABLE_CAP = 128

cdef nvme_status_row _status_rows[STATUS_TABLE_CAP]
cdef int _status_nrows = 0
# row number + 1 per (SCT, SC); 0 means not in the table
cdef uint8_t _status_index[8][256]


# Status field of the CQE (DW3 bits 31:16 seen as the 16-bit nvme_cqe.status):
# P bit 0, SC bits 8:1, SCT bits 11:9, CRD bits 13:12, M bit 14, DNR bit 15.

# the inline field accessors (status_sc, status_pack, ...): nvmefs/_core.pxd
@cython.linetrace(False)
@cython.profile(False)
cdef int status_lookup(uint8_t sct, uint8_t sc, const char **name, const char **desc,
                       int *err, bint *transient) noexcept nogil:
    """1 and the row's fields if (sct, sc) is known; 0 and defaults (EIO, not
    transient) if not.  Any out pointer may be NULL."""
    cdef uint8_t i = _status_index[sct & 0x7][sc]
    cdef const nvme_status_row *r
    if i != 0:
        r = &_status_rows[i - 1]
        if name != NULL:
            name[0] = r.name
        if desc != NULL:
            desc[0] = r.desc
        if err != NULL:
            err[0] = r.err
        if transient != NULL:
            transient[0] = r.transient
        return 1
    if name != NULL:
        name[0] = b"VENDOR_SPECIFIC" if sct == 7 else b"UNKNOWN"
    if desc != NULL:
        desc[0] = b"Vendor Specific Status" if sct == 7 else b"Unknown Status Code"
    if err != NULL:
        err[0] = _cerr.EIO
    if transient != NULL:
        transient[0] = False
    return 0


cdef int _status_add(uint8_t sct, uint8_t sc, const char *name, const char *desc,
                     int err, bint transient) except -1:
    global _status_nrows
    if _status_nrows >= STATUS_TABLE_CAP:
        raise RuntimeError("status table full: raise STATUS_TABLE_CAP")
    if sct > 7 or _status_index[sct][sc] != 0:
        raise RuntimeError(f"status table: bad or duplicate SCT {sct} SC 0x{sc:02X}")
    _status_rows[_status_nrows] = nvme_status_row(sct, sc, name, desc, err, transient)
    _status_nrows += 1
    _status_index[sct][sc] = <uint8_t>_status_nrows
    return 0


cdef int _status_init() except -1:
    global _status_nrows
    cdef int EAGAIN_ = _cerr.EAGAIN, EINVAL_ = _cerr.EINVAL, EIO_ = _cerr.EIO
    cdef int CANCELED = _STATUS_ECANCELED
    memset(_status_index, 0, sizeof(_status_index))
    _status_nrows = 0

    # --- SCT 0: generic command status ---
    _status_add(0, 0x00, b"SUCCESS", b"Successful Completion", 0, False)
    _status_add(0, 0x01, b"INVALID_OPCODE", b"Invalid Command Opcode", _cerr.EOPNOTSUPP, False)
    _status_add(0, 0x02, b"INVALID_FIELD", b"Invalid Field in Command", EINVAL_, False)
    # our CID allocator handed out a live id: a host bug, the same id collides again
    _status_add(0, 0x03, b"COMMAND_ID_CONFLICT", b"Command ID Conflict", _cerr.EBUSY, False)
    _status_add(0, 0x04, b"DATA_TRANSFER_ERROR", b"Data Transfer Error", EIO_, True)
    # the controller is losing power: recovery is a reset, not a resubmission
    _status_add(0, 0x05, b"ABORTED_POWER_LOSS",
                b"Commands Aborted due to Power Loss Notification", CANCELED, False)
    _status_add(0, 0x06, b"INTERNAL_ERROR", b"Internal Error", EIO_, True)
    # the host asked for this abort (normally its timeout path), so whether to
    # resubmit is that caller's decision, not a blind retry
    _status_add(0, 0x07, b"ABORT_REQUESTED", b"Command Abort Requested", CANCELED, False)
    # queue teardown (reset, shutdown): the command may go again on a live queue
    _status_add(0, 0x08, b"ABORTED_SQ_DELETION", b"Command Aborted due to SQ Deletion",
                CANCELED, True)
    _status_add(0, 0x09, b"ABORTED_FAILED_FUSED",
                b"Command Aborted due to Failed Fused Command", CANCELED, False)
    _status_add(0, 0x0A, b"ABORTED_MISSING_FUSED",
                b"Command Aborted due to Missing Fused Command", EINVAL_, False)
    # Linux says EOPNOTSUPP; ENODEV tells a userspace caller that the namespace
    # (NSID) is not there, rather than that the operation is unsupported
    _status_add(0, 0x0B, b"INVALID_NAMESPACE_OR_FORMAT", b"Invalid Namespace or Format",
                _cerr.ENODEV, False)
    _status_add(0, 0x0C, b"COMMAND_SEQUENCE_ERROR", b"Command Sequence Error", _cerr.EPROTO, False)
    _status_add(0, 0x0D, b"INVALID_SGL_SEGMENT_DESCRIPTOR", b"Invalid SGL Segment Descriptor",
                EINVAL_, False)
    _status_add(0, 0x0E, b"INVALID_SGL_DESCRIPTOR_COUNT", b"Invalid Number of SGL Descriptors",
                EINVAL_, False)
    _status_add(0, 0x0F, b"DATA_SGL_LENGTH_INVALID", b"Data SGL Length Invalid", EINVAL_, False)
    _status_add(0, 0x10, b"METADATA_SGL_LENGTH_INVALID", b"Metadata SGL Length Invalid",
                EINVAL_, False)
    _status_add(0, 0x11, b"SGL_DESCRIPTOR_TYPE_INVALID", b"SGL Descriptor Type Invalid",
                EINVAL_, False)
    _status_add(0, 0x12, b"INVALID_CMB_USE", b"Invalid Use of Controller Memory Buffer",
                EINVAL_, False)
    _status_add(0, 0x13, b"PRP_OFFSET_INVALID", b"PRP Offset Invalid", EINVAL_, False)
    _status_add(0, 0x14, b"ATOMIC_WRITE_UNIT_EXCEEDED", b"Atomic Write Unit Exceeded",
                EINVAL_, False)
    _status_add(0, 0x15, b"OPERATION_DENIED", b"Operation Denied", _cerr.EPERM, False)
    _status_add(0, 0x16, b"SGL_OFFSET_INVALID", b"SGL Offset Invalid", EINVAL_, False)
    # 0x17 reserved
    _status_add(0, 0x18, b"HOST_ID_INCONSISTENT_FORMAT", b"Host Identifier Inconsistent Format",
                EINVAL_, False)
    # fabrics: the association is gone, recovery is a reconnect
    _status_add(0, 0x19, b"KEEP_ALIVE_EXPIRED", b"Keep Alive Timer Expired",
                _cerr.ETIMEDOUT, False)
    _status_add(0, 0x1A, b"KEEP_ALIVE_INVALID", b"Keep Alive Timeout Invalid", EINVAL_, False)
    # another host preempted our reservation: a retry meets a reservation conflict
    _status_add(0, 0x1B, b"ABORTED_PREEMPT_ABORT", b"Command Aborted due to Preempt and Abort",
                CANCELED, False)
    _status_add(0, 0x1C, b"SANITIZE_FAILED", b"Sanitize Failed", EIO_, False)
    _status_add(0, 0x1D, b"SANITIZE_IN_PROGRESS", b"Sanitize In Progress", _cerr.EBUSY, True)
    _status_add(0, 0x1E, b"SGL_DATA_BLOCK_GRANULARITY_INVALID",
                b"SGL Data Block Granularity Invalid", EINVAL_, False)
    _status_add(0, 0x1F, b"COMMAND_UNSUPPORTED_FOR_CMB_QUEUE",
                b"Command Not Supported for Queue in CMB", _cerr.EOPNOTSUPP, False)
    _status_add(0, 0x20, b"NAMESPACE_WRITE_PROTECTED", b"Namespace is Write Protected",
                _cerr.EROFS, False)
    # the spec's own "try again" codes (Base 2.0: host should retry)
    _status_add(0, 0x21, b"COMMAND_INTERRUPTED", b"Command Interrupted", EAGAIN_, True)
    _status_add(0, 0x22, b"TRANSIENT_TRANSPORT_ERROR", b"Transient Transport Error",
                EAGAIN_, True)
    _status_add(0, 0x23, b"PROHIBITED_BY_LOCKDOWN",
                b"Command Prohibited by Command and Feature Lockdown", _cerr.EPERM, False)
    # CC.CRIME: media becomes ready later; the controller sets DNR once CRTO expires
    _status_add(0, 0x24, b"ADMIN_MEDIA_NOT_READY", b"Admin Command Media Not Ready",
                EAGAIN_, True)
    # 0x80-0xBF: NVM command set specific generic status
    # Linux: BLK_STS_TARGET (EREMOTEIO); ERANGE names the actual problem
    _status_add(0, 0x80, b"LBA_OUT_OF_RANGE", b"LBA Out of Range", _cerr.ERANGE, False)
    _status_add(0, 0x81, b"CAPACITY_EXCEEDED", b"Capacity Exceeded", _cerr.ENOSPC, False)
    _status_add(0, 0x82, b"NAMESPACE_NOT_READY", b"Namespace Not Ready", EAGAIN_, True)
    # EBADE as Linux (BLK_STS_RESV_CONFLICT) and SCSI report it: reservation
    # holders test for exactly this errno
    _status_add(0, 0x83, b"RESERVATION_CONFLICT", b"Reservation Conflict", _cerr.EBADE, False)
    _status_add(0, 0x84, b"FORMAT_IN_PROGRESS", b"Format In Progress", _cerr.EBUSY, True)

    # --- SCT 1: command specific status (meaning depends on the opcode) ---
    # queue creation/deletion errors are driver bugs or exhausted controller
    # resources: never transient
    _status_add(1, 0x00, b"COMPLETION_QUEUE_INVALID", b"Completion Queue Invalid", EINVAL_, False)
    _status_add(1, 0x01, b"INVALID_QUEUE_ID", b"Invalid Queue Identifier", EINVAL_, False)
    _status_add(1, 0x02, b"INVALID_QUEUE_SIZE", b"Invalid Queue Size", EINVAL_, False)
    # the host exceeded Identify ACL / AERL: a host bug, not a passing state
    _status_add(1, 0x03, b"ABORT_LIMIT_EXCEEDED", b"Abort Command Limit Exceeded",
                _cerr.EBUSY, False)
    # 0x04 reserved
    _status_add(1, 0x05, b"ASYNC_EVENT_LIMIT_EXCEEDED",
                b"Asynchronous Event Request Limit Exceeded", _cerr.EBUSY, False)
    _status_add(1, 0x06, b"INVALID_FIRMWARE_SLOT", b"Invalid Firmware Slot", EINVAL_, False)
    _status_add(1, 0x07, b"INVALID_FIRMWARE_IMAGE", b"Invalid Firmware Image", EINVAL_, False)
    _status_add(1, 0x08, b"INVALID_INTERRUPT_VECTOR", b"Invalid Interrupt Vector", EINVAL_, False)
    _status_add(1, 0x09, b"INVALID_LOG_PAGE", b"Invalid Log Page", EINVAL_, False)
    _status_add(1, 0x0A, b"INVALID_FORMAT", b"Invalid Format", EINVAL_, False)
    # 0x0B and 0x10-0x13 (firmware activation outcomes) left out: this driver
    # never commits firmware; they decode as SCT1_SC0xNN / EIO
    _status_add(1, 0x0C, b"INVALID_QUEUE_DELETION", b"Invalid Queue Deletion", EINVAL_, False)
    _status_add(1, 0x0D, b"FEATURE_NOT_SAVEABLE", b"Feature Identifier Not Saveable",
                EINVAL_, False)
    _status_add(1, 0x0E, b"FEATURE_NOT_CHANGEABLE", b"Feature Not Changeable", _cerr.EPERM, False)
    _status_add(1, 0x0F, b"FEATURE_NOT_NAMESPACE_SPECIFIC", b"Feature Not Namespace Specific",
                EINVAL_, False)
    # Namespace Management / Attachment (the only commands that use 0x15-0x1C here)
    _status_add(1, 0x15, b"NAMESPACE_INSUFFICIENT_CAPACITY", b"Namespace Insufficient Capacity",
                _cerr.ENOSPC, False)
    _status_add(1, 0x16, b"NAMESPACE_ID_UNAVAILABLE", b"Namespace Identifier Unavailable",
                _cerr.ENOSPC, False)
    _status_add(1, 0x18, b"NAMESPACE_ALREADY_ATTACHED", b"Namespace Already Attached",
                _cerr.EEXIST, False)
    _status_add(1, 0x19, b"NAMESPACE_IS_PRIVATE", b"Namespace Is Private", _cerr.EPERM, False)
    _status_add(1, 0x1A, b"NAMESPACE_NOT_ATTACHED", b"Namespace Not Attached", EINVAL_, False)
    _status_add(1, 0x1B, b"THIN_PROVISIONING_NOT_SUPPORTED", b"Thin Provisioning Not Supported",
                _cerr.EOPNOTSUPP, False)
    _status_add(1, 0x1C, b"CONTROLLER_LIST_INVALID", b"Controller List Invalid", EINVAL_, False)
    # 0x80-0xBF: NVM command set (Read, Write, Compare, Write Zeroes, DSM)
    _status_add(1, 0x80, b"CONFLICTING_ATTRIBUTES", b"Conflicting Attributes", EINVAL_, False)
    # a PRINFO field the namespace cannot honour: a command field error, not a
    # failed check (that is SCT 2 0x82-0x84)
    _status_add(1, 0x81, b"INVALID_PROTECTION_INFO", b"Invalid Protection Information",
                EINVAL_, False)
    _status_add(1, 0x82, b"WRITE_TO_READ_ONLY_RANGE", b"Attempted Write to Read Only Range",
                _cerr.EROFS, False)

    # --- SCT 2: media and data integrity errors ---
    # Linux gives BLK_STS_MEDIUM (ENODATA) / BLK_STS_PROTECTION (EILSEQ); here
    # every media and end-to-end failure is EIO, so that EILSEQ means exactly
    # one thing to a Compare caller: the data did not match
    _status_add(2, 0x80, b"WRITE_FAULT", b"Write Fault", EIO_, False)
    _status_add(2, 0x81, b"UNRECOVERED_READ_ERROR", b"Unrecovered Read Error", EIO_, False)
    _status_add(2, 0x82, b"E2E_GUARD_CHECK_ERROR", b"End-to-end Guard Check Error", EIO_, False)
    _status_add(2, 0x83, b"E2E_APP_TAG_CHECK_ERROR", b"End-to-end Application Tag Check Error",
                EIO_, False)
    _status_add(2, 0x84, b"E2E_REF_TAG_CHECK_ERROR", b"End-to-end Reference Tag Check Error",
                EIO_, False)
    _status_add(2, 0x85, b"COMPARE_FAILURE", b"Compare Failure", _cerr.EILSEQ, False)
    _status_add(2, 0x86, b"ACCESS_DENIED", b"Access Denied", _cerr.EACCES, False)
    _status_add(2, 0x87, b"DEALLOCATED_OR_UNWRITTEN_BLOCK",
                b"Deallocated or Unwritten Logical Block", EIO_, False)
    _status_add(2, 0x88, b"E2E_STORAGE_TAG_CHECK_ERROR", b"End-to-End Storage Tag Check Error",
                EIO_, False)

    # --- SCT 3: path related status ---
    # Linux fails these over to another path; with one path a delayed retry on
    # the same controller is the only failover there is
    _status_add(3, 0x00, b"INTERNAL_PATH_ERROR", b"Internal Path Error", EAGAIN_, True)
    # "persistent": the spec sends the host to a different controller, and
    # this driver has no other
    _status_add(3, 0x01, b"ANA_PERSISTENT_LOSS", b"Asymmetric Access Persistent Loss",
                EIO_, False)
    _status_add(3, 0x02, b"ANA_INACCESSIBLE", b"Asymmetric Access Inaccessible", EAGAIN_, True)
    _status_add(3, 0x03, b"ANA_TRANSITION", b"Asymmetric Access Transition", EAGAIN_, True)
    _status_add(3, 0x60, b"CONTROLLER_PATHING_ERROR", b"Controller Pathing Error", EAGAIN_, True)
    _status_add(3, 0x70, b"HOST_PATHING_ERROR", b"Host Pathing Error", EAGAIN_, True)
    _status_add(3, 0x71, b"ABORTED_BY_HOST", b"Command Aborted By Host", EAGAIN_, True)
    # SCT 4-6 reserved, SCT 7 vendor specific: never in the table
    return 0


_status_init()


import collections as _collections

StatusInfo = _collections.namedtuple(
    "StatusInfo",
    "sct sc crd more dnr name description errno transient retryable success")
StatusInfo.__doc__ = (
    "A decoded NVMe completion status.  retryable = not success and transient "
    "and not dnr; success = SCT 0 and SC 0 (CRD, M and DNR do not matter then).")


def decode_status(int status16):
    """Decode the 16-bit CQE status field (phase bit 0 included and ignored)
    into a StatusInfo.  Unknown codes get a synthetic name (SCT{n}_SC0xNN, or
    VENDOR_SPECIFIC_0xNN for SCT 7) and EIO."""
    if status16 < 0 or status16 > 0xFFFF:
        raise ValueError(f"status {status16:#x} is not a 16-bit value")
    cdef uint16_t s = <uint16_t>status16
    cdef uint8_t sct = status_sct(s), sc = status_sc(s)
    cdef const char *name
    cdef const char *desc
    cdef int err
    cdef bint transient
    cdef bint dnr = status_dnr(s)
    cdef bint success = sct == 0 and sc == 0
    if status_lookup(sct, sc, &name, &desc, &err, &transient):
        py_name = name.decode("ascii")
    elif sct == 7:
        py_name = f"VENDOR_SPECIFIC_0x{sc:02X}"
    else:
        py_name = f"SCT{sct}_SC0x{sc:02X}"
    return StatusInfo(sct, sc, status_crd(s), status_more(s), dnr, py_name,
                      desc.decode("ascii"), err, transient,
                      (not success) and transient and not dnr, success)


def status_table():
    """Every known status as (sct, sc, name, description, errno, transient),
    in table order (by SCT, then SC)."""
    cdef int i
    cdef const nvme_status_row *r
    rows = []
    for i in range(_status_nrows):
        r = &_status_rows[i]
        rows.append((r.sct, r.sc, r.name.decode("ascii"), r.desc.decode("ascii"),
                     r.err, bool(r.transient)))
    return rows


def make_status(int sct, int sc, dnr=False, more=False, int crd=0, int phase=0):
    """Build a 16-bit CQE status field (the inverse of decode_status)."""
    if not 0 <= sct <= 7:
        raise ValueError(f"SCT {sct} outside 0..7")
    if not 0 <= sc <= 0xFF:
        raise ValueError(f"SC {sc} outside 0..0xFF")
    if not 0 <= crd <= 3:
        raise ValueError(f"CRD {crd} outside 0..3")
    if not 0 <= phase <= 1:
        raise ValueError(f"phase {phase} is not 0 or 1")
    return status_pack(<uint8_t>sct, <uint8_t>sc, <uint8_t>crd, bool(more), bool(dnr),
                       <uint8_t>phase)
