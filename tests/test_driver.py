"""The driver above the queue core, against the built-in controller model:
bring-up, concurrent verified I/O (PRP and SGL, interrupts and polling),
the namespace API, errors, retries, and recovery through fault injection."""
import os
import random
import struct

import pytest
import trio

from nvmefs import _core
from nvmefs.controller import REG_CSTS, open_controller
from nvmefs.errors import NvmeError
from nvmefs.transport import ModelTransport

MiB = 1 << 20


@pytest.fixture
def make_transport():
    made = []

    def make(**kw):
        kw.setdefault("namespaces", ((64 * MiB, 512),))
        kw.setdefault("arena_size", 256 * MiB)
        t = ModelTransport(**kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


async def test_bring_up_identifies_controller_and_namespaces(make_transport):
    t = make_transport(namespaces=((8 * MiB, 512), (16 * MiB, 4096)), max_io_queues=3)
    async with open_controller(t, io_queues=8) as c:
        assert c.id_ctrl["sqes"] == 0x66 and c.id_ctrl["cqes"] == 0x44
        assert c.id_ctrl["mn"]
        assert sorted(c.namespaces) == [1, 2]
        assert (c.namespaces[1].lba_size, c.namespaces[1].nlbas) == (512, 8 * MiB // 512)
        assert (c.namespaces[2].lba_size, c.namespaces[2].nlbas) == (4096, 16 * MiB // 4096)
        # asked for 8 queues, the controller grants 3
        assert len(c.io_qs) == 3
        assert c.max_transfer == (1 << c.id_ctrl["mdts"]) * 4096
    assert t.read32(REG_CSTS) & 0xC == 0x8, "normal shutdown must complete"


async def _random_io(ns, ref, n_ops, rng, max_lbas, concurrency=48):
    """Concurrent random reads/writes; writes never overlap in-flight ranges
    so the reference stays exact."""
    lba_size = ns.lba_size
    busy = set()
    lock = trio.Lock()
    sem = trio.Semaphore(concurrency)
    errors = []

    async def one(i):
        async with sem:
            while True:
                count = rng.randint(1, max_lbas)
                lba = rng.randrange(0, ns.nlbas - count)
                rng_range = set(range(lba, lba + count))
                async with lock:
                    if not (busy & rng_range):
                        busy.update(rng_range)
                        break
                await trio.sleep(0)
            try:
                if i % 2:
                    data = os.urandom(count * lba_size)
                    await ns.write(lba, data)
                    ref[lba * lba_size:(lba + count) * lba_size] = data
                else:
                    got = await ns.read(lba, count)
                    if got != ref[lba * lba_size:(lba + count) * lba_size]:
                        errors.append((lba, count))
            finally:
                busy.difference_update(rng_range)

    async with trio.open_nursery() as nursery:
        for i in range(n_ops):
            nursery.start_soon(one, i)
    assert not errors, f"{len(errors)} reads returned wrong data, first {errors[0]}"
    whole = await ns.read(0, ns.nlbas)
    assert whole == ref


@pytest.mark.parametrize("sgl,polled", [("off", False), ("bitbucket", False), ("on", True)])
async def test_concurrent_random_io_matches_reference(make_transport, sgl, polled):
    t = make_transport(namespaces=((16 * MiB, 512),), sgl=sgl, mdts=5)   # MDTS 128 KiB
    async with open_controller(t, io_queues=3, queue_entries=64, polled=polled) as c:
        ns = c.namespaces[1]
        ref = bytearray(ns.size)
        # up to 1 MiB per op: eight times MDTS, split and issued concurrently
        await _random_io(ns, ref, 1500, random.Random(7), max_lbas=2048)
        st = c.stats()["queues"]
        assert sum(q["completed"] for q in st[1:]) > 3000
        assert all(q["completed"] > 0 for q in st[1:]), "I/O must spread over every queue"
        if sgl == "off":
            assert sum(q["sgl"] for q in st) == 0
        else:
            assert sum(q["sgl"] for q in st) > 0   # large bounce chains pick SGL


async def test_4k_namespace_and_zero_copy(make_transport):
    t = make_transport(namespaces=((8 * MiB, 4096),))
    async with open_controller(t, io_queues=2) as c:
        ns = c.namespaces[1]
        buf = t.arena.alloc(3 * MiB)
        mv = memoryview(buf)
        pattern = os.urandom(3 * MiB)
        mv[:] = pattern
        await ns.write(10, buf)                     # zero copy, > MDTS: split
        out = t.arena.alloc(3 * MiB)
        await ns.read(10, 3 * MiB // 4096, out)
        assert bytes(memoryview(out)) == pattern
        assert await ns.read(10, 1) == pattern[:4096]
        mv.release()


async def test_flush_write_zeroes_deallocate_compare(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=1) as c:
        ns = c.namespaces[1]
        data = os.urandom(64 * 512)
        await ns.write(100, data, fua=True)
        await ns.flush()
        assert await ns.compare(100, data)
        assert not await ns.compare(100, bytes(64 * 512))
        await ns.write_zeroes(110, 8)
        got = await ns.read(100, 64)
        assert got[:10 * 512] == data[:10 * 512]
        assert got[10 * 512:18 * 512] == bytes(8 * 512)
        assert got[18 * 512:] == data[18 * 512:]
        await ns.deallocate([(100, 4), (140, 20)])
        got = await ns.read(100, 64)
        assert got[:4 * 512] == bytes(4 * 512) and got[40 * 512:60 * 512] == bytes(20 * 512)
        assert got[4 * 512:10 * 512] == data[4 * 512:10 * 512]


async def test_device_error_is_decoded_for_that_command_only(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=2) as c:
        ns = c.namespaces[1]
        await ns.write(0, b"\x5a" * 4096)
        t.model.inject(0x02, lba_start=0, lba_end=7, action="fail", sct=2, sc=0x81, dnr=True)
        with pytest.raises(NvmeError) as ei:
            await ns.read(0, 8)
        e = ei.value
        assert (e.name, e.sct, e.sc, e.dnr, e.errno) == ("UNRECOVERED_READ_ERROR", 2, 0x81, True, 5)
        assert await ns.read(0, 8) == b"\x5a" * 4096
        # the controller's own validation, through a raw command: LBA beyond the end
        with pytest.raises(NvmeError) as ei:
            await c.execute(c.io_qs[0], 0x02, nsid=1, cdw10=ns.nlbas, cdw12=0,
                            segments=[(t.arena.alloc(4096).iova, 512)], is_read=True)
        assert ei.value.name == "LBA_OUT_OF_RANGE" and ei.value.dnr


async def test_retryable_status_is_retried_nonretryable_is_not(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=1) as c:
        ns = c.namespaces[1]
        t.model.inject(0x01, action="fail", sct=0, sc=0x06, dnr=False, count=2)   # internal error
        await ns.write(0, b"\x11" * 512)
        assert ns.retried == 2
        assert await ns.read(0, 1) == b"\x11" * 512
        t.model.inject(0x01, action="fail", sct=0, sc=0x06, dnr=True)
        with pytest.raises(NvmeError, match="INTERNAL"):
            await ns.write(0, b"\x22" * 512)
        assert ns.retried == 2


async def test_dropped_command_is_aborted_and_resubmitted(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=1, timeout=0.5) as c:
        ns = c.namespaces[1]
        await ns.write(8, b"\x33" * 512)
        t.model.inject(0x02, action="drop")
        with trio.fail_after(10):
            assert await ns.read(8, 1) == b"\x33" * 512
        assert t.model.stats()["aborts"] >= 1
        assert c.resets == 0


async def test_hung_controller_is_reset_and_io_resumes(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=2, timeout=0.5, admin_timeout=0.5) as c:
        ns = c.namespaces[1]
        await ns.write(16, b"\x44" * 1024)
        t.model.hang(True)
        with trio.fail_after(20):
            assert await ns.read(16, 2) == b"\x44" * 1024
        assert c.resets == 1
        await ns.write(18, b"\x55" * 512)
        assert await ns.read(18, 1) == b"\x55" * 512


async def test_fatal_status_triggers_reset(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=1) as c:
        ns = c.namespaces[1]
        t.model.set_fatal()
        with trio.fail_after(10):
            while c.resets == 0:
                await trio.sleep(0.05)
            await c.ready.wait()
        await ns.write(0, b"\x66" * 512)
        assert await ns.read(0, 1) == b"\x66" * 512


async def test_delayed_completion_is_waited_for(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=1, timeout=5) as c:
        ns = c.namespaces[1]
        t.model.inject(0x01, action="delay", delay_ms=300)
        start = trio.current_time()
        await ns.write(0, b"\x77" * 512)
        assert trio.current_time() - start >= 0.25
        assert c.resets == 0 and t.model.stats()["aborts"] == 0


async def test_more_tasks_than_queue_slots_wait_for_space(make_transport):
    t = make_transport()
    # no hybrid polling: a task that finds the queue idle would complete its
    # command inside one native call, and when all 200 happen to, the SQ
    # never fills (seen as busy_waits == 0 about once in 30 runs)
    async with open_controller(t, io_queues=1, queue_entries=4, spin_us=0) as c:
        ns = c.namespaces[1]
        results = {}

        async def one(i):
            await ns.write(i, bytes([i]) * 512)
            results[i] = await ns.read(i, 1)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
        assert all(results[i] == bytes([i]) * 512 for i in range(200))
        assert c.io_qs[0].stats()["busy_waits"] > 0


async def test_image_persists_across_controllers(make_transport, tmp_path):
    img = str(tmp_path / "disk.img")
    t = make_transport(image=img, namespaces=((32 * MiB, 512),))
    async with open_controller(t, io_queues=1) as c:
        await c.namespaces[1].write(1000, b"persist!" * 64)
    t.close()
    assert os.stat(img).st_blocks * 512 < 8 * MiB, "the image must stay sparse"
    t2 = make_transport(image=img, create=False)
    async with open_controller(t2, io_queues=1) as c:
        assert await c.namespaces[1].read(1000, 1) == b"persist!" * 64


async def test_cancelled_waiter_keeps_bounce_chunks_until_completion(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=1, timeout=5) as c:
        ns = c.namespaces[1]
        pool = c.io_qs[0].bounce
        full = len(pool.free)
        t.model.inject(0x02, action="delay", delay_ms=400)
        with trio.move_on_after(0.1):
            await ns.read(0, 8)
        # the controller may still DMA into the chunk: it must not be reusable yet
        assert len(pool.free) == full - 1
        with trio.fail_after(5):
            while len(pool.free) != full:
                await trio.sleep(0.02)
        assert await ns.read(0, 1) == bytes(512)


async def test_hybrid_polling_catches_qd1_completions(make_transport):
    t = make_transport()
    # a window far above the model's service time (~2 us), so that even a
    # loaded machine that deschedules the model thread is caught by polling
    async with open_controller(t, io_queues=1, spin_us=50_000) as c:
        ns = c.namespaces[1]
        for i in range(200):
            await ns.read(i, 1)
        st = c.io_qs[0].stats()
        assert st["polled_completions"] >= 180
    async with open_controller(make_transport(), io_queues=1, spin_us=0) as c:
        for i in range(50):
            await c.namespaces[1].read(i, 1)
        assert c.io_qs[0].stats()["polled_completions"] == 0


async def test_fast_path_one_native_round_trip_per_command(make_transport):
    """QD1 reads and writes on an idle queue complete inside the native call
    (no slot, no interrupt wake-up), spread over every queue by the round
    robin, with the data intact."""
    t = make_transport()
    async with open_controller(t, io_queues=2, spin_us=50_000) as c:
        ns = c.namespaces[1]
        rng = random.Random(7)
        ref = {}
        for i in range(100):
            lba = rng.randrange(0, 4096) * 8
            ref[lba] = os.urandom(4096)
            await ns.write(lba, ref[lba])
        for lba, data in ref.items():
            assert await ns.read(lba, 8) == data
            assert await ns.read_window(lba, 8, 100, 50) == data[100:150]
        for q in c.io_qs:
            st = q.stats()
            assert st["submitted"] >= 0.4 * (100 + 2 * len(ref)), st
            # completed inside the native call, not by the general path's spin()
            assert st["fast_path"] >= 0.9 * st["submitted"], st
            # the completion task listens only for commands that outlived polling
            assert st["interrupts"] <= 2 * (st["submitted"] - st["polled_completions"]), st
            assert q.qp.outstanding == 0 and q.waiting == 0
    # concurrent requests whose commands outlive polling: the fast path
    # declines busy queues without moving the round robin, so the general
    # path still spreads them over both queues
    t2 = make_transport()
    async with open_controller(t2, io_queues=2, spin_us=1) as c:
        ns = c.namespaces[1]
        t2.model.inject(0x02, action="delay", delay_ms=5, count=0)
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(ns.read, i * 8, 8)
        spread = [q.stats()["submitted"] for q in c.io_qs]
        assert min(spread) >= 0.3 * sum(spread), spread


async def test_polling_yields_the_cpu_to_a_controller_thread_sharing_it(make_transport):
    """With the daemon and the built-in controller's thread on one CPU, a
    poll that kept the CPU for its whole window would never see the
    command complete (every one then pays the window and a wake-up).  The
    poll yields once it has spun longer than a command usually takes."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})     # the controller's thread inherits it
    try:
        t = make_transport()
        async with open_controller(t, io_queues=1, spin_us=30) as c:
            ns, q = c.namespaces[1], c.io_qs[0]
            await ns.write(0, bytes(4096))
            before = q.fast_path
            for i in range(200):
                await ns.read_window(i % 8, 1, 0, 512)
            assert q.fast_path - before >= 100, q.fast_path - before
    finally:
        os.sched_setaffinity(0, old)


async def test_fast_path_command_that_outlives_polling_is_waited_for(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=1, spin_us=20) as c:
        ns = c.namespaces[1]
        await ns.write(16, b"\x33" * 512)
        t.model.inject(0x02, action="delay", delay_ms=50)
        assert await ns.read_window(16, 1, 0, 512) == b"\x33" * 512
        t.model.inject(0x01, action="delay", delay_ms=50)
        await ns.write(17, b"\x44" * 512)
        assert await ns.read(17, 1) == b"\x44" * 512
        q = c.io_qs[0]
        assert q.qp.outstanding == 0 and q.waiting == 0 and len(q.bounce.free) == q.bounce.capacity()


async def test_fast_path_errors_are_counted_once_and_retried_by_the_rules(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=1, spin_us=50_000) as c:
        ns = c.namespaces[1]
        await ns.write(0, b"\x5a" * 4096)
        before = t.model.stats()["host_read_commands"]
        t.model.inject(0x02, lba_start=0, lba_end=7, action="fail", sct=2, sc=0x81, dnr=True)
        with pytest.raises(NvmeError, match="UNRECOVERED_READ_ERROR"):
            await ns.read_window(0, 8, 0, 4096)
        # a non-retryable failure is not sent again (nor counted twice)
        assert t.model.stats()["host_read_commands"] - before <= 1
        assert c.errors_by_status == {"UNRECOVERED_READ_ERROR": 1}
        assert await ns.read_window(0, 8, 0, 4096) == b"\x5a" * 4096
        # retryable: resubmitted (through the general path) and then fine
        t.model.inject(0x01, action="fail", sct=0, sc=0x06, dnr=False)
        await ns.write(8, b"\x66" * 512)
        assert ns.retried == 1
        assert await ns.read(8, 1) == b"\x66" * 512


async def test_fast_path_follows_the_retry_rules(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=1, spin_us=50_000, retries=2) as c:
        ns = c.namespaces[1]
        t.model.inject(0x02, action="fail", sct=0, sc=0x06, dnr=False, count=0)   # every read, retryable
        for call in (lambda: ns.read(0, 8), lambda: ns.read_window(0, 8, 0, 4096)):
            before = sum(c.errors_by_status.values())
            with pytest.raises(NvmeError, match="INTERNAL"):
                await call()
            # one first attempt and `retries` more, wherever they ran
            assert sum(c.errors_by_status.values()) - before == 3
        assert c.io_qs[0].stats()["fast_path"] == 0


async def test_write_zeroes_and_dsm_follow_the_nvm_command_set_limits(make_transport):
    """WZSL, DMRL, DMRSL and DMSL (Identify CNS 06h) split Write Zeroes and
    deallocate; the model refuses commands above them, as a strict
    controller may."""
    t = make_transport(wzsl=1, dmrl=2, dmrsl=100, dmsl=150)
    async with open_controller(t, io_queues=1) as c:
        assert c.nvm_limits == {"write_zeroes_bytes": 8192, "dsm_ranges": 2, "dsm_range_lbas": 100,
                                "dsm_lbas": 150}
        ns = c.namespaces[1]
        await ns.write(0, b"\x77" * (2048 * 512))
        await ns.write_zeroes(0, 1000)                   # 8 KiB = 16 LBAs per command
        await ns.deallocate([(1000, 333), (1500, 7), (1600, 1)])
        data = await ns.read(0, 2048)
        assert data[:1333 * 512] == bytes(1333 * 512)
        assert data[1333 * 512:1500 * 512] == b"\x77" * (167 * 512)
        assert data[1500 * 512:1507 * 512] == bytes(7 * 512)
        assert data[1600 * 512:1601 * 512] == bytes(512)
        # the limits are real: one command above each is refused
        q = c.io_qs[0]
        with pytest.raises(NvmeError, match="INVALID_FIELD"):
            await c.execute(q, 0x08, nsid=1, cdw10=0, cdw12=16)
        buf = t.arena.alloc(4096)
        for ranges in ([(0, 101)], [(0, 100), (200, 51)], [(0, 1), (5, 1), (9, 1)]):
            payload = b"".join(struct.pack("<IIQ", 0, n, lba) for lba, n in ranges)
            memoryview(buf)[:len(payload)] = payload
            with pytest.raises(NvmeError, match="INVALID_FIELD"):
                await c.execute(q, 0x09, nsid=1, cdw10=len(ranges) - 1, cdw11=1 << 2,
                                segments=[(buf.iova, len(payload))])
    async with open_controller(make_transport(), io_queues=1) as c:
        assert c.nvm_limits == {}


async def test_reset_completes_every_command_in_flight(make_transport):
    t = make_transport()
    async with open_controller(t, io_queues=2, queue_entries=16) as c:
        ns = c.namespaces[1]
        await ns.write(0, b"\x99" * 64 * 512)
        t.model.inject(0x02, action="drop", count=0)       # every read from now on is lost
        results = []

        async def reader(i):
            results.append(await ns.read(i * 8, 8))

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(reader, i)
            await trio.sleep(0.2)
            t.model.clear_faults()
            t.model.set_fatal()             # the health check resets; all four resubmit
            with trio.fail_after(15):
                while len(results) < 4:
                    await trio.sleep(0.05)
        assert results == [b"\x99" * 4096] * 4
        assert c.resets == 1


async def test_reset_disables_the_controller_before_it_fails_and_frees_anything(make_transport, monkeypatch):
    """A timed-out controller may still be working: until CC.EN=0 is
    acknowledged (CSTS.RDY=0) it may write completions into the CQs and
    read data into the bounce chunks or the lanes' buffers, so none
    of that memory may go back to the arena, nor any waiter be failed
    (and resubmit elsewhere), before then -- as Linux's nvme_reset_work
    disables first.  Each queue records CSTS.RDY when it is torn down."""
    from nvmefs.queue import IoQueue
    t = make_transport()
    seen = []
    fail_all, close = IoQueue.fail_all, IoQueue.close

    def record(what, real):
        def wrapped(q, *args):
            seen.append((what, q.qid, t.read32(REG_CSTS) & 1))
            return real(q, *args)
        return wrapped
    monkeypatch.setattr(IoQueue, "fail_all", record("fail", fail_all))
    monkeypatch.setattr(IoQueue, "close", record("close", close))
    from nvmefs.lanes import Lanes
    async with open_controller(t, io_queues=2, owners=[Lanes(t.arena, [0])]) as c:
        await c.namespaces[1].write(0, b"\x01" * 512)
        await c.reset("test")
        torn = [s for s in seen if s[1] is not None]
        assert {q for _, q, _ in torn} == {0, 1, 2, 3}, torn         # admin, two trio queues, the lane's
        assert all(rdy == 0 for _, _, rdy in torn), torn
        seen.clear()
        await c.namespaces[1].write(0, b"\x02" * 512)              # and it works again
        assert bytes(await c.namespaces[1].read(0, 1)) == b"\x02" * 512


async def test_failed_reset_fails_io_instead_of_hanging(make_transport):
    from nvmefs.errors import ControllerError
    t = make_transport()
    async with open_controller(t, io_queues=1) as c:
        ns = c.namespaces[1]
        t.model.inject(0x05, admin=True, action="fail", sct=1, sc=0x02, dnr=True, count=0)
        t.model.set_fatal()
        with trio.fail_after(15):
            with pytest.raises(ControllerError):
                while True:
                    await ns.read(0, 1)
                    await trio.sleep(0.05)
        assert c.closed


@pytest.mark.parametrize("polled", [False, True])
async def test_shadow_doorbells_verified_io(make_transport, polled):
    t = make_transport(namespaces=((16 * MiB, 512),), mdts=5)
    async with open_controller(t, io_queues=2, queue_entries=32, polled=polled,
                               shadow_doorbells=True) as c:
        assert c.dbbuf_active and t.model.stats()["shadow_doorbells"]
        ns = c.namespaces[1]
        ref = bytearray(ns.size)
        await _random_io(ns, ref, 600, random.Random(11), max_lbas=512)
        st = c.stats()["queues"]
        # the controller's event index let most MMIO doorbell writes be skipped
        assert sum(q["shadow_skips"] for q in st[1:]) > 0
        assert st[0]["shadow_skips"] == 0, "the admin queue always rings MMIO"
        await c.reset("test", c.generation)      # Doorbell Buffer Config again after a reset
        assert c.dbbuf_active
        assert await ns.read(0, 4) == ref[:2048]


async def test_a_command_that_changes_namespaces_is_followed_by_reading_them_again(make_transport):
    """Commands Supported and Effects: Format NVM has NCC/NIC, so the driver
    reads the namespaces again right after it (the new LBA size, at once);
    Identify has none, and nothing is re-read."""
    from nvmefs.controller import ADM_FORMAT, ADM_IDENTIFY
    t = make_transport(namespaces=((8 * MiB, 512),))
    async with open_controller(t, io_queues=1) as c:
        assert c.effects[ADM_FORMAT] & 0b1100 and c.effects[ADM_IDENTIFY] == 1
        ns = c.namespaces[1]
        assert (ns.lba_size, ns.nlbas) == (512, 16384)
        before = t.model.stats()["admin_commands"].get(ADM_IDENTIFY, 0)
        await c.admin(ADM_FORMAT, nsid=1, cdw10=1)                 # to 4 KiB LBAs
        assert (c.namespaces[1].lba_size, c.namespaces[1].nlbas) == (4096, 2048)
        after = t.model.stats()["admin_commands"].get(ADM_IDENTIFY, 0)
        assert after - before == 2                                 # the list, then the namespace
        await c.namespaces[1].write(0, b"\x42" * 4096)
        assert await c.namespaces[1].read(0, 1) == b"\x42" * 4096
