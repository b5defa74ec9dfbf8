"""NVMe/TCP on the wire, without a target: golden bytes for the PDUs and
Fabrics commands we build, and one connection (``_core.TcpQueue``) driven
over a socketpair by a scripted peer that sends what a target would -- and
what a broken one might.  Every malformed PDU must end the connection with
the right H2CTermReq, leave the command's buffer untouched and post no
completion.  (The real target, Linux nvmet-tcp, is in test_tcp.py.)"""
import os
import socket
import struct
import threading
import time

import pytest

from nvmefs import _core
from nvmefs import tcp, tcp_url

ICRESP = 0x01
H2C_TERM, C2H_TERM, CMD, RSP, H2C_DATA, C2H_DATA, R2T = 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x09
F_HDGST, F_DDGST, F_LAST, F_SUCCESS = 1, 2, 4, 8


def crc(data):
    return _core.tcp_crc32c(data)


# --- golden bytes ------------------------------------------------------------------

def test_crc32c_vectors():
    # the CRC32C check value, and RFC 3720 B.4's iSCSI vectors
    assert crc(b"123456789") == 0xE3069283
    assert crc(bytes(32)) == 0x8A9136AA
    assert crc(b"\xff" * 32) == 0x62A8AB43
    assert crc(bytes(range(32))) == 0x46DD794E
    assert crc(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_icreq_bytes():
    assert _core.pdu_icreq() == bytes([0, 0, 128, 0, 128, 0, 0, 0]) + bytes(120)
    b = _core.pdu_icreq(True, True)
    assert b[:12] == bytes([0, 0, 128, 0, 128, 0, 0, 0, 0, 0, 0, 3]) and b[12:] == bytes(116)


def local_sqe(opc, cid=0x1234, nsid=1, cdw10=0, sgl=b""):
    sqe = bytearray(64)
    sqe[0] = opc
    struct.pack_into("<HI", sqe, 2, cid, nsid)
    sqe[24:24 + len(sgl)] = sgl
    struct.pack_into("<I", sqe, 40, cdw10)
    return bytes(sqe)


def test_capsule_bytes_incapsule_write_with_digests():
    data = bytes(range(256)) * 2
    sqe = local_sqe(0x01, cdw10=7, sgl=struct.pack("<QI3xB", 0xdead000, 512, 0x00))
    pdu = _core.pdu_capsule(sqe, 5, 512, data=data, hdgst=True, ddgst=True)
    # CH: CapsuleCmd, HDGSTF|DDGSTF, hlen 72, pdo 76 (72 + header digest), plen 76 + 512 + 4
    assert pdu[:8] == bytes([0x04, 0x03, 72, 76]) + struct.pack("<I", 76 + 512 + 4)
    wire = pdu[8:72]
    assert wire[0] == 0x01 and wire[1] == 0x40               # PSDT = SGL
    assert struct.unpack_from("<HI", wire, 2) == (5, 1)       # wire cid is the slot, nsid kept
    assert wire[8:24] == bytes(16)                            # MPTR cleared
    assert wire[24:40] == struct.pack("<QI3xB", 0, 512, 0x01)  # Data Block, Offset subtype, ICDOFF 0
    assert struct.unpack_from("<I", wire, 40)[0] == 7
    assert struct.unpack_from("<I", pdu, 72)[0] == crc(pdu[:72])
    assert pdu[76:76 + 512] == data
    assert struct.unpack_from("<I", pdu, 76 + 512)[0] == crc(data)


def test_capsule_bytes_transport_sgl_and_no_data():
    sqe = local_sqe(0x02, sgl=struct.pack("<QI3xB", 0x1000, 65536, 0x00))
    pdu = _core.pdu_capsule(sqe, 0, 65536)
    assert pdu[:8] == bytes([0x04, 0, 72, 0]) + struct.pack("<I", 72)
    assert pdu[8 + 24:8 + 40] == struct.pack("<QI3xB", 0, 65536, 0x5A)   # Transport SGL Data Block
    flush = _core.pdu_capsule(local_sqe(0x00), 1, 0)
    assert flush[8 + 24:8 + 40] == struct.pack("<QI3xB", 0, 0, 0x5A) and flush[9] == 0x40


def test_capsule_pad_for_cpda():
    pdu = _core.pdu_capsule(local_sqe(0x01), 2, 4, data=b"abcd", cpda=7)   # data on 32-byte boundaries
    assert pdu[3] == 96 and pdu[72:96] == bytes(24) and pdu[96:] == b"abcd"
    assert struct.unpack_from("<I", pdu, 4)[0] == 100


def test_h2c_bytes():
    data = b"x" * 100
    pdu = _core.pdu_h2c(3, 0x77, 4096, data, True, hdgst=True, ddgst=True)
    assert pdu[:8] == bytes([0x06, 0x07, 24, 28]) + struct.pack("<I", 28 + 100 + 4)
    assert struct.unpack_from("<HHII", pdu, 8) == (3, 0x77, 4096, 100)
    assert struct.unpack_from("<I", pdu, 24)[0] == crc(pdu[:24])
    assert pdu[28:128] == data and struct.unpack_from("<I", pdu, 128)[0] == crc(data)


def test_fabrics_command_bytes():
    c = tcp.connect_sqe(qid=3, sqsize=127, kato_ms=5000, cattr=tcp.CATTR_DISABLE_SQFLOW)
    assert c[0] == 0x7F and c[4] == 0x01 and c[40:52] == bytes.fromhex("0000 0300 7f00 04 00 88130000")
    d = tcp.connect_data(b"\x11" * 16, 0xFFFF, "nqn.sub", "nqn.host")
    assert len(d) == 1024 and d[:16] == b"\x11" * 16 and d[16:18] == b"\xff\xff"
    assert d[256:264] == b"nqn.sub\0" and d[512:521] == b"nqn.host\0" and d[18:256] == bytes(238)
    assert tcp.property_get_sqe(0x1C, False)[40:48] == bytes.fromhex("00000000 1c000000")
    assert tcp.property_get_sqe(0x00, True)[40] == 1
    s = tcp.property_set_sqe(0x14, 0x460001, False)
    assert s[4] == 0x00 and s[40:56] == bytes.fromhex("00000000 14000000 01004600 00000000")
    g = tcp.get_log_sqe(0x70, 1024, 2048)
    assert g[0] == 0x02 and struct.unpack_from("<IIII", g, 40) == (0x70 | (255 << 16), 0, 2048, 0)


def test_url_parsing():
    assert tcp_url.parse_url("nvme-tcp://10.0.0.1/nqn.x") == ("10.0.0.1", 4420, "nqn.x")
    assert tcp_url.parse_url("nvme-tcp://[::1]:4421/nqn.a:b") == ("::1", 4421, "nqn.a:b")
    assert tcp_url.canonical_url("nvme-tcp://h/n") == "nvme-tcp://h:4420/n"
    for bad in ("nvme-tcp://h:4420", "tcp://h/n", "nvme-tcp://h:0/n", "nvme-tcp://h:99999/n"):
        with pytest.raises(ValueError):
            tcp_url.parse_url(bad)


# --- one connection against a scripted peer -------------------------------------------

class Peer:
    """The target's end of the socketpair, driven by the test."""

    def __init__(self, sock, hdgst, ddgst):
        self.s, self.hdgst, self.ddgst = sock, hdgst, ddgst
        self.s.settimeout(10)

    def recv_exact(self, n):
        out = b""
        while len(out) < n:
            got = self.s.recv(n - len(out))
            if not got:
                raise EOFError(f"connection closed after {len(out)} of {n} bytes")
            out += got
        return out

    def pdu(self):
        """(type, flags, header bytes, data) of the next PDU, digests checked."""
        ch = self.recv_exact(8)
        ptype, flags, hlen, pdo, plen = struct.unpack("<BBBBI", ch)
        rest = self.recv_exact(plen - 8)
        whole = ch + rest
        hd = 4 if flags & F_HDGST else 0
        assert bool(hd) == (self.hdgst and ptype not in (H2C_TERM,)), f"HDGSTF on type {ptype}"
        if hd:
            assert struct.unpack_from("<I", whole, hlen)[0] == crc(whole[:hlen]), "header digest"
        data = b""
        if pdo:
            end = plen - (4 if flags & F_DDGST else 0)
            data = whole[pdo:end]
            if flags & F_DDGST:
                assert struct.unpack_from("<I", whole, end)[0] == crc(data), "data digest"
        elif ptype == H2C_TERM:
            data = whole[hlen:]
        return ptype, flags, whole[:hlen], data

    def send(self, ptype, body, data=b"", flags=0, pdo=None, bad_hdgst=False, bad_ddgst=False):
        hd = 4 if self.hdgst else 0
        hlen = 8 + len(body)
        if hd:
            flags |= F_HDGST
        if data and self.ddgst:
            flags |= F_DDGST
        if pdo is None:
            pdo = hlen + hd if data else 0
        dd = 4 if data and self.ddgst else 0
        plen = (pdo + len(data) + dd) if data else hlen + hd
        hdr = struct.pack("<BBBBI", ptype, flags, hlen, pdo, plen) + body
        out = hdr
        if hd:
            out += struct.pack("<I", crc(hdr) ^ (1 if bad_hdgst else 0))
        if data:
            out += bytes(pdo - len(out)) + data
            if dd:
                out += struct.pack("<I", crc(data) ^ (1 if bad_ddgst else 0))
        self.s.sendall(out)

    def rsp(self, cccid, status=0, dw0=0):
        self.send(RSP, struct.pack("<IIHHHH", dw0, 0, 0, 1, cccid, status << 1))

    def c2h(self, cccid, off, data, last=True, success=False, **kw):
        flags = (F_LAST if last else 0) | (F_SUCCESS if success else 0)
        self.send(C2H_DATA, struct.pack("<HHII4x", cccid, 0, off, len(data)), data, flags=flags, **kw)

    def r2t(self, cccid, ttag, off, length):
        self.send(R2T, struct.pack("<HHII4x", cccid, ttag, off, length))


class Conn:
    """A TcpQueue carrying a local queue pair (qid 1, 16 entries)."""

    def __init__(self, hdgst=False, ddgst=False, maxh2cdata=4096, incapsule=8192, tcp=False):
        if tcp:     # loopback TCP: socket buffers of megabytes, as on a real link
            lsn = socket.create_server(("127.0.0.1", 0))
            a = socket.create_connection(lsn.getsockname())
            b, _ = lsn.accept()
            lsn.close()
        else:
            a, b = socket.socketpair()
        self.arena = _core.DmaArena(16 << 20)
        self.regs = _core.RegisterFile(0x2000)
        self.qp = _core.QueuePair(self.arena, self.regs, 1, 16, max_transfer=1 << 20)
        self.qp.sgls = 1
        self.qp.sgl_only = True
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.irq = os.eventfd(0, os.EFD_NONBLOCK)
        self.qp.set_notifier(_core.always_kick_address(), self.kick)
        self.peer = Peer(b, hdgst, ddgst)
        self.q = _core.TcpQueue(os.dup(a.fileno()), 1, self.arena, self.regs, depth=15, hdgst=hdgst, ddgst=ddgst)
        a.close()

        def answer():
            req = self.peer.recv_exact(128)
            assert req[:8] == bytes([0, 0, 128, 0, 128, 0, 0, 0])
            assert req[11] == (1 if hdgst else 0) | (2 if ddgst else 0)
            self.peer.s.sendall(struct.pack("<BBBBIHBBI", ICRESP, 0, 128, 0, 128, 0, 0, req[11], maxh2cdata)
                                + bytes(112))
        t = threading.Thread(target=answer)
        t.start()
        assert self.q.handshake(5.0) == (0, maxh2cdata)
        t.join()
        self.q.start(self.kick)
        self.q.set_limits(incapsule)
        self.q.serve(self.qp.sq_iova, self.qp.cq_iova, 16, 0, self.irq)

    def buffer(self, n, fill=0xEE):
        buf = self.arena.alloc(n)
        buf.view()[:] = bytes([fill]) * n if hasattr(buf, "view") else None
        return buf

    def submit(self, opc, buf, nbytes, is_read, segments=None):
        return self.qp.submit_command(opc, nsid=1, cdw12=0, segments=segments or [(buf.iova, nbytes)],
                                      is_read=is_read)

    def reap(self, timeout=5.0):
        import select
        deadline = timeout
        while True:
            got = self.qp.reap()
            if got:
                return got
            r, _, _ = select.select([self.irq], [], [], deadline)
            if not r:
                return []
            os.eventfd_read(self.irq)

    def close(self):
        self.q.fail("test over")
        self.q.stop()
        self.peer.s.close()
        os.close(self.kick)
        os.close(self.irq)


@pytest.fixture
def conn(request):
    c = Conn(**getattr(request, "param", {}))
    yield c
    c.close()


def fill(buf, byte):
    mv = memoryview(buf)
    mv[:] = bytes([byte]) * len(mv)


@pytest.mark.parametrize("conn", [{}, {"hdgst": True, "ddgst": True}], indirect=True, ids=["plain", "digests"])
def test_read_with_success_flag_and_with_capsule_resp(conn):
    buf = conn.arena.alloc(8192)
    fill(buf, 0xEE)
    cid = conn.submit(0x02, buf, 8192, True)
    ptype, flags, hdr, _ = conn.peer.pdu()
    assert ptype == CMD and hdr[8 + 24 + 15] == 0x5A and struct.unpack_from("<I", hdr, 8 + 24 + 8)[0] == 8192
    wire_cid = struct.unpack_from("<H", hdr, 10)[0]
    payload = os.urandom(8192)
    conn.peer.c2h(wire_cid, 0, payload[:4096], last=False)
    conn.peer.c2h(wire_cid, 4096, payload[4096:], last=True, success=True)
    (user, got_cid, status, _, _), = conn.reap()
    assert (got_cid, status) == (cid, 0) and bytes(memoryview(buf)) == payload
    # the same read answered by C2HData then a CapsuleResp carrying an error status
    cid = conn.submit(0x02, buf, 8192, True)
    _, _, hdr, _ = conn.peer.pdu()
    wire_cid = struct.unpack_from("<H", hdr, 10)[0]
    conn.peer.c2h(wire_cid, 0, bytes(8192))
    conn.peer.rsp(wire_cid, status=0x281)          # SCT 2 SC 81h: Unrecovered Read Error
    (_, got_cid, status, _, _), = conn.reap()
    assert got_cid == cid and status == 0x281 << 1
    assert conn.q.stats()["c2h_success"] == 1 and conn.q.failed is None


@pytest.mark.parametrize("conn", [{}, {"hdgst": True, "ddgst": True}], indirect=True, ids=["plain", "digests"])
def test_write_in_capsule_and_by_r2t(conn):
    small = conn.arena.alloc(4096)
    data = os.urandom(4096)
    memoryview(small)[:] = data
    cid = conn.submit(0x01, small, 4096, False)
    ptype, flags, hdr, got = conn.peer.pdu()
    assert ptype == CMD and hdr[8 + 24 + 15] == 0x01 and got == data
    conn.peer.rsp(struct.unpack_from("<H", hdr, 10)[0])
    assert conn.reap()[0][1:3] == (cid, 0)
    # 40 KiB: above the in-capsule limit, so R2T; H2CData in MAXH2CDATA (4 KiB) pieces
    big = conn.arena.alloc(40960)
    data = os.urandom(40960)
    memoryview(big)[:] = data
    cid = conn.submit(0x01, big, 40960, False)
    ptype, _, hdr, got = conn.peer.pdu()
    assert ptype == CMD and hdr[8 + 24 + 15] == 0x5A and got == b""
    wire_cid = struct.unpack_from("<H", hdr, 10)[0]
    received = b""
    for off, length in ((0, 16384), (16384, 24576)):      # two R2Ts, one after the other
        conn.peer.r2t(wire_cid, 0x40 + off, off, length)
        pos = off
        while pos < off + length:
            ptype, flags, hdr, chunk = conn.peer.pdu()
            cccid, ttag, datao, datal = struct.unpack_from("<HHII", hdr, 8)
            assert (ptype, cccid, ttag, datao) == (H2C_DATA, wire_cid, 0x40 + off, pos)
            assert datal == len(chunk) <= 4096
            pos += datal
            assert bool(flags & F_LAST) == (pos == off + length)
            received += chunk
    assert received == data
    conn.peer.rsp(wire_cid)
    assert conn.reap()[0][1:3] == (cid, 0)
    st = conn.q.stats()
    assert st["r2t"] == 2 and st["h2c_data"] == 10 and st["incapsule_writes"] == 1


def test_bit_bucket_read(conn):
    conn.qp.sgls = 1 | (1 << 16)
    buf = conn.arena.alloc(8192)
    fill(buf, 0xEE)
    cid = conn.qp.submit_command(0x02, nsid=1, segments=[(buf.iova, 1024), (0, 2048, True), (buf.iova + 4096, 1024)],
                                 is_read=True)
    _, _, hdr, _ = conn.peer.pdu()
    assert struct.unpack_from("<I", hdr, 8 + 32)[0] == 4096
    payload = os.urandom(4096)
    conn.peer.c2h(struct.unpack_from("<H", hdr, 10)[0], 0, payload, success=True)
    assert conn.reap()[0][1:3] == (cid, 0)
    mv = bytes(memoryview(buf))
    assert mv[:1024] == payload[:1024] and mv[4096:5120] == payload[3072:]
    assert mv[1024:4096] == b"\xee" * 3072 and mv[5120:] == b"\xee" * 3072


def expect_term(conn, fes, why_part, buf=None, pattern=0xEE):
    ptype, _, hdr, data = conn.peer.pdu()
    assert ptype == H2C_TERM, f"expected an H2CTermReq, got PDU type {ptype}"
    assert struct.unpack_from("<H", hdr, 8)[0] == fes
    with pytest.raises(EOFError):
        conn.peer.pdu()
    assert why_part in (conn.q.failed or "")
    assert conn.qp.reap() == []
    if buf is not None:
        assert bytes(memoryview(buf)) == bytes([pattern]) * len(memoryview(buf))
    return data


def start_read(conn, n=4096):
    buf = conn.arena.alloc(n)
    fill(buf, 0xEE)
    conn.submit(0x02, buf, n, True)
    _, _, hdr, _ = conn.peer.pdu()
    return buf, struct.unpack_from("<H", hdr, 10)[0]


def test_c2h_beyond_the_buffer_is_refused(conn):
    buf, wire_cid = start_read(conn)
    conn.peer.c2h(wire_cid, 2048, bytes(4096))
    expect_term(conn, 0x04, "outside the command's buffer", buf)


def test_c2h_out_of_order_is_refused(conn):
    buf, wire_cid = start_read(conn, 8192)
    conn.peer.c2h(wire_cid, 4096, bytes(4096), last=False)
    expect_term(conn, 0x04, "out of order", buf)


def test_c2h_for_unknown_command_is_refused(conn):
    buf, wire_cid = start_read(conn)
    conn.peer.c2h(wire_cid + 1, 0, bytes(4096))
    data = expect_term(conn, 0x01, "not an outstanding read", buf)
    assert data[:8] == bytes([C2H_DATA, F_LAST, 24, 24]) + struct.pack("<I", 24 + 4096)


def test_success_without_last_is_refused(conn):
    buf, wire_cid = start_read(conn)
    conn.peer.c2h(wire_cid, 0, bytes(4096), last=False, success=True)
    expect_term(conn, 0x01, "SUCCESS without LAST_PDU", buf)


def test_r2t_for_a_read_is_refused(conn):
    buf, wire_cid = start_read(conn)
    conn.peer.r2t(wire_cid, 1, 0, 4096)
    expect_term(conn, 0x01, "not an outstanding write", buf)


def test_resp_for_unknown_command_is_refused(conn):
    buf, wire_cid = start_read(conn)
    conn.peer.rsp(9)
    expect_term(conn, 0x01, "not outstanding", buf)


def test_wrong_pdu_type_and_hlen_are_refused(conn):
    buf, wire_cid = start_read(conn)
    conn.peer.s.sendall(struct.pack("<BBBBI", ICRESP, 0, 128, 0, 128) + bytes(120))
    expect_term(conn, 0x01, "type a host never receives", buf)


def test_resp_with_wrong_plen_is_refused(conn):
    buf, wire_cid = start_read(conn)
    conn.peer.s.sendall(struct.pack("<BBBBI", RSP, 0, 24, 0, 28) + bytes(20))
    expect_term(conn, 0x01, "wrong PDO or PLEN", buf)


@pytest.mark.parametrize("conn", [{"hdgst": True}], indirect=True)
def test_bad_header_digest_is_refused(conn):
    buf, wire_cid = start_read(conn)
    conn.peer.c2h(wire_cid, 0, bytes(4096), bad_hdgst=True)
    expect_term(conn, 0x03, "header digest error", buf)


@pytest.mark.parametrize("conn", [{"ddgst": True}], indirect=True)
def test_bad_data_digest_fails_the_connection(conn):
    buf, wire_cid = start_read(conn)
    conn.peer.c2h(wire_cid, 0, bytes(4096), success=True, bad_ddgst=True)
    with pytest.raises(EOFError):
        conn.peer.pdu()
    assert "data digest error" in conn.q.failed
    assert conn.qp.reap() == []


@pytest.mark.parametrize("conn", [{"hdgst": True}], indirect=True)
def test_missing_digest_flag_is_refused(conn):
    buf, wire_cid = start_read(conn)
    conn.peer.s.sendall(struct.pack("<BBBBI", RSP, 0, 24, 0, 28) + bytes(20))
    expect_term(conn, 0x01, "digest flags", buf)


def test_target_termreq_and_close_end_the_connection(conn):
    buf, wire_cid = start_read(conn)
    conn.peer.s.sendall(struct.pack("<BBBBIHI10x", C2H_TERM, 0, 24, 0, 24, 0x05, 0))
    with pytest.raises(EOFError):
        conn.peer.pdu()
    assert "C2HTermReq, fatal error status 0x5" in conn.q.failed
    c2 = Conn()
    try:
        start_read(c2)
        c2.peer.s.close()
        for _ in range(500):
            if c2.q.failed:
                break
            time.sleep(0.01)
        assert "closed by the target" in c2.q.failed
    finally:
        c2.q.fail("x")
        os.close(c2.kick)
        os.close(c2.irq)


def test_prp_command_gets_invalid_field_locally(conn):
    buf = conn.arena.alloc(4096)
    conn.qp.sgl_only = False
    cid = conn.qp.submit_command(0x02, nsid=1, segments=[(buf.iova, 4096)], is_read=True, dptr="prp")
    (_, got, status, _, _), = conn.reap()
    assert got == cid and (status >> 1) & 0xFF == 0x02 and status & 0x8000
    assert conn.q.stats()["local_errors"] == 1


@pytest.mark.parametrize("conn", [{"tcp": True}, {"tcp": True, "hdgst": True, "ddgst": True}], indirect=True,
                         ids=["plain", "digests"])
def test_c2h_arriving_in_pieces_completes(conn):
    """A large C2HData that trickles in (the thread waits with SO_RCVLOWAT
    inside it): most of 1 MiB at once, then a tail shorter than a page, then
    the digest -- the read completes (a stale wake-up mark once left the
    thread asleep with the tail in the socket)."""
    n = 1 << 20
    buf = conn.arena.alloc(n)
    cid = conn.submit(0x02, buf, n, True)
    _, _, hdr, _ = conn.peer.pdu()
    wire_cid = struct.unpack_from("<H", hdr, 10)[0]
    payload = os.urandom(n)
    pdu = bytearray()
    real = conn.peer.s

    class Capture:
        def sendall(self, b):
            pdu.extend(b)
    conn.peer.s = Capture()
    conn.peer.c2h(wire_cid, 0, payload, success=True)
    conn.peer.s = real
    tail = 1000 + (4 if conn.peer.ddgst else 0)
    real.sendall(bytes(pdu[:16]))          # a header cut in two
    time.sleep(0.05)
    real.sendall(bytes(pdu[16:-tail]))
    time.sleep(0.3)
    real.sendall(bytes(pdu[-tail:-4]) if conn.peer.ddgst else bytes(pdu[-tail:]))
    if conn.peer.ddgst:
        time.sleep(0.05)
        real.sendall(bytes(pdu[-4:]))
    got = conn.reap(timeout=5)
    assert got and got[0][1:3] == (cid, 0) and bytes(memoryview(buf)) == payload


def test_early_answer_to_a_write_waits_for_its_data(conn):
    """A target may answer a write (with an error) while its data is still
    being sent: the CQE -- after which the host reuses the buffer -- is
    posted only once nothing of the buffer is left to send."""
    n = 1 << 20
    buf = conn.arena.alloc(n)
    memoryview(buf)[:] = os.urandom(n)
    cid = conn.submit(0x01, buf, n, False)
    _, _, hdr, _ = conn.peer.pdu()
    wire_cid = struct.unpack_from("<H", hdr, 10)[0]
    conn.peer.r2t(wire_cid, 7, 0, n)
    conn.peer.rsp(wire_cid, status=0x06)           # Internal Error, before the data came
    time.sleep(0.3)
    assert conn.qp.reap() == []                    # the data is still going out: no CQE yet
    got = 0
    while got < n:
        ptype, flags, hdr, chunk = conn.peer.pdu()
        assert ptype == H2C_DATA
        got += len(chunk)
    (_, got_cid, status, _, _), = conn.reap()
    assert got_cid == cid and (status >> 1) & 0xFF == 0x06
    assert conn.q.failed is None
