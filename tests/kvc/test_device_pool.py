import random

import pytest
import torch

from kvc.device_pool import BlockPool, DevicePool, NativeBlockPool, _native_blockq
from kvc.hashing import PageSpec


def native_pool(n: int) -> NativeBlockPool:
    lib = _native_blockq()
    assert lib is not None, "blockq.c did not build (a C compiler is part of the test set-up)"
    return NativeBlockPool(n, lib)


# every BlockPool test runs on the Python pool and on the C one (blockq.c)
@pytest.fixture(params=["python", "native"])
def make(request):
    return BlockPool if request.param == "python" else native_pool


def cache_one(pool: BlockPool, block: int, h: bytes, parent: bytes, tokens: bytes) -> bool:
    return pool.cache_blocks([block], [h], [parent], [tokens]) == 1


def test_allocate_free_order_and_refcounts(make):
    pool = make(6)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 3
    assert list(pool.ref_count[:3]) == [1, 1, 1]
    for i, b in enumerate(a):
        cache_one(pool, b, bytes([i]) * 16, bytes(16), b"t%d" % i)
    pool.free(a)
    # freed tail first: the next allocations evict block 2 (deepest) before 1 and 0
    assert pool.free_order() == [3, 4, 5, 2, 1, 0]
    assert pool.allocate(4) == [3, 4, 5, 2]
    assert bytes([2]) * 16 not in pool.hash_to_block and bytes([1]) * 16 in pool.hash_to_block


def test_blocks_that_hold_no_page_are_handed_out_before_a_cached_page_is_evicted(make):
    """A freed block without a page (a partial last page, a decode's) and the blocks reset_cache
    forgets go to the free queue's front: the next allocation takes them, in sequence / ascending
    order, and every cached page stays matchable. (Before: they joined the end and the allocation
    evicted cached pages first.)"""
    pool = make(8)
    a = pool.allocate(4)  # [0, 1, 2, 3]: pages 0-2 full and cached, 3 partial
    for i, b in enumerate(a[:3]):
        cache_one(pool, b, bytes([i]) * 16, bytes(16), b"t%d" % i)
    pool.free(a)
    assert pool.free_order() == [3, 4, 5, 6, 7, 2, 1, 0]
    b = pool.allocate(4)  # another prompt: blank blocks only
    assert b == [3, 4, 5, 6] and all(bytes([i]) * 16 in pool.hash_to_block for i in range(3))
    pool.free(b)  # none cached: back to the front in sequence order
    assert pool.free_order()[:5] == [3, 4, 5, 6, 7]
    assert pool.allocate(8) is not None  # a full pool: now the cached pages go, tail first
    pool2 = make(6)
    c = pool2.allocate(6)
    for i, blk in enumerate(c):
        cache_one(pool2, blk, bytes([i]) * 16, bytes(16), b"t%d" % i)
    pool2.free(c[:3]), pool2.free(c[3:])
    assert pool2.free_order() == [2, 1, 0, 5, 4, 3]
    assert pool2.reset_cache() == 6 and pool2.free_order() == [0, 1, 2, 3, 4, 5]
    assert pool2.allocate(6) == [0, 1, 2, 3, 4, 5]  # consecutive again


def test_shortage_is_none_and_changes_nothing(make):
    pool = make(2)
    pool.allocate(1)
    assert pool.allocate(2) is None
    assert pool.num_free == 1


def test_match_prefix_verifies_parent_and_tokens(make):
    pool = make(4)
    b = pool.allocate(2)
    h0, h1 = b"\x00" * 16, b"\x01" * 16
    cache_one(pool, b[0], h0, b"r" * 16, b"aaaa")
    cache_one(pool, b[1], h1, h0, b"bbbb")
    assert pool.match_prefix([h0, h1], [b"r" * 16, h0], b"aaaabbbb") == b
    assert pool.match_prefix([h0, h1], [b"r" * 16, h0], b"aaaaXXXX") == b[:1]
    assert pool.match_prefix([h0, h1], [b"q" * 16, h0], b"aaaabbbb") == []
    assert pool.match_prefix([h0, h1], [b"r" * 16, b"z" * 16], b"aaaabbbb") == b[:1]  # parent of page 1
    assert pool.match_prefix([h0, h1], [b"r" * 16, h0], b"aaaa") == b[:1]  # tokens for one page only
    assert pool.match_prefix([h0, b"\x09" * 16, h1], [b"r" * 16, h0, h0], b"aaaabbbbbbbb") == b[:1]  # a miss
    assert pool.match_prefix([], [], b"") == []


def test_touch_shares_blocks_and_keeps_them_out_of_the_free_queue(make):
    pool = make(3)
    b = pool.allocate(1)
    cache_one(pool, b[0], b"\x05" * 16, bytes(16), b"x")
    pool.free(b)
    assert b[0] in pool.free_order()
    pool.touch(b)
    pool.touch(b)
    assert pool.ref_count[b[0]] == 2 and b[0] not in pool.free_order()
    pool.free(b)
    assert b[0] not in pool.free_order()
    pool.free(b)
    assert b[0] in pool.free_order() and pool.block_hash(b[0]) == b"\x05" * 16


def test_cache_block_refuses_a_second_holder_of_a_hash(make):
    pool = make(2)
    b = pool.allocate(2)
    assert cache_one(pool, b[0], b"\x07" * 16, bytes(16), b"x")
    assert not cache_one(pool, b[1], b"\x07" * 16, bytes(16), b"x")


def test_gather_scatter_roundtrip():
    spec = PageSpec(3, 2, 4, 2, "float32")
    pool = DevicePool(spec, 5)
    pages = torch.randn(2, *spec.shape)
    pool.scatter([3, 1], pages)
    got = pool.gather([3, 1])
    assert torch.equal(got, pages) and got.is_contiguous()  # page-major: what the put path copies out
    k, v = pool.layer(2)
    assert torch.equal(k[3], pages[0, 2, 0]) and torch.equal(v[1], pages[1, 2, 1])
    assert torch.count_nonzero(pool.kv[:, :, [0, 2, 4]]) == 0


def test_layer_scatters_equal_the_whole_page_scatter():
    """A layered load's writes: scatter_layers one layer at a time or a range of layers in one
    launch, from layer-major rows, leave the pool as the whole-page scatter does."""
    spec = PageSpec(5, 2, 4, 2, "float32")
    pages = torch.randn(3, *spec.shape)
    want = DevicePool(spec, 6)
    want.scatter([4, 0, 2], pages)
    lm = pages.transpose(0, 1).contiguous()  # [L, n, parts, P, H, D]
    for groups in ([(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)], [(0, 2), (2, 5)], [(0, 5)], [(0, 1), (1, 4), (4, 5)]):
        pool = DevicePool(spec, 6)
        index = pool.index([4, 0, 2])
        for lo, hi in groups:
            pool.scatter_layers(lo, hi, index, lm[lo:hi])
        assert torch.equal(pool.kv, want.kv), groups


def test_cache_blocks_registers_a_run_like_one_at_a_time(make):
    pool = make(8)
    b = pool.allocate(4)
    hs = [bytes([i]) * 16 for i in range(4)]
    assert cache_one(pool, b[1], hs[1], hs[0], b"y")  # already held: skipped in the run below
    assert pool.cache_blocks(b, hs, [bytes(16)] + hs[:3], [b"x", b"y", b"z", b"w"]) == 3
    assert pool.match_prefix(hs, [bytes(16)] + hs[:3], b"xyzw") == b


def test_cache_blocks_in_bulk_equals_one_at_a_time(make):
    """A run with nothing held goes in bulk (a load's 2,048 pages); a run that repeats a hash or a
    block inside itself, or has fewer parents than blocks, still registers what the loop would."""
    def state(pool):
        return dict(pool.hash_to_block), dict(pool._cached)
    hs = [bytes([i]) * 16 for i in range(6)]
    parents = [bytes(16)] + hs[:5]
    toks = [bytes([65 + i]) for i in range(6)]
    for blocks, hashes, ps, ts in (([0, 1, 2, 3, 4, 5], hs, parents, toks),
                                   ([0, 1, 2, 3], [hs[0], hs[1], hs[1], hs[2]], parents, toks),  # a hash twice
                                   ([0, 1, 1, 2], hs[:4], parents, toks),  # a block twice
                                   ([0, 1, 2, 3, 4], hs[:5], parents[:3], toks)):  # fewer parents
        bulk, loop = make(8), make(8)
        got = bulk.cache_blocks(blocks, hashes, ps, ts)
        want = sum(cache_one(loop, b, h, p, t) for b, h, p, t in zip(blocks, hashes, ps, ts))
        assert got == want and state(bulk) == state(loop)


def test_forgotten_counts_every_record_dropped_and_nothing_else(make):
    """BlockPool.forgotten moves exactly when a block's record is dropped (an eviction by allocate,
    reset_cache): while it stands, every record read before still holds (the prefix cache's
    remembered matches rely on that to skip comparing them)."""
    pool = make(6)
    a = pool.allocate(3)
    assert pool.forgotten == 0  # blank blocks: nothing dropped
    for i, b in enumerate(a):
        cache_one(pool, b, bytes([i]) * 16, bytes(16), b"t%d" % i)
    before = pool.records(a)
    pool.touch(a)
    pool.free(a)
    pool.free(a)
    assert pool.forgotten == 0 and pool.records(a) == before  # touch, free, a failed re-cache: no change
    assert not cache_one(pool, a[0], b"\x09" * 16, bytes(16), b"x")
    assert pool.forgotten == 0 and pool.records(a) == before
    assert pool.allocate(4) == [3, 4, 5, 2]  # three blank blocks, then block 2's page is evicted
    assert pool.forgotten == 1 and pool.records(a) != before
    assert pool.reset_cache() == 2 and pool.forgotten == 3


def test_native_pool_equals_the_python_pool_over_random_calls():
    """The C pool (blockq.c) against the Python one: the same calls in a random order (allocations
    that evict, hits touched again, tables freed in pieces and whole, pages registered singly and
    in runs, resets), the same results and the same state after every call."""
    def state(pool):
        return (pool.free_order(), [int(c) for c in pool.ref_count], pool.num_free, dict(pool.hash_to_block),
                dict(pool._cached), pool.forgotten)
    for seed in range(20):
        rng = random.Random(seed)
        n = rng.choice([1, 2, 7, 64])
        py, c = BlockPool(n), native_pool(n)
        tables: list[list[int]] = []  # each holds one reference on its blocks
        serial = 0
        for _ in range(300):
            op = rng.random()
            if op < 0.3:
                k = rng.randint(0, n + 1)
                got = py.allocate(k)
                assert c.allocate(k) == got
                if got is not None:
                    tables.append(got)
            elif op < 0.5 and tables:
                t = tables.pop(rng.randrange(len(tables)))
                if len(t) > 1 and rng.random() < 0.3:  # a preempted tail first, then the rest
                    cut = rng.randrange(1, len(t))
                    py.free(t[cut:]), c.free(t[cut:])
                    t = t[:cut]
                py.free(t), c.free(t)
            elif op < 0.7 and tables:
                t = rng.choice(tables)
                blocks = [b for b in t if rng.random() < 0.8]
                hashes = [bytes([serial % 256, serial // 256 % 256]) + bytes([i]) * 14 for i in range(len(blocks))]
                serial += 1
                if rng.random() < 0.2 and hashes:  # a hash already held somewhere
                    hashes[0] = next(iter(py.hash_to_block), hashes[0])
                parents = [bytes(16)] * len(blocks)
                toks = [b"t"] * len(blocks)
                assert py.cache_blocks(blocks, hashes, parents, toks) == c.cache_blocks(blocks, hashes, parents, toks)
            elif op < 0.85:
                held = list(py._cached)
                if held:
                    hit = rng.sample(held, rng.randint(1, len(held)))
                    py.touch(hit), c.touch(hit)
                    tables.append(hit)
            elif op < 0.9:
                assert py.reset_cache() == c.reset_cache()
            else:
                hs = list(py.hash_to_block)
                assert py.match_prefix(hs, [bytes(16)] * len(hs), b"t" * len(hs)) == \
                    c.match_prefix(hs, [bytes(16)] * len(hs), b"t" * len(hs))
            assert state(py) == state(c), seed
        for t in tables:
            py.free(t), c.free(t)
        assert state(py) == state(c) and c.num_free == n


def test_native_pool_names_bad_block_ids_and_double_frees():
    pool = native_pool(4)
    a = pool.allocate(2)
    assert cache_one(pool, a[1], b"\x01" * 16, bytes(16), b"x")  # its flag comes with the next call
    with pytest.raises(IndexError, match=r"\[0, 2\*\*32\)"):
        pool.free([-1])  # refused before any call
    with pytest.raises(ValueError, match="cannot allocate -1 blocks"):
        pool.allocate(-1)
    with pytest.raises(IndexError, match="block 9 is not in this pool of 4"):
        pool.touch([a[0], 9])
    with pytest.raises(IndexError, match="block 9 is not in this pool of 4"):
        pool.free([a[0], 9])
    with pytest.raises(IndexError, match=r"\[0, 2\*\*32\)"):
        pool.free([-1])
    assert list(pool.ref_count) == [1, 1, 0, 0] and pool.free_order() == [2, 3]  # nothing changed
    pool.free([a[1]])
    assert pool.free_order() == [2, 3, a[1]]  # it holds a page: to the end (the flag survived the errors)
    pool.touch([a[1]])
    assert pool.allocate(3) is None and pool.num_free == 2
    pool.free(a)
    with pytest.raises(AssertionError, match="block 1 freed more often than referenced"):
        pool.free([1])


def test_native_pool_takes_a_tables_own_uint32_ids():
    """An engine's block table carries its ids as an array('I') (`u32`): touch and free read it
    as it is, with the same effect as the list."""
    from engine.request import BlockTable
    a, b = native_pool(8), native_pool(8)
    ta = a.allocate(5)
    assert b.allocate(5) == ta
    a.free(BlockTable(ta[1:])), b.free(ta[1:])
    a.touch(BlockTable(ta[2:4])), b.touch(ta[2:4])
    assert a.free_order() == b.free_order() and list(a.ref_count) == list(b.ref_count)
    with pytest.raises(IndexError, match="block 9 is not in this pool of 8"):
        a.touch(BlockTable([1, 9]))
