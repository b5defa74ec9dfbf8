"""The pyfuse3 frontend: one regular file per namespace (nvme0n1, ...).

The lanes (nvmefs/lanes.py, _core/lane.pyx) serve every data request --
READ, WRITE, FALLOCATE, FLUSH, FSYNC -- in C, each on its own CPU.  What is
left is here, in trio: names and attributes, open and release, statfs, and
extended attributes of the root directory: ``user.nvmefs.stats`` (what
`nvmefs stats` prints), ``user.nvmefs.admin`` (the admin verbs of the CLI,
run on this mount's controller: set it to a request, then read the answer;
each caller process has its own), and, for tests of the error paths only,
``user.nvmefs.inject`` (fault injection into the built-in controller).

The files follow the controller's namespaces: after a rescan (a namespace
attached, detached, deleted or formatted; nvmefs/controller.py) the kernel
is told to forget names that went and attributes that changed.

Inode numbers: the root directory is 1, namespace N is N + 1 (the lanes
map a request's inode to its namespace the same way).
"""
import errno
import json
import logging
import os
import stat
import time
from collections import OrderedDict

import pyfuse3

from nvmefs import admin
from nvmefs.errors import ControllerError, NvmeError

log = logging.getLogger("nvmefs.fuse")

ROOT = pyfuse3.ROOT_INODE
STATS_XATTR = b"user.nvmefs.stats"
INJECT_XATTR = b"user.nvmefs.inject"
ADMIN_XATTR = b"user.nvmefs.admin"
ADMIN_RESULTS = 64          # answers kept, one per caller process, oldest dropped


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
        self.open_handles = {}      # inode -> files open on it
        self.admin_results = OrderedDict()
        self.admin_requests = 0
        ctrl.namespace_listeners.append(self.namespaces_changed)

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
        self.open_handles[inode] = self.open_handles.get(inode, 0) + 1
        # O_DIRECT from the caller always bypasses the page cache; the mount
        # option decides for everybody else
        return pyfuse3.FileInfo(fh=inode, direct_io=self.direct_io or bool(flags & os.O_DIRECT),
                                keep_cache=not self.direct_io)

    async def release(self, fh):
        n = self.open_handles.get(fh, 0) - 1
        if n > 0:
            self.open_handles[fh] = n
        else:
            self.open_handles.pop(fh, None)

    # -- namespaces that come and go -------------------------------------------

    def namespaces_changed(self, before, after):
        """The controller's rescan: ``before`` and ``after`` map nsid ->
        (size, LBA size).  New names need nothing (a failed lookup is not
        cached); the kernel forgets names that went and the attributes
        (size, block size) of namespaces that changed."""
        for nsid, shape in before.items():
            if nsid not in after:
                log.info("%s is gone", self.name_of(nsid))
                # async: the request that caused it (a setxattr on the root)
                # may still hold the directory's lock
                pyfuse3.invalidate_entry_async(ROOT, self.name_of(nsid).encode(), ignore_enoent=True)
            elif after[nsid] != shape:
                try:
                    pyfuse3.invalidate_inode(nsid + 1, attr_only=True)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:     # the kernel had not looked it up
                        log.warning("invalidating %s: %s", self.name_of(nsid), exc)
        for nsid in after:
            if nsid not in before:
                log.info("%s appeared", self.name_of(nsid))

    # -- `nvmefs stats MOUNTPOINT` reads this ----------------------------------

    def stats(self):
        st = self.ctrl.stats()
        st["lanes"] = self.lanes.stats()
        for name, fn in self.extra_stats.items():
            st[name] = fn()
        st["namespaces"] = {self.name_of(n): {"lba_size": ns.lba_size, "size": ns.size,
                                              "open_files": self.open_handles.get(n + 1, 0)}
                            for n, ns in self.ctrl.namespaces.items()}
        st["admin_requests"] = self.admin_requests
        return st

    async def getxattr(self, inode, name, ctx):
        if inode == ROOT and name == STATS_XATTR:
            return json.dumps(self.stats()).encode()
        if inode == ROOT and name == ADMIN_XATTR and ctx.pid in self.admin_results:
            return self.admin_results[ctx.pid]
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def _admin(self, value, ctx):
        """One admin verb asked for by `nvmefs <verb>` (nvmefs/admin.py):
        {"verb", "args", "force"} in, {"ok", "result" | "error", "usage"}
        kept for the caller to read.  Only the mount's owner (or root) may."""
        if ctx.uid not in (0, os.getuid()):
            raise pyfuse3.FUSEError(errno.EACCES)
        try:
            req = json.loads(value)
            name, params, force = req["verb"], dict(req.get("args", {})), bool(req.get("force"))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        self.admin_requests += 1
        fn = admin.VERBS.get(name)
        busy = [n for n in admin.target_nsids(self.ctrl, name, params) if self.open_handles.get(n + 1)]
        if fn is None:
            res = {"ok": False, "usage": True, "error": f"unknown admin verb {name!r}"}
        elif busy and not force:
            which = ", ".join(f"{self.name_of(n)} ({self.open_handles[n + 1]} open file(s))" for n in busy)
            res = {"ok": False, "usage": True,
                   "error": f"{name}: {which} in use in this mount; close them (umount, losetup -d) "
                            f"or pass --force"}
        else:
            try:
                res = {"ok": True, "result": await fn(self.ctrl, **params)}
            except (NvmeError, ControllerError, LookupError, ValueError) as exc:
                res = {"ok": False, "error": str(exc)}
            except TypeError as exc:
                res = {"ok": False, "usage": True, "error": f"{name}: {exc}"}
            log.info("admin %s %s: %s", name, params, "done" if res["ok"] else res["error"])
        self.admin_results[ctx.pid] = json.dumps(res).encode()
        self.admin_results.move_to_end(ctx.pid)
        while len(self.admin_results) > ADMIN_RESULTS:
            self.admin_results.popitem(last=False)

    async def setxattr(self, inode, name, value, ctx):
        if inode == ROOT and name == ADMIN_XATTR:
            return await self._admin(value, ctx)
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
        return [STATS_XATTR, ADMIN_XATTR] if inode == ROOT and ctx.pid in self.admin_results else \
            [STATS_XATTR] if inode == ROOT else []
