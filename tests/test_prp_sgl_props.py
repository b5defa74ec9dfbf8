"""Property tests: the Cython builders against the pure-Python reference
walker (refcheck.py), over random buffer layouts and sizes."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvmefs import _core
from nvmefs.errors import PrpLayoutError, SglLayoutError

from refcheck import RefError, coalesce, walk_prp, walk_sgl

PAGE = 4096
ARENA = _core.DmaArena(256 << 20)
DATA = ARENA.alloc(96 << 20)      # segments are carved from here
LISTS = ARENA.alloc(64 * PAGE)    # list memory for one command
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def prp_layouts(draw):
    """PRP-expressible layouts: a first segment at any dword offset, middle
    segments of whole pages, a last segment starting on a page."""
    n = draw(st.integers(1, 12))
    page = draw(st.integers(0, 64))
    segs = []
    for i in range(n):
        if i == 0:
            off = draw(st.integers(0, PAGE // 4 - 1)) * 4
            if n == 1:
                length = draw(st.integers(1, 300 * PAGE))
            else:
                length = draw(st.integers(1, 8)) * PAGE - off
        elif i < n - 1:
            off, length = 0, draw(st.integers(1, 40)) * PAGE
        else:
            off, length = 0, draw(st.integers(1, 40 * PAGE))
        page += draw(st.integers(0, 3))
        addr = DATA.iova + page * PAGE + off
        segs.append((addr, length))
        page += (off + length + PAGE - 1) // PAGE
    return segs


@SETTINGS
@given(prp_layouts())
def test_prp_builder_matches_reference(segs):
    prp1, prp2 = _core.build_prp(segs, LISTS)
    total = sum(n for _a, n in segs)
    ranges = walk_prp(ARENA.read, prp1, prp2, total)
    assert coalesce(ranges) == coalesce(segs)
    for a, _n in ranges[1:]:
        assert a % PAGE == 0
    if total + (segs[0][0] % PAGE) <= PAGE:
        assert prp2 == 0


@SETTINGS
@given(prp_layouts(), st.integers(1, PAGE - 1), st.integers(0, 11))
def test_prp_builder_refuses_misaligned_middle(segs, shift, which):
    if len(segs) < 2:
        return
    i = 1 + which % (len(segs) - 1)
    a, n = segs[i]
    bad = list(segs)
    bad[i] = (a + shift, n)   # a later segment no longer starts on a page
    with pytest.raises(PrpLayoutError):
        _core.build_prp(bad, LISTS)


@st.composite
def sgl_layouts(draw, bit_bucket=False):
    n = draw(st.integers(1, 700))
    segs = []
    pos = 0
    for _ in range(n):
        pos += draw(st.integers(0, 64)) * 4
        length = draw(st.integers(1, 3 * PAGE))
        if bit_bucket and draw(st.integers(0, 5)) == 0:
            segs.append((0, length, True))
            continue
        segs.append((DATA.iova + pos, length, False))
        pos += length
    if all(s[2] for s in segs):
        segs.append((DATA.iova + pos + 64, 512, False))
    return segs


@SETTINGS
@given(sgl_layouts(bit_bucket=True))
def test_sgl_builder_matches_reference(segs):
    sgl1 = _core.build_sgl(segs, LISTS)
    total = sum(s[1] for s in segs)
    assert walk_sgl(ARENA.read, sgl1, total) == segs


@SETTINGS
@given(st.integers(1, 4000))
def test_sgl_chaining_boundaries(n):
    # around 256 descriptors per page: exactly-full pages, one more, many pages
    segs = [(DATA.iova + 8 * k, 4, False) for k in range(n)]
    lists = ARENA.alloc(((n + 254) // 255 + 1) * PAGE)
    try:
        sgl1 = _core.build_sgl(segs, lists)
        assert walk_sgl(ARENA.read, sgl1, 4 * n) == segs
    finally:
        lists.free()


@pytest.mark.parametrize("n", [510, 511, 512, 513, 1022, 1023, 1024, 2049])
def test_prp_chaining_boundaries(n):
    # transfers whose entry count lands on and around list-page boundaries
    lists = ARENA.alloc(8 * PAGE)
    try:
        prp1, prp2 = _core.build_prp([(DATA.iova, n * PAGE)], lists)
        assert coalesce(walk_prp(ARENA.read, prp1, prp2, n * PAGE)) == [(DATA.iova, n * PAGE, False)]
        assert _core.prp_list_pages_needed(n * PAGE) == (1 if n - 1 <= 512 else -(-(n - 2) // 511))
    finally:
        lists.free()


def test_list_memory_too_small_is_reported():
    small = ARENA.alloc(PAGE)
    try:
        with pytest.raises(PrpLayoutError, match="list pages"):
            _core.build_prp([(DATA.iova, 600 * PAGE)], small)
        with pytest.raises(SglLayoutError, match="too many"):
            _core.build_sgl([(DATA.iova + 8 * k, 4) for k in range(300)], small)
    finally:
        small.free()


def test_reference_walker_rejects_offset_prp2():
    # the reference must itself catch the reviewed driver's unaligned PRP2
    with pytest.raises(RefError, match="PRP_OFFSET_INVALID"):
        walk_prp(ARENA.read, DATA.iova + 0x200, DATA.iova + PAGE + 0x200, PAGE)


def test_sgl_dword_granularity():
    with pytest.raises(SglLayoutError, match="dword"):
        _core.build_sgl([(DATA.iova + 2, 100)], LISTS, dword_only=True)
    _core.build_sgl([(DATA.iova + 4, 100)], LISTS, dword_only=True)


SGL = 0x1
SGL_BB = 0x1 | (1 << 16)


@pytest.mark.parametrize("segs,sgls,kw,want", [
    # no SGL support: PRP
    ([(0x100000000, 1 << 20)], 0, {}, "prp"),
    # single contiguous buffer of at most two pages: always PRP
    ([(0x100000000 + 512, 2 * PAGE - 512)], SGL, {}, "prp"),
    # large contiguous buffer: average segment above 32 KiB -> SGL
    ([(0x100000000, 1 << 20)], SGL, {}, "sgl"),
    # many small page-aligned segments: average below the threshold -> PRP
    ([(0x100000000 + 2 * PAGE * k, PAGE) for k in range(16)], SGL, {}, "prp"),
    # not PRP-expressible: SGL when supported
    ([(0x100000000, 512), (0x100000000 + PAGE + 8, 512)], SGL, {}, "sgl"),
    # admin commands never use SGL
    ([(0x100000000, 1 << 20)], SGL, {"admin": True}, "prp"),
    # bit bucket on a read with support
    ([(0x100000000, 512), (0, 512, True)], SGL_BB, {"read": True}, "sgl"),
    # threshold is configurable
    ([(0x100000000 + 2 * PAGE * k, PAGE) for k in range(16)], SGL, {"threshold": 4096}, "sgl"),
])
def test_selection_rule(segs, sgls, kw, want):
    assert _core.choose_data_pointer(segs, sgls, **kw) == want


@pytest.mark.parametrize("segs,sgls,kw,exc", [
    ([(0x100000000, 512), (0x100000000 + PAGE + 8, 512)], 0, {}, PrpLayoutError),
    ([(0x100000000, 512), (0, 512, True)], SGL, {"read": True}, SglLayoutError),   # no BB support
    ([(0x100000000, 512), (0, 512, True)], SGL_BB, {"read": False}, SglLayoutError),  # BB on a write
])
def test_selection_rule_refusals(segs, sgls, kw, exc):
    with pytest.raises(exc):
        _core.choose_data_pointer(segs, sgls, **kw)
