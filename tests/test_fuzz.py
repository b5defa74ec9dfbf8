"""A short run of the model fuzzer (tests/fuzz_model.py; `make fuzz` runs a
long one): random commands through real queues, every status allowed,
nothing corrupted, no hang."""
import pytest

import fuzz_model


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fuzzed_commands(seed):
    res = fuzz_model.run(seed, commands=3000)
    assert res["commands"] >= 3000
    statuses = {st for (_k, _o, st) in res["histogram"]}
    # the run reached past the first checks: data moved, pointers refused
    assert {(0, 0x00), (0, 0x04), (0, 0x13), (0, 0x80)} <= statuses, statuses
