"""VFIO tests that run INSIDE the vfio-lab guest (tests/vfio_lab.py), against
QEMU's NVMe controller bound to vfio-pci.  Not collected on the host (the
name does not match test_*.py): tests/test_vfio.py boots the guest once and
runs this file there.

The guest's controller (tests/vfio_lab.py qemu_argv): MDTS 10 (4 MiB),
namespace 1 = 64 MiB of 512 B LBAs, namespace 2 = 64 MiB of 4 KiB LBAs,
one CPU -- so the tests ask for io_queues=2 explicitly.
"""
import errno
import json
import os
import random
import struct
import time

import pytest
import trio

from nvmefs import _core
from nvmefs.controller import REG_CSTS, open_controller
from nvmefs.errors import NvmeError
from nvmefs.transport import open_transport
from nvmefs.vfio import VfioTransport, find_nvme_functions

MiB = 1 << 20
ARENA = 96 * MiB
OPTS = dict(io_queues=2, bounce_bytes=4 * MiB)
IO_READ, IO_WRITE = 0x02, 0x01


def _bdf():
    found = find_nvme_functions()
    if not found:
        pytest.fail("no NVMe function in this machine: run these tests in the vfio lab "
                    "(python tests/vfio_lab.py pytest tests/guest/vfio_guest_tests.py)")
    return os.environ.get("NVMEFS_VFIO_BDF") or found[0]


@pytest.fixture
def bdf():
    return _bdf()


@pytest.fixture
def transport(bdf):
    t = VfioTransport(bdf, arena_size=ARENA)
    yield t
    t.close()


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


# -- bring-up ---------------------------------------------------------------------

async def test_bring_up_and_identify(transport):
    cap = transport.read64(0)
    assert (cap >> 32) & 0xF == 0, "DSTRD"
    assert (cap >> 37) & 1, "NVM command set"
    async with open_controller(transport, **OPTS) as c:
        assert c.id_ctrl["mn"] == "QEMU NVMe Ctrl"
        assert c.mqes == cap & 0xFFFF
        assert {n: ns.lba_size for n, ns in c.namespaces.items()} == {1: 512, 2: 4096}
        assert c.namespaces[1].size == c.namespaces[2].size == 64 * MiB
        assert len(c.io_qs) == 2
        assert c.max_transfer == 4 * MiB          # mdts=10
        assert c.sgls & 3, "QEMU's controller supports SGLs"
    # CC.SHN normal shutdown completed (CSTS.SHST = 10b)
    assert transport.read32(REG_CSTS) & 0xC == 0x8


async def test_open_errors_name_the_fix(bdf):
    with pytest.raises(ValueError, match="not a PCI address"):
        VfioTransport("nvme0")
    with pytest.raises(OSError, match="no PCI device"):
        VfioTransport("0000:00:1f.6")
    others = [d for d in os.listdir("/sys/bus/pci/devices")
              if os.path.islink(f"/sys/bus/pci/devices/{d}/driver")
              and os.path.basename(os.readlink(f"/sys/bus/pci/devices/{d}/driver")) != "vfio-pci"]
    assert others, "the guest's virtio devices are bound to virtio-pci"
    with pytest.raises(OSError, match="bind it to vfio-pci"):
        VfioTransport(others[0])
    t = VfioTransport(bdf, arena_size=4 * MiB)
    try:
        with pytest.raises(OSError, match="in use") as ei:
            VfioTransport(bdf, arena_size=4 * MiB)
        assert ei.value.errno == errno.EBUSY
    finally:
        t.close()
    with pytest.raises(ValueError, match="expected vfio:"):
        open_transport("vfio:zz")


# -- I/O ----------------------------------------------------------------------------

async def _random_io(ns, ref, n_ops, rng, max_lbas, concurrency=32):
    """Concurrent random reads and writes, never overlapping an in-flight
    write, checked against the reference ``ref``."""
    busy = []
    sem = trio.Semaphore(concurrency)
    lbs = ns.lba_size
    nl = len(ref) // lbs

    async def one(i):
        async with sem:
            while True:
                count = rng.randint(1, max_lbas)
                lba = rng.randrange(0, nl - count)
                if all(lba + count <= b or b + n <= lba for b, n in busy):
                    break
                await trio.sleep(0)
            busy.append((lba, count))
            try:
                if rng.random() < 0.5:
                    data = rng.randbytes(count * lbs)
                    await ns.write(lba, data)
                    ref[lba * lbs:(lba + count) * lbs] = data
                else:
                    got = await ns.read(lba, count)
                    assert got == ref[lba * lbs:(lba + count) * lbs], f"read {lba}+{count} op {i}"
            finally:
                busy.remove((lba, count))

    async with trio.open_nursery() as nursery:
        for i in range(n_ops):
            nursery.start_soon(one, i)


@pytest.mark.parametrize("polled", [False, True], ids=["msix", "polled"])
async def test_concurrent_verified_io_both_namespaces(transport, polled):
    rng = random.Random(4)
    async with open_controller(transport, polled=polled, spin_us=0, **OPTS) as c:
        for nsid in (1, 2):
            ns = c.namespaces[nsid]
            span = 4 * MiB // ns.lba_size        # the first 4 MiB, known content
            ref = bytearray(pattern(nsid, span * ns.lba_size))
            await ns.write(0, bytes(ref))
            await _random_io(ns, ref, 150, rng, max_lbas=64 if ns.lba_size == 512 else 16)
            assert await ns.read(0, span) == ref
        st = [q.stats() for q in c.io_qs]
        assert all(s["completed"] > 20 for s in st), st       # both queues used
        # QEMU offers Doorbell Buffer Config: the I/O above ran on shadow doorbells
        assert c.dbbuf_active
        if polled:
            assert all(s["interrupts"] == 0 for s in st), st
        else:
            assert sum(s["interrupts"] for s in st) > 0, st
            assert c.admin_q.stats()["interrupts"] > 0


async def test_transfers_above_mdts_are_split(transport):
    async with open_controller(transport, **OPTS) as c:
        for nsid in (1, 2):
            ns = c.namespaces[nsid]
            data = pattern(10 + nsid, 10 * MiB)             # 2.5 x MDTS
            await ns.write(8, data)                          # bounce path, 3 pieces
            assert await ns.read(8, len(data) // ns.lba_size) == data
            buf = transport.arena.alloc(10 * MiB)           # zero copy, 3 pieces
            await ns.read(8, len(data) // ns.lba_size, buf)
            assert transport.arena.read(buf.iova, len(data)) == data
            buf.free()
        st = [q.stats() for q in c.io_qs]
        # 4 MiB bounce transfers are 32 chunks: the SGL path
        assert sum(s["sgl"] for s in st) >= 6, st


async def test_prp_and_sgl_chained_lists(transport):
    arena = transport.arena
    async with open_controller(transport, **OPTS) as c:
        q = c.io_qs[0]
        per_page = 4096 // 8
        data = pattern(7, 4 * MiB)
        src = arena.alloc(4 * MiB + 4096)
        arena.write(src.iova, data)
        # PRP: 4 MiB, page aligned = PRP1 + 1023 list entries over 3
        # chained list pages; then 2 MiB from an offset start (PRP1 offset)
        assert _core.prp_list_pages_needed(4 * MiB, 0) > 1
        await c.execute(q, IO_WRITE, nsid=1, cdw10=0, cdw12=4 * MiB // 512 - 1,
                        segments=[(src.iova, 4 * MiB)], dptr="prp")
        await c.execute(q, IO_WRITE, nsid=1, cdw10=0, cdw12=2 * MiB // 512 - 1,
                        segments=[(src.iova + 512, 2 * MiB)], dptr="prp")
        data = pattern(7, 4 * MiB)
        data = data[512:512 + 2 * MiB] + data[2 * MiB:]
        # SGL: read it back scattered over 500 discontiguous segments of
        # uneven (byte-granular) lengths: a Segment list page chained to a Last
        # Segment list page.  (Three or more list pages hit a QEMU bug, see
        # conformance_probes.DEVIATIONS; the probe table covers that chain.)
        dst = arena.alloc(8 * MiB + 500 * 4096)
        sizes = [4 * MiB // 500] * 500
        sizes[-1] += 4 * MiB - sum(sizes)
        segs, off = [], 0
        for n in sizes:
            segs.append((dst.iova + off + 3, n))
            off += (n + 3 + 4096 + 4095) // 4096 * 4096      # a gap page between segments
        assert len(segs) > 4096 // 16, "more descriptors than one list page holds"
        await c.execute(q, IO_READ, nsid=1, cdw10=0, cdw12=4 * MiB // 512 - 1,
                        segments=segs, dptr="sgl", is_read=True)
        got = b"".join(arena.read(a, n) for a, n in segs)
        assert got == data
        # and the PRP read of an SGL write, on the 4 KiB namespace
        await c.execute(q, IO_WRITE, nsid=2, cdw10=0, cdw12=4 * MiB // 4096 - 1,
                        segments=segs, dptr="sgl")
        out = arena.alloc(4 * MiB)
        await c.execute(q, IO_READ, nsid=2, cdw10=0, cdw12=4 * MiB // 4096 - 1,
                        segments=[(out.iova, 4 * MiB)], dptr="prp", is_read=True)
        assert arena.read(out.iova, 4 * MiB) == data
        st = q.stats()
        assert st["prp"] >= 2 and st["sgl"] >= 2
        for b in (src, dst, out):
            b.free()


async def test_flush_write_zeroes_deallocate(transport):
    async with open_controller(transport, **OPTS) as c:
        for nsid in (1, 2):
            ns = c.namespaces[nsid]
            n = 64
            await ns.write(100, pattern(nsid, n * ns.lba_size))
            await ns.flush()
            await ns.write_zeroes(100, 16)
            got = await ns.read(100, n)
            assert got[:16 * ns.lba_size] == bytes(16 * ns.lba_size)
            assert got[16 * ns.lba_size:] == pattern(nsid, n * ns.lba_size)[16 * ns.lba_size:]
            await ns.deallocate([(120, 8), (140, 4)])
            got = await ns.read(100, n)
            dlfeat = await c.identify(0, nsid)
            if dlfeat[33] & 7 == 1:                   # DLFEAT: deallocated blocks read as zeroes
                assert got[20 * ns.lba_size:28 * ns.lba_size] == bytes(8 * ns.lba_size)
            await ns.flush()


async def test_lba_out_of_range_is_a_decoded_error(transport):
    async with open_controller(transport, **OPTS) as c:
        ns = c.namespaces[1]
        buf = transport.arena.alloc(4096)
        with pytest.raises(NvmeError) as ei:
            await c.execute(c.io_qs[0], IO_READ, nsid=1, lba=ns.nlbas, cdw10=ns.nlbas & 0xFFFFFFFF,
                            cdw11=ns.nlbas >> 32, cdw12=0, segments=[(buf.iova, 512)], is_read=True)
        assert ei.value.name == "LBA_OUT_OF_RANGE" and ei.value.dnr
        assert ei.value.lba == ns.nlbas
        # that command only: the queue goes on
        await ns.write(0, pattern(1, 4096))
        assert await ns.read(0, 8) == pattern(1, 4096)
        assert c.errors_by_status == {"LBA_OUT_OF_RANGE": 1}


async def test_more_tasks_than_queue_slots(transport):
    # spin_us=0: hybrid polling would complete each command before the
    # next task gets to submit, and the queue would never fill
    async with open_controller(transport, io_queues=1, queue_entries=4, bounce_bytes=4 * MiB,
                               spin_us=0) as c:
        ns = c.namespaces[2]
        results = {}

        async def one(i):
            await ns.write(i * 2, pattern(i, 2 * 4096))
            results[i] = await ns.read(i * 2, 2)

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
        assert all(results[i] == pattern(i, 2 * 4096) for i in range(100))
        st = c.io_qs[0].stats()
        assert st["entries"] == 4
        assert st["busy_waits"] > 0, st


async def test_close_and_reopen(bdf):
    for round_ in range(3):
        t = VfioTransport(bdf, arena_size=16 * MiB)
        try:
            async with open_controller(t, io_queues=1, bounce_bytes=1 * MiB) as c:
                ns = c.namespaces[1]
                if round_:
                    assert await ns.read(2000, 8) == pattern(round_ - 1, 4096)
                await ns.write(2000, pattern(round_, 4096))
        finally:
            t.close()
        assert t.dev.closed


def test_cli_admin_commands_on_the_device(bdf, capsys):
    import json

    from nvmefs import cli
    assert cli.main(["id-ctrl", "--device", f"vfio:{bdf}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mn"] == "QEMU NVMe Ctrl"
    assert cli.main(["list", "--device", f"vfio:{bdf}", "--json"]) == 0
    out = capsys.readouterr().out
    assert "4096" in out and "512" in out, out
    assert cli.main(["id-ctrl", "--device", "vfio:0000:00:1f.6"]) == 2
    assert "no PCI device" in capsys.readouterr().err


MOUNT_DAEMON = """
import sys
from nvmefs import cli, mount
args = cli.build_parser().parse_args(sys.argv[1:])
args.argv = sys.argv[1:]
sys.exit(mount.run_mount_device(args))
"""


def test_mount_over_vfio_and_fio_verify(bdf, tmp_path):
    """The whole path: the FUSE mount served from the VFIO device, fio with
    verify on the namespace file.  Runs mount.run_mount_device (what
    `nvmefs mount --device vfio:BDF` dispatches to) in a daemon process,
    with two lanes: each its own queue pair and MSI-X vector on QEMU's
    controller."""
    import subprocess
    import sys

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon = subprocess.Popen([sys.executable, "-c", MOUNT_DAEMON, "mount", "--device", f"vfio:{bdf}",
                               str(mnt), "--lanes", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            assert daemon.poll() is None, daemon.stdout.read()
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.2)
        assert sorted(os.listdir(mnt)) == ["nvme0n1", "nvme0n2"]
        assert os.path.getsize(mnt / "nvme0n2") == 64 * MiB
        fio = subprocess.run(["fio", "--name=v", f"--filename={mnt / 'nvme0n1'}", "--rw=randwrite",
                              "--bs=4k", "--size=2M", "--direct=1", "--ioengine=psync",
                              "--verify=crc32c", "--do_verify=1", "--randrepeat=0",
                              "--output-format=terse"], capture_output=True, text=True, timeout=120)
        assert fio.returncode == 0, fio.stdout + fio.stderr
        # several requests in flight at once, up to 1 MiB: the lanes'
        # zero-copy writes (PRP1 inside the request) on QEMU's controller
        fio = subprocess.run(["fio", "--name=q", f"--filename={mnt / 'nvme0n1'}", "--rw=randwrite",
                              "--bsrange=4k-1M", "--size=8M", "--offset=4M", "--direct=1", "--ioengine=libaio",
                              "--iodepth=8", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                              "--randrepeat=0", "--output-format=terse"],
                             capture_output=True, text=True, timeout=300)
        assert fio.returncode == 0, fio.stdout + fio.stderr
        la = json.loads(os.getxattr(mnt, "user.nvmefs.stats"))["lanes"]
        assert len(la["lanes"]) == 2, la
        assert sum(ln["writes"] for ln in la["lanes"]) >= 512 + 8, la
        # no assertion on max_in_flight: how many requests the kernel hands a
        # lane at once depends on scheduling in a 1-CPU TCG guest (a CI run
        # saw 1); several commands outstanding on QEMU's queues is checked
        # by test_more_tasks_than_queue_slots, which controls its own depth
        assert la["errors"] == 0, la
        # fallocate on QEMU's controller: punch hole (Write Zeroes with DEAC)
        # and zero range, unaligned edges read-modify-written, 4 KiB LBAs
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        data = bytearray(os.urandom(256 * 1024))
        fd = os.open(mnt / "nvme0n2", os.O_RDWR)
        try:
            os.pwrite(fd, data, 8 * MiB)
            assert libc.fallocate(fd, 0x03, 8 * MiB + 100, 20000) == 0, ctypes.get_errno()
            data[100:20100] = bytes(20000)
            assert libc.fallocate(fd, 0x10, 8 * MiB + 65536, 65536 + 7) == 0, ctypes.get_errno()
            data[65536:131079] = bytes(65543)
            assert os.pread(fd, len(data), 8 * MiB) == bytes(data)
        finally:
            os.close(fd)
        la = json.loads(os.getxattr(mnt, "user.nvmefs.stats"))["lanes"]
        assert sum(ln["fallocates"] for ln in la["lanes"]) == 2 and la["errors"] == 0, la
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], timeout=30)
        try:
            out, _ = daemon.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            out, _ = daemon.communicate()
    assert daemon.returncode == 0, out
    assert "shut down cleanly" in out, out


# -- differential conformance ----------------------------------------------------------

def test_differential_conformance(transport):
    import conformance_probes as cp
    from nvmefs.transport import ModelTransport

    qemu = cp.run_probes(None, transport.arena, transport.regs)
    # the model configured like the lab's QEMU: MDTS 4 MiB, MQES 2047, SGLs
    # without bit buckets (QEMU 7.2 reports SGLS = 1)
    m = ModelTransport(namespaces=((64 * MiB, 512), (64 * MiB, 4096)), arena_size=ARENA,
                       mdts=10, mqes=2047, sgl="on")
    try:
        model = cp.run_probes(m.model, m.arena, m.regs)
    finally:
        m.close()
    text, diffs = cp.table(qemu, model)
    print(text)
    if os.environ.get("LAB_RW"):
        with open(os.path.join(os.environ["LAB_RW"], "conformance.txt"), "w") as f:
            f.write(text + "\n")
    assert not diffs, "undocumented differences between QEMU and the model:\n" + "\n".join(diffs)


# -- DMA isolation and differential fuzzing --------------------------------------------
# In this order, last: the builders' test asserts that the IOMMU has logged no
# fault since boot, and the guest kernel rate-limits its DMAR messages, so the
# deliberate faults of the next two tests must come after it.

def _model_like_the_lab():
    from nvmefs.transport import ModelTransport
    return ModelTransport(namespaces=((64 * MiB, 512), (64 * MiB, 4096)), arena_size=ARENA,
                          mdts=10, mqes=2047, sgl="on")


def _save(name, text):
    print(text)
    if os.environ.get("LAB_RW"):
        with open(os.path.join(os.environ["LAB_RW"], name), "w") as f:
            f.write(text + "\n")


def test_builders_emit_only_mapped_addresses(transport):
    """Seeded random buffer layouts inside arena allocations, through the
    queue pair's PRP/SGL builders and build_prp / build_sgl: every address
    in each command and its lists lies in the arena's one IOMMU mapping (the
    lists in the list memory the builder owns), QEMU moves the data
    (verified), and the IOMMU has logged no fault -- for these commands and
    for every guest test before this one."""
    import dma_isolation as di
    log = di.KernelLog(from_boot=True)
    try:
        count = di.run_builders(transport.arena, transport.regs)
        faults = log.dmar_faults()
    finally:
        log.close()
    print(count)
    assert count["prp"] >= 10 and count["sgl"] >= 10, count
    assert count["queue pair"] >= 10 and count["build_*"] >= 10, count
    assert count["list reads"] >= 100, "layouts too simple to need PRP lists or SGL segments"
    assert faults == [], f"the IOMMU refused DMA of the driver's commands: {faults}"


def test_bad_bus_addresses_do_no_harm(transport, bdf):
    """Unmapped IOVAs in every place a controller takes an address from
    (dma_isolation.PROBES): QEMU answers what dma_isolation.EXPECTED pins,
    the model Data Transfer Error; the canary beside the buffers and the
    process's memory are unchanged, no foreign bytes reach the medium, the
    IOMMU logs its refusals at exactly those addresses, and verified I/O on
    the same queue works after them."""
    import dma_isolation as di
    log = di.KernelLog()
    try:
        qemu, medium, problems, bads = di.run_bad_addresses(None, transport.arena, transport.regs)
        faults = log.wait_for_fault()
    finally:
        log.close()
    m = _model_like_the_lab()
    try:
        model, _medium, model_problems, _bads = di.run_bad_addresses(m.model, m.arena, m.regs)
    finally:
        m.close()
    _save("dma_isolation.txt", di.table(qemu, model, medium))
    assert not problems, problems
    assert not model_problems, model_problems
    wrong = {k: v for k, v in qemu.items() if v != di.EXPECTED[k[0]][0]}
    assert not wrong, f"QEMU answered otherwise than dma_isolation.EXPECTED: {wrong}"
    wrong = {k: v for k, v in model.items() if v != di.DTE}
    assert not wrong, f"the model did not answer Data Transfer Error: {wrong}"
    pages = {a & ~0xFFF for a in bads.values()}
    assert faults, "no DMAR fault logged: did the IOMMU see the bad addresses at all?"
    dev = di.short_bdf(bdf)
    stray = [f for f in faults if f[1] != dev or f[2] not in pages]
    assert not stray, f"DMAR faults at addresses no probe used: {stray} (probes: {sorted(map(hex, pages))})"


def test_fuzz_against_qemu_and_model(transport):
    """The model fuzzer's seeded sequences (tests/fuzz_model.py) sent to
    QEMU's controller and to the model, compared on (SCT, SC) per
    completion: every difference belongs to a class of fuzz_diff.DEVIATIONS;
    neither controller stops answering or reports a fatal status, memory
    beside the fuzzer's buffers is unchanged, and a verified write and read
    work after each seed."""
    import fuzz_diff as fd
    m = _model_like_the_lab()
    try:
        rows, problems = fd.run(transport, m)
    finally:
        m.close()
    text, unexplained = fd.report(rows)
    _save("fuzz_diff.txt", text)
    assert not problems, problems
    assert not unexplained, "differences no class of fuzz_diff.DEVIATIONS explains:\n" + "\n".join(unexplained)
    sent = [r for r in rows if not str(r[2]).startswith("skipped")]
    assert len(sent) >= 1500, f"only {len(sent)} commands compared"
    assert sum(1 for r in sent if r[2] == r[3] == fd.SUCCESS) >= 200, "too few commands succeeded on both"
