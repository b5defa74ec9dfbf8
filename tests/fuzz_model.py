#!/usr/bin/env python3
"""A bounded, seeded fuzzer for the controller model.

Random submission queue entries -- every opcode, random fields, malformed
and looping PRP lists and SGL segment chains, bad queue ids, duplicate
CIDs -- go to the model through real queues: a raw queue (model_harness:
any field placed exactly) and a driver QueuePair (its CID table, flow
control and completion checks).  Checked for every command: it completes
once, within a deadline (AERs may stay outstanding, as the spec lets them),
with a status the specification allows for its kind.  Checked at the end:
the namespace the fuzzer never writes is unchanged, no byte of host memory
outside the buffers the commands point into changed (a sentinel region and
the queues themselves), the QueuePair is consistent (every id free, heads
at tails, no stale or foreign completions), the model still serves a
verified write and read, and it never reported a fatal status.

    python tests/fuzz_model.py [--seconds 60] [--seed N]     (make fuzz)

prints commands per second and the status histogram.
"""
import argparse
import collections
import os
import random
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nvmefs import _core, _model  # noqa: E402

from model_harness import PAGE, REG_CSTS, Host, Timeout, sgl_desc, sqe  # noqa: E402

NS_BYTES = 8 << 20
GUARD_NSID = 2
IO_QID_RAW, IO_QID_DRV = 1, 2
ENTRIES = 64

# statuses (SCT, SC) allowed per kind of command; anything else -- Internal
# Error, a media error on a memory store, a status of another command set
# -- is a model bug
GENERIC = {(0, 0x00), (0, 0x01), (0, 0x02), (0, 0x03), (0, 0x04), (0, 0x0B)}
DPTR = {(0, 0x0D), (0, 0x0E), (0, 0x0F), (0, 0x11), (0, 0x12), (0, 0x13), (0, 0x16), (0, 0x1A)}
IO_RW = GENERIC | DPTR | {(0, 0x80)}
IO_COMPARE = IO_RW | {(2, 0x85)}
ADMIN = (GENERIC | DPTR | {(0, 0x0C), (0, 0x07), (0, 0x08)}
         | {(1, sc) for sc in (0x00, 0x01, 0x02, 0x03, 0x05, 0x08, 0x09, 0x0A, 0x0C, 0x0D, 0x0E, 0x0F,
                               0x14, 0x15, 0x16, 0x18, 0x1A, 0x1B, 0x1C)})
IO_OPCODES = (0x00, 0x01, 0x02, 0x05, 0x08, 0x09)
WRITES_DATA = {0x01, 0x08, 0x09}
ADMIN_OPCODES = (0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x18, 0x80)
NS_MGMT_OPCODES = (0x0D, 0x15)          # Namespace Management, Attachment
# Doorbell Buffer Config is left out on purpose: it would move the
# doorbells to memory this raw host does not update


def allowed(admin, opc):
    if admin:
        return ADMIN
    if opc == 0x05:
        return IO_COMPARE
    if opc in IO_OPCODES:
        return IO_RW
    # an opcode the model does not know: Invalid Opcode, or the checks
    # made before the opcode's (namespace, fused bits: QEMU's order)
    return {(0, 0x01), (0, 0x0B), (0, 0x02)}


class Commands:
    """The fuzzer's random submission queue entries, apart from any target:
    ``arena`` needs only ``iova_base``, ``size`` and ``write()`` (the list
    pages are written through it), so the vfio lab can record what one
    seeded sequence writes and replay it on two controllers
    (tests/guest/fuzz_diff.py).  ``data_iova``: 64 pages the data pointers
    aim at; ``lists_iova``: 8 pages of PRP lists and SGL segments;
    ``ns_lbas``: namespace 1's size, for the LBAs at and past its end;
    ``ns_mgmt``: also Namespace Management and Attachment commands (never
    taking namespace 1 or the guard namespace away)."""

    def __init__(self, rnd, arena, data_iova, lists_iova, ns_lbas=NS_BYTES // 512, ns_mgmt=False):
        self.rnd, self.arena = rnd, arena
        self.data_iova, self.lists_iova, self.ns_lbas = data_iova, lists_iova, ns_lbas
        self.admin_opcodes = ADMIN_OPCODES + (NS_MGMT_OPCODES if ns_mgmt else ())

    def addr(self):
        r, d = self.rnd, self.data_iova
        k = r.randrange(10)
        if k < 5:
            return d + r.randrange(64) * PAGE                    # a page of the data buffer
        if k < 7:
            return d + r.randrange(64 * PAGE) & ~3               # inside it, dword aligned
        if k == 7:
            return d + r.randrange(64 * PAGE)                    # any alignment
        if k == 8:
            end = self.arena.iova_base + self.arena.size
            return r.choice((0, 0x1000, end, end + PAGE, self.arena.iova_base - PAGE,
                             (1 << 64) - PAGE))                  # outside the arena
        return r.getrandbits(64)

    def prp_list(self):
        """A PRP list page in the list buffer: data pages, bad entries, or
        a chain pointer back into the list itself (a loop)."""
        r = self.rnd
        page = self.lists_iova + r.randrange(8) * PAGE
        n = PAGE // 8
        ents = [self.addr() if r.random() < 0.1 else self.data_iova + r.randrange(64) * PAGE for _ in range(n)]
        if r.random() < 0.3:
            ents[-1] = self.lists_iova + r.randrange(8) * PAGE + r.choice((0, 0, 8, 4))   # chain / loop
        self.arena.write(page, struct.pack(f"<{n}Q", *ents))
        return page + (r.randrange(n) * 8 if r.random() < 0.3 else 0)

    def sgl_chain(self):
        """SGL1 and, in the list buffer, segments of random descriptors;
        segment descriptors may point back at themselves."""
        r = self.rnd

        def desc():
            t = r.choice((0, 0, 0, 1, 2, 3, 4, 5, 0xF))
            if t in (2, 3):
                length = r.choice((16, 32, 64, 4096, r.randrange(1 << 16)))
                return sgl_desc(self.lists_iova + r.randrange(8) * PAGE + r.choice((0, 16, 3)), length, t)
            return sgl_desc(self.addr(), r.choice((512, 4096, r.randrange(1 << 20), 0)), t,
                            r.choice((0, 0, 1, 0xA)))
        for p in range(r.randrange(1, 4)):
            page = self.lists_iova + r.randrange(8) * PAGE
            self.arena.write(page, b"".join(desc() for _ in range(r.randrange(1, 16))))
        return desc()

    def dptr(self, kw):
        r = self.rnd
        k = r.randrange(4)
        if k == 0:
            kw["prp1"], kw["prp2"] = self.addr(), self.addr()
        elif k == 1:
            kw["prp1"], kw["prp2"] = self.addr(), self.prp_list()
        elif k == 2:
            kw["sgl"] = self.sgl_chain()
        else:
            kw["prp1"] = self.addr()
            kw["psdt"] = r.choice((2, 3))                        # reserved / MPTR-SGL

    def nsid(self, opc, admin):
        r = self.rnd
        n = r.choice((0, 1, 1, 1, 1, 1, 1, 2, 3, 0xFFFFFFFF, r.getrandbits(32)))
        # never a command that writes data to the guard namespace (or to all)
        if (not admin and opc in WRITES_DATA or admin and opc == 0x80) and n in (GUARD_NSID, 0xFFFFFFFF):
            n = 1
        return n

    def io_cmd(self):
        r = self.rnd
        opc = r.choice(IO_OPCODES) if r.random() < 0.9 else r.randrange(256)
        kw = dict(nsid=self.nsid(opc, False))
        slba = r.choice((0, r.randrange(self.ns_lbas), self.ns_lbas - 1, self.ns_lbas, r.getrandbits(64)))
        kw["cdw10"], kw["cdw11"] = slba & 0xFFFFFFFF, slba >> 32
        kw["cdw12"] = r.choice((0, 7, r.randrange(64), r.randrange(1 << 16))) | (r.getrandbits(16) << 16
                                                                               if r.random() < 0.2 else 0)
        if opc == 0x09:
            kw["cdw10"] = r.randrange(256)
            kw["cdw11"] = r.choice((0, 4, r.getrandbits(32)))
        for f in ("cdw13", "cdw14", "cdw15"):
            if r.random() < 0.2:
                kw[f] = r.getrandbits(32)
        if r.random() < 0.05:
            kw["fuse"] = r.randrange(1, 4)
        self.dptr(kw)
        return opc, kw

    def admin_cmd(self):
        r = self.rnd
        opc = r.choice(self.admin_opcodes) if r.random() < 0.9 else r.randrange(256)
        if opc == 0x7C or opc in NS_MGMT_OPCODES and len(self.admin_opcodes) == len(ADMIN_OPCODES):
            opc = 0x06
        kw = dict(nsid=self.nsid(opc, True), cdw10=r.getrandbits(32), cdw11=r.getrandbits(32))
        if opc in (0x00, 0x01, 0x04, 0x05):
            # queue management with ids of every kind, never the fuzzer's own two
            qid = r.choice((0, 3, 4, 8, 9, 0xFFFF, r.randrange(1 << 16)))
            kw["cdw10"] = (r.choice((0, 1, 15, 63, 0xFFFF)) << 16) | qid
            kw["cdw11"] = (r.choice((0, IO_QID_RAW, 3, 9, r.randrange(1 << 16))) << 16) | r.randrange(8)
            kw["prp1"] = r.choice((self.data_iova + r.randrange(64) * PAGE, self.addr()))
        elif opc == 0x06:
            kw["cdw10"] = r.choice((0, 1, 2, 3, 5, 6, 7, 8, r.randrange(256)))
            self.dptr(kw)
        elif opc == 0x02:
            kw["cdw10"] = (r.randrange(1 << 16) << 16) | r.choice((1, 2, 3, 5, 0x70, 0x7F, 0xC0, r.randrange(256)))
            self.dptr(kw)
        elif opc in (0x09, 0x0A):
            fid = r.choice((1, 2, 4, 5, 6, 7, 8, 9, 0x0A, 0x0B, 0x80, r.randrange(256)))
            kw["cdw10"] = fid | (r.choice((0, 0, 1 << 31, r.randrange(8) << 8)))
            if fid == 7:
                kw["cdw11"] = r.choice((0, 0xFFFF0000, r.getrandbits(32)))
            if r.random() < 0.3:
                self.dptr(kw)
        elif opc == 0x08:
            kw["cdw10"] = (r.randrange(1 << 16) << 16) | r.choice((0, 1, 2, r.randrange(1 << 16)))
        elif opc == 0x80:
            kw["cdw10"] = r.choice((0, 1, 1 << 9, 2 << 9, 0x10, r.randrange(1 << 12)))
        elif opc == 0x0C:
            kw = dict()
        elif opc in NS_MGMT_OPCODES:
            self.ns_mgmt_cmd(opc, kw)
        else:
            if r.random() < 0.5:
                self.dptr(kw)
        return opc, kw


    def ns_mgmt_cmd(self, opc, kw):
        """Create / delete (0Dh), attach / detach (15h): random sizes, formats,
        controller lists and NSIDs, the data in a page of the data buffer."""
        r = self.rnd
        sel = r.choice((0, 0, 1, 1, r.randrange(16)))
        kw["cdw10"] = sel | ((r.getrandbits(28) << 4) if r.random() < 0.1 else 0)
        kw["cdw11"] = 0 if r.random() < 0.9 else r.getrandbits(32)
        if opc == 0x0D and sel == 0 and r.random() < 0.8:
            kw["nsid"] = 0                  # what a create names
        else:
            kw["nsid"] = r.choice((3, 3, 4, 4, 5, 0, 1, 2, 16, 17, 0xFFFFFFFF, r.getrandbits(32)))
        if sel == 1 and kw["nsid"] in (1, GUARD_NSID, 0xFFFFFFFF):
            kw["nsid"] = 3                  # delete / detach: never the fuzzer's own two
        page = self.data_iova + r.randrange(64) * PAGE
        if opc == 0x0D:
            nsze = r.choice((8, 2048, 2048, 4096, NS_BYTES // 512, 0, 1 << 40, r.getrandbits(64)))
            ncap = nsze if r.random() < 0.8 else r.choice((0, nsze // 2, nsze + 1))
            ident = bytearray(struct.pack("<QQ", nsze, ncap).ljust(PAGE, b"\0"))
            ident[26] = r.choice((0, 0, 1, 2, 0x10, 0x20, r.randrange(256)))
            if r.random() < 0.1:
                ident[29], ident[30] = r.randrange(8), r.randrange(2)
            self.arena.write(page, bytes(ident))
        else:
            ids = r.choice(((1,), (1,), (1,), (), (2,), (1, 1), (0xFFFF,)))
            count = len(ids) if r.random() < 0.9 else r.randrange(1 << 16)
            self.arena.write(page, struct.pack(f"<H{len(ids)}H", count, *ids).ljust(PAGE, b"\0"))
        if r.random() < 0.8:
            kw["prp1"] = page
        else:
            self.dptr(kw)


class Fuzzer(Commands):
    def __init__(self, seed):
        self.rnd = random.Random(seed)
        self.arena = _core.DmaArena(64 << 20)
        self.regs = _core.RegisterFile(_model.model_regs_size(8, 0))
        # room for the namespaces Namespace Management commands create
        self.model = _model.ControllerModel(self.arena, self.regs, namespaces=((NS_BYTES, 512), (NS_BYTES, 512)),
                                            max_io_queues=8, capacity=6 * NS_BYTES)
        self.model.start()
        self.h = Host(self.model, self.arena, self.regs)
        self.h.enable()
        self.h.create_io(IO_QID_RAW, entries=ENTRIES)
        # the driver's queue pair on qid 2
        self.qp = _core.QueuePair(self.arena, self.regs, IO_QID_DRV, ENTRIES)
        c = self.h.admin(0x05, cdw10=((ENTRIES - 1) << 16) | IO_QID_DRV, cdw11=(IO_QID_DRV << 16) | 1,
                         prp1=self.qp.cq_iova)
        assert c.status == 0, c
        c = self.h.admin(0x01, cdw10=((ENTRIES - 1) << 16) | IO_QID_DRV, cdw11=(IO_QID_DRV << 16) | 1,
                         prp1=self.qp.sq_iova)
        assert c.status == 0, c
        # data buffers the commands may point into, list pages, a sentinel
        self.data = self.h.alloc(64 * PAGE)
        self.lists = self.h.alloc(8 * PAGE)
        self.sentinel = self.h.alloc(16 * PAGE)
        Commands.__init__(self, self.rnd, self.arena, self.data.iova, self.lists.iova, ns_mgmt=True)
        self.sentinel_bytes = os.urandom(16 * PAGE)
        self.arena.write(self.sentinel.iova, self.sentinel_bytes)
        self.guard = bytes(self.rnd.getrandbits(8) for _ in range(4096)) * (NS_BYTES // 4096)
        self._write_guard()
        self.hist = collections.Counter()
        self.commands = 0
        self.aers = 0

    def close(self):
        self.model.stop()

    def _write_guard(self):
        step = 64 * PAGE
        for off in range(0, NS_BYTES, step):
            self.arena.write(self.data.iova, self.guard[off:off + step])
            kw = dict(nsid=GUARD_NSID, cdw10=off // 512, cdw12=step // 512 - 1)
            kw["prp1"], kw["prp2"] = self.h.prps(self.data.iova, step)
            assert self.h.io(0x01, IO_QID_RAW, **kw).status == 0

    # -- running -----------------------------------------------------------------

    def check(self, admin, opc, sct, sc, via=""):
        self.hist[(("admin" if admin else "io"), opc, (sct, sc))] += 1
        if (sct, sc) not in allowed(admin, opc):
            raise AssertionError(f"{'admin' if admin else 'I/O'} opcode 0x{opc:02x}{via}: status SCT {sct} "
                                 f"SC 0x{sc:02x} is not one the specification allows here")

    def step(self):
        r = self.rnd
        k = r.random()
        if k < 0.15:
            opc, kw = self.admin_cmd()
            if opc == 0x0C:
                if self.aers >= 4:
                    return
                self.h.submit(0, sqe(0x0C))
                self.aers += 1
                self.commands += 1
                return
            c = self.h.cmd(sqe(opc, **kw), 0, timeout=10)
            if opc == 0x01 and c.status == 0 or opc == 0x05 and c.status == 0:
                # a queue it made: take it away again (a raw host owns no ring there)
                qid = kw["cdw10"] & 0xFFFF
                self.h.admin(0x00, cdw10=qid)
                self.h.admin(0x04, cdw10=qid)
            self.check(True, opc, c.sct, c.sc)
        elif k < 0.7:
            opc, kw = self.io_cmd()
            c = self.h.cmd(sqe(opc, **kw), IO_QID_RAW, timeout=10)
            self.check(False, opc, c.sct, c.sc)
        else:
            # through the driver's queue pair: a burst of raw PRP commands
            n = r.randrange(1, 16)
            sent = {}
            for _ in range(n):
                opc, kw = self.io_cmd()
                if "sgl" in kw or kw.get("psdt") or kw.get("fuse"):
                    kw.pop("sgl", None), kw.pop("psdt", None), kw.pop("fuse", None)
                    kw["prp1"], kw["prp2"] = self.addr(), self.addr()
                cid = self.qp.submit_command(opc, ring=False, user=opc, **kw)
                sent[cid] = opc
            self.qp.ring()
            self.model.kick()
            deadline = time.monotonic() + 10
            while sent:
                for user, cid, status, _dw0, _dw1 in self.qp.reap():
                    opc = sent.pop(cid)
                    assert user == opc
                    self.check(False, opc, (status >> 9) & 7, (status >> 1) & 0xFF, " via QueuePair")
                if sent and time.monotonic() > deadline:
                    raise Timeout(f"QueuePair: {len(sent)} commands never completed")
            self.commands += n
            return
        self.commands += 1

    def duplicate_cid(self):
        """A command reusing the CID of an outstanding AER gets Command ID
        Conflict (the AER stays outstanding)."""
        self.h.submit(0, sqe(0x0C), cid=0xBEEF)
        self.aers += 1
        cid = self.h.submit(0, sqe(0x06, cdw10=1, prp1=self.data.iova), cid=0xBEEF)
        done = [x for x in self.h.wait(0) if x.cid == cid]
        assert len(done) == 1 and (done[0].sct, done[0].sc) == (0, 0x03), done
        self.check(True, 0x06, done[0].sct, done[0].sc)
        self.commands += 2

    def final_checks(self):
        assert not self.regs.read32(REG_CSTS) & 2, "the model reported a fatal status (CSTS.CFS)"
        assert self.arena.read(self.sentinel.iova, 16 * PAGE) == self.sentinel_bytes, "sentinel memory changed"
        st = self.qp.stats()
        assert self.qp.outstanding == 0, st
        assert self.qp.sq_free == ENTRIES - 1, st
        assert st.get("bad_sqhd", 0) == 0 and st.get("wrong_sqid", 0) == 0, st
        # the guard namespace, unchanged
        step = 64 * PAGE
        for off in range(0, NS_BYTES, step):
            c, got = self.h.read(off // 512, step, qid=IO_QID_RAW, nsid=GUARD_NSID)
            assert c.status == 0 and got == self.guard[off:off + step], f"guard namespace changed at {off}"
        # and the model still serves a verified write and read
        data = os.urandom(8 * PAGE)
        ns1 = self.h.identify(0, 1)
        lba = 1 << ns1[128 + 4 * (ns1[26] & 0xF) + 2]
        assert self.h.write(0, data, qid=IO_QID_RAW, lba=lba).status == 0
        c, back = self.h.read(0, len(data), qid=IO_QID_RAW, lba=lba)
        assert c.status == 0 and back == data


def run(seed, commands=None, seconds=None):
    f = Fuzzer(seed)
    try:
        t0 = time.monotonic()
        f.duplicate_cid()
        while (commands is None or f.commands < commands) and (seconds is None or time.monotonic() - t0 < seconds):
            f.step()
        elapsed = time.monotonic() - t0
        f.final_checks()
        return {"commands": f.commands, "seconds": elapsed, "histogram": f.hist}
    finally:
        f.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=None, help="default: a new one, printed")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"fuzzing the controller model, seed {seed}, {args.seconds:g} s", flush=True)
    res = run(seed, seconds=args.seconds)
    print(f"{res['commands']} commands in {res['seconds']:.1f} s: {res['commands'] / res['seconds']:.0f} commands/s, "
          "every status allowed, guard namespace and sentinel memory intact")
    by_status = collections.Counter()
    for (_kind, _opc, st), n in res["histogram"].items():
        by_status[st] += n
    names = {}
    for (sct, sc) in by_status:
        try:
            names[(sct, sc)] = _core.decode_status(_core.make_status(sct, sc)).name
        except Exception:
            names[(sct, sc)] = "?"
    for st, n in by_status.most_common():
        print(f"  SCT {st[0]} SC 0x{st[1]:02x}  {names[st]:<40} {n:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
