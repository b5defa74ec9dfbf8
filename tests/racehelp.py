"""Linearizability checks for racing writes and fallocates: which operation
took its LBA range when (RangeOrder), and what the bytes must then be
(replay)."""
import trio


class RangeOrder:
    """Wraps a RangeLock so that ``order`` lists the operations in the order
    they took their ranges.  An operation is known by ``op_of[task]``, or by
    ``current`` while set (work done synchronously, outside any task of
    its own, as the FUSE direct lane does)."""

    def __init__(self, lock):
        self.order, self.op_of, self.current = [], {}, None
        try_acquire, acquire = lock.try_acquire, lock.acquire

        def try_acquire_rec(a, b):
            ok = try_acquire(a, b)
            if ok:
                self.took()
            return ok

        async def acquire_rec(a, b):
            await acquire(a, b)
            self.took()
        lock.try_acquire, lock.acquire = try_acquire_rec, acquire_rec

    def took(self, op=None):
        if op is None:
            op = self.current if self.current is not None else self.op_of.get(trio.lowlevel.current_task())
        self.order.append(op)


def replay(start, ops, order):
    """``start`` with ``ops`` ((kind, off, n, data or None for zeroes), ...)
    applied one by one in ``order``; every op must appear exactly once."""
    assert sorted(order) == list(range(len(ops)))
    ref = bytearray(start)
    for i in order:
        _kind, off, n, data = ops[i]
        ref[off:off + n] = data if data is not None else bytes(n)
    return ref


KEEP, PUNCH, ZERO = 0x01, 0x02, 0x10


async def apply(fs, fh, op):
    """One op through the FUSE frontend's general path."""
    kind, off, n, data = op
    if data is not None:
        assert await fs.write(fh, off, data) == n
    else:
        await fs.fallocate(fh, (PUNCH | KEEP) if kind == "punch" else ZERO, off, n)


async def race(fs, fh, start, ops, rec, run):
    """Start ``run(i)`` for every op at once, wait for all, and check the
    bytes against the ops replayed in the order they took their ranges."""
    async with trio.open_nursery() as nursery:
        for i in range(len(ops)):
            nursery.start_soon(run, i)
    assert await fs.read(fh, 0, len(start)) == replay(start, ops, rec.order)


async def new_round(fs, fh, rec, seed, region):
    """Fill the first ``region`` bytes with seeded noise and forget the last
    round's order: (rng, start bytes)."""
    import random
    rng = random.Random(seed)
    start = bytes(rng.getrandbits(8) for _ in range(region))
    await fs.write(fh, 0, start)
    rec.order.clear()
    return rng, start
