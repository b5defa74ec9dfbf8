"""NVMe over TCP: the transport for a namespace served by another machine.

A controller reached over TCP (an NVMe-oF target such as Linux nvmet-tcp
or SPDK nvmf_tgt) is made to look like the PCIe one the rest of the driver
drives: queue pairs build their SQEs and SGLs in local memory (a DmaArena
nobody but us reads) and ring doorbells in a local register file; each
queue's connection (``_core.TcpQueue``, _core/tcp.pyx) has a native thread
that carries the SQEs as capsules, the data as PDUs, and the answers back
as CQEs plus an interrupt eventfd.  So the lanes, the trio queues, the
watchdog, resets and stats run unchanged.

What differs is bring-up, and this file does it (control plane only):

- registers are properties: CAP and VS are read once (Property Get), CC
  writes become Property Set, CSTS reads Property Get, all on the admin
  connection.  CC.EN 0->1 creates the association (a TCP connection,
  ICReq/ICResp, Fabrics Connect on the admin queue with cntlid FFFFh and
  our KATO), CC.EN 1->0 ends it;
- I/O queues are connections: ``create_io_queue`` opens one per queue and
  sends Connect with the association's cntlid (no Create I/O SQ/CQ);
- a connection that breaks (reset, digest error, a malformed PDU, no Keep
  Alive answer within KATO) makes CSTS read CFS, so the controller's reset
  path runs: the association is torn down, a new one made (every
  ``reconnect_delay`` seconds until ``ctrl_loss_tmo`` has passed since the
  loss), and the queue owners resubmit what was outstanding.  Only when the
  loss timeout passes do requests fail.
"""
import errno
import logging
import os
import socket
import struct
import threading
import time
import uuid

import trio

from nvmefs import _core
from nvmefs.errors import ControllerError
from nvmefs.tcp_url import DEFAULT_PORT, canonical_url, parse_url
from nvmefs.transport import Transport

log = logging.getLogger("nvmefs.tcp")

TcpError = _core.TcpError

DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
ADMIN_INCAPSULE = 8192          # in-capsule data an admin queue takes (NVMe/TCP: 8 KiB)
# The admin queue's size on the wire (Linux's NVME_AQ_DEPTH; SPDK's default
# max_aq_depth): two of its slots are the connection's own (control calls,
# Keep Alive), the rest carry the local admin queue, whose deeper SQ waits.
ADMIN_WIRE_ENTRIES = 32
MAX_IO_QUEUES = 64

REG_CAP, REG_VS, REG_CC, REG_CSTS, REG_AQA, REG_ASQ, REG_ACQ = 0x00, 0x08, 0x14, 0x1C, 0x24, 0x28, 0x30
CC_EN, CC_SHN_MASK = 1, 3 << 14
CSTS_RDY, CSTS_CFS, CSTS_SHST_DONE = 1, 2, 0x8

NVMF_OPC, FCTYPE_PROP_SET, FCTYPE_CONNECT, FCTYPE_PROP_GET = 0x7F, 0x00, 0x01, 0x04
CATTR_DISABLE_SQFLOW = 1 << 2

# Connect's command specific statuses (NVMe over Fabrics 1.1, figure 21)
CONNECT_STATUS = {0x80: "incompatible Connect format", 0x81: "controller busy",
                  0x82: "invalid Connect parameters", 0x83: "restart discovery", 0x84: "invalid host"}
# byte offsets in the Connect data a target's "invalid parameter" answer points at
CONNECT_FIELDS = {0: "host identifier", 16: "controller id", 256: "subsystem NQN", 512: "host NQN"}

TRTYPE = {1: "rdma", 2: "fc", 3: "tcp", 254: "loop"}
ADRFAM = {1: "ipv4", 2: "ipv6", 3: "ib", 4: "fc", 254: "loop"}
SUBTYPE = {1: "discovery subsystem referral", 2: "nvme subsystem", 3: "current discovery subsystem"}
TREQ_SECURE = {0: "not specified", 1: "required", 2: "not required"}

def _machine_uuid():
    try:
        with open("/etc/machine-id") as f:
            return uuid.uuid5(uuid.NAMESPACE_DNS, "nvmefs-host-" + f.read().strip())
    except OSError:
        return uuid.uuid5(uuid.NAMESPACE_DNS, "nvmefs-host-" + socket.gethostname())


def default_hostnqn():
    """/etc/nvme/hostnqn (nvme-cli's), else one derived from the machine id."""
    try:
        with open("/etc/nvme/hostnqn") as f:
            nqn = f.read().strip()
            if nqn:
                return nqn
    except OSError:
        pass
    return f"nqn.2014-08.org.nvmexpress:uuid:{_machine_uuid()}"


def default_hostid():
    try:
        with open("/etc/nvme/hostid") as f:
            return uuid.UUID(f.read().strip())
    except (OSError, ValueError):
        return _machine_uuid()


# --- Fabrics commands (64-byte SQEs; the connection sets cid and the SGL) ---------

def connect_sqe(qid, sqsize, kato_ms=0, cattr=0):
    """Connect (FCTYPE 01h): ``sqsize`` is 0's based."""
    sqe = bytearray(64)
    sqe[0], sqe[4] = NVMF_OPC, FCTYPE_CONNECT
    struct.pack_into("<HHHBxI", sqe, 40, 0, qid, sqsize, cattr, kato_ms)
    return bytes(sqe)


def connect_data(hostid, cntlid, subnqn, hostnqn):
    data = bytearray(1024)
    data[0:16] = hostid.bytes if isinstance(hostid, uuid.UUID) else bytes(hostid)
    struct.pack_into("<H", data, 16, cntlid)
    for off, s in ((256, subnqn), (512, hostnqn)):
        b = s.encode()
        if len(b) > 223:
            raise ValueError(f"NQN {s!r} is longer than 223 bytes")
        data[off:off + len(b)] = b
    return bytes(data)


def property_get_sqe(offset, wide):
    sqe = bytearray(64)
    sqe[0], sqe[4] = NVMF_OPC, FCTYPE_PROP_GET
    struct.pack_into("<B3xI", sqe, 40, 1 if wide else 0, offset)
    return bytes(sqe)


def property_set_sqe(offset, value, wide):
    sqe = bytearray(64)
    sqe[0], sqe[4] = NVMF_OPC, FCTYPE_PROP_SET
    struct.pack_into("<B3xIQ", sqe, 40, 1 if wide else 0, offset, value)
    return bytes(sqe)


def get_log_sqe(lid, nbytes, offset=0):
    numd = nbytes // 4 - 1
    sqe = bytearray(64)
    sqe[0] = 0x02
    struct.pack_into("<IIII", sqe, 40, lid | ((numd & 0xFFFF) << 16), numd >> 16,
                     offset & 0xFFFFFFFF, offset >> 32)
    return bytes(sqe)


def cqe_status(cqe):
    """(sct, sc, dnr, dw0, dw1) of a 16-byte CQE."""
    dw0, dw1, _sqhd, _sqid, _cid, status = struct.unpack("<IIHHHH", cqe)
    return (status >> 9) & 7, (status >> 1) & 0xFF, bool(status >> 15), dw0, dw1


class Connection:
    """One TCP connection to the target, carrying one queue."""

    def __init__(self, host, port, qid, arena, regs, *, depth, kick_fd, hdr_digest=False,
                 data_digest=False, timeout=5.0):
        where = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            raise TcpError(errno.ECONNREFUSED, f"{where}: connection refused (no NVMe/TCP target "
                                               f"listening there)") from None
        except socket.timeout:
            raise TcpError(errno.ETIMEDOUT, f"{where}: no answer to the TCP connection within "
                                            f"{timeout:g} s") from None
        except socket.gaierror as exc:
            raise TcpError(errno.EHOSTUNREACH, f"{host}: cannot resolve the address ({exc.strerror})") from None
        except OSError as exc:
            raise TcpError(exc.errno or errno.EIO, f"{where}: cannot connect ({exc.strerror or exc})") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.qid = qid
        self.timeout = timeout
        self.q = _core.TcpQueue(sock.detach(), qid, arena, regs, depth=depth, hdgst=hdr_digest,
                                ddgst=data_digest)
        try:
            self.q.handshake(timeout)
            self.q.start(kick_fd)
        except BaseException:
            self.close()
            raise

    def call(self, sqe, data=None, read_len=0, timeout=None):
        return self.q.call(sqe, data, read_len, self.timeout if timeout is None else timeout)

    def connect(self, subnqn, hostnqn, hostid, cntlid, sqsize, kato_ms=0, cattr=0):
        """Fabrics Connect for this connection's queue; the controller id."""
        cqe, _ = self.call(connect_sqe(self.qid, sqsize, kato_ms, cattr),
                           connect_data(hostid, cntlid, subnqn, hostnqn))
        sct, sc, _dnr, dw0, _ = cqe_status(cqe)
        if sct == 0 and sc == 0:
            return dw0 & 0xFFFF
        what = CONNECT_STATUS.get(sc, f"status SCT {sct:#x} SC {sc:#x}") if sct == 1 else \
            f"status SCT {sct:#x} SC {sc:#x}"
        if sct == 1 and sc == 0x84:
            raise TcpError(errno.EACCES, f"the target does not allow host {hostnqn} to connect to {subnqn}")
        if sct == 1 and sc == 0x82 and dw0 >> 16 & 1 and (dw0 & 0xFFFF) == 256:
            raise TcpError(errno.ENOENT, f"the target has no subsystem {subnqn} (or not on this port)")
        if sct == 1 and sc == 0x82:
            field = CONNECT_FIELDS.get(dw0 & 0xFFFF, f"offset {dw0 & 0xFFFF}") if dw0 >> 16 & 1 else \
                f"command byte {dw0 & 0xFFFF}"
            raise TcpError(errno.EINVAL, f"Connect of queue {self.qid} to {subnqn} refused: {what} ({field})")
        raise TcpError(errno.EIO, f"Connect of queue {self.qid} to {subnqn} refused: {what}")

    def prop_get(self, offset, wide, timeout=None):
        cqe, _ = self.call(property_get_sqe(offset, wide), timeout=timeout)
        sct, sc, _dnr, dw0, dw1 = cqe_status(cqe)
        if sct or sc:
            raise TcpError(errno.EIO, f"Property Get {offset:#x} failed (SCT {sct:#x} SC {sc:#x})")
        return dw0 | (dw1 << 32) if wide else dw0

    def prop_set(self, offset, value, wide=False, timeout=None):
        cqe, _ = self.call(property_set_sqe(offset, value, wide), timeout=timeout)
        sct, sc, _dnr, _dw0, _ = cqe_status(cqe)
        if sct or sc:
            raise TcpError(errno.EIO, f"Property Set {offset:#x} = {value:#x} failed (SCT {sct:#x} SC {sc:#x})")

    def close(self):
        self.q.fail("connection closed by the host")
        self.q.stop()


class TcpTransport(Transport):
    """A controller reached over NVMe/TCP (``nvme-tcp://HOST[:PORT]/SUBNQN``).
    Options carry nvme-cli's names."""

    fabrics = True

    def __init__(self, url, *, hostnqn=None, hostid=None, nr_io_queues=None, hdr_digest=False,
                 data_digest=False, keep_alive_tmo=5.0, reconnect_delay=10.0, ctrl_loss_tmo=600.0,
                 disable_sqflow=False, connect_timeout=5.0, arena_size=1 << 30):
        self.host, self.port, self.subnqn = parse_url(url)
        self.name = canonical_url(url)
        self.hostnqn = hostnqn or default_hostnqn()
        self.hostid = uuid.UUID(str(hostid)) if hostid else default_hostid()
        self.nr_io_queues = min(nr_io_queues or MAX_IO_QUEUES, MAX_IO_QUEUES)
        self.hdr_digest, self.data_digest = hdr_digest, data_digest
        self.kato = keep_alive_tmo
        self.reconnect_delay = reconnect_delay
        self.ctrl_loss_tmo = ctrl_loss_tmo
        self.cattr = CATTR_DISABLE_SQFLOW if disable_sqflow else 0
        self.connect_timeout = connect_timeout
        self.ready_grace = ctrl_loss_tmo + connect_timeout
        self._lock = threading.Lock()      # association state; control plane only
        self._closing = threading.Event()
        self._kick, self._irq = {}, {}
        self._admin, self._io = None, {}
        self._cntlid = None
        self._state = "idle"               # idle | connecting | live | lost | failed
        self._why = None
        self._lost_at = None
        self._cc = 0
        self._shst = 0
        self._gen = 0                      # moves at every teardown: a late association is dropped
        self._connector = None
        self.associations = 0
        self.losses = 0
        self.arena = _core.DmaArena(arena_size)
        self.regs = _core.RegisterFile(0x1000 + 2 * (MAX_IO_QUEUES + 1) * 4)
        # One short association now, so that a wrong address, subsystem or
        # host fails here with one clear line instead of as a bring-up timeout.
        try:
            probe = self._connection(0, 2)
            try:
                probe.connect(self.subnqn, self.hostnqn, self.hostid, 0xFFFF, 3, 0, self.cattr)
                cap = probe.prop_get(REG_CAP, True)
                self._vs = probe.prop_get(REG_VS, False)
            finally:
                probe.close()
        except BaseException:
            self._close_fds()
            raise
        # doorbells are local memory at stride 4
        self._cap = cap & ~(0xF << 32)

    # -- connections ---------------------------------------------------------------

    def _kick_fd(self, qid):
        fd = self._kick.get(qid)
        if fd is None:
            fd = self._kick[qid] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd

    def _connection(self, qid, depth):
        return Connection(self.host, self.port, qid, self.arena, self.regs, depth=depth,
                          kick_fd=self._kick_fd(qid), hdr_digest=self.hdr_digest,
                          data_digest=self.data_digest, timeout=self.connect_timeout)

    def _associate(self, gen):
        """A new association carrying the local admin queue (AQA/ASQ/ACQ);
        False when it came too late (torn down or closed meanwhile)."""
        aqa = self.regs.read32(REG_AQA)
        entries = min((aqa & 0xFFF) + 1, ((aqa >> 16) & 0xFFF) + 1)
        wire = min(entries + 2, ADMIN_WIRE_ENTRIES)
        a = self._connection(0, wire - 3)       # at most wire - 1 in flight, the two own slots included
        try:
            kato_ms = int(self.kato * 1000)
            cntlid = a.connect(self.subnqn, self.hostnqn, self.hostid, 0xFFFF, wire - 1, kato_ms, self.cattr)
            a.q.set_limits(ADMIN_INCAPSULE)
            a.prop_set(REG_CC, self._cc)
            if kato_ms:
                a.q.set_keepalive(self.kato)
            # the target's own ready bit first: the driver sees ready (from
            # our state) as soon as the association is published below
            deadline = time.monotonic() + max(0.5, ((self._cap >> 24) & 0xFF) * 0.5)
            while True:
                csts = a.prop_get(REG_CSTS, False)
                if csts & CSTS_CFS:
                    raise TcpError(errno.EIO, "the controller reported fatal status while becoming ready")
                if csts & CSTS_RDY:
                    break
                if time.monotonic() > deadline:
                    raise TcpError(errno.ETIMEDOUT, "the controller did not become ready within CAP.TO")
                time.sleep(0.005)
        except BaseException:
            a.close()
            raise
        with self._lock:
            late = gen != self._gen or self._closing.is_set() or not self._cc & CC_EN
            if not late:
                # served only once it is ours for sure: an association that
                # lost the race never takes an SQE of the next one's queue
                a.q.serve(self.regs.read64(REG_ASQ), self.regs.read64(REG_ACQ), entries, 0, self.irq_fd(0))
                self._admin, self._cntlid = a, cntlid
                self._state = "live"
                self.associations += 1
                again, self._lost_at = self._lost_at is not None, None
        if late:
            a.close()
            return False
        if again:
            log.warning("%s: reconnected (controller %d)", self.name, cntlid)
        return True

    def _connect_loop(self, gen):
        # after a loss: retry until ctrl_loss_tmo has passed since it; the
        # very first association gets one try (the probe just worked)
        first = self.associations == 0
        deadline = (self._lost_at or time.monotonic()) + self.ctrl_loss_tmo
        why = "the mount is going away"
        try:
            while not self._closing.is_set() and gen == self._gen:
                try:
                    if self._associate(gen):
                        return
                    why = "the association was torn down while it was being made"
                    break
                except (OSError, ValueError) as exc:
                    why = str(exc)
                if first or time.monotonic() + self.reconnect_delay > deadline:
                    break
                log.warning("%s: reconnect failed (%s); next try in %g s", self.name, why, self.reconnect_delay)
                self._closing.wait(self.reconnect_delay)
        except Exception as exc:        # never leave the state at "connecting"
            why = f"reconnect failed: {exc!r}"
        with self._lock:
            if gen != self._gen:
                return                  # torn down meanwhile: whoever did it owns the state
            self._state = "failed"
            self._why = why if first or self._closing.is_set() else \
                f"controller lost for good: no association within --ctrl-loss-tmo " \
                f"({self.ctrl_loss_tmo:g} s); last try: {why}"
        log.error("%s: %s", self.name, self._why)

    def interrupt(self):
        self._closing.set()

    def _teardown(self, cc):
        with self._lock:
            admin, io = self._admin, list(self._io.values())
            live = self._state == "live"
            self._admin, self._io = None, {}
            self._gen += 1              # an association still being made is dropped when done
            if self._state in ("live", "lost", "connecting"):
                self._state = "idle"
        if admin is not None and live and not admin.q.failed:
            try:
                admin.prop_set(REG_CC, cc, timeout=1.0)
            except TcpError:
                pass
        for c in io + ([admin] if admin is not None else []):
            c.close()

    def _broken(self):
        """Why a connection of the association failed, or None."""
        with self._lock:
            conns = ([self._admin] if self._admin else []) + list(self._io.values())
        for c in conns:
            why = c.q.failed
            if why:
                return f"queue {c.qid}: {why}"
        return None

    def _mark_lost(self, why):
        with self._lock:
            if self._state != "live":
                return
            self._state = "lost"
            self._why = why
            self._lost_at = time.monotonic()
            self.losses += 1
        log.warning("%s: connection lost (%s); reconnecting", self.name, why)

    # -- registers -----------------------------------------------------------------

    def read64(self, off):
        if off == REG_CAP:
            return self._cap
        return self.regs.read64(off)

    def read32(self, off):
        if off == REG_CAP:
            return self._cap & 0xFFFFFFFF
        if off == REG_CAP + 4:
            return self._cap >> 32
        if off == REG_VS:
            return self._vs
        if off == REG_CC:
            return self._cc
        if off == REG_CSTS:
            return self._read_csts()
        return self.regs.read32(off)

    def _read_csts(self):
        # As Linux's host: while the association lives the controller is
        # ready unless a connection broke (Keep Alive finds a silent target);
        # the wire is asked only for the shutdown status, so a stalled target
        # never blocks the trio thread on a register read.
        with self._lock:
            state, admin = self._state, self._admin
        shutting = self._cc & CC_SHN_MASK
        if state == "live":
            why = self._broken()
            if why is None and not shutting:
                return CSTS_RDY
            if why is None:
                try:
                    csts = admin.prop_get(REG_CSTS, False, timeout=min(max(self.kato, 1.0), 5.0))
                    self._shst = csts & 0xC
                    return csts
                except TcpError as exc:
                    why = f"queue 0: {exc}"
            self._mark_lost(why)
            state = "lost"
        done = CSTS_SHST_DONE if shutting else 0      # nothing left to shut down
        if state == "lost":
            return CSTS_RDY | CSTS_CFS | done
        if state == "failed":
            return CSTS_CFS | done
        return (self._shst if not self._cc & CC_EN else 0) | done

    def write32(self, off, value):
        if off != REG_CC:
            self.regs.write32(off, value)
            return
        old, self._cc = self._cc, value
        if value & CC_EN and not old & CC_EN:
            with self._lock:
                self._state = "connecting"
                self._why = None
                self._gen += 1
                gen = self._gen
            self._connector = threading.Thread(target=self._connect_loop, args=(gen,), name="nvme-tcp-connect",
                                               daemon=True)
            self._connector.start()
        elif old & CC_EN and not value & CC_EN:
            self._teardown(value)
        elif (old ^ value) & CC_SHN_MASK and self._state == "live":
            try:
                self._admin.prop_set(REG_CC, value)
            except TcpError as exc:
                self._mark_lost(f"queue 0: {exc}")

    def write64(self, off, value):
        self.regs.write64(off, value)

    # -- queues and interrupts ------------------------------------------------------

    def irq_fd(self, vector):
        fd = self._irq.get(vector)
        if fd is None:
            fd = self._irq[vector] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd

    def max_vectors(self):
        return self.nr_io_queues + 1

    def attach(self, qp):
        # every doorbell write wakes the queue's connection thread
        qp.set_notifier(_core.always_kick_address(), self._kick_fd(qp.qid))

    async def create_io_queue(self, ctrl, q, ien):
        ioccsz, icdoff = ctrl.id_ctrl.get("ioccsz", 0), ctrl.id_ctrl.get("icdoff", 0)
        # in-capsule data only where it starts at offset 0 (ICDOFF; nvmet, Linux's host)
        incapsule = max(0, ioccsz * 16 - 64) if icdoff == 0 else 0
        irq = self.irq_fd(q.qid) if ien else -1
        try:
            await trio.to_thread.run_sync(self._open_io, q.qid, q.qp.entries, q.qp.sq_iova, q.qp.cq_iova,
                                          irq, incapsule)
        except OSError as exc:
            raise ControllerError(f"{self.name}: cannot connect I/O queue {q.qid}: {exc}") from None

    def _open_io(self, qid, entries, sq_iova, cq_iova, irq, incapsule):
        with self._lock:
            if self._state != "live":
                raise TcpError(errno.ENOTCONN, self._why or "the association is gone")
            cntlid = self._cntlid
        c = self._connection(qid, entries - 1)
        try:
            c.connect(self.subnqn, self.hostnqn, self.hostid, cntlid, entries - 1, 0, self.cattr)
            c.q.set_limits(incapsule)
            c.q.serve(sq_iova, cq_iova, entries, 0, irq)
        except BaseException:
            c.close()
            raise
        with self._lock:
            self._io[qid] = c

    async def delete_io_queue(self, ctrl, q):
        with self._lock:
            c = self._io.pop(q.qid, None)
        if c is not None:
            c.close()

    def fault_reason(self):
        return self._why if self._state in ("lost", "failed") else None

    def stats(self):
        with self._lock:
            conns = ([self._admin] if self._admin else []) + [self._io[k] for k in sorted(self._io)]
            state = self._state
        return {"state": state, "cntlid": self._cntlid, "hostnqn": self.hostnqn,
                "associations": self.associations, "connection_losses": self.losses,
                "hdr_digest": self.hdr_digest, "data_digest": self.data_digest,
                "connections": [c.q.stats() for c in conns]}

    def close(self):
        self._closing.set()
        self._teardown(self._cc & ~CC_EN)
        if self._connector is not None:
            # an attempt in progress ends within its timeouts and drops what
            # it made; its connection threads must be gone before the fds
            self._connector.join(4 * self.connect_timeout + 5)
        self._close_fds()

    def _close_fds(self):
        for fd in list(self._kick.values()) + list(self._irq.values()):
            os.close(fd)
        self._kick.clear()
        self._irq.clear()


def discover(host, port=DEFAULT_PORT, *, hostnqn=None, hostid=None, hdr_digest=False, data_digest=False,
             timeout=5.0):
    """The discovery log page (70h) of the target at host:port:
    (generation counter, [entry dicts])."""
    arena = _core.DmaArena(1 << 20)
    regs = _core.RegisterFile(0x2000)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    c = None
    try:
        c = Connection(host, port, 0, arena, regs, depth=4, kick_fd=kick, hdr_digest=hdr_digest,
                       data_digest=data_digest, timeout=timeout)
        hostid = uuid.UUID(str(hostid)) if hostid else default_hostid()
        c.connect(DISCOVERY_NQN, hostnqn or default_hostnqn(), hostid, 0xFFFF, 31)
        cap = c.prop_get(REG_CAP, True)
        c.prop_set(REG_CC, CC_EN | (6 << 16) | (4 << 20))
        deadline = time.monotonic() + max(0.5, ((cap >> 24) & 0xFF) * 0.5)
        while not c.prop_get(REG_CSTS, False) & CSTS_RDY:
            if time.monotonic() > deadline:
                raise TcpError(errno.ETIMEDOUT, f"{host}:{port}: the discovery controller did not become ready")
            time.sleep(0.01)

        def log_page(off, n):
            cqe, data = c.call(get_log_sqe(0x70, n, off), read_len=n)
            sct, sc, *_ = cqe_status(cqe)
            if sct or sc:
                raise TcpError(errno.EIO, f"{host}:{port}: Get Log Page 70h failed (SCT {sct:#x} SC {sc:#x})")
            return data

        head = log_page(0, 1024)
        genctr, numrec = struct.unpack_from("<QQ", head, 0)
        entries = []
        for i in range(min(numrec, 1024)):
            e = log_page(1024 * (i + 1), 1024)
            entries.append({
                "trtype": TRTYPE.get(e[0], str(e[0])), "adrfam": ADRFAM.get(e[1], str(e[1])),
                "subtype": SUBTYPE.get(e[2], str(e[2])), "treq": TREQ_SECURE.get(e[3] & 3, str(e[3] & 3)),
                "portid": struct.unpack_from("<H", e, 4)[0], "cntlid": struct.unpack_from("<H", e, 6)[0],
                "asqsz": struct.unpack_from("<H", e, 8)[0],
                "trsvcid": e[32:64].split(b"\0")[0].decode(errors="replace").strip(),
                "subnqn": e[256:512].split(b"\0")[0].decode(errors="replace").strip(),
                "traddr": e[512:768].split(b"\0")[0].decode(errors="replace").strip(),
            })
        return genctr, entries
    finally:
        if c is not None:
            c.close()
        os.close(kick)
