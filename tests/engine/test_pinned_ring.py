import pytest
import torch

from engine.pinned_ring import PinnedRing


def ring(pages=8):
    return PinnedRing(pages, (2, 3), torch.bfloat16, pin=False)


def test_runs_are_adjacent_and_come_back_in_order():
    r = ring()
    a, b = r.take(3), r.take(3)
    assert (a, b) == (0, 3) and r.used == 6
    assert r.take(3) is None           # 2 slots left at the end, none at the start
    r.give(a)
    assert r.take(3) == 0              # wraps to the start: [0, 3) is free again
    assert r.take(1) is None           # [6, 8) was skipped by the wrap; [3, 6) still taken
    r.give(b)
    assert r.take(3) == 3              # [3, 8) is free again
    assert r.take(2) == 6
    assert r.take(1) is None           # full
    r.give(0)
    assert r.take(1) == 0              # [0, 3) free: wraps again
    r.give(3)
    r.give(6)
    r.give(0)
    assert r.used == 0 and r.take(8) == 0  # empty: the whole ring again


def test_misuse_is_an_error_not_a_corruption():
    r = ring()
    assert r.take(9) is None           # larger than the ring: the offer is dropped
    a, b = r.take(2), r.take(2)
    with pytest.raises(RuntimeError, match="out of order"):
        r.give(b)
    with pytest.raises(RuntimeError, match="out of order"):
        r.untake(a)
    r.untake(b)                        # a dropped offer hands back the newest run
    assert r.take(2) == b
    with pytest.raises(ValueError, match="at least one page"):
        PinnedRing(0, (1,), torch.float32, pin=False)
    assert r.fits((2, 3), torch.bfloat16) and not r.fits((2, 4), torch.bfloat16)


def test_many_random_offers_never_overlap():
    import random
    rng = random.Random(0)
    r = ring(64)
    live = []
    for _ in range(5000):
        if live and (rng.random() < 0.5 or len(live) > 10):
            r.give(live.pop(0)[0])
        else:
            n = rng.randint(1, 20)
            s = r.take(n)
            if s is not None:
                assert 0 <= s and s + n <= 64
                for s2, n2 in live:
                    assert s + n <= s2 or s2 + n2 <= s, "overlapping runs"
                live.append((s, n))


def test_can_take_answers_what_take_would_without_taking():
    r = ring()
    for n in (1, 3, 8, 9):
        assert r.can_take(n) == (n <= 8)
    a = r.take(3)
    r.take(3)
    assert not r.can_take(3) and r.can_take(2) and r.used == 6  # [6, 8) free; asking took nothing
    r.give(a)
    assert r.can_take(3) and not r.can_take(4)  # [0, 3) free at the start, [6, 8) at the end
    assert r.take(3) == 0               # take agrees with the answer
    assert not r.can_take(1)            # [3, 6) taken, [6, 8) skipped by the wrap: as take(1) gives None
    assert r.take(1) is None
