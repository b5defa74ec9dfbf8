"""NVMe completion status decoding (_core/status.pyx) and its exception
(nvmefs/errors.py).

The expected codes below are written out from shared NVME-NOTES.md ("Status
codes") and the NVMe Base 2.0 status tables, not read back from the table
under test.
"""

import errno
import pickle
import re

import pytest
from hypothesis import given, strategies as st

from nvmefs._core import decode_status, make_status, status_table
from nvmefs.errors import (
    ControllerError,
    NvmeError,
    PrpLayoutError,
    QueueBusy,
    SglLayoutError,
    error_from_status,
    opcode_name,
)


# (SCT, SC, name) for every code NVME-NOTES.md lists, plus the path-related
# and end-to-end codes the driver must name.
NOTES_CODES = [
    (0, 0x00, "SUCCESS"),
    (0, 0x01, "INVALID_OPCODE"),
    (0, 0x02, "INVALID_FIELD"),
    (0, 0x03, "COMMAND_ID_CONFLICT"),
    (0, 0x04, "DATA_TRANSFER_ERROR"),
    (0, 0x06, "INTERNAL_ERROR"),
    (0, 0x07, "ABORT_REQUESTED"),
    (0, 0x08, "ABORTED_SQ_DELETION"),
    (0, 0x0B, "INVALID_NAMESPACE_OR_FORMAT"),
    (0, 0x0C, "COMMAND_SEQUENCE_ERROR"),
    (0, 0x0D, "INVALID_SGL_SEGMENT_DESCRIPTOR"),
    (0, 0x0E, "INVALID_SGL_DESCRIPTOR_COUNT"),
    (0, 0x0F, "DATA_SGL_LENGTH_INVALID"),
    (0, 0x10, "METADATA_SGL_LENGTH_INVALID"),
    (0, 0x11, "SGL_DESCRIPTOR_TYPE_INVALID"),
    (0, 0x13, "PRP_OFFSET_INVALID"),
    (0, 0x16, "SGL_OFFSET_INVALID"),
    (0, 0x80, "LBA_OUT_OF_RANGE"),
    (0, 0x81, "CAPACITY_EXCEEDED"),
    (0, 0x82, "NAMESPACE_NOT_READY"),
    (1, 0x00, "COMPLETION_QUEUE_INVALID"),
    (1, 0x01, "INVALID_QUEUE_ID"),
    (1, 0x02, "INVALID_QUEUE_SIZE"),
    (1, 0x03, "ABORT_LIMIT_EXCEEDED"),
    (1, 0x05, "ASYNC_EVENT_LIMIT_EXCEEDED"),
    (1, 0x06, "INVALID_FIRMWARE_SLOT"),
    (1, 0x08, "INVALID_INTERRUPT_VECTOR"),
    (1, 0x09, "INVALID_LOG_PAGE"),
    (1, 0x0A, "INVALID_FORMAT"),
    (1, 0x0C, "INVALID_QUEUE_DELETION"),
    (2, 0x80, "WRITE_FAULT"),
    (2, 0x81, "UNRECOVERED_READ_ERROR"),
    (2, 0x82, "E2E_GUARD_CHECK_ERROR"),
    (2, 0x83, "E2E_APP_TAG_CHECK_ERROR"),
    (2, 0x84, "E2E_REF_TAG_CHECK_ERROR"),
    (2, 0x85, "COMPARE_FAILURE"),
    (2, 0x86, "ACCESS_DENIED"),
    (2, 0x87, "DEALLOCATED_OR_UNWRITTEN_BLOCK"),
    (3, 0x00, "INTERNAL_PATH_ERROR"),
    (3, 0x01, "ANA_PERSISTENT_LOSS"),
    (3, 0x02, "ANA_INACCESSIBLE"),
    (3, 0x03, "ANA_TRANSITION"),
    (3, 0x60, "CONTROLLER_PATHING_ERROR"),
    (3, 0x70, "HOST_PATHING_ERROR"),
    (3, 0x71, "ABORTED_BY_HOST"),
]

# (SCT, SC, errno, transient)
ERRNO_CASES = [
    (0, 0x00, 0, False),
    (0, 0x01, errno.EOPNOTSUPP, False),
    (0, 0x02, errno.EINVAL, False),
    (0, 0x03, errno.EBUSY, False),
    (0, 0x04, errno.EIO, True),
    (0, 0x06, errno.EIO, True),
    (0, 0x07, errno.ECANCELED, False),
    (0, 0x08, errno.ECANCELED, True),
    (0, 0x0B, errno.ENODEV, False),
    (0, 0x0D, errno.EINVAL, False),
    (0, 0x13, errno.EINVAL, False),
    (0, 0x16, errno.EINVAL, False),
    (0, 0x80, errno.ERANGE, False),
    (0, 0x81, errno.ENOSPC, False),
    (0, 0x82, errno.EAGAIN, True),
    (1, 0x01, errno.EINVAL, False),
    (1, 0x02, errno.EINVAL, False),
    (1, 0x08, errno.EINVAL, False),
    (2, 0x80, errno.EIO, False),
    (2, 0x81, errno.EIO, False),
    (2, 0x82, errno.EIO, False),
    (2, 0x85, errno.EILSEQ, False),
    (2, 0x86, errno.EACCES, False),
    (2, 0x87, errno.EIO, False),
    (3, 0x03, errno.EAGAIN, True),
    (3, 0x70, errno.EAGAIN, True),
]


def raw_status(sct, sc, crd=0, more=False, dnr=False, phase=0):
    """The layout from NVME-NOTES.md (DW3 bits 31:16), independent of make_status."""
    return phase | sc << 1 | sct << 9 | crd << 12 | int(more) << 14 | int(dnr) << 15


@given(sct=st.integers(0, 7), sc=st.integers(0, 0xFF), crd=st.integers(0, 3),
       more=st.booleans(), dnr=st.booleans(), phase=st.integers(0, 1))
def test_bit_layout_round_trip(sct, sc, crd, more, dnr, phase):
    s = make_status(sct, sc, dnr=dnr, more=more, crd=crd, phase=phase)
    assert s == raw_status(sct, sc, crd, more, dnr, phase)
    info = decode_status(s)
    assert (info.sct, info.sc, info.crd, info.more, info.dnr) == (sct, sc, crd, more, dnr)
    assert info.success == (sct == 0 and sc == 0)
    assert info.retryable == (not info.success and info.transient and not dnr)
    # the phase bit must never change the meaning
    assert decode_status(s ^ 1) == info


def test_status_from_cqe_dword3():
    # DW3: CID [15:0], P 16, SC [24:17], SCT [27:25], CRD [29:28], M 30, DNR 31
    dw3 = 1 << 31 | 1 << 30 | 2 << 28 | 2 << 25 | 0x81 << 17 | 1 << 16 | 0x1234
    info = decode_status(dw3 >> 16)
    assert (info.sct, info.sc, info.crd, info.more, info.dnr) == (2, 0x81, 2, True, True)
    assert info.name == "UNRECOVERED_READ_ERROR"


def test_every_16_bit_status_decodes():
    for s in range(0x10000):
        info = decode_status(s)
        assert info.name and info.description
        assert info.errno >= 0
        assert (info.errno == 0) == info.success


@pytest.mark.parametrize("sct,sc,name", NOTES_CODES)
def test_notes_codes_have_their_names(sct, sc, name):
    info = decode_status(make_status(sct, sc))
    assert info.name == name
    assert not info.description.startswith(("Unknown", "Vendor"))


def test_descriptions_follow_the_spec_wording():
    assert decode_status(make_status(0, 0x01)).description == "Invalid Command Opcode"
    assert decode_status(make_status(0, 0x13)).description == "PRP Offset Invalid"
    assert decode_status(make_status(0, 0x80)).description == "LBA Out of Range"
    assert decode_status(make_status(2, 0x81)).description == "Unrecovered Read Error"
    assert decode_status(make_status(3, 0x03)).description == "Asymmetric Access Transition"


@pytest.mark.parametrize("sct,sc,err,transient", ERRNO_CASES)
def test_errno_and_transience(sct, sc, err, transient):
    info = decode_status(make_status(sct, sc))
    assert info.errno == err, (info.name, errno.errorcode.get(info.errno))
    assert info.transient is transient
    assert info.retryable is (transient and not info.success)


def test_dnr_makes_transient_status_non_retryable():
    for sct, sc in [(0, 0x04), (0, 0x06), (0, 0x08), (0, 0x82), (3, 0x03), (3, 0x70)]:
        assert decode_status(make_status(sct, sc)).retryable
        info = decode_status(make_status(sct, sc, dnr=True))
        assert info.transient and info.dnr and not info.retryable


def test_success_is_never_retryable():
    for s in (make_status(0, 0), make_status(0, 0, dnr=True, crd=3, more=True, phase=1)):
        info = decode_status(s)
        assert info.success and not info.retryable and info.errno == 0


def test_unknown_codes_get_synthetic_names_and_eio():
    info = decode_status(make_status(0, 0x7F))
    assert (info.name, info.errno, info.transient) == ("SCT0_SC0x7F", errno.EIO, False)
    assert decode_status(make_status(1, 0xFE)).name == "SCT1_SC0xFE"
    assert decode_status(make_status(2, 0x00)).name == "SCT2_SC0x00"
    assert decode_status(make_status(5, 0x2A)).name == "SCT5_SC0x2A"
    vendor = decode_status(make_status(7, 0xC1, dnr=False))
    assert (vendor.name, vendor.errno, vendor.retryable) == ("VENDOR_SPECIFIC_0xC1", errno.EIO, False)
    assert decode_status(make_status(7, 0x00)).name == "VENDOR_SPECIFIC_0x00"


def test_status_table_is_consistent():
    rows = status_table()
    keys = [(r[0], r[1]) for r in rows]
    assert len(keys) == len(set(keys))
    names = [r[2] for r in rows]
    assert len(names) == len(set(names))
    assert set(NOTES_CODES) <= {(r[0], r[1], r[2]) for r in rows}
    for sct, sc, name, desc, err, transient in rows:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), name
        assert sct in (0, 1, 2, 3) and 0 <= sc <= 0xFF
        assert isinstance(transient, bool)
        assert (err == 0) == (sct == 0 and sc == 0)
        info = decode_status(make_status(sct, sc))
        assert (info.name, info.description, info.errno, info.transient) == (
            name, desc, err, transient)
    # keep the table honest: media errors and host bugs are never transient
    assert not any(r[5] for r in rows if r[0] == 2)


@pytest.mark.parametrize("kwargs", [
    dict(sct=8, sc=0), dict(sct=-1, sc=0), dict(sct=0, sc=0x100), dict(sct=0, sc=-1),
    dict(sct=0, sc=0, crd=4), dict(sct=0, sc=0, phase=2),
])
def test_make_status_rejects_out_of_range_fields(kwargs):
    with pytest.raises((ValueError, OverflowError)):
        make_status(**kwargs)


@pytest.mark.parametrize("bad", [-1, 0x10000])
def test_decode_status_rejects_non_16_bit_values(bad):
    with pytest.raises((ValueError, OverflowError)):
        decode_status(bad)


def test_nvme_error_fields_and_message():
    s = make_status(0, 0x80, dnr=True, phase=1)
    exc = error_from_status(s, opcode=0x02, cid=7, qid=1)
    assert isinstance(exc, OSError) and isinstance(exc, NvmeError)
    assert exc.errno == errno.ERANGE
    assert exc.strerror == "LBA Out of Range"
    assert (exc.sct, exc.sc, exc.dnr, exc.more, exc.crd) == (0, 0x80, True, False, 0)
    assert (exc.name, exc.description, exc.retryable) == ("LBA_OUT_OF_RANGE", "LBA Out of Range", False)
    assert (exc.opcode, exc.cid, exc.qid, exc.nsid, exc.lba) == (0x02, 7, 1, None, None)
    assert exc.status == s
    assert str(exc) == ("nvme: LBA_OUT_OF_RANGE (SCT 0x0 SC 0x80, DNR) on Read qid 1 cid 7: "
                        "LBA Out of Range")


def test_nvme_error_message_variants():
    exc = error_from_status(make_status(2, 0x81, more=True, crd=1), opcode=0x02, qid=3, cid=9,
                            nsid=1, lba=4096)
    assert str(exc) == ("nvme: UNRECOVERED_READ_ERROR (SCT 0x2 SC 0x81, MORE, CRD 1) on Read "
                        "qid 3 cid 9 nsid 1 lba 4096: Unrecovered Read Error")
    bare = error_from_status(make_status(0, 0x06))
    assert str(bare) == "nvme: INTERNAL_ERROR (SCT 0x0 SC 0x06): Internal Error"
    assert bare.retryable and bare.errno == errno.EIO


def test_admin_opcodes_are_named_from_the_admin_table():
    # qid 0 is the admin queue, where opcode 0x01 is Create I/O SQ, not Write
    exc = error_from_status(make_status(1, 0x02, dnr=True), opcode=0x01, qid=0, cid=3)
    assert " on Create I/O SQ qid 0 cid 3: " in str(exc)
    assert "on Write" in str(error_from_status(make_status(0, 0x02), opcode=0x01, qid=2))
    assert "on Identify" in str(error_from_status(make_status(0, 0x02), opcode=0x06, admin=True))
    assert opcode_name(0x80, admin=True) == "Format NVM"
    assert opcode_name(0x09) == "Dataset Management"
    assert opcode_name(0x09, admin=True) == "Set Features"
    assert opcode_name(0x99) == "opcode 0x99"


def test_converter_refuses_success():
    for s in (0, 1, make_status(0, 0, dnr=True, more=True, crd=2, phase=1)):
        with pytest.raises(ValueError):
            error_from_status(s)


def test_nvme_error_can_be_raised_caught_and_pickled():
    with pytest.raises(OSError) as caught:
        raise error_from_status(make_status(2, 0x86), opcode=0x01, qid=1, cid=2, nsid=1, lba=0)
    exc = caught.value
    assert exc.errno == errno.EACCES
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is NvmeError
    assert str(copy) == str(exc)
    assert (copy.errno, copy.name, copy.nsid, copy.lba) == (exc.errno, exc.name, 1, 0)


def test_other_exception_classes():
    assert issubclass(PrpLayoutError, ValueError)
    assert issubclass(SglLayoutError, ValueError)
    assert not issubclass(QueueBusy, OSError)
    assert str(ControllerError("controller fatal status (CSTS.CFS)")) == \
        "controller fatal status (CSTS.CFS)"
