"""Controller bring-up, admin commands, recovery and shutdown (trio).

Bring-up follows NVME-NOTES.md "Bring-up": disable and wait (bounded by
CAP.TO), program the admin queue, enable and wait, Identify, Set Features
Number of Queues, then the I/O queue pairs its queue owners want, up to
what the controller grants.

A queue owner is whoever submits to and reaps a set of I/O queues: trio's
own (TrioQueues, nvmefs/queue.py: the namespace API) and, in a mount, the
lanes (nvmefs/lanes.py).  The controller creates their queues and hands
them over (attach); around a reset it has each owner quiesce (stop using
its queues) before the controller is disabled, detach (give up what was in
flight) after, and attach the new queues once it is back up; when the
controller is gone for good it fails them.

Namespaces can change under a running controller: Namespace Management or
Attachment, Format NVM (the Commands Supported and Effects log says which
commands change them), or an Asynchronous Event the controller posts
(Namespace Attribute Changed, with the Changed Namespace List, log 04h).
Each ends in rescan_namespaces(): Identify again, hand the owners the new
table, tell the listeners (the mount adds and removes files).  One
Asynchronous Event Request is kept outstanding per bring-up.

Timeouts follow Linux's nvme_timeout recipe: a fatal controller status
resets at once; otherwise the command is aborted once, and if it still
does not complete (or the abort fails, or an admin command times out) the
controller is reset and what was in flight is resubmitted.
"""
import logging
import math
import struct
from contextlib import asynccontextmanager

import psutil
import trio

from nvmefs.errors import ControllerError, NvmeError, error_from_status, opcode_name
from nvmefs.queue import ControllerReset, IoQueue, TrioQueues

log = logging.getLogger("nvmefs.controller")

REG_CAP, REG_VS, REG_CC, REG_CSTS, REG_AQA, REG_ASQ, REG_ACQ = 0x00, 0x08, 0x14, 0x1C, 0x24, 0x28, 0x30
CC_EN = 1
CC_IOSQES = 6 << 16
CC_IOCQES = 4 << 20
CC_SHN_NORMAL = 1 << 14
CSTS_RDY, CSTS_CFS = 1, 2
CSTS_SHST_MASK, CSTS_SHST_DONE = 0xC, 0x8

ADM_GET_LOG = 0x02
ADM_IDENTIFY, ADM_ABORT, ADM_SET_FEATURES, ADM_GET_FEATURES, ADM_FORMAT = 0x06, 0x08, 0x09, 0x0A, 0x80
# Commands Supported and Effects entry bits (log page 05h)
EFFECTS_CSUPP, EFFECTS_LBCC, EFFECTS_NCC, EFFECTS_NIC = 1 << 0, 1 << 1, 1 << 2, 1 << 3
ADM_AER, ADM_NS_MGMT, ADM_NS_ATTACH = 0x0C, 0x0D, 0x15
ADM_DBBUF = 0x7C
OACS_DBBUF, OACS_NS_MGMT = 1 << 8, 1 << 3
OAES_NS_ATTR = 1 << 8
FEAT_VWC, FEAT_NUM_QUEUES, FEAT_ASYNC_EVENT = 0x06, 0x07, 0x0B
AEN_NOTICE, AEN_NS_ATTR_CHANGED = 2, 0x00
LOG_CHANGED_NS = 0x04


def _cstr(raw):
    return raw.split(b"\0")[0].decode("ascii", "replace").strip()


def parse_identify_controller(raw):
    vid, ssvid = struct.unpack_from("<HH", raw, 0)
    oncs, = struct.unpack_from("<H", raw, 520)
    return {
        "vid": vid, "ssvid": ssvid, "sn": _cstr(raw[4:24]), "mn": _cstr(raw[24:64]),
        "fr": _cstr(raw[64:72]), "mdts": raw[77], "cntlid": struct.unpack_from("<H", raw, 78)[0],
        "ver": struct.unpack_from("<I", raw, 80)[0], "oaes": struct.unpack_from("<I", raw, 92)[0],
        "oacs": struct.unpack_from("<H", raw, 256)[0],
        "aerl": raw[259], "lpa": raw[261], "elpe": raw[262], "sqes": raw[512], "cqes": raw[513],
        "maxcmd": struct.unpack_from("<H", raw, 514)[0], "nn": struct.unpack_from("<I", raw, 516)[0],
        "oncs": oncs, "vwc": raw[525], "sgls": struct.unpack_from("<I", raw, 536)[0],
        "subnqn": _cstr(raw[768:1024]),
        # NVM capacity and what namespace management has not allocated (bytes; 128-bit fields)
        "tnvmcap": int.from_bytes(raw[280:296], "little"), "unvmcap": int.from_bytes(raw[296:312], "little"),
        # Command Retry Delay Times, 100 ms units (a status's CRD picks one)
        "crdt": struct.unpack_from("<HHH", raw, 134),
        # fabrics: I/O queue capsule size (16-byte units) and where in-capsule data starts
        "ioccsz": struct.unpack_from("<I", raw, 1792)[0], "icdoff": struct.unpack_from("<H", raw, 1798)[0],
    }


def parse_identify_namespace(raw):
    nsze, ncap, nuse = struct.unpack_from("<QQQ", raw, 0)
    nlbaf, flbas = raw[25], raw[26]
    lbafs = []
    for i in range(nlbaf + 1):
        dw, = struct.unpack_from("<I", raw, 128 + 4 * i)
        lbafs.append({"ms": dw & 0xFFFF, "lbads": (dw >> 16) & 0xFF, "rp": (dw >> 24) & 3})
    fmt = flbas & 0xF
    return {"nsze": nsze, "ncap": ncap, "nuse": nuse, "nsfeat": raw[24], "nlbaf": nlbaf,
            "dlfeat": raw[33],
            "flbas": flbas, "lbafs": lbafs, "lba_size": 1 << lbafs[fmt]["lbads"], "format": fmt}


def usable_cpus():
    try:
        return len(psutil.Process().cpu_affinity())
    except (AttributeError, OSError):
        return psutil.cpu_count() or 1


class Controller:
    """A bring-up'd NVMe controller.  Use ``async with open_controller(t) as c``."""

    def __init__(self, transport, nursery, *, io_queues=None, queue_entries=256, admin_entries=64,
                 polled=False, timeout=10.0, admin_timeout=10.0, retries=3, max_transfer=None,
                 bounce_bytes=16 << 20, spin_us=30, shadow_doorbells=None, owners=()):
        """``io_queues``: trio's own I/O queues (default one per usable
        CPU); ``owners``: further queue owners (the mount's lanes), served
        after trio's."""
        self.transport = transport
        self.nursery = nursery
        self.trio = TrioQueues(io_queues or usable_cpus(), bounce_bytes)
        self.owners = [self.trio, *owners]
        self.queue_entries = queue_entries
        self.admin_entries = admin_entries
        self.polled = polled
        self.timeout = timeout
        self.admin_timeout = admin_timeout
        self.retries = retries
        self.max_transfer_cap = max_transfer
        self.bounce_bytes = bounce_bytes
        self.spin_ns = int(spin_us * 1000)
        # None: use them where the transport says MMIO doorbells are costly (VFIO)
        self.shadow_doorbells = shadow_doorbells
        self._dbbuf = None
        self.dbbuf_active = False
        self.admin_q = None
        self.queues = []            # every I/O queue, in qid order
        self.namespaces = {}
        self.ready = trio.Event()
        self.generation = 0
        self.resets = 0
        self._reset_lock = trio.Lock()
        self.closed = False
        self.id_ctrl = {}
        self.nvm_limits = {}
        self._idbuf = None
        self.errors_by_status = {}
        self.effects = {}           # admin opcode -> Commands Supported and Effects entry
        # called as fn(before, after) after each rescan, with {nsid: (size, lba_size)}
        self.namespace_listeners = []
        self._rescan_lock = trio.Lock()
        self._id_lock = trio.Lock()
        self.async_events = 0       # Asynchronous Event completions taken
        self.rescans = 0

    # -- registers ---------------------------------------------------------------

    async def _wait_csts(self, want_rdy, what):
        deadline = trio.current_time() + max(self.cap_to, 0.5) + self.transport.ready_grace
        delay = 0.0005
        while True:
            csts = self.transport.read32(REG_CSTS)
            if csts == 0xFFFFFFFF:
                raise ControllerError(f"{self.transport.name}: controller not responding (CSTS reads all ones)")
            if (csts & CSTS_RDY) == want_rdy:
                return csts
            if want_rdy and csts & CSTS_CFS:
                why = self.transport.fault_reason()
                raise ControllerError(f"{self.transport.name}: " + (why or f"controller fatal status while {what}"))
            if trio.current_time() > deadline:
                grace = self.transport.ready_grace
                raise ControllerError(f"{self.transport.name}: controller did not {what} within "
                                      f"CAP.TO ({self.cap_to:.1f} s)" +
                                      (f" and the transport's reconnect time ({grace:g} s)" if grace else ""))
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _bring_up(self):
        if self.ready.is_set():
            self.ready = trio.Event()   # waiters from reset() keep the event they hold
        t = self.transport
        cap = t.read64(REG_CAP)
        self.mqes = cap & 0xFFFF
        self.cap_to = ((cap >> 24) & 0xFF) * 0.5
        self.dstrd = (cap >> 32) & 0xF
        if not (cap >> 37) & 1:
            raise ControllerError(f"{t.name}: controller does not support the NVM command set")
        if (cap >> 48) & 0xF:
            raise ControllerError(f"{t.name}: controller's minimum page size is above 4 KiB")
        await self._disable()
        entries = min(self.admin_entries, self.mqes + 1, 4096)
        self.admin_q = IoQueue(t, 0, entries, max_transfer=64 << 10, sgls=0, polled=self.polled)
        t.write32(REG_AQA, (entries - 1) | ((entries - 1) << 16))
        t.write64(REG_ASQ, self.admin_q.qp.sq_iova)
        t.write64(REG_ACQ, self.admin_q.qp.cq_iova)
        t.write32(REG_CC, CC_EN | CC_IOSQES | CC_IOCQES)   # CSS NVM, MPS 4 KiB, round robin
        await self._wait_csts(1, "become ready")
        await self.nursery.start(self.admin_q.run)
        if self._idbuf is None:
            self._idbuf = t.arena.alloc(4096)

        self.id_ctrl = parse_identify_controller(await self.identify(1))
        mdts = self.id_ctrl["mdts"]
        self.max_transfer = (1 << mdts) * 4096 if mdts else 8 << 20
        if self.max_transfer_cap:
            self.max_transfer = min(self.max_transfer, self.max_transfer_cap)
        self.max_transfer = min(self.max_transfer, self.bounce_bytes)
        self.sgls = self.id_ctrl["sgls"]
        self.nvm_limits = await self._nvm_limits()

        await self._setup_dbbuf()

        want = sum(o.wants for o in self.owners)
        n = min(want, t.max_vectors() - 1)
        dw0, _ = await self.admin(ADM_SET_FEATURES, cdw10=FEAT_NUM_QUEUES, cdw11=(n - 1) | ((n - 1) << 16))
        n = min(n, (dw0 & 0xFFFF) + 1, (dw0 >> 16) + 1)
        entries = min(self.queue_entries, self.mqes + 1)
        self.queues = []
        plan, qid = [], 1
        for owner in self.owners:
            mine = []
            # in order of the owners: trio's own first
            for _ in range(min(owner.wants, n + 1 - qid)):
                q = IoQueue(t, qid, entries, max_transfer=self.max_transfer, sgls=self.sgls,
                            polled=self.polled, bounce_bytes=owner.bounce_bytes, spin_ns=self.spin_ns)
                q.owner = owner.name
                await t.create_io_queue(self, q, 0 if self.polled else 1)
                if self.dbbuf_active:
                    q.qp.set_shadow(*self._dbbuf, self.dstrd)
                mine.append(q)
                self.queues.append(q)
                qid += 1
            if not mine and owner.wants:
                raise ControllerError(f"{t.name}: the controller granted {n} I/O queue(s), none left for "
                                      f"the {owner.name} (which needs {owner.wants})")
            plan.append((owner, mine))

        self.effects = await self._command_effects()
        await self._identify_namespaces()
        aen = await self._enable_async_events()
        self.generation += 1
        for owner, mine in plan:
            await owner.attach(self, mine)
        self.ready.set()
        if aen:
            self.nursery.start_soon(self._async_events, self.generation)

    @property
    def io_qs(self):
        """trio's own I/O queues (the namespace API's)."""
        return self.trio.queues

    def _all_queues(self):
        return [self.admin_q] + self.queues

    async def _disable(self):
        cc = self.transport.read32(REG_CC)
        if cc & CC_EN:
            self.transport.write32(REG_CC, cc & ~CC_EN)
        await self._wait_csts(0, "become disabled")

    async def _setup_dbbuf(self):
        """Doorbell Buffer Config: I/O queues publish tails and heads in a
        shadow page and write MMIO only when the controller's event index
        asks for it -- each MMIO write is a VM exit on an emulated controller.
        The admin queue stays on MMIO (as in Linux) but also keeps its
        shadow entries current, for controllers that read them."""
        want = self.shadow_doorbells
        if want is None:
            want = getattr(self.transport, "prefers_shadow_doorbells", False)
        self.dbbuf_active = False
        if not want or not self.id_ctrl["oacs"] & OACS_DBBUF:
            return
        if self._dbbuf is None:
            self._dbbuf = (self.transport.arena.alloc(4096), self.transport.arena.alloc(4096))
        for page in self._dbbuf:
            memoryview(page)[:] = bytes(4096)
        shadow, eventidx = self._dbbuf
        await self.admin(ADM_DBBUF, prp1=shadow.iova, prp2=eventidx.iova)
        self.admin_q.qp.set_shadow(shadow, eventidx, self.dstrd, always_ring=True)
        self.dbbuf_active = True

    # -- commands ----------------------------------------------------------------

    async def execute(self, q, opcode, *, timeout=None, nsid=0, lba=None, chunks=None, **cmd):
        """Run one command on queue ``q``; returns (dw0, dw1).  Raises
        NvmeError for an error status, ControllerReset if a reset took the
        command (resubmit), ControllerError if the controller is gone.

        ``chunks``: bounce chunks the command's data lives in.  If the caller
        is cancelled while the command is in flight they are handed to the
        slot (and the list emptied), so they go back to the pool only when
        the controller can no longer DMA into them."""
        timeout = timeout or (self.admin_timeout if q.qid == 0 else self.timeout)
        slot = await q.submit(opcode, deadline=None, nsid=nsid, **cmd)
        # the clock starts when the controller has the command, not while
        # the submitter waited for SQ space or an id
        slot.deadline = trio.current_time() + timeout
        q.spin(slot)
        return await self.finish(q, slot, opcode, nsid, lba, chunks)

    async def finish(self, q, slot, opcode, nsid=0, lba=None, chunks=None):
        """Wait for a submitted command's slot; returns (dw0, dw1) or raises
        as execute() does."""
        if slot.event.is_set():
            # completed while we polled: a full scheduling round costs more
            # than the command did, so only every 16th pays one
            await q.fast_checkpoint()
        else:
            # a cancelled waiter's command stays listened for: its id and
            # bounce chunks come back only with its completion
            q.listen(slot)
            try:
                # timeouts are the watchdog's job: no cancel scope per command
                await slot.event.wait()
            except trio.Cancelled:
                if not slot.event.is_set():
                    slot.abandoned = True
                    if chunks:
                        slot.chunks = list(chunks)
                        chunks.clear()
                raise
        if slot.error is not None:
            raise slot.error
        if slot.status:
            raise self.status_error(slot.status, opcode, slot.cid, q.qid, nsid, lba)
        return slot.dw0, slot.dw1

    def status_error(self, status, opcode, cid, qid, nsid, lba):
        """The NvmeError for a completion's status, counted by name."""
        exc = error_from_status(status, opcode=opcode, cid=cid, qid=qid, nsid=nsid or None, lba=lba)
        self.errors_by_status[exc.name] = self.errors_by_status.get(exc.name, 0) + 1
        return exc

    async def admin(self, opcode, **cmd):
        if self.closed:
            raise ControllerError("controller is closed")
        res = await self.execute(self.admin_q, opcode, **cmd)
        if self.effects.get(opcode, 0) & (EFFECTS_NCC | EFFECTS_NIC) and self.ready.is_set():
            # the namespaces may have changed (an LBA size, their number):
            # read them again now, as Linux's nvme_passthru_end does, rather
            # than when (or whether) an event says so
            await self.rescan_namespaces(f"after {opcode_name(opcode, admin=True)}")
        return res

    async def identify(self, cns, nsid=0, csi=0):
        # one buffer, so one Identify at a time (a rescan and an admin
        # request may both be reading)
        async with self._id_lock:
            buf = self._idbuf
            await self.admin(ADM_IDENTIFY, nsid=nsid, cdw10=cns, cdw11=csi << 24,
                             segments=[(buf.iova, 4096)], is_read=True)
            return bytes(memoryview(buf))

    async def _identify_namespaces(self):
        nsids = struct.unpack("<1024I", await self.identify(2))
        from nvmefs.namespace import Namespace
        seen = set()
        for nsid in nsids:
            if nsid == 0:
                break
            info = parse_identify_namespace(await self.identify(0, nsid))
            if nsid in self.namespaces:
                self.namespaces[nsid].update(info)
            else:
                self.namespaces[nsid] = Namespace(self, nsid, info)
            seen.add(nsid)
        for gone in set(self.namespaces) - seen:
            del self.namespaces[gone]

    async def rescan_namespaces(self, reason):
        """Identify the active namespaces again; the queue owners switch to
        the new table and the listeners hear what came, went or changed.
        A reset in the middle ends it (the bring-up identifies them anyway)."""
        async with self._rescan_lock:
            if self.closed or not self.ready.is_set():
                return
            gen = self.generation
            before = {n: (ns.size, ns.lba_size) for n, ns in self.namespaces.items()}
            try:
                await self._identify_namespaces()
                if gen != self.generation:
                    return
                for owner in self.owners:
                    changed = getattr(owner, "namespaces_changed", None)
                    if changed is not None:
                        await changed(self)
            except (ControllerReset, ControllerError) as exc:
                log.info("%s: namespace rescan (%s) cut short: %s", self.transport.name, reason, exc)
                return
            self.rescans += 1
            after = {n: (ns.size, ns.lba_size) for n, ns in self.namespaces.items()}
            if after != before:
                log.info("%s: namespaces %s -> %s (%s)", self.transport.name, sorted(before),
                         sorted(after), reason)
            for fn in self.namespace_listeners:
                fn(before, after)

    async def _enable_async_events(self):
        """Asynchronous Event Configuration: namespace attribute notices where
        the controller offers them (OAES bit 8).  Error events need no
        enabling.  False if the controller takes no event requests."""
        if self.id_ctrl.get("oaes", 0) & OAES_NS_ATTR:
            try:
                await self.admin(ADM_SET_FEATURES, cdw10=FEAT_ASYNC_EVENT, cdw11=OAES_NS_ATTR)
            except NvmeError as exc:
                log.info("%s: namespace attribute notices not enabled (%s)", self.transport.name, exc.name)
        return True

    async def _async_events(self, generation):
        """One Asynchronous Event Request outstanding for this bring-up (it
        has no deadline: it completes only when something happens).  Each
        event's log page is read with RAE clear, which is what lets the
        controller post the next event of its type."""
        name = self.transport.name
        while not self.closed and generation == self.generation:
            try:
                dw0, _ = await self.execute(self.admin_q, ADM_AER, timeout=math.inf)
            except (ControllerReset, ControllerError):
                return                      # a reset re-arms it; a shutdown ends it
            except NvmeError as exc:
                log.warning("%s: asynchronous event request refused (%s): no events", name, exc.name)
                return
            self.async_events += 1
            typ, info, lid = dw0 & 7, (dw0 >> 8) & 0xFF, (dw0 >> 16) & 0xFF
            try:
                if typ == AEN_NOTICE and info == AEN_NS_ATTR_CHANGED:
                    raw = await self.get_log_page(LOG_CHANGED_NS, 4096)
                    listed = [n for n in struct.unpack("<1024I", raw) if n]
                    await self.rescan_namespaces(f"namespace attribute changed: {listed}")
                else:
                    if lid:
                        await self.get_log_page(lid, 64 if lid == 0x01 else 512)
                    log.warning("%s: asynchronous event type %d info 0x%02x (log page %02Xh)",
                                name, typ, info, lid)
            except (ControllerReset, ControllerError):
                return
            except NvmeError as exc:
                log.warning("%s: reading the log page of an asynchronous event failed: %s", name, exc)

    # -- namespace management (Namespace Management 0Dh, Attachment 15h) ---------

    def _need_ns_mgmt(self):
        if not self.id_ctrl.get("oacs", 0) & OACS_NS_MGMT:
            raise ControllerError(f"{self.transport.name}: the controller does not support namespace "
                                  f"management (OACS bit 3 is clear)")

    async def _admin_data(self, opcode, data, **cmd):
        """An admin command that sends ``data`` (at most 4 KiB) to the controller."""
        buf = self.transport.arena.alloc(4096)
        try:
            memoryview(buf)[:] = bytes(data).ljust(4096, b"\0")
            return await self.admin(opcode, segments=[(buf.iova, 4096)], is_read=False, **cmd)
        finally:
            buf.free()

    async def create_namespace(self, nsze, ncap=None, flbas=0):
        """Namespace Management create: ``nsze`` blocks of LBA format
        ``flbas``, not attached.  Returns the new NSID."""
        self._need_ns_mgmt()
        data = bytearray(4096)
        struct.pack_into("<QQ", data, 0, nsze, nsze if ncap is None else ncap)
        data[26] = flbas
        dw0, _ = await self._admin_data(ADM_NS_MGMT, data, cdw10=0)
        return dw0

    async def delete_namespace(self, nsid):
        self._need_ns_mgmt()
        await self.admin(ADM_NS_MGMT, nsid=nsid, cdw10=1)

    async def attach_namespace(self, nsid, controllers=None, detach=False):
        """Namespace Attachment: attach ``nsid`` to (or detach it from) the
        controllers listed (default: this one)."""
        self._need_ns_mgmt()
        ids = list(controllers) if controllers else [self.id_ctrl["cntlid"]]
        data = struct.pack(f"<H{len(ids)}H", len(ids), *ids)
        await self._admin_data(ADM_NS_ATTACH, data, nsid=nsid, cdw10=1 if detach else 0)

    async def allocated_namespaces(self):
        """{nsid: Identify Namespace (CNS 11h)} of every allocated namespace,
        attached or not (CNS 10h)."""
        self._need_ns_mgmt()
        ids = struct.unpack("<1024I", await self.identify(0x10))
        out = {}
        for nsid in ids:
            if nsid == 0:
                break
            out[nsid] = parse_identify_namespace(await self.identify(0x11, nsid))
        return out

    async def _command_effects(self):
        """Commands Supported and Effects (log page 05h, when LPA bit 1 says
        it is there): admin opcode -> its entry, so that a command which
        changes namespaces (Format NVM, namespace management) is followed by
        reading them again, as Linux's nvme_passthru_end does.  {} without."""
        if not self.id_ctrl.get("lpa", 0) & 0x02:
            return {}
        try:
            raw = await self.get_log_page(0x05, 4096, nsid=0)
        except NvmeError as exc:
            log.info("%s: no Commands Supported and Effects log (%s)", self.transport.name, exc.name)
            return {}
        acs = struct.unpack_from("<256I", raw, 0)
        return {opc: e for opc, e in enumerate(acs) if e & EFFECTS_CSUPP}

    async def _nvm_limits(self):
        """The NVM command set's size limits for Write Zeroes and Dataset
        Management (Identify CNS 06h, CSI 00h; NVM Command Set spec, I/O
        Command Set specific Identify Controller), as Linux reads them.  A
        controller that does not know CNS 06h has none: {}."""
        if self.id_ctrl["ver"] < 0x00010400:
            return {}
        try:
            raw = await self.identify(6, csi=0)
        except NvmeError as exc:
            log.info("%s: no I/O command set specific Identify (%s): no Write Zeroes/DSM limits",
                     self.transport.name, exc.name)
            return {}
        wzsl, dmrl = raw[1], raw[3]
        dmrsl, dmsl = struct.unpack_from("<IQ", raw, 4)
        mpsmin = 1 << (12 + ((self.transport.read64(0) >> 48) & 0xF))
        limits = {}
        if wzsl:
            limits["write_zeroes_bytes"] = mpsmin << wzsl
        if dmrl:
            limits["dsm_ranges"] = dmrl
        if dmrsl:
            limits["dsm_range_lbas"] = dmrsl
        if dmsl:
            limits["dsm_lbas"] = dmsl
        return limits

    async def get_log_page(self, lid, nbytes, nsid=0xFFFFFFFF, offset=0):
        buf = self.transport.arena.alloc(nbytes)
        try:
            numd = nbytes // 4 - 1
            await self.admin(ADM_GET_LOG, nsid=nsid, cdw10=lid | ((numd & 0xFFFF) << 16),
                             cdw11=numd >> 16, cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32,
                             segments=[(buf.iova, nbytes)], is_read=True)
            return bytes(memoryview(buf)[:nbytes])
        finally:
            buf.free()

    async def get_features(self, fid, cdw11=0):
        return (await self.admin(ADM_GET_FEATURES, cdw10=fid, cdw11=cdw11))[0]

    async def set_features(self, fid, cdw11):
        return (await self.admin(ADM_SET_FEATURES, cdw10=fid, cdw11=cdw11))[0]

    def pick_queue(self):
        """I/O queue for the next command of trio's: round robin over its
        queues (one trio thread submits to all of them)."""
        return self.trio.pick()

    @property
    def _rr(self):
        return self.trio.rr

    @_rr.setter
    def _rr(self, value):
        self.trio.rr = value

    # -- recovery ----------------------------------------------------------------

    def fatal(self):
        return bool(self.transport.read32(REG_CSTS) & CSTS_CFS)

    async def _watchdog(self):
        """Finds commands past their deadline (one task instead of a cancel
        scope per command) and runs the timeout recipe for each, once."""
        tick = max(0.01, min(0.25, min(self.timeout, self.admin_timeout) / 8))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            # the lanes watch their own commands: timed_out() below
            for q in [self.admin_q] + self.io_qs:
                if q is None or q.dead:
                    continue
                for slot in q.outstanding_slots():
                    if slot.deadline <= now and not slot.timed_out:
                        slot.timed_out = True
                        self.nursery.start_soon(self._on_timeout, q, slot)

    async def timed_out(self, qid, cid, opcode, escalate, generation):
        """A queue owner's command (qid, cid) is past the timeout; with
        ``escalate``, past twice the timeout after its abort.  The same
        recipe as for trio's own commands: reset on a fatal status or once
        the abort did not help, else abort it."""
        if generation != self.generation or not self.ready.is_set() or self.closed:
            return          # that queue is gone: a reset took the command
        log.warning("%s: I/O command %s cid %d on queue %d %s", self.transport.name,
                    opcode_name(opcode), cid, qid,
                    "still outstanding after its abort" if escalate else "timed out")
        try:
            if escalate or self.fatal():
                await self.reset("controller fatal status" if self.fatal() else "command timeout", generation)
                return
            dw0, _ = await self.admin(ADM_ABORT, cdw10=qid | (cid << 16))
            log.warning("abort of cid %d on queue %d: %s", cid, qid,
                        "command aborted" if not dw0 & 1 else "command not aborted")
        except (NvmeError, ControllerReset, ControllerError) as exc:
            log.warning("abort of cid %d on queue %d failed: %s", cid, qid, exc)

    async def _on_timeout(self, q, slot):
        gen = self.generation
        if not self.ready.is_set():
            # during bring-up there is nothing to reset to: give up clearly
            q.fail_slot(slot, ControllerError(
                f"{self.transport.name}: controller stopped answering "
                f"(opcode 0x{slot.opcode:02x} timed out during bring-up)"))
            return
        log.warning("%s: %s command cid %d on queue %d timed out", self.transport.name,
                    "admin" if q.qid == 0 else "I/O", slot.cid, q.qid)
        if self.fatal():
            await self.reset("controller fatal status", gen)
            return
        if q.qid != 0 and not slot.aborting:
            slot.aborting = True
            try:
                dw0, _ = await self.admin(ADM_ABORT, cdw10=q.qid | (slot.cid << 16))
                log.warning("abort of cid %d on queue %d: %s", slot.cid, q.qid,
                            "command aborted" if not dw0 & 1 else "command not aborted")
            except (NvmeError, ControllerReset, ControllerError) as exc:
                log.warning("abort of cid %d on queue %d failed: %s", slot.cid, q.qid, exc)
            if slot.event.is_set():
                return
            with trio.move_on_after(self.timeout):
                await slot.event.wait()
            if slot.event.is_set():
                return
        try:
            await self.reset("command timeout", gen)
        except Exception as exc:
            log.error("%s", exc)

    async def reset(self, reason, generation=None):
        """Controller reset: fail everything in flight with ControllerReset
        (callers resubmit), then bring the controller up again.  Shielded:
        a half-done reset (old queues gone, new ones not made) must never be
        left behind by a cancelled caller."""
        with trio.CancelScope(shield=True):
            async with self._reset_lock:
                if generation is not None and generation != self.generation:
                    return                       # someone else already reset it
                if self.closed:
                    raise ControllerError("controller is closed")
                self.resets += 1
                log.warning("%s: resetting controller (%s)", self.transport.name, reason)
                self.ready = trio.Event()
                exc = ControllerReset(reason)
                disabled = False
                try:
                    # Every owner stops using its queues first, then the
                    # controller is quiesced (Linux's nvme_reset_work
                    # disables before it cancels anything): until CSTS.RDY=0
                    # a slow, not dead, controller may still write into the
                    # CQs and buffers that are failed, freed and reused below.
                    for owner in self.owners:
                        await owner.quiesce()
                    try:
                        await self._disable()
                        disabled = True
                    except ControllerError as err:
                        # it will not even stop: tear down regardless (the
                        # bring-up tries again, and fails the controller)
                        log.error("%s", err)
                    for owner in self.owners:
                        owner.detach(exc)
                    await self._close_queues(exc)
                    await self._bring_up()
                except BaseException as err:
                    # whatever stopped the bring-up, waiters must see a closed
                    # controller rather than wait for ever
                    self.closed = True
                    self.ready.set()
                    with trio.CancelScope(shield=True):
                        for owner in self.owners:
                            await owner.fail(dma_unsafe=not disabled)
                    if isinstance(err, Exception) and not isinstance(err, ControllerError):
                        raise ControllerError(f"{self.transport.name}: reset failed: {err}") from err
                    raise

    async def _close_queues(self, exc):
        old = self._all_queues()
        for q in old:
            if q is not None:
                q.fail_all(exc)
        for q in old:
            if q is not None:
                if q.cancel_scope is not None:
                    await q.finished.wait()
                q.close()

    # -- shutdown ----------------------------------------------------------------

    async def shutdown(self):
        """Flush, delete I/O queues, CC.SHN normal shutdown, wait SHST.
        Waits for a reset in progress rather than racing it; a transport
        still trying to reach the controller (reconnecting) gives up now."""
        self.transport.interrupt()
        async with self._reset_lock:
            await self._shutdown()

    async def _shutdown(self):
        if self.closed:
            return
        t = self.transport
        try:
            if self.generation == 0:
                return                      # bring-up never finished: nothing to shut down
            if not self.fatal() and self.ready.is_set():
                for ns in self.namespaces.values():
                    try:
                        await ns.flush()
                    except (NvmeError, ControllerReset) as exc:
                        log.warning("flush of namespace %d at shutdown failed: %s", ns.nsid, exc)
                # an owner still serving (the lanes, when the mount did not
                # stop them) lets go of its queues before they are deleted
                for owner in self.owners[1:]:
                    await owner.quiesce()
                for q in reversed(self.queues):
                    await t.delete_io_queue(self, q)
            cc = t.read32(REG_CC)
            t.write32(REG_CC, (cc & ~(3 << 14)) | CC_SHN_NORMAL)
            deadline = trio.current_time() + max(self.cap_to, 1.0)
            while (t.read32(REG_CSTS) & CSTS_SHST_MASK) != CSTS_SHST_DONE:
                if trio.current_time() > deadline:
                    log.warning("%s: shutdown did not complete within CAP.TO", t.name)
                    break
                await trio.sleep(0.001)
        except (NvmeError, ControllerError, ControllerReset) as exc:
            log.warning("%s: clean shutdown failed: %s", t.name, exc)
        finally:
            self.closed = True
            exc = ControllerError("controller shut down")
            for owner in self.owners:
                await owner.fail(dma_unsafe=False)
            await self._close_queues(exc)

    def stats(self):
        # generation: one more each time the controller is brought up (a
        # reset has finished when it moves)
        extra = self.transport.stats()
        return {"transport": self.transport.name, **({"transport_stats": extra} if extra else {}),
                "resets": self.resets, "generation": self.generation,
                "ready": self.ready.is_set(), "async_events": self.async_events, "rescans": self.rescans,
                "errors_by_status": dict(self.errors_by_status),
                "queues": [q.stats() for q in self._all_queues()]}

    async def _health(self):
        # CSTS.CFS can appear with nothing in flight; Linux notices it in its
        # keep-alive/timeout paths, we poll it (cheap register read).
        while True:
            await trio.sleep(0.5)
            if not self.closed and self.ready.is_set() and self.fatal():
                try:
                    await self.reset("controller fatal status", self.generation)
                except Exception as exc:
                    log.error("%s", exc)
                    return


@asynccontextmanager
async def open_controller(transport, **options):
    """Bring a controller up; shut it down cleanly on exit.  Errors come out
    as themselves, not wrapped in the nursery's exception group."""
    try:
        async with _controller_nursery(transport, **options) as ctrl:
            yield ctrl
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@asynccontextmanager
async def _controller_nursery(transport, **options):
    async with trio.open_nursery() as nursery:
        ctrl = Controller(transport, nursery, **options)
        try:
            nursery.start_soon(ctrl._watchdog)
            await ctrl._bring_up()
            nursery.start_soon(ctrl._health)
            yield ctrl
        finally:
            with trio.CancelScope(shield=True):
                await ctrl.shutdown()
            nursery.cancel_scope.cancel()
