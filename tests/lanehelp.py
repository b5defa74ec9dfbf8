"""A controller whose lanes read SOCK_SEQPACKET sockets standing in for
/dev/fuse: a test writes FUSE requests into a lane's socket as the kernel
would and reads each reply back, one message each, exactly once.  The real
mount is in test_mount.py."""
import contextlib
import os
import socket
import struct

import trio

from nvmefs.controller import open_controller
from nvmefs.lanes import Lanes
from nvmefs.transport import ModelTransport

FUSE_GETATTR, FUSE_READ, FUSE_WRITE, FUSE_FSYNC, FUSE_FLUSH = 3, 15, 16, 20, 25
FUSE_INTERRUPT, FUSE_FALLOCATE = 36, 43
KEEP, PUNCH, ZERO = 0x01, 0x02, 0x10
KiB, MiB = 1 << 10, 1 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
NODE = 2                    # namespace 1's inode


def header(opcode, unique, body_len, nodeid=NODE, pid=0):
    # fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, padding
    return struct.pack("<IIQQIIII", 40 + body_len, opcode, unique, nodeid, 0, 0, pid, 0)


def read_req(unique, off, size, nodeid=NODE, pid=0):
    body = struct.pack("<QQIIQII", nodeid, off, size, 0, 0, 0, 0)       # fuse_read_in
    return header(FUSE_READ, unique, len(body), nodeid, pid) + body


def write_req(unique, off, data, nodeid=NODE, pid=0):
    body = struct.pack("<QQIIQII", nodeid, off, len(data), 0, 0, 0, 0) + bytes(data)   # fuse_write_in + data
    return header(FUSE_WRITE, unique, len(body), nodeid, pid) + body


def fallocate_req(unique, off, length, mode, nodeid=NODE):
    body = struct.pack("<QQQII", nodeid, off, length, mode, 0)           # fuse_fallocate_in
    return header(FUSE_FALLOCATE, unique, len(body), nodeid) + body


def flush_req(unique, nodeid=NODE):
    body = struct.pack("<QIIQ", nodeid, 0, 0, 0)                        # fuse_flush_in
    return header(FUSE_FLUSH, unique, len(body), nodeid) + body


def fsync_req(unique, nodeid=NODE):
    body = struct.pack("<QII", nodeid, 0, 0)                            # fuse_fsync_in
    return header(FUSE_FSYNC, unique, len(body), nodeid) + body


def interrupt_req(unique, target):
    body = struct.pack("<Q", target)
    return header(FUSE_INTERRUPT, unique, len(body), 0) + body


def same(got, want):
    """Byte equality with a short message (pytest's own diff of random
    megabytes takes minutes)."""
    got, want = bytes(got), bytes(want)
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise AssertionError(f"{len(got)} bytes vs {len(want)} expected, first difference at {at}")
    return True


class Channel:
    """The kernel's end of one lane's channel: collects replies by request
    id, each exactly once."""

    def __init__(self):
        self.kernel, self.ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.kernel, self.ours):
            # a 1 MiB write is one message
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 * MiB)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 * MiB)
        self.kernel.setblocking(False)
        self.ours.setblocking(False)
        self.got = {}

    def close(self):
        self.kernel.close()
        self.ours.close()

    def send(self, msg):
        self.kernel.send(msg)

    def collect(self):
        while True:
            try:
                msg = self.kernel.recv(4 * MiB)
            except BlockingIOError:
                return
            length, err, unique = struct.unpack_from("<IiQ", msg)
            assert length == len(msg), "reply length field"
            assert unique not in self.got, f"request {unique} answered twice"
            self.got[unique] = (-err, msg[16:])


class Rig:
    def __init__(self, ctrl, lanes, channels):
        self.ctrl, self.lanes, self.channels = ctrl, lanes, channels
        self.ns = ctrl.namespaces[1]
        self.model = ctrl.transport.model
        self.unique = 0

    def next_unique(self):
        self.unique += 2        # the kernel's ids are even; an interrupt's is odd
        return self.unique

    def send(self, lane, make, *args, **kw):
        u = self.next_unique()
        self.channels[lane].send(make(u, *args, **kw))
        return u

    async def wait(self, *uniques, lane=None, timeout=20):
        """Until every one of ``uniques`` is answered (on any lane's channel,
        or on ``lane``'s only): their (errno, body)."""
        chans = self.channels if lane is None else [self.channels[lane]]
        with trio.fail_after(timeout):
            while True:
                for ch in chans:
                    ch.collect()
                got = {}
                for ch in chans:
                    got.update(ch.got)
                if all(u in got for u in uniques):
                    return [got[u] for u in uniques]
                await trio.sleep(0.001)

    async def call(self, lane, make, *args, **kw):
        return (await self.wait(self.send(lane, make, *args, **kw), lane=lane))[0]

    async def read(self, off, size, lane=0):
        err, body = await self.call(lane, read_req, off, size)
        assert err == 0, os.strerror(err)
        return body

    async def read_all(self, off, size, lane=0):
        """In requests of at most 1 MiB, as the kernel sends them."""
        out = bytearray()
        while size:
            n = min(size, MiB)
            out += await self.read(off, n, lane)
            off += n
            size -= n
        return out

    async def write(self, off, data, lane=0):
        err, body = await self.call(lane, write_req, off, data)
        assert err == 0, os.strerror(err)
        return struct.unpack("<II", body)[0]

    def stats(self):
        return self.lanes.stats()["lanes"]

    async def retable(self):
        """The lanes take the namespace table (and the command limits in
        it) when a queue is attached: as after a reset, without one."""
        await self.lanes.quiesce()
        await self.lanes.attach(self.ctrl, self.lanes.queues)

    def total(self, key):
        return sum(st[key] for st in self.stats())


@contextlib.asynccontextmanager
async def lanes_rig(namespaces=((16 * MiB, 4096),), cpus=(0,), queue_entries=256, model_kw=None, **ctrl_kw):
    """(Rig) with one lane per entry of ``cpus``, serving."""
    t = ModelTransport(namespaces=namespaces, arena_size=512 * MiB, **(model_kw or {}))
    lanes = Lanes(t.arena, list(cpus), spin_ns=30000, timeout=ctrl_kw.pop("timeout", 10.0))
    channels = []
    try:
        async with open_controller(t, io_queues=1, queue_entries=queue_entries, owners=[lanes],
                                   timeout=lanes.timeout, **ctrl_kw) as c, trio.open_nursery() as nursery:
            channels = [Channel() for _ in range(lanes.count)]
            await nursery.start(lanes.run)
            lanes.serve([ch.ours.fileno() for ch in channels], (0, 0), own=False)
            try:
                yield Rig(c, lanes, channels)
            finally:
                with trio.CancelScope(shield=True):
                    await lanes.stop()
                nursery.cancel_scope.cancel()
    finally:
        lanes.close()
        for ch in channels:
            ch.close()
        t.close()
