"""fallocate as the FUSE frontend carries it out (no mount: the handler is
called directly), on controllers with and without Write Zeroes and Dataset
Management.  The real mount is covered in test_mount.py."""
import errno
import os

import pyfuse3
import pytest

from nvmefs.controller import open_controller
from nvmefs.fusefs import NvmeFS
from nvmefs.namespace import ONCS_DSM, ONCS_WRITE_ZEROES
from racehelp import KEEP, PUNCH, ZERO, RangeOrder, apply, new_round, race

MiB = 1 << 20


@pytest.mark.parametrize("oncs,dlfeat,want", [
    (ONCS_WRITE_ZEROES | ONCS_DSM, 0x09, "write_zeroes"),
    (ONCS_DSM, 0x01, "deallocate"),
    (ONCS_DSM, 0x00, "write"),          # deallocate promises nothing: write zeroes
    (0, 0x00, "write"),
])
async def test_punch_hole_and_zero_range_by_controller_support(transport, oncs, dlfeat, want):
    async with open_controller(transport, io_queues=1) as c:
        ns = c.namespaces[1]
        c.id_ctrl["oncs"] = oncs
        ns.info["dlfeat"] = dlfeat
        data = bytearray(os.urandom(4 * MiB))
        await ns.write(0, data)
        used = []
        for name in ("write_zeroes", "deallocate", "write"):
            orig = getattr(ns, name)

            def spy(*a, _orig=orig, _name=name, **k):
                used.append(_name)
                return _orig(*a, **k)
            setattr(ns, name, spy)
        fs = NvmeFS(c)
        fh = ns.nsid + 1
        await fs.fallocate(fh, PUNCH | KEEP, 100, 3 * 4096)        # edges in LBAs 0 and 3
        data[100:100 + 3 * 4096] = bytes(3 * 4096)
        await fs.fallocate(fh, ZERO, MiB, 64 * 1024 + 1)
        data[MiB:MiB + 64 * 1024 + 1] = bytes(64 * 1024 + 1)
        assert await ns.read(0, 1024) == data
        # the whole LBAs went through the command the controller supports;
        # the partial edges through read-modify-write (write)
        assert want in used
        if want == "write_zeroes":
            assert used.count("write") == 3        # two punch edges, one zero-range tail
        elif want == "deallocate":                 # ... and zero-range's whole LBAs
            assert used.count("write") == 4 and used.count("deallocate") == 1
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await fs.fallocate(fh, 0, 0, 4096)
        assert ei.value.errno == errno.EOPNOTSUPP
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await fs.fallocate(fh, ZERO, ns.size - 4096, 8192)
        assert ei.value.errno == errno.ENOSPC
        assert fs.fallocates == {"punch": 1, "zero": 1, "refused": 1}


async def test_concurrent_writes_and_fallocate_serialise_per_range(transport):
    """Unaligned writes, punch holes and zero ranges racing over the same
    few LBAs (4 KiB LBAs: nearly every edge is read-modify-written).  With
    no polling every command yields, so the tasks really interleave.  The
    result must equal the operations applied one by one in the order they
    took the range lock: no edge write-back may lose another's bytes."""
    import trio

    region = 32 * 1024
    async with open_controller(transport, io_queues=2, spin_us=0) as c:
        ns = c.namespaces[1]
        fs = NvmeFS(c)
        fh = ns.nsid + 1
        rec = RangeOrder(fs._lock(ns))

        for seed in range(8):
            rng, start = await new_round(fs, fh, rec, seed, region)
            ops = []
            for i in range(40):
                off = rng.randrange(0, region - 6000)
                n = rng.randrange(1, 6000)
                kind = rng.choice(["write", "punch", "zero"])
                ops.append((kind, off, n, bytes([i + 1]) * n if kind == "write" else None))

            async def run(i):
                rec.op_of[trio.lowlevel.current_task()] = i
                await apply(fs, fh, ops[i])

            await race(fs, fh, start, ops, rec, run)
