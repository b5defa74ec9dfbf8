"""Namespace Management (0Dh), Namespace Attachment (15h), the Changed
Namespace List (log 04h) and Namespace Attribute Changed events in the
controller model, through the raw host (exact statuses and bytes)."""
import os
import struct

import pytest

from nvmefs import _core, _model

from model_harness import PAGE, Host, sqe, status_of

MiB = 1 << 20
OK = (0, 0, False)
INVALID_OPCODE = (0, 0x01, True)
INVALID_FIELD = (0, 0x02, True)
INVALID_NS = (0, 0x0B, True)
INVALID_FORMAT = (1, 0x0A, True)
INSUFFICIENT_CAPACITY = (1, 0x15, True)
NSID_UNAVAILABLE = (1, 0x16, True)
ALREADY_ATTACHED = (1, 0x18, True)
NOT_ATTACHED = (1, 0x1A, True)
THIN_UNSUPPORTED = (1, 0x1B, True)
CTRL_LIST_INVALID = (1, 0x1C, True)
AEN_NS_CHANGED = 0x02 | (0x00 << 8) | (0x04 << 16)   # Notice, attribute changed, log 04h


@pytest.fixture
def make_host():
    models = []

    def make(**kw):
        kw.setdefault("max_io_queues", 2)
        arena = _core.DmaArena(64 << 20)
        regs = _core.RegisterFile(_model.model_regs_size(kw["max_io_queues"]))
        model = _model.ControllerModel(arena, regs, **kw)
        models.append(model)
        model.start()
        h = Host(model, arena, regs)
        h.enable()
        h.create_io(1, ien=False)
        return h

    yield make
    for m in models:
        m.stop()


def create(h, nsze, ncap=None, flbas=0, nsid=0, dps=0, nmic=0):
    buf = h.alloc(PAGE)
    data = bytearray(PAGE)
    struct.pack_into("<QQ", data, 0, nsze, nsze if ncap is None else ncap)
    data[26], data[29], data[30] = flbas, dps, nmic
    h.arena.write(buf.iova, bytes(data))
    return h.admin(0x0D, nsid=nsid, cdw10=0, prp1=buf.iova)


def delete(h, nsid):
    return h.admin(0x0D, nsid=nsid, cdw10=1)


def attach(h, nsid, detach=False, ids=(1,)):
    buf = h.alloc(PAGE)
    h.arena.write(buf.iova, struct.pack(f"<H{len(ids)}H", len(ids), *ids).ljust(PAGE, b"\0"))
    return h.admin(0x15, nsid=nsid, cdw10=1 if detach else 0, prp1=buf.iova)


def nsids(h, cns):
    ids = struct.unpack("<1024I", h.identify(cns, nsid=0))
    return list(ids[:ids.index(0)])


def capacity(h):
    d = h.identify(1)
    oacs, = struct.unpack_from("<H", d, 256)
    tnvmcap, unvmcap = struct.unpack_from("<QxxxxxxxxQ", d, 280)
    return oacs, tnvmcap, unvmcap


def changed_list(h, rae=False):
    c, raw = h.get_log(0x04, 4096, rae=rae)
    assert c.status == 0, c
    ids = struct.unpack("<1024I", raw)
    return list(ids[:ids.index(0)])


def test_identify_reports_management_and_capacity(make_host):
    h = make_host(namespaces=((8 * MiB, 512),), capacity=64 * MiB)
    oacs, tnvmcap, unvmcap = capacity(h)
    assert oacs & (1 << 3)
    assert (tnvmcap, unvmcap) == (64 * MiB, 56 * MiB)
    oaes, = struct.unpack_from("<I", h.identify(1), 92)
    assert oaes & (1 << 8)
    assert h.model.capacity == (64 * MiB, 56 * MiB)


def test_create_attach_io_detach_delete(make_host):
    h = make_host(namespaces=((8 * MiB, 512),), capacity=64 * MiB)
    c = create(h, (16 * MiB) // 4096, flbas=1)
    assert status_of(c) == OK and c.dw0 == 2
    assert capacity(h)[2] == 40 * MiB
    # allocated, not attached: not active, I/O to it is Invalid Field
    assert nsids(h, 0x02) == [1] and nsids(h, 0x10) == [1, 2]
    assert h.identify(0x00, nsid=2) == bytes(PAGE)
    d = h.identify(0x11, nsid=2)
    assert struct.unpack_from("<QQ", d, 0) == (4096, 4096) and d[26] == 1
    assert struct.unpack_from("<H", h.identify(0x12, nsid=2), 0)[0] == 0
    assert status_of(h.read(0, 4096, nsid=2, lba=4096)[0]) == INVALID_FIELD

    assert status_of(attach(h, 2)) == OK
    assert nsids(h, 0x02) == [1, 2]
    assert struct.unpack_from("<HH", h.identify(0x12, nsid=2), 0) == (1, 1)
    # a new namespace reads zeroes; its data and namespace 1's stay apart
    c, data = h.read(4095, 4096, nsid=2, lba=4096)
    assert c.status == 0 and data == bytes(4096)
    assert h.write(0, b"\x11" * 8192, nsid=1).status == 0
    assert h.write(4095, b"\x22" * 4096, nsid=2, lba=4096).status == 0
    assert h.read(0, 8192, nsid=1)[1] == b"\x11" * 8192
    assert h.read(4095, 4096, nsid=2, lba=4096)[1] == b"\x22" * 4096
    assert status_of(h.read(4096, 4096, nsid=2, lba=4096)[0]) == (0, 0x80, True)   # LBA out of range

    assert status_of(attach(h, 2, detach=True)) == OK
    assert nsids(h, 0x02) == [1]
    assert status_of(delete(h, 2)) == OK
    assert nsids(h, 0x10) == [1] and capacity(h)[2] == 56 * MiB
    assert h.read(0, 8192, nsid=1)[1] == b"\x11" * 8192


def test_statuses(make_host):
    h = make_host(namespaces=((8 * MiB, 512),), capacity=32 * MiB)
    assert status_of(create(h, 0)) == INVALID_FIELD
    assert status_of(create(h, 2048, ncap=4096)) == INVALID_FIELD       # NCAP > NSZE
    assert status_of(create(h, 4096, ncap=2048)) == THIN_UNSUPPORTED
    assert status_of(create(h, 2048, flbas=2)) == INVALID_FORMAT
    assert status_of(create(h, 2048, dps=1)) == INVALID_FIELD
    assert status_of(create(h, 2048, nmic=1)) == INVALID_FIELD
    assert status_of(create(h, 2047)) == INVALID_FIELD                  # not whole 4 KiB
    assert status_of(create(h, 2048, nsid=1)) == INVALID_FIELD
    assert status_of(create(h, (24 * MiB) // 512 + 8)) == INSUFFICIENT_CAPACITY
    assert status_of(h.admin(0x0D, cdw10=2)) == INVALID_FIELD            # SEL 2 is reserved
    assert status_of(h.admin(0x0D, cdw10=0, cdw11=1 << 24)) == INVALID_FIELD   # CSI other than NVM
    assert status_of(delete(h, 3)) == INVALID_FIELD                     # in 1..NN, unallocated
    assert status_of(delete(h, 17)) == INVALID_NS
    assert status_of(attach(h, 3)) == INVALID_FIELD
    assert status_of(attach(h, 0xFFFFFFFF)) == INVALID_NS
    assert status_of(attach(h, 1)) == ALREADY_ATTACHED
    assert status_of(attach(h, 1, ids=(2,))) == CTRL_LIST_INVALID
    assert status_of(attach(h, 1, ids=())) == CTRL_LIST_INVALID
    assert status_of(attach(h, 1, ids=(1, 1))) == CTRL_LIST_INVALID
    assert status_of(attach(h, 1, detach=True)) == OK
    assert status_of(attach(h, 1, detach=True)) == NOT_ATTACHED
    # nothing above changed the capacity or the table
    assert capacity(h)[2] == 24 * MiB and nsids(h, 0x10) == [1]


def test_every_nsid_in_use(make_host):
    h = make_host(namespaces=((1 * MiB, 512),), capacity=16 * MiB)
    for nsid in range(2, 17):
        c = create(h, 512)                                  # 256 KiB each
        assert status_of(c) == OK and c.dw0 == nsid
    assert status_of(create(h, 512)) == NSID_UNAVAILABLE
    assert status_of(delete(h, 0xFFFFFFFF)) == OK
    assert nsids(h, 0x10) == [] and capacity(h)[2] == 16 * MiB
    assert status_of(h.read(0, 512, nsid=1)[0]) == INVALID_FIELD


def test_namespace_attribute_changed_event_and_log(make_host):
    h = make_host(namespaces=((8 * MiB, 512),), capacity=32 * MiB)
    assert status_of(create(h, 2048)) == OK
    assert status_of(attach(h, 2)) == OK
    # no notices enabled: listed in the log, no event
    assert changed_list(h, rae=True) == [2]
    assert status_of(h.admin(0x09, cdw10=0x0B, cdw11=1 << 8)) == OK
    aer = h.submit(0, sqe(0x0C))
    h.expect_none(0, 0.05)
    assert changed_list(h) == [2]                 # read with RAE=0: starts again
    assert changed_list(h) == []
    assert status_of(attach(h, 2, detach=True)) == OK
    ev = [c for c in h.wait(0) if c.cid == aer]
    assert ev and ev[0].status == 0 and ev[0].dw0 == AEN_NS_CHANGED
    # a second event waits until the host has read the log
    aer = h.submit(0, sqe(0x0C))
    assert status_of(delete(h, 2)) == OK          # detached: no change to an active NSID
    assert status_of(attach(h, 1, detach=True)) == OK
    h.expect_none(0, 0.05)
    assert changed_list(h) == [1, 2]
    assert status_of(attach(h, 1)) == OK
    ev = [c for c in h.wait(0) if c.cid == aer]
    assert ev and ev[0].dw0 == AEN_NS_CHANGED
    assert changed_list(h) == [1]


def test_format_that_changes_the_lba_size_is_an_attribute_change(make_host):
    h = make_host(namespaces=((8 * MiB, 512),))
    assert changed_list(h) == []
    assert h.admin(0x80, nsid=1, cdw10=0).status == 0      # same format: no change
    assert changed_list(h) == []
    assert h.admin(0x80, nsid=1, cdw10=1).status == 0
    assert changed_list(h) == [1]


def test_image_keeps_the_table_and_reuses_gaps(make_host, tmp_path):
    path = str(tmp_path / "img")
    _model.create_image(path, ((4 * MiB, 512),), capacity=16 * MiB)
    h = make_host(image=path)
    for n in (2, 3):
        c = create(h, (2 * MiB) // 512)
        assert c.dw0 == n
    assert attach(h, 3).status == 0
    assert h.write(0, b"\x33" * 4096, nsid=3).status == 0
    assert delete(h, 2).status == 0
    # 3 MiB does not fit the 2 MiB gap namespace 2 left: it goes after namespace 3
    assert create(h, (3 * MiB) // 512).dw0 == 2
    hdr = _model.read_image_header(path)
    off = {ns["nsid"]: ns["offset"] for ns in hdr["namespaces"]}
    assert off == {1: 1 * MiB, 2: 9 * MiB, 3: 7 * MiB}
    # 1 MiB does: NSID 4 takes the gap at 5 MiB
    assert create(h, MiB // 512).dw0 == 4
    assert _model.read_image_header(path)["namespaces"][3]["offset"] == 5 * MiB
    assert capacity(h)[2] == 16 * MiB - (4 + 3 + 2 + 1) * MiB
    # 6 MiB are unallocated, but in a 1 MiB and a 5 MiB gap: a namespace is
    # one extent of the image
    assert status_of(create(h, (6 * MiB) // 512)) == INSUFFICIENT_CAPACITY
    h.model.stop()

    hdr = _model.read_image_header(path)
    assert hdr["clean"] and hdr["capacity"] == 16 * MiB
    assert [(ns["nsid"], ns["size"], ns["attached"]) for ns in hdr["namespaces"]] == \
        [(1, 4 * MiB, True), (2, 3 * MiB, False), (3, 2 * MiB, True), (4, 1 * MiB, False)]
    h = make_host(image=path)
    assert nsids(h, 0x02) == [1, 3] and nsids(h, 0x10) == [1, 2, 3, 4]
    assert h.read(0, 4096, nsid=3)[1] == b"\x33" * 4096
    # a deleted namespace's blocks are given back: its successor reads zeroes
    assert delete(h, 3).status == 0
    assert create(h, (2 * MiB) // 512).dw0 == 3
    assert attach(h, 3).status == 0
    assert h.read(0, 4096, nsid=3)[1] == bytes(4096)


def test_image_from_before_the_capacity_field(make_host, tmp_path):
    """An image whose header has no capacity (made before namespace
    management) has the data area up to the end of the file."""
    path = str(tmp_path / "old")
    _model.create_image(path, ((4 * MiB, 512), (2 * MiB, 4096)))
    with open(path, "r+b") as f:
        f.seek(56)
        f.write(bytes(8))
    assert _model.read_image_header(path)["capacity"] == os.path.getsize(path) - MiB == 6 * MiB
    h = make_host(image=path)
    assert capacity(h)[1:] == (6 * MiB, 0)
    assert status_of(create(h, 8)) == INSUFFICIENT_CAPACITY
    assert delete(h, 2).status == 0 and create(h, 8).dw0 == 2


def test_raw_image_has_no_namespace_management(make_host, tmp_path):
    path = str(tmp_path / "raw")
    _model.create_raw_image(path, 8 * MiB)
    h = make_host(image=path)
    oacs, tnvmcap, _ = capacity(h)
    assert not oacs & (1 << 3) and tnvmcap == 0
    assert status_of(create(h, 8)) == INVALID_OPCODE
    assert status_of(attach(h, 1, detach=True)) == INVALID_OPCODE
    assert status_of(h.get_log(0x04, 4096)[0]) == (1, 0x09, True)
    with open(path, "rb") as f:
        assert f.read() == bytes(8 * MiB)       # never written but for data
