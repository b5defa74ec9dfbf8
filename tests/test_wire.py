"""Wire struct sizes and field offsets as compiled (SPDK nvme_spec.h checks)."""
from nvmefs import _core


def test_struct_sizes():
    assert _core.SQE_SIZE == 64
    assert _core.CQE_SIZE == 16
    assert _core.SGL_DESC_SIZE == 16


def test_sqe_offsets():
    sqe = _core.wire_layout()["sqe"]
    # DW0 opcode/flags/CID, DW1 NSID, DW4-5 MPTR, DW6-9 DPTR, DW10..15
    assert (sqe["opc"], sqe["flags"], sqe["cid"], sqe["nsid"]) == (0, 1, 2, 4)
    assert sqe["mptr"] == 16 and sqe["dptr"] == 24
    assert sqe["cdw10"] == 40 and sqe["cdw15"] == 60


def test_cqe_offsets():
    cqe = _core.wire_layout()["cqe"]
    # DW2 SQHD/SQID, DW3 CID then phase+status in bits 31:16
    assert (cqe["dw0"], cqe["sqhd"], cqe["sqid"], cqe["cid"], cqe["status"]) == (0, 8, 10, 12, 14)


def test_sgl_descriptor_offsets():
    sgl = _core.wire_layout()["sgl"]
    assert (sgl["addr"], sgl["length"], sgl["id"]) == (0, 8, 15)
