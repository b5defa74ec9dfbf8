"""The pyfuse3 frontend: one regular file per namespace (nvme0n1, ...).

Byte-granular reads and writes map onto LBAs: aligned parts go straight to
NVMe commands (split by MDTS and issued concurrently by the namespace API),
unaligned heads and tails are read-modify-written.  Every write holds an
exclusive lock on the LBA range it touches (RangeLock), so a read-modify-
write can never put back stale bytes over a concurrent writer's data.
"""
import errno
import logging
import os
import stat
import threading
import time

from nvmefs import fuseshim
import pyfuse3
import trio

from nvmefs import _core
from nvmefs.errors import ControllerError, NvmeError
from nvmefs.namespace import IO_READ, IO_WRITE, ONCS_DSM, ONCS_WRITE_ZEROES, _resubmit

log = logging.getLogger("nvmefs.fuse")

ROOT = pyfuse3.ROOT_INODE

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
ZERO_CHUNK = 1 << 20


class RangeLock:
    """Exclusive locks on half-open LBA ranges; waiters park until no held
    range overlaps theirs.  The ranges live in a _core.RangeSet, where the
    lane engine takes its writes' ranges from the lane thread too (which
    then has trio's thread run wake()).  O(held ranges) per operation, the
    number of writes in flight."""

    def __init__(self, capacity=64):
        self.core = _core.RangeSet(capacity)
        self.lot = trio.lowlevel.ParkingLot()

    @property
    def held(self):
        return self.core.held

    def _free(self, a, b):
        return self.core.free(a, b)

    def try_acquire(self, a, b):
        """Take the range now if nothing overlaps it (no scheduling point)."""
        return self.core.try_acquire(a, b)

    async def acquire(self, a, b):
        while not self.core.try_acquire(a, b):
            self.core.waiters += 1
            try:
                await self.lot.park()
            finally:
                self.core.waiters -= 1

    def release(self, a, b):
        self.core.release(a, b)
        self.wake()

    def wake(self):
        if self.lot:
            self.lot.unpark_all()


class NvmeFS(pyfuse3.Operations):
    def __init__(self, ctrl, *, direct_io=True, ctrl_index=0):
        super().__init__()
        self.ctrl = ctrl
        self.direct_io = direct_io
        self.prefix = f"nvme{ctrl_index}n"
        self.locks = {}
        self.mtime = {}
        self.started = time.time_ns()
        self.errors = 0
        self.nursery = None         # where fallocate requests run (set by serve)
        self.fallocates = {"punch": 0, "zero": 0, "refused": 0}
        # direct lane: requests answered inside libfuse's dispatch, and
        # those it started there and finished in a task
        self.lane = {"read": 0, "write": 0, "queued": 0, "continued": 0}
        self.lane_on = False        # set by serve once libfuse calls the lane
        self.lane_thread = None     # fuseshim.LaneThread, when serve started one
        self.engine = None          # _core.LaneEngine, when the lane thread drives one (start_engine)
        # what the lane needs to reach trio from the lane thread
        self.token = trio.lowlevel.current_trio_token()
        self.clock = trio.lowlevel.current_clock()
        self.trio_thread = threading.get_ident()
        lane = _core.DirectLane(self, fuseshim.TAKEN)
        self.lane_read, self.lane_write = lane.read, lane.write

    # -- names and attributes --------------------------------------------------

    def _ns(self, inode):
        ns = self.ctrl.namespaces.get(inode - 1)
        if ns is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return ns

    def _name(self, nsid):
        return f"{self.prefix}{nsid}".encode()

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
            t = self.mtime.get(inode, self.started)
            if self.engine is not None:
                t = max(t, self.engine.mtime_ns(ns.nsid))
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = t
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name == b".":
            return await self.getattr(ROOT)
        for nsid in self.ctrl.namespaces:
            if name == self._name(nsid):
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
            if not pyfuse3.readdir_reply(token, self._name(nsid), await self.getattr(nsid + 1), nsid):
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
                            self._name(ns.nsid).decode(), attr.st_size, ns.size)
                raise pyfuse3.FUSEError(errno.EPERM if attr.st_size < ns.size else errno.EFBIG)
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise pyfuse3.FUSEError(errno.EPERM)
            if fields.update_mtime:
                self.mtime[inode] = attr.st_mtime_ns
        return await self.getattr(inode)

    # -- data ------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        self._ns(inode)
        # O_DIRECT from the caller always bypasses the page cache; the mount
        # option decides for everybody else
        return pyfuse3.FileInfo(fh=inode, direct_io=self.direct_io or bool(flags & os.O_DIRECT),
                                keep_cache=not self.direct_io)

    def _lock(self, ns):
        lock = self.locks.get(ns.nsid)
        if lock is None:
            # room for every write the engine can have in flight: its side
            # cannot grow the array (RangeSet)
            lock = self.locks[ns.nsid] = RangeLock(64 + (self.engine.buffers if self.engine else 0))
        return lock

    def _io_error(self, ns, what, exc):
        self.errors += 1
        log.error("%s %s: %s", self._name(ns.nsid).decode(), what, exc)
        return pyfuse3.FUSEError(errno.EIO)

    async def read(self, fh, off, size):
        ns = self._ns(fh)
        if off >= ns.size or size == 0:
            return b""
        end = min(off + size, ns.size)
        bs = ns.lba_size
        first, last = off // bs, (end + bs - 1) // bs
        try:
            return await ns.read_window(first, last - first, off - first * bs, end - off)
        except (NvmeError, ControllerError) as exc:
            raise self._io_error(ns, f"read at {off}+{size}", exc) from None

    async def write(self, fh, off, buf):
        ns = self._ns(fh)
        n = len(buf)
        if off + n > ns.size:
            if off >= ns.size:
                raise pyfuse3.FUSEError(errno.ENOSPC)
            n = ns.size - off       # short write up to the end, as a block device does
        if n == 0:
            return 0
        bs = ns.lba_size
        first, last = off // bs, (off + n + bs - 1) // bs
        lock = self._lock(ns)
        if not lock.try_acquire(first, last):
            await lock.acquire(first, last)
        try:
            if off % bs == 0 and n % bs == 0:
                await ns.write(first, memoryview(buf)[:n])
            else:
                await self._patch(ns, off, memoryview(buf)[:n])
        except (NvmeError, ControllerError) as exc:
            raise self._io_error(ns, f"write at {off}+{n}", exc) from None
        finally:
            lock.release(first, last)
        self.mtime[fh] = time.time_ns()
        return n

    # -- the direct lane: reached through nvmefs._fuseshim ----------------------
    #
    # pyfuse3 turns every request into a coroutine awaited by one of its
    # worker tasks; at QD1 that machinery costs more than the NVMe command.
    # The shim offers each read and write to lane_read/lane_write first,
    # synchronously, inside libfuse's dispatch -- by default in the lane
    # thread that reads /dev/fuse (fuseshim.LaneThread), holding the world
    # lock, so never at the same time as a trio task, but outside trio's
    # thread: what they need of trio goes through self.token and self.clock.
    # When one polled command on an idle queue can serve a request
    # (_core.fast_first), they answer it on the spot; when none can, they
    # queue one without polling.  When the command fails, outlives the poll
    # or was queued, a task takes it over through Namespace._command (so the
    # retry and reset rules are the general path's) and answers it.
    # Everything else -- short reads at the end, unaligned writes, requests
    # larger than MDTS, no bounce memory, a range a read-modify-write holds
    # -- is declined (None) and goes to pyfuse3's handler, i.e. read() and
    # write() above.  lane_read and lane_write are _core.DirectLane's
    # (fastpath.pyx): in Python their bookkeeping cost more than the
    # command.  The tasks that continue them are below.

    def _continue_in_task(self, task, args, give_up, who):
        """A run_sync_soon callback (the lane may ask from the lane thread)
        that starts ``task(*args)``.  If it cannot, ``give_up(errno)`` lets
        go of what the request holds and answers it: EINTR when shutting
        down, else EIO."""
        try:
            if self.nursery is None:
                raise trio.RunFinishedError("the mount is shutting down")
            self.nursery.start_soon(task, *args)
        except BaseException as exc:   # a run_sync_soon callback must not raise
            finished = isinstance(exc, trio.RunFinishedError)
            give_up(errno.EINTR if finished else errno.EIO)
            if not finished:
                log.error("%s: could not continue a request: %r", who, exc)

    def _lane_spawn(self, task, args, lock, first, count):
        """DirectLane's: the command is left to finish on its own."""
        def give_up(err):
            _core.lane_unwind(args[-1], lock, first, count)
            fuseshim.reply_err(args[0], err)
        self._continue_in_task(task, args, give_up, "direct lane")

    async def _lane_read_task(self, req, ns, first, count, skip, size, pending):
        await self._lane_finish(
            req, ns, f"read at {first * ns.lba_size + skip}+{size}", fuseshim.reply_buf,
            lambda: ns._command(IO_READ, lba=first, nbytes=count * ns.lba_size, window=(skip, size),
                                pending=pending, cdw10=first & 0xFFFFFFFF, cdw11=first >> 32, cdw12=count - 1))

    async def _lane_write_task(self, req, ns, off, data, lock, pending):
        bs = ns.lba_size
        first, count = off // bs, len(data) // bs
        await self._lane_finish(
            req, ns, f"write at {off}+{len(data)}", lambda req, _: fuseshim.reply_write(req, len(data)),
            lambda: ns._command(IO_WRITE, lba=first, nbytes=len(data), data_out=memoryview(data),
                                pending=pending, cdw10=first & 0xFFFFFFFF, cdw11=first >> 32, cdw12=count - 1),
            release=lambda: lock.release(first, first + count))

    async def _lane_finish(self, req, ns, what, answer, command, release=None, error=None):
        """Run ``command()`` and answer ``req`` exactly once: answer(req,
        result), or error(req, errno) (EIO for a failed command, EINTR when
        the shutdown cancelled it; ``error`` defaults to
        fuseshim.reply_err); ``release`` runs before the answer."""
        self.lane["continued"] += 1
        result, err = None, errno.EINTR
        try:
            result = await command()
            err = 0
        except (NvmeError, ControllerError) as exc:
            err = self._io_error(ns, what, exc).errno
        except Exception:
            log.exception("direct lane %s failed", what)
            err = errno.EIO
        finally:
            if release is not None:
                release()
            if err:
                (error or fuseshim.reply_err)(req, err)
            else:
                answer(req, result)

    # -- the lane engine (_core/lane.pyx): the lane thread's own I/O queue -------
    #
    # With the lane thread, reads and writes need no Python at all: the
    # engine reads them from /dev/fuse into DMA memory, submits them on the
    # controller's lane queue and answers on /dev/fuse, in the lane thread.
    # NvmeFS owns the queue for it (Controller.set_lane_owner): the hooks
    # below hand every incarnation of it to the engine and take it back
    # around resets.  What the engine cannot finish -- a failed command,
    # commands a reset took -- comes back here and continues in a task on
    # the general path, answered through the engine.

    def start_engine(self, buffers=_core.LANE_BUFFERS):
        """Create the engine and take the controller's lane queue for it;
        False (and no engine) when the controller has none."""
        self.engine = _core.LaneEngine(self.ctrl.transport.arena, self._engine_handoff, self._engine_wake,
                                       buffers=buffers)
        if not self.ctrl.set_lane_owner(self):
            self.engine = None
            return False
        return True

    def drop_engine(self):
        """The lane thread did not start after all: give the queue back."""
        self.ctrl.set_lane_owner(None)
        self.engine = None

    def lane_attach(self, q):
        self.engine.attach(q.qp, -1 if q.fd is None else q.fd, self.ctrl.max_transfer, q.spin_ns,
                           [(nsid, ns.lba_size, ns.nlbas, self._lock(ns))
                            for nsid, ns in self.ctrl.namespaces.items()])

    def lane_detach(self):
        self.engine.detach()

    def lane_expired(self, timeout):
        return self.engine.expired(timeout)

    def lane_command_in_flight(self, cid):
        return self.engine.command_in_flight(cid)

    def _engine_handoff(self, job):
        # GIL held, in the lane thread (or trio's, on detach): if trio is
        # gone this raises, and the engine answers EIO itself
        self.token.run_sync_soon(self._engine_spawn, job)

    def _engine_wake(self, lock):
        self.token.run_sync_soon(lock.wake)

    def _engine_spawn(self, job):
        def give_up(err):
            opcode, unique, nsid, first, count = job[:5]
            if opcode == _core.FUSE_OP_WRITE:
                self.locks[nsid].release(first, first + count)
            self.engine.reply_err(unique, err)
        self._continue_in_task(self._engine_task, job, give_up, "lane engine")

    async def _engine_task(self, opcode, unique, nsid, first, count, skip, size, data, failed):
        ns = self.ctrl.namespaces.get(nsid)
        write = opcode == _core.FUSE_OP_WRITE
        release = (lambda: self.locks[nsid].release(first, first + count)) if write else None
        if ns is None:          # gone after a reset
            if release is not None:
                release()
            self.engine.reply_err(unique, errno.EIO)
            return

        async def command():
            if failed is not None:
                # the engine's attempt was the first: the general path's
                # rule decides whether another is worth making
                status, qid, cid = failed
                exc = self.ctrl.status_error(status, IO_WRITE if write else IO_READ, cid, qid, nsid, first)
                if not _resubmit(exc):
                    raise exc
                ns.retried += 1
                log.info("retrying after %s", exc)
                await trio.sleep(0.002)
            if write:
                await ns.write(first, data)
            else:
                return await ns.read_window(first, count, skip, size)

        bs = ns.lba_size
        if write:
            await self._lane_finish(unique, ns, f"write at {first * bs}+{size}",
                                    lambda u, _: self.engine.reply_write(u, size), command, release,
                                    error=self.engine.reply_err)
        else:
            await self._lane_finish(unique, ns, f"read at {first * bs + skip}+{size}", self.engine.reply_data,
                                    command, error=self.engine.reply_err)

    # -- fallocate: reached through nvmefs._fuseshim (pyfuse3 has no handler) --

    def fallocate_request(self, req, ino, mode, off, length, fh):
        """Called from libfuse's dispatch in the trio thread: start the work
        in a task and answer the request from it, exactly once."""
        if self.nursery is None:
            fuseshim.reply_err(req, errno.EOPNOTSUPP)
            return
        self.nursery.start_soon(self._fallocate_task, req, fh, mode, off, length)

    async def _fallocate_task(self, req, fh, mode, off, length):
        err = errno.EINTR           # cancelled: the shutdown gave up waiting on it
        try:
            await self.fallocate(fh, mode, off, length)
            err = 0
        except pyfuse3.FUSEError as exc:
            err = exc.errno
        except Exception:
            log.exception("fallocate(mode=%#x, %d+%d) failed", mode, off, length)
            err = errno.EIO
        finally:
            fuseshim.reply_err(req, err)

    async def fallocate(self, fh, mode, off, length):
        """PUNCH_HOLE|KEEP_SIZE zeroes and deallocates, ZERO_RANGE writes
        zeroes (see _zero_lbas); the partial LBAs at unaligned edges are
        zeroed by read-modify-write.
        Other modes (plain allocation included: every block of a namespace
        already exists) get EOPNOTSUPP, as from a block device."""
        ns = self._ns(fh)
        punch = mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if not punch and mode & ~FALLOC_FL_KEEP_SIZE != FALLOC_FL_ZERO_RANGE:
            self.fallocates["refused"] += 1
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if off < 0 or length <= 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        end = off + length
        if end > ns.size:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise pyfuse3.FUSEError(errno.ENOSPC)    # it would grow the file
            end = ns.size
        if off >= end:
            return
        bs = ns.lba_size
        first, last = off // bs, (end + bs - 1) // bs
        whole_a, whole_b = -(-off // bs), end // bs      # the LBAs covered entirely
        lock = self._lock(ns)
        if not lock.try_acquire(first, last):
            await lock.acquire(first, last)
        try:
            if whole_a >= whole_b:
                await self._patch(ns, off, bytes(end - off))
            else:
                if off < whole_a * bs:
                    await self._patch(ns, off, bytes(whole_a * bs - off))
                if end > whole_b * bs:
                    await self._patch(ns, whole_b * bs, bytes(end - whole_b * bs))
                await self._zero_lbas(ns, whole_a, whole_b - whole_a, deallocate=punch)
        except (NvmeError, ControllerError) as exc:
            raise self._io_error(ns, f"fallocate(mode={mode:#x}) at {off}+{length}", exc) from None
        finally:
            lock.release(first, last)
        self.fallocates["punch" if punch else "zero"] += 1
        self.mtime[fh] = time.time_ns()

    async def _patch(self, ns, off, data):
        """Write ``data`` at byte ``off``, reading back only the partial LBAs
        at its edges (read-modify-write; the caller holds the range lock)."""
        bs = ns.lba_size
        n = len(data)
        first, last = off // bs, (off + n + bs - 1) // bs
        head = off - first * bs
        block = bytearray((last - first) * bs)
        await ns.read(first, 1, memoryview(block)[:bs])
        if last - first > 1 and (off + n) % bs:
            await ns.read(last - 1, 1, memoryview(block)[-bs:])
        block[head:head + n] = data
        await ns.write(first, block)

    async def _zero_lbas(self, ns, lba, count, *, deallocate):
        """Make whole LBAs read as zeroes; ``deallocate``: give the space back
        where the controller can.  Write Zeroes with DEAC comes first, as in
        Linux's blkdev_fallocate: its zeroes are guaranteed, whereas Dataset
        Management deallocate is advisory (a controller may skip ranges
        below its granularity, NPDG) and is used only without Write Zeroes,
        when DLFEAT says deallocated blocks read as zeroes."""
        if ns.supports(ONCS_WRITE_ZEROES):
            await ns.write_zeroes(lba, count, deallocate=deallocate)
        elif deallocate and ns.supports(ONCS_DSM) and ns.deallocate_reads_zero:
            await ns.deallocate([(lba, count)])
        else:
            per = max(1, ZERO_CHUNK // ns.lba_size)
            zeros = bytes(per * ns.lba_size)
            while count:
                n = min(per, count)
                await ns.write(lba, memoryview(zeros)[:n * ns.lba_size])
                lba += n
                count -= n

    async def _flush(self, fh):
        ns = self._ns(fh)
        try:
            await ns.flush()
        except (NvmeError, ControllerError) as exc:
            raise self._io_error(ns, "flush", exc) from None

    async def fsync(self, fh, datasync):
        await self._flush(fh)

    async def flush(self, fh):
        # close(): data written through this file reaches stable media
        await self._flush(fh)

    async def release(self, fh):
        pass

    # -- live statistics: `nvmefs stats MOUNTPOINT` reads this xattr ------------

    STATS_XATTR = b"user.nvmefs.stats"

    async def getxattr(self, inode, name, ctx):
        if inode == ROOT and name == self.STATS_XATTR:
            import json
            st = self.ctrl.stats()
            st["fuse_errors"] = self.errors
            st["fallocate"] = dict(self.fallocates, hooked=fuseshim.sessions_hooked() > 0)
            st["direct_lane"] = dict(self.lane, on=self.lane_on,
                                     thread=fuseshim.lane_thread_stats() if self.lane_thread else None,
                                     engine=self.engine.stats() if self.engine else None)
            st["namespaces"] = {self._name(n).decode(): {"lba_size": ns.lba_size, "size": ns.size,
                                                         "retried": ns.retried}
                                for n, ns in self.ctrl.namespaces.items()}
            return json.dumps(st).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    INJECT_XATTR = b"user.nvmefs.inject"

    async def setxattr(self, inode, name, value, ctx):
        # Fault injection into the built-in model, for tests of the mount's
        # error paths; only when the daemon was started with
        # NVMEFS_FAULT_INJECTION=1, never in normal use.
        if inode != ROOT or name != self.INJECT_XATTR or os.environ.get("NVMEFS_FAULT_INJECTION") != "1":
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        import json
        model = getattr(self.ctrl.transport, "model", None)
        if model is None:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        try:
            spec = json.loads(value)
            if spec.pop("fatal", False):
                model.set_fatal()
            elif spec.pop("hang", None) is not None:
                model.hang(bool(spec.get("hang")))
            else:
                model.inject(spec.pop("opcode"), **spec)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("bad fault injection request %r: %s", value, exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    async def listxattr(self, inode, ctx):
        return [self.STATS_XATTR] if inode == ROOT else []
