"""The pyfuse3 frontend: one regular file per namespace (nvme0n1, ...).

The lanes (nvmefs/lanes.py, _core/lane.pyx) serve every data request --
READ, WRITE, FALLOCATE, FLUSH, FSYNC -- in C, each on its own CPU.  What is
left is here, in trio: names and attributes, open and release, statfs, and
two extended attributes of the root directory: ``user.nvmefs.stats``
(what `nvmefs stats` prints) and, for tests of the error paths only,
``user.nvmefs.inject`` (fault injection into the built-in controller).

Inode numbers: the root directory is 1, namespace N is N + 1 (the lanes
map a request's inode to its namespace the same way).
"""
import errno
import json
import logging
import os
import stat
import time

import pyfuse3

log = logging.getLogger("nvmefs.fuse")

ROOT = pyfuse3.ROOT_INODE
STATS_XATTR = b"user.nvmefs.stats"
INJECT_XATTR = b"user.nvmefs.inject"


def namespace_name(ctrl_index, nsid):
    return f"nvme{ctrl_index}n{nsid}"


class NvmeFS(pyfuse3.Operations):
    def __init__(self, ctrl, lanes, *, direct_io=True, ctrl_index=0, extra_stats=None):
        super().__init__()
        self.ctrl = ctrl
        self.lanes = lanes
        self.direct_io = direct_io
        # --page-cache: the kernel keeps written pages and sends them in
        # writeback (up to max_write per request) instead of one request
        # per write(); fsync and close still end in FSYNC/FLUSH, which the
        # lanes turn into NVMe Flush
        self.enable_writeback_cache = not direct_io
        self.ctrl_index = ctrl_index
        self.mtime = {}
        self.started = time.time_ns()
        # more sections for `nvmefs stats` (name -> callable): the mount's
        self.extra_stats = extra_stats or {}

    # -- names and attributes --------------------------------------------------

    def _ns(self, inode):
        ns = self.ctrl.namespaces.get(inode - 1)
        if ns is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return ns

    def name_of(self, nsid):
        return namespace_name(self.ctrl_index, nsid)

    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.st_uid = os.getuid()
        e.st_gid = os.getgid()
        e.entry_timeout = 300
        e.attr_timeout = 300
        if inode == ROOT:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 2
            e.st_size = 0
            e.st_blksize = 4096
            t = self.started
        else:
            ns = self._ns(inode)
            e.st_mode = stat.S_IFREG | 0o644
            e.st_nlink = 1
            e.st_size = ns.size
            e.st_blksize = ns.lba_size
            e.st_blocks = ns.size // 512
            t = max(self.mtime.get(inode, self.started), self.lanes.mtime_ns(ns.nsid))
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = t
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name == b".":
            return await self.getattr(ROOT)
        for nsid in self.ctrl.namespaces:
            if name == self.name_of(nsid).encode():
                return await self.getattr(nsid + 1)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT

    async def readdir(self, fh, start_id, token):
        for nsid in sorted(self.ctrl.namespaces):
            if nsid <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, self.name_of(nsid).encode(), await self.getattr(nsid + 1), nsid):
                break

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        total = sum(ns.size for ns in self.ctrl.namespaces.values())
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = 0          # fixed-size files: nothing to allocate
        s.f_files = len(self.ctrl.namespaces) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode != ROOT:
            ns = self._ns(inode)
            if fields.update_size and attr.st_size != ns.size:
                log.warning("refusing to resize %s to %d bytes: a namespace has a fixed size of %d",
                            self.name_of(ns.nsid), attr.st_size, ns.size)
                raise pyfuse3.FUSEError(errno.EPERM if attr.st_size < ns.size else errno.EFBIG)
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise pyfuse3.FUSEError(errno.EPERM)
            if fields.update_mtime:
                self.mtime[inode] = attr.st_mtime_ns
        return await self.getattr(inode)

    async def open(self, inode, flags, ctx):
        self._ns(inode)
        # O_DIRECT from the caller always bypasses the page cache; the mount
        # option decides for everybody else
        return pyfuse3.FileInfo(fh=inode, direct_io=self.direct_io or bool(flags & os.O_DIRECT),
                                keep_cache=not self.direct_io)

    async def release(self, fh):
        pass

    # -- `nvmefs stats MOUNTPOINT` reads this ----------------------------------

    def stats(self):
        st = self.ctrl.stats()
        st["lanes"] = self.lanes.stats()
        for name, fn in self.extra_stats.items():
            st[name] = fn()
        st["namespaces"] = {self.name_of(n): {"lba_size": ns.lba_size, "size": ns.size}
                            for n, ns in self.ctrl.namespaces.items()}
        return st

    async def getxattr(self, inode, name, ctx):
        if inode == ROOT and name == STATS_XATTR:
            return json.dumps(self.stats()).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def setxattr(self, inode, name, value, ctx):
        # Fault injection into the built-in model, for tests of the mount's
        # error paths; only when the daemon was started with
        # NVMEFS_FAULT_INJECTION=1, never in normal use.
        if inode != ROOT or name != INJECT_XATTR or os.environ.get("NVMEFS_FAULT_INJECTION") != "1":
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        model = getattr(self.ctrl.transport, "model", None)
        if model is None:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        try:
            spec = json.loads(value)
            if spec.pop("fatal", False):
                model.set_fatal()
            elif spec.pop("reset", False):
                # a controller reset now, as the watchdog would start one
                self.ctrl.nursery.start_soon(self.ctrl.reset, "reset asked for through user.nvmefs.inject",
                                             self.ctrl.generation)
            elif spec.pop("clear", False):
                model.clear_faults()
            elif "hang" in spec:
                model.hang(bool(spec.pop("hang")))
            else:
                model.inject(spec.pop("opcode"), **spec)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("bad fault injection request %r: %s", value, exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    async def listxattr(self, inode, ctx):
        return [STATS_XATTR] if inode == ROOT else []
