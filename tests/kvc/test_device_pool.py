import torch

from kvc.device_pool import BlockPool, DevicePool
from kvc.hashing import PageSpec


def cache_one(pool: BlockPool, block: int, h: bytes, parent: bytes, tokens: bytes) -> bool:
    return pool.cache_blocks([block], [h], [parent], [tokens]) == 1


def test_allocate_free_order_and_refcounts():
    pool = BlockPool(6)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 3
    assert pool.ref_count[:3] == [1, 1, 1]
    for i, b in enumerate(a):
        cache_one(pool, b, bytes([i]) * 16, bytes(16), b"t%d" % i)
    pool.free(a)
    # freed tail first: the next allocations evict block 2 (deepest) before 1 and 0
    assert list(pool.free_queue) == [3, 4, 5, 2, 1, 0]
    assert pool.allocate(4) == [3, 4, 5, 2]
    assert bytes([2]) * 16 not in pool.hash_to_block and bytes([1]) * 16 in pool.hash_to_block


def test_blocks_that_hold_no_page_are_handed_out_before_a_cached_page_is_evicted():
    """A freed block without a page (a partial last page, a decode's) and the blocks reset_cache
    forgets go to the free queue's front: the next allocation takes them, in sequence / ascending
    order, and every cached page stays matchable. (Before: they joined the end and the allocation
    evicted cached pages first.)"""
    pool = BlockPool(8)
    a = pool.allocate(4)  # [0, 1, 2, 3]: pages 0-2 full and cached, 3 partial
    for i, b in enumerate(a[:3]):
        cache_one(pool, b, bytes([i]) * 16, bytes(16), b"t%d" % i)
    pool.free(a)
    assert list(pool.free_queue) == [3, 4, 5, 6, 7, 2, 1, 0]
    b = pool.allocate(4)  # another prompt: blank blocks only
    assert b == [3, 4, 5, 6] and all(bytes([i]) * 16 in pool.hash_to_block for i in range(3))
    pool.free(b)  # none cached: back to the front in sequence order
    assert list(pool.free_queue)[:5] == [3, 4, 5, 6, 7]
    assert pool.allocate(8) is not None  # a full pool: now the cached pages go, tail first
    pool2 = BlockPool(6)
    c = pool2.allocate(6)
    for i, blk in enumerate(c):
        cache_one(pool2, blk, bytes([i]) * 16, bytes(16), b"t%d" % i)
    pool2.free(c[:3]), pool2.free(c[3:])
    assert list(pool2.free_queue) == [2, 1, 0, 5, 4, 3]
    assert pool2.reset_cache() == 6 and list(pool2.free_queue) == [0, 1, 2, 3, 4, 5]
    assert pool2.allocate(6) == [0, 1, 2, 3, 4, 5]  # consecutive again


def test_shortage_is_none_and_changes_nothing():
    pool = BlockPool(2)
    pool.allocate(1)
    assert pool.allocate(2) is None
    assert pool.num_free == 1


def test_match_prefix_verifies_parent_and_tokens():
    pool = BlockPool(4)
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


def test_touch_shares_blocks_and_keeps_them_out_of_the_free_queue():
    pool = BlockPool(3)
    b = pool.allocate(1)
    cache_one(pool, b[0], b"\x05" * 16, bytes(16), b"x")
    pool.free(b)
    assert b[0] in pool.free_queue
    pool.touch(b)
    pool.touch(b)
    assert pool.ref_count[b[0]] == 2 and b[0] not in pool.free_queue
    pool.free(b)
    assert b[0] not in pool.free_queue
    pool.free(b)
    assert b[0] in pool.free_queue and pool.block_hash(b[0]) == b"\x05" * 16


def test_cache_block_refuses_a_second_holder_of_a_hash():
    pool = BlockPool(2)
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


def test_cache_blocks_registers_a_run_like_one_at_a_time():
    pool = BlockPool(8)
    b = pool.allocate(4)
    hs = [bytes([i]) * 16 for i in range(4)]
    assert cache_one(pool, b[1], hs[1], hs[0], b"y")  # already held: skipped in the run below
    assert pool.cache_blocks(b, hs, [bytes(16)] + hs[:3], [b"x", b"y", b"z", b"w"]) == 3
    assert pool.match_prefix(hs, [bytes(16)] + hs[:3], b"xyzw") == b


def test_cache_blocks_in_bulk_equals_one_at_a_time():
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
        bulk, loop = BlockPool(8), BlockPool(8)
        got = bulk.cache_blocks(blocks, hashes, ps, ts)
        want = sum(cache_one(loop, b, h, p, t) for b, h, p, t in zip(blocks, hashes, ps, ts))
        assert got == want and state(bulk) == state(loop)


def test_forgotten_counts_every_record_dropped_and_nothing_else():
    """BlockPool.forgotten moves exactly when a block's record is dropped (an eviction by allocate,
    reset_cache): while it stands, every record read before still holds (the prefix cache's
    remembered matches rely on that to skip comparing them)."""
    pool = BlockPool(6)
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
