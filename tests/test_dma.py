import pytest

from nvmefs import _core


def test_buffers_are_page_aligned_bus_addresses(arena):
    bufs = [arena.alloc(n) for n in (1, 4096, 4097, 65536)]
    for b in bufs:
        assert b.iova % arena.page_size == 0
        # bus addresses live in the arena's IOVA window, not the process's address space
        assert arena.iova_base <= b.iova < arena.iova_base + arena.size
        assert b.iova != arena.vaddr_base + (b.iova - arena.iova_base)
    ivs = sorted((b.iova, b.size) for b in bufs)
    for (a, n), (b, _) in zip(ivs, ivs[1:]):
        assert a + n <= b, "allocations overlap"


def test_buffer_protocol_and_translation(arena):
    b = arena.alloc(8192)
    mv = memoryview(b)
    mv[100:104] = b"abcd"
    assert arena.read(b.iova + 100, 4) == b"abcd"
    arena.write(b.iova + 4096, b"xyz")
    assert bytes(mv[4096:4099]) == b"xyz"
    with pytest.raises(BufferError):
        b.free()
    mv.release()
    b.free()


def test_counters_and_reuse(arena):
    before = arena.stats()
    b = arena.alloc(3 * 4096)
    assert arena.stats()["pages_in_use"] == before["pages_in_use"] + 3
    b.free()
    assert arena.stats()["pages_in_use"] == before["pages_in_use"]
    assert arena.stats()["frees"] == before["frees"] + 1


def test_exhaustion_is_a_clear_error():
    a = _core.DmaArena(4 * 4096)
    held = a.alloc(3 * 4096)  # noqa: F841 -- kept alive on purpose
    with pytest.raises(MemoryError, match="exhausted"):
        a.alloc(2 * 4096)


def test_out_of_range_translation_rejected(arena):
    with pytest.raises(ValueError, match="outside"):
        arena.read(arena.iova_base + arena.size - 2, 4)
    with pytest.raises(ValueError, match="outside"):
        arena.read(arena.iova_base - 4096, 4)


@pytest.mark.parametrize("size,page", [(4096 * 3 + 1, 4096), (65536, 3000), (0, 4096)])
def test_bad_geometry(size, page):
    with pytest.raises(ValueError):
        _core.DmaArena(size, page)


def _rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_buffers_are_zeroed_and_fresh_pages_stay_untouched():
    """Every buffer reads as zeroes, also where an earlier owner wrote; a
    buffer of pages never handed out is not made resident by alloc() (the
    lanes' receive buffers cost only what is used)."""
    small = _core.DmaArena(16 * 4096)
    a = small.alloc(16 * 4096)          # the whole arena: the next one must reuse it
    memoryview(a)[:] = b"\xab" * (16 * 4096)
    iova = a.iova
    a.free()
    b = small.alloc(16 * 4096)
    assert b.iova == iova
    assert not any(memoryview(b)), "a reused buffer kept an earlier owner's bytes"
    arena = _core.DmaArena(256 << 20)
    before = _rss_kib()
    big = arena.alloc(128 << 20)
    assert _rss_kib() - before < 8 << 10, "alloc() touched the pages of a fresh buffer"
    assert not any(memoryview(big)[-4096:])
