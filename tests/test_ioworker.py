"""The ioworker (bench loop in nvmefs._model) and the model's null-data mode:
exact counts, no byte moved in null-data mode, every check still made."""
import json
import os
import subprocess
import sys

import trio

from nvmefs import _model
from nvmefs.controller import open_controller
from nvmefs.queue import HandedQueues
from nvmefs.transport import ModelTransport

KiB, MiB = 1 << 10, 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def work(t, owner, **kw):
    kw.setdefault("nsid", 1)
    kw.setdefault("lba_size", 512)
    kw.setdefault("seconds", 30.0)
    return trio.to_thread.run_sync(lambda: _model.ioworker(owner.queues[0].qp, t.arena, **kw))


async def test_every_command_counted_once_and_latencies_ordered():
    t = ModelTransport(namespaces=((64 * MiB, 512),), arena_size=64 * MiB)
    owner = HandedQueues(1)
    try:
        async with open_controller(t, io_queues=1, queue_entries=64, polled=True, owners=[owner]) as c:
            nlba = c.namespaces[1].nlbas
            before = t.model.stats()
            r = await work(t, owner, nlba=nlba, qd=16, io_bytes=4 * KiB, read_pct=50, max_ios=3000)
            after = t.model.stats()
            assert r["ios"] == 3000 and r["errors"] == 0 and r["outstanding"] == 0, r
            assert r["reads"] + r["writes"] == 3000 and 0 < r["reads"] < 3000, r
            assert after["host_read_commands"] - before["host_read_commands"] == r["reads"]
            assert after["host_write_commands"] - before["host_write_commands"] == r["writes"]
            assert after["bytes_written"] - before["bytes_written"] == r["writes"] * 4 * KiB
            lat = r["lat_ns"]
            assert 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"], lat
            # sequential 128 KiB through SGLs, stopping at the end of the namespace
            r = await work(t, owner, nlba=nlba, qd=8, io_bytes=128 * KiB, read_pct=0, sequential=True,
                           dptr="sgl", max_ios=64 * MiB // (128 * KiB))
            assert r["ios"] == 512 and r["errors"] == 0, r
            assert c.io_qs[0].qp.sgl_commands == 0                      # trio's queue was not used
            assert owner.queues[0].qp.sgl_commands == 512
    finally:
        t.close()


async def test_forced_sgl_on_a_controller_without_them_fails_every_command():
    t = ModelTransport(namespaces=((16 * MiB, 512),), arena_size=64 * MiB, sgl="off")
    owner = HandedQueues(1)
    try:
        async with open_controller(t, io_queues=1, queue_entries=64, polled=True, owners=[owner]) as c:
            r = await work(t, owner, nlba=c.namespaces[1].nlbas, qd=4, dptr="sgl", max_ios=100)
            assert r["ios"] == 100 and r["errors"] == 100, r
            r = await work(t, owner, nlba=c.namespaces[1].nlbas, qd=4, dptr="auto", max_ios=100)
            assert r["ios"] == 100 and r["errors"] == 0, r
    finally:
        t.close()


async def test_null_data_moves_no_byte_but_checks_every_command(tmp_path):
    img = str(tmp_path / "null.img")
    t = ModelTransport(img, namespaces=((16 * MiB, 512),), arena_size=64 * MiB, null_data=True)
    owner = HandedQueues(1)
    try:
        async with open_controller(t, io_queues=1, queue_entries=64, polled=True, owners=[owner]) as c:
            ns = c.namespaces[1]
            await ns.write(0, b"\xaa" * 4096)
            r = await work(t, owner, nlba=ns.nlbas, qd=8, io_bytes=64 * KiB, read_pct=0, sequential=True,
                           max_ios=256)
            assert r["ios"] == 256 and r["errors"] == 0, r
            assert t.model.stats()["bytes_written"] == 4096 + 256 * 64 * KiB
            # the checks still run: told the namespace is twice its size,
            # the sequential pass's second half is past the end, every one
            # of its 256 commands refused
            r = await work(t, owner, nlba=2 * ns.nlbas, qd=8, io_bytes=64 * KiB, sequential=True, max_ios=512)
            assert r["ios"] == 512 and r["errors"] == 256, r
            assert t.model.stats()["bytes_read"] == 256 * 64 * KiB
    finally:
        t.close()
    t = ModelTransport(img, arena_size=64 * MiB)
    try:
        async with open_controller(t, io_queues=1) as c:
            assert await c.namespaces[1].read(0, 32768) == bytes(16 * MiB)
    finally:
        t.close()


def test_the_bench_runs_and_reports_every_row(tmp_path):
    out = tmp_path / "iow.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ioworker.py"), "--seconds", "0.05",
                        "--repeat", "1", "--rows", "QD8", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    for mode in ("null", "data"):
        assert list(res["model"][mode]) == ["randread 4k QD8"]
        row = res["model"][mode]["randread 4k QD8"]
        assert row["ios"] > 0 and row["errors"] == 0 and row["outstanding"] == 0
    assert res["echo"]["echo 4k QD1"]["ios"] > 0
    assert "targets (issue 17)" in r.stdout
