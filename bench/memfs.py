#!/usr/bin/env python3
"""The ceiling of a pyfuse3 frontend: one file backed by a bytearray, served
the way nvmefs serves a namespace (direct I/O, memoryview reads), with no
driver underneath.  Used by bench/fio_bench.py as a baseline.

    python bench/memfs.py MOUNTPOINT SIZE_BYTES
"""
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
FILE = ROOT + 1


class MemFS(pyfuse3.Operations):
    def __init__(self, size):
        super().__init__()
        self.data = bytearray(size)

    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.entry_timeout = e.attr_timeout = 300
        if inode == ROOT:
            e.st_mode, e.st_nlink = stat.S_IFDIR | 0o755, 2
        elif inode == FILE:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o644, 1, len(self.data)
            e.st_blksize = 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT and name == b"data":
            return await self.getattr(FILE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"data", await self.getattr(FILE), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        return memoryview(self.data)[off:off + size]

    async def write(self, fh, off, buf):
        n = min(len(buf), len(self.data) - off)
        self.data[off:off + n] = buf[:n]
        return n

    async def fsync(self, fh, datasync):
        pass

    async def flush(self, fh):
        pass


async def serve(mnt, size):
    pyfuse3.init(MemFS(size), mnt, set(pyfuse3.default_options) | {"fsname=memfs"})
    try:
        async with trio.open_nursery() as nursery:
            async def stop():
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for _ in sigs:
                        nursery.cancel_scope.cancel()

            async def main():
                await pyfuse3.main(min_tasks=8, max_tasks=256)
                nursery.cancel_scope.cancel()
            nursery.start_soon(stop)
            nursery.start_soon(main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    trio.run(serve, sys.argv[1], int(sys.argv[2]))
