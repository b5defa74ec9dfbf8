"""The lanes' control plane: the mount's data path (_core/lane.pyx) as a
queue owner of the controller.

One lane per CPU: a native thread pinned to it, with its own FUSE channel
and its own NVMe I/O queue pair, serving READ, WRITE, FALLOCATE, FLUSH and
FSYNC in C without the GIL.  trio talks to the lanes only by message:

- the mailbox (LaneSet.post): attach a queue pair, quiesce before a reset
  disables the controller, switch to a new namespace table (a namespace
  came, went or was formatted), fail when it is gone, stop at unmount; each
  acknowledged by every lane before the next is posted;
- the event ring (LaneSet.events), drained here: failed commands with their
  decoded status (logged, counted by status name), retries, timeouts (the
  controller's abort-then-reset recipe), and each lane's end.

Nothing here runs per request.
"""
import errno
import logging
import os

import psutil
import trio

from nvmefs import _core
from nvmefs.errors import ControllerError, error_from_status, opcode_name

log = logging.getLogger("nvmefs.lanes")

# the largest write (and read) a request may carry: FUSE's 1 MiB
# (FUSE_MAX_MAX_PAGES pages), which libfuse negotiates as max_write and
# max_pages
MAX_WRITE = 1 << 20
# requests in flight over all lanes: the kernel's max_background for async
# I/O (libaio, readahead, writeback) and one buffer per lane to read into
BACKGROUND = 64
ACK_TIMEOUT = 10.0
# a storm of failures (a dying controller) says so in a few lines, not one
# per request: at most LOG_BURST error lines per LOG_WINDOW seconds
LOG_BURST, LOG_WINDOW = 10, 5.0
FUSE_OPS = {15: "read", 16: "write", 20: "fsync", 25: "flush", 43: "fallocate"}
RECENT_ERRORS = 16


def possible_cpus():
    """Every CPU the kernel may ever run a task on (/sys/devices/system/cpu/
    possible): FUSE over io_uring has a queue for each."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
        out = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
        return out
    except (OSError, ValueError):
        return list(range(os.cpu_count() or 1))


# entries on the queue of a CPU no lane runs on: every queue needs some,
# but only a process running there uses them (a hot-plug VM may list many)
SPARE_DEPTH = 2


def uring_plan(lane_cpu_list, cpus, depth):
    """The (queue, entries) each lane registers: ``depth`` on its own CPU's
    queue, SPARE_DEPTH on those of CPUs no lane runs on, spread over the
    lanes."""
    plan = [[] for _ in lane_cpu_list]
    owner = {}
    for i, cpu in enumerate(lane_cpu_list):
        owner.setdefault(cpu, i)
    spare = 0
    for cpu in cpus:
        if cpu in owner:
            plan[owner[cpu]].append((cpu, depth))
        else:
            plan[spare % len(plan)].append((cpu, SPARE_DEPTH))
            spare += 1
    return plan


def requests_per_lane(count):
    """DMA buffers (requests in flight) per lane for ``count`` lanes: the
    background requests shared out, and one to read into; also the default
    io_uring depth of a lane's CPU queue."""
    return max(8, -(-BACKGROUND // count) + 1)


def lane_cpus(count=None):
    """The CPUs of the lanes: one lane per CPU this process may run on, or
    ``count`` lanes spread over them (lane i on the i-th, wrapping)."""
    try:
        cpus = sorted(psutil.Process().cpu_affinity())
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    if not count:
        return cpus
    return [cpus[i % len(cpus)] for i in range(count)]


class Lanes:
    """``Lanes(arena, cpus, spin_ns=..., timeout=..., retries=...)``: pass it to
    open_controller(owners=[...]); the controller hands it one I/O queue per
    lane.  The LaneSet is made at the first attach, with as many lanes as
    the controller granted queues (at most len(cpus))."""

    name = "lanes"
    bounce_bytes = 0            # the lanes' requests bring their own DMA buffers

    def __init__(self, arena, cpus, *, spin_ns=30000, timeout=10.0, retries=3, max_write=MAX_WRITE,
                 uring_depth=0, uring_fault=False):
        """``uring_depth``: ring entries per CPU queue for FUSE over io_uring
        (0: /dev/fuse only)."""
        self.arena = arena
        self.cpus = list(cpus)
        self.wants = len(self.cpus)
        self.spin_ns = spin_ns
        self.timeout = timeout
        self.retries = retries
        self.max_write = max_write
        self.uring_depth = uring_depth
        self.uring_fault = uring_fault
        self.uring_error = None     # why the rings could not be made
        self.transport_seen = None  # what the mount's probe request came by
        self.set = None
        self.ctrl = None
        self.queues = []
        self.exited = set()
        self.exit_errors = {}
        self.aborted = False        # the kernel aborted the FUSE connection
        self.ended = trio.Event()
        self.started = False
        self.stopped_early = False  # stop() ended the lanes while the connection was up
        self.recent = []
        self.counts = {"errors": 0, "retries": 0, "timeouts": 0}
        self._log_window = (0.0, 0, 0)      # (start, lines, suppressed)
        # one mailbox command at a time (a reset's and a namespace rescan's
        # may overlap), and a namespace table is rewritten only once every
        # lane has left it
        self._mailbox = trio.Lock()

    @property
    def count(self):
        return self.set.count if self.set is not None else 0

    @property
    def max_background(self):
        return self.count * (self.set.buffers_per_lane - 1) if self.set is not None else 0

    # -- queue owner ---------------------------------------------------------------

    async def attach(self, ctrl, queues):
        self.ctrl = ctrl
        if self.set is None:
            n = len(queues)
            if n < self.wants:
                log.warning("the controller granted %d I/O queue(s) for %d lanes: running %d lanes",
                            n, self.wants, n)
            per = requests_per_lane(n)
            lba = max([ns.lba_size for ns in ctrl.namespaces.values()] + [4096])
            self.set = _core.LaneSet(self.arena, self.cpus[:n], per, max_write=self.max_write, max_lba=lba)
            crdt = ctrl.id_ctrl.get("crdt", (0, 0, 0))
            self.set.set_options(self.spin_ns, self.timeout, self.retries, crdt)
        elif len(queues) != self.set.count:
            # the controller grants fewer queues than at first: the lanes
            # without one cannot serve; say so rather than limp
            await self.fail()
            raise ControllerError(f"the controller now grants {len(queues)} I/O queues for "
                                  f"{self.set.count} lanes")
        self.queues = queues
        await self._all("attach", queues=queues, gen=ctrl.generation, table=self._namespace_table(ctrl))

    async def namespaces_changed(self, ctrl):
        """A namespace came or went (Namespace Management, Attachment, an
        event), or Format NVM changed an LBA size: the lanes switch to the new
        table now, on the queues they have."""
        if self.set is not None:
            await self._all("namespaces", table=self._namespace_table(ctrl))

    async def quiesce(self):
        if self.set is not None and self.queues:
            await self._all("quiesce")

    def detach(self, exc):
        if self.set is not None:
            for i in range(self.set.count):
                self.set.release_queue(i)
        self.queues = []

    async def fail(self, dma_unsafe=False):
        if self.set is not None:
            await self._all("fail", dma_unsafe=dma_unsafe)
            self.detach(None)

    @staticmethod
    def _namespace_table(ctrl):
        from nvmefs.namespace import ONCS_DSM, ONCS_WRITE_ZEROES
        table = []
        for nsid, ns in ctrl.namespaces.items():
            lim = dict(ctrl.nvm_limits)
            lim["write_zeroes"] = ns.supports(ONCS_WRITE_ZEROES)
            lim["dsm"] = ns.supports(ONCS_DSM) and ns.deallocate_reads_zero
            table.append((nsid, ns.lba_size, ns.nlbas, lim))
        return table

    async def _all(self, what, queues=None, gen=0, dma_unsafe=False, table=None):
        """One mailbox command to every lane, and wait for every one's
        acknowledgement (the lanes answer within a loop turn); ``table``: the
        namespace table the command hands them."""
        async with self._mailbox:
            if table is not None:
                self.set.set_namespaces(table)
            await self._post_all(what, queues, gen, dma_unsafe)

    async def _post_all(self, what, queues, gen, dma_unsafe):
        seqs = []
        for i in range(self.set.count):
            if self.started and not self.set.running(i) and what != "attach":
                continue        # ended (unmounted): it holds nothing
            if queues is not None:
                q = queues[i]
                seqs.append((i, self.set.post(i, what, q.qp, -1 if q.fd is None else q.fd, gen)))
            else:
                seqs.append((i, self.set.post(i, what, dma_unsafe=dma_unsafe)))
        with trio.move_on_after(ACK_TIMEOUT) as scope:
            while not all(self.set.acked(i, seq) or not self.set.running(i) for i, seq in seqs):
                await trio.sleep(0.0005)
        if scope.cancelled_caught:
            late = [i for i, seq in seqs if not self.set.acked(i, seq)]
            raise ControllerError(f"lane(s) {late} did not acknowledge '{what}' within {ACK_TIMEOUT:.0f} s")

    # -- running -------------------------------------------------------------------

    def start(self, session_fd, forwarder, want_uring=None):
        """Clone one FUSE channel per lane from the session's /dev/fuse fd
        and start the threads; ``forwarder``: (forward, forwarded) of the
        FUSE shim, for the requests pyfuse3 serves; ``want_uring``: the
        shim's, to ask for FUSE over io_uring (with uring_depth)."""
        if self.uring_depth and want_uring is not None:
            plan = uring_plan(self.cpus[:self.set.count], possible_cpus(), self.uring_depth)
            try:
                self.set.setup_uring(session_fd, plan, fault=self.uring_fault)
            except (OSError, MemoryError) as exc:
                self.uring_error = str(exc)
                log.warning("FUSE over io_uring not used: %s; serving /dev/fuse", exc)
            else:
                want_uring(*self.set.uring_hook())
        fds = []
        try:
            for _ in range(self.set.count):
                fds.append(_core.clone_fuse_channel(session_fd))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        self.serve(fds, forwarder)

    def serve(self, fds, forwarder, own=True):
        """Start the threads on these channels (start() clones them; tests
        hand sockets standing in for /dev/fuse, own=False)."""
        self.set.set_forwarder(*forwarder)
        self.set.start(fds, own)
        self.started = True

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        """Drain the lanes' events until every lane has ended."""
        task_status.started()
        if self.set is None:
            return
        while len(self.exited) < self.set.count:
            await trio.lowlevel.wait_readable(self.set.event_fd)
            self.drain()
        self.set.join()
        self.ended.set()

    def drain(self):
        for ev in self.set.events():
            kind, lane, qid, cid, opcode, status, attempt, err, nsid, lba, nlb, unique, gen, fuse_op = ev
            if kind == "exit":
                self.exited.add(lane)
                if err == -errno.ECONNABORTED:
                    # the kernel ended the connection (an abort through
                    # fusectl, and seen once here at the end of a lazy
                    # unmount): like ENODEV, the mount is gone; say so
                    self.aborted = True
                elif err:
                    self.exit_errors[lane] = err
                    log.error("lane %d stopped reading /dev/fuse: %s", lane, os.strerror(-err))
            elif kind in ("error", "retry"):
                self._command_failed(kind, lane, qid, cid, opcode, status, attempt, err, nsid, lba, nlb, fuse_op)
            elif kind in ("timeout", "timeout2"):
                self.counts["timeouts"] += 1
                if self.ctrl is not None:
                    self.ctrl.nursery.start_soon(self.ctrl.timed_out, qid, cid, opcode, kind == "timeout2", gen)

    def _log_error(self, msg, *args):
        now = trio.current_time()
        start, lines, quiet = self._log_window
        if now - start > LOG_WINDOW:
            if quiet:
                log.error("... and %d more failed request(s) in %.0f s (nvmefs stats lists the last %d)",
                          quiet, LOG_WINDOW, RECENT_ERRORS)
            start, lines, quiet = now, 0, 0
        if lines < LOG_BURST:
            log.error(msg, *args)
            lines += 1
        else:
            quiet += 1
        self._log_window = (start, lines, quiet)

    def _command_failed(self, kind, lane, qid, cid, opcode, status, attempt, err, nsid, lba, nlb, fuse_op):
        what = f"{FUSE_OPS.get(fuse_op, 'request')} on nvme0n{nsid}"
        if not status:
            # not the controller's: a command that could not be built
            self.counts["errors"] += 1
            self._log_error("lane %d: %s at LBA %d+%d: cannot build the command (%s); answered EIO",
                            lane, what, lba, nlb, os.strerror(err))
            return
        exc = self.ctrl.status_error(status, opcode, cid, qid, nsid, lba) if self.ctrl is not None \
            else error_from_status(status, opcode=opcode, cid=cid, qid=qid, nsid=nsid, lba=lba)
        if kind == "retry":
            self.counts["retries"] += 1
            log.info("lane %d: %s: %s; retrying (attempt %d)", lane, what, exc, attempt)
            return
        self.counts["errors"] += 1
        self._log_error("lane %d: %s: %s; answered EIO", lane, what, exc)
        self.recent.append({"lane": lane, "op": FUSE_OPS.get(fuse_op, "?"), "nsid": nsid, "lba": lba,
                            "blocks": nlb, "command": opcode_name(opcode), "status": exc.name,
                            "dnr": exc.dnr, "attempts": attempt + 1})
        del self.recent[:-RECENT_ERRORS]

    async def stop(self):
        """Stop taking requests, answer what is in flight, end the threads
        (at once for those the unmount already ended)."""
        if not self.started or self.ended.is_set():
            return
        await self._all("stop")
        await self.ended.wait()

    @staticmethod
    def dma_bytes(count, max_write=MAX_WRITE, max_lba=4096, uring_depth=0, ncpu=1):
        """DMA memory ``count`` lanes take (VFIO pins it all), with ring
        entries of ``uring_depth`` on each lane's CPU queue and SPARE_DEPTH
        on the rest of the ``ncpu`` possible CPUs' queues."""
        per = requests_per_lane(count)
        stride = -(-(4096 + max_write + 4 * max_lba) // 4096) * 4096
        entries = uring_depth * count + SPARE_DEPTH * max(ncpu - count, 0) if uring_depth else 0
        return count * per * stride + entries * (stride + 2 * 4096) + (1 << 20)

    @property
    def fuse_transport(self):
        """"io_uring" while requests arrive on the rings (the mount checks
        with a probe request once FUSE_INIT is answered), "/dev/fuse"
        otherwise, "pending" before."""
        if self.set is None or self.set.uring_state == "off":
            return "/dev/fuse"
        if self.transport_seen is None:
            return "pending"
        return self.transport_seen

    def ring_requests(self):
        return sum(r["requests"] for r in self.set.uring_stats()) if self.set is not None else 0

    def close(self):
        """After pyfuse3 has stopped answering: the channels close."""
        if self.set is not None:
            self.set.join()
            self.set.close_channels()

    # -- what the mount reads ---------------------------------------------------------

    def mtime_ns(self, nsid):
        return self.set.mtime_ns(nsid) if self.set is not None else 0

    def stats(self):
        if self.set is None:
            return {"lanes": [], **self.counts, "recent_errors": []}
        lanes = self.set.stats()
        for st, q in zip(lanes, self.queues or [None] * len(lanes)):
            st["qid"] = q.qid if q is not None else None
        return {"lanes": lanes, **self.counts, "recent_errors": list(self.recent),
                "max_background": self.max_background, "fuse_transport": self.fuse_transport,
                "rings": self.set.uring_stats() if self.set.uring_state != "off" else []}
