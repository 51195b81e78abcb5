import contextlib

import numpy as np
import pytest
import torch

from kvc import hashing
from kvc.metrics import KvcMetrics
from kvc.store import TieredStore

from .backend_suite import BackendSuite
from .conftest import NS, SPEC, kvc_config, make_pages


@pytest.fixture
def backend(tmp_path):
    store = TieredStore(kvc_config(tmp_path))
    yield store
    store.close()


class TestTieredStoreSuite(BackendSuite):
    pass


def metric(store, name, **labels):
    v = store.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def count_demotions(s) -> list[int]:
    """The size of each chunk of victims s demotes from now on (appended as each is chosen)."""
    sizes, real = [], s._demote_steps

    def chosen(choose):
        def pick():
            victims = choose()
            sizes.append(len(victims))
            return victims
        return real(pick)
    s._demote_steps = chosen
    return sizes


def test_lookup_counts_tokens_and_hits_by_tier(tmp_path):
    with TieredStore(kvc_config(tmp_path)) as s:
        toks = list(range(22))
        _, pages = make_pages(NS, toks)
        s.put_pages(NS, pages[:3])
        r = s.lookup(NS, tokens=toks)
        assert r.located == ["cpu"] * 3 and r.tiers["cpu"] == 3
        assert metric(s, "kvc_lookup_query_tokens_total") == 22
        assert metric(s, "kvc_lookup_hit_tokens_total", tier="cpu") == 12


def test_forced_collision_never_returns_other_prompts_pages(tmp_path, monkeypatch):
    """With a hash function that maps every page to one key, prompt B must never get A's KV."""
    monkeypatch.setattr(hashing, "chain_hash", lambda parent, toks: b"\x01" * 16)
    with TieredStore(kvc_config(tmp_path)) as s:
        a, b = [1, 2, 3, 4], [5, 6, 7, 8]
        ha, pa = make_pages(NS, a)
        hb, pb = make_pages(NS, b, seed=1)
        assert ha == hb  # the patched hash collides
        assert s.put_pages(NS, pa).stored == 1
        res = s.put_pages(NS, pb)
        assert (res.stored, res.rejected) == (0, 1)
        assert metric(s, "kvc_hash_collisions_total") == 1
        assert s.lookup(NS, tokens=b).num_pages == 0  # tokens differ: not a hit
        assert metric(s, "kvc_hash_collisions_total") == 2
        assert s.lookup(NS, tokens=a).num_pages == 1


def keys(*hashes):
    """The tiers' keys of NS's pages: namespace root + hash."""
    return [NS.root + h for h in hashes]


def test_cpu_tier_never_exceeds_budget_and_evicts_lru_deepest_first(tmp_path):
    page = SPEC.page_bytes  # 256 bytes
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=8 * page / (1 << 30), disk_path=None,
                     high_watermark=0.99, low_watermark=0.5)
    with TieredStore(cfg) as s:
        assert s.cpu.capacity == 8 * page
        ha, pa = make_pages(NS, list(range(16)))          # chain A: 4 pages
        hb, pb = make_pages(NS, list(range(100, 116)))    # chain B: 4 pages
        s.put_pages(NS, pa)
        s.put_pages(NS, pb)
        assert s.cpu.used == 8 * page
        # each put makes its chain most recent, deepest page first
        assert list(s.cpu.entries) == keys(ha[3], ha[2], ha[1], ha[0], hb[3], hb[2], hb[1], hb[0])
        s.get_pages(NS, ha)  # A is now more recent than B, again tail first
        assert list(s.cpu.entries) == keys(hb[3], hb[2], hb[1], hb[0], ha[3], ha[2], ha[1], ha[0])
        hc, pc = make_pages(NS, list(range(200, 204)))
        s.put_pages(NS, pc)
        # eviction runs down to the low watermark (9 - 4 = 5 pages): all of B, then A's tail
        assert set(s.cpu.entries) == set(keys(ha[0], ha[1], ha[2], hc[0]))
        assert s.cpu.used <= s.cpu.capacity
        assert metric(s, "kvc_evictions_total", tier="cpu", reason="capacity") == 5


def test_deepest_page_evicted_first(tmp_path):
    page = SPEC.page_bytes
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=4 * page / (1 << 30), disk_path=None,
                     high_watermark=0.99, low_watermark=0.9)
    with TieredStore(cfg) as s:
        ha, pa = make_pages(NS, list(range(16)))
        s.put_pages(NS, pa)
        s.get_pages(NS, ha)
        _, pc = make_pages(NS, list(range(200, 204)))
        s.put_pages(NS, pc)
        # down to the low watermark (3.6 of 4 pages) takes two pages: the tail, not the prefix
        assert s.lookup(NS, hashes=ha).num_pages == 2
        assert s.cpu.get(NS.root + ha[0]) and s.cpu.get(NS.root + ha[1])


def test_pinned_pages_are_not_evicted_and_leases_expire(tmp_path):
    page = SPEC.page_bytes
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=4 * page / (1 << 30), disk_path=None,
                     pin_budget_fraction=1.0)  # all of the tier
    with TieredStore(cfg) as s:
        ha, pa = make_pages(NS, list(range(16)))
        s.put_pages(NS, pa)
        lease = s.pin(NS, ha)
        _, pb = make_pages(NS, list(range(100, 104)))
        res = s.put_pages(NS, pb)
        assert res.rejected == 1 and s.lookup(NS, hashes=ha).num_pages == 4
        assert s.stats()["pinned_pages"] == 4
        s.unpin(lease)
        assert s.put_pages(NS, pb).stored == 1
        short = s.pin(NS, [pb[0].hash], ttl_s=1e-6)
        assert s.stats()["leases"] == 0 and metric(s, "kvc_forced_unpins_total") == 1
        assert s.unpin(short) is False


def test_pin_rejects_bad_ttl_and_hash(tmp_path):
    with TieredStore(kvc_config(tmp_path, disk_path=None)) as s:
        with pytest.raises(ValueError, match="ttl"):
            s.pin(NS, [], ttl_s=0)
        with pytest.raises(ValueError, match="16 bytes"):
            s.pin(NS, [b"short"])


def test_write_back_to_disk_then_promote_on_hit(tmp_path):
    page = SPEC.page_bytes
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=4 * page / (1 << 30))
    with TieredStore(cfg) as s:
        ha, pa = make_pages(NS, list(range(16)))
        s.put_pages(NS, pa)
        assert s.disk.pages == 0  # write-back: nothing on disk yet
        hb, pb = make_pages(NS, list(range(100, 116)))
        s.put_pages(NS, pb)
        s.flush()
        r = s.lookup(NS, hashes=ha)
        assert r.num_pages == 4 and "disk" in r.located
        assert metric(s, "kvc_transfer_bytes_total", src="cpu", dst="disk") > 0
        got = s.get_pages(NS, ha)
        assert all(torch.equal(a.data, b.data) for a, b in zip(got, pa))
        assert s.lookup(NS, hashes=ha).located == ["cpu"] * 4  # promoted
        assert metric(s, "kvc_transfer_bytes_total", src="disk", dst="cpu") == 4 * page


def test_promotions_of_a_get_are_one_native_copy_a_run(tmp_path, monkeypatch):
    """Disk pages a get promotes into the cpu tier are copied in one native call for the run (a
    numpy copy a page hands the GIL to a busy thread each time), into slots reserved under the
    lock; what the cpu tier then serves is the same bytes, and a page already stored by the time
    of the commit gives its slot back."""
    from kvc import pagecopy

    lib = pagecopy.library()
    if lib is None:
        pytest.skip("no native library here (no C compiler)")
    calls = []  # pages a copy call moved from outside the cpu tier's slab into it
    real = type(lib).copy

    def copy(self, src, dst, lens):
        lo, hi = s._slab.ctypes.data, s._slab.ctypes.data + s._slab.nbytes
        if all(lo <= d < hi for d in dst) and not any(lo <= a < hi for a in src):
            calls.append(len(src))
        return real(self, src, dst, lens)
    monkeypatch.setattr(type(lib), "copy", copy)
    page = SPEC.page_bytes
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=8 * page / (1 << 30))
    with TieredStore(cfg) as s:
        ha, pa = make_pages(NS, list(range(24)))  # 6 pages
        s.put_pages(NS, pa)
        s.flush()
        hb, pb = make_pages(NS, list(range(100, 132)))  # 8 more: the first 6 go down to disk
        s.put_pages(NS, pb)
        s.flush()
        assert s.lookup(NS, hashes=ha).located == ["disk"] * 6
        calls.clear()
        got = s.get_pages(NS, ha)
        assert all(torch.equal(a.data, b.data) for a, b in zip(got, pa))
        assert calls == [6]  # one call for the run's six promotions
        assert s.lookup(NS, hashes=ha).located == ["cpu"] * 6
        assert metric(s, "kvc_tier_pages", tier="cpu") == 8
        again = s.get_pages(NS, ha)  # now from the cpu tier, its checksums checked
        assert all(torch.equal(a.data, b.data) for a, b in zip(again, pa))
        # a slot whose page another thread stored before the commit goes back
        k, later = NS.root + b"x" * 16, []
        with s._lock:
            e = s.cpu.get(NS.root + ha[0])
            s._promote(k, e, got[0].data.view(torch.uint8).reshape(-1).numpy(), later)
            s.cpu.commit(k, e, s.cpu.reserve(e.nbytes))  # stored meanwhile
        used = s.cpu.used
        s._commit_promotions(later)
        assert later == [] and s.cpu.used == used - e.nbytes  # the reserved slot given back, nothing else


def test_get_into_makes_no_tensor_a_page(tmp_path, monkeypatch):
    """get_into (an engine's load: the bytes and a count) reads disk pages through numpy views of
    out's rows, making and dropping no torch tensor a page (each can hand the GIL to a busy thread
    and wait a switch interval); the bytes and the count as get_pages gives them."""
    page = SPEC.page_bytes
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=8 * page / (1 << 30))
    with TieredStore(cfg) as s:
        ha, pa = make_pages(NS, list(range(24)))
        s.put_pages(NS, pa)
        s.flush()
        s.put_pages(NS, make_pages(NS, list(range(100, 132)))[1])  # the first 6 pages go down to disk
        s.flush()
        assert s.lookup(NS, hashes=ha).located == ["disk"] * 6
        out = torch.zeros((6, *SPEC.shape), dtype=torch.float32)

        def refused(*a, **k):
            raise AssertionError("a tensor a page")
        monkeypatch.setattr(torch.Tensor, "unbind", refused)
        assert s.get_into(NS, ha, out) == 6
        monkeypatch.undo()
        assert all(torch.equal(out[i], p.data) for i, p in enumerate(pa))
        assert s.lookup(NS, hashes=ha).located == ["cpu"] * 6  # promoted as get_pages does


def test_write_through(tmp_path):
    with TieredStore(kvc_config(tmp_path, disk_write="through")) as s:
        ha, pa = make_pages(NS, list(range(8)))
        s.put_pages(NS, pa)
        s.flush()
        assert s.disk.pages == 2 and s.cpu.pages == 2


def test_cpu_zero_goes_straight_to_disk(tmp_path):
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=0)) as s:
        ha, pa = make_pages(NS, list(range(8)))
        assert s.put_pages(NS, pa).stored == 2
        s.flush()
        assert s.lookup(NS, hashes=ha).located == ["disk", "disk"]
        assert torch.equal(s.get_pages(NS, ha)[1].data, pa[1].data)


def test_without_a_cpu_tier_disk_eviction_keeps_a_prompts_prefix(tmp_path):
    """With no cpu tier the chain walk found no ancestors, so the disk tier's order was write
    order and eviction took a prompt's first pages: the rest stayed on disk, unreachable."""
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=0, disk_size_GB=150_000 / (1 << 30))) as s:
        ha, pa = make_pages(NS, list(range(4 * 20)))
        s.put_pages(NS, pa)
        s.flush()
        s.put_pages(NS, make_pages(NS, list(range(1000, 1000 + 4 * 20)))[1])  # past the budget
        s.flush()
        held = [s.disk.get(NS.root + h) is not None for h in ha]
        assert 0 < sum(held) < len(ha)
        assert held == sorted(held, reverse=True)  # a prefix: the tail went first
        assert s.lookup(NS, hashes=ha).num_pages == sum(held)


def test_a_chain_walk_through_disk_only_pages_touches_each_tier_its_own(tmp_path):
    """A page put below a chain that left the cpu tier for the disk, then a get that promotes the
    chain's first pages again: the walk goes through the disk-only pages to the cpu-held ones and
    touches in each tier only the pages it holds (a cpu touch of a disk-only page was a KeyError
    that failed the put)."""
    page = SPEC.page_bytes
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=4 * page / (1 << 30), high_watermark=0.99, low_watermark=0.9)
    with TieredStore(cfg) as s:
        hs, ps = make_pages(NS, list(range(4 * 5)))
        s.put_pages(NS, ps[:4])
        s.flush()
        s.put_pages(NS, make_pages(NS, list(range(1000, 1016)))[1])  # A's pages demoted to disk
        s.flush()
        assert all(s.cpu.get(NS.root + h) is None and s.disk.get(NS.root + h) for h in hs[:4])
        s.get_pages(NS, hs[:1])  # promoted: the root page in cpu again, its children disk only
        assert s.put_pages(NS, ps[4:]).stored == 1
        s.flush()
        assert s.lookup(NS, hashes=hs).num_pages == 5
        assert list(s.disk.index)[-1] == NS.root + hs[0]  # the chain's root the most recent


def test_a_restarted_disk_tier_evicts_a_prompts_tail_first(tmp_path):
    """A restart loads the disk tier's pages in write order, and without a cpu tier (or written
    through) a prompt is written prefix first: the restarted tier took its first pages first."""
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=0, disk_size_GB=150_000 / (1 << 30))
    ha, pa = make_pages(NS, list(range(4 * 20)))
    hx, px = make_pages(NS, list(range(2000, 2000 + 4 * 3)))
    with TieredStore(cfg) as s:
        s.put_pages(NS, pa[:12])
        s.put_pages(NS, px)  # another chain between: write order is not chain order
        s.put_pages(NS, pa[12:])
        s.flush()
        before = list(s.disk.index)
    with TieredStore(cfg) as s:
        assert list(s.disk.index) == before  # the order the running tier had
        s.put_pages(NS, make_pages(NS, list(range(1000, 1000 + 4 * 20)))[1])  # past the budget
        s.flush()
        held = [s.disk.get(NS.root + h) is not None for h in ha]
        assert 0 < sum(held) < len(ha) and held == sorted(held, reverse=True)
        assert s.lookup(NS, hashes=ha).num_pages == sum(held)


def test_flipped_byte_in_cpu_is_a_miss_and_counted(tmp_path):
    with TieredStore(kvc_config(tmp_path, disk_path=None)) as s:
        ha, pa = make_pages(NS, list(range(12)))
        s.put_pages(NS, pa)
        s.cpu.view(NS.root + ha[1])[7] ^= 0xFF
        got = s.get_pages(NS, ha)
        assert len(got) == 1
        assert metric(s, "kvc_checksum_failures_total", tier="cpu") == 1
        assert s.lookup(NS, hashes=ha).num_pages == 1  # the bad page is gone


def test_events_reach_listeners(tmp_path):
    seen = []
    with TieredStore(kvc_config(tmp_path, disk_path=None)) as s:
        s.add_listener(lambda kind, root, h, parent, tier: seen.append((kind, h, tier)))
        ha, pa = make_pages(NS, list(range(8)))
        s.put_pages(NS, pa)
        s.delete(NS, ha[1:])
    assert seen == [("stored", ha[0], "cpu"), ("stored", ha[1], "cpu"), ("removed", ha[1], "cpu")]


def test_gpu_only_holds_nothing(tmp_path):
    with TieredStore(kvc_config(tmp_path, gpu_only=True)) as s:
        _, pa = make_pages(NS, list(range(8)))
        assert s.put_pages(NS, pa).rejected == 2
        assert s.stats()["tiers"]["cpu"]["capacity_bytes"] == 0


def test_metrics_share_a_registry(tmp_path):
    m = KvcMetrics()
    with TieredStore(kvc_config(tmp_path, disk_path=None), metrics=m) as s:
        _, pa = make_pages(NS, list(range(8)))
        s.put_pages(NS, pa)
    assert m.registry.get_sample_value("kvc_tier_pages", {"tier": "cpu"}) == 2
    assert m.registry.get_sample_value("kvc_tier_capacity_bytes", {"tier": "cpu"}) == 1 << 20


def test_pin_ignores_other_namespaces_pages(tmp_path):
    page = SPEC.page_bytes
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=4 * page / (1 << 30), disk_path=None)
    with TieredStore(cfg) as s:
        other = NS.with_salt("other-tenant")
        ho, po = make_pages(other, list(range(16)))
        s.put_pages(other, po)
        s.pin(NS, ho)  # a different namespace: pins nothing
        assert s.stats()["pinned_pages"] == 0
        _, pb = make_pages(NS, list(range(100, 104)))
        assert s.put_pages(NS, pb).stored == 1  # the other tenant's pages stayed evictable


@pytest.mark.parametrize("readers", [0, 1, 3])
def test_cpu_tier_parallel_reads_verify_each_page(readers):
    """read_many's parts (the reader threads' and, since the caller reads one part itself, the
    caller's): every page copied, each verdict in its page's place, a corrupt page in the first
    part and one in the last."""
    from kvc.cpu_tier import CpuTier, Entry
    from kvc.record import checksum
    tier = CpuTier(1 << 20, pin=False, reader_threads=readers)
    rng = np.random.default_rng(0)
    hashes = [bytes([i]) * 16 for i in range(7)]
    payloads = [rng.integers(0, 255, 4096, dtype=np.uint8) for _ in hashes]
    for h, p in zip(hashes, payloads):
        assert tier.put(h, Entry(b"r" * 16, b"p" * 16, b"", "uint8", (4096,), 4096, checksum(p)), p)
    tier.view(hashes[0])[7] ^= 1
    tier.view(hashes[6])[100] ^= 1
    dsts = [torch.empty(4096, dtype=torch.uint8) for _ in hashes]
    assert tier.read_many(hashes, dsts) == [False, True, True, True, True, True, False]
    assert all(torch.equal(d, torch.from_numpy(p)) for d, p in zip(dsts[1:6], payloads[1:6]))
    for n in (1, 2, 3):  # fewer pages than parts
        dsts = [torch.empty(4096, dtype=torch.uint8) for _ in range(n)]
        assert tier.read_many(hashes[1:1 + n], dsts) == [True] * n
        assert all(torch.equal(d, torch.from_numpy(p)) for d, p in zip(dsts, payloads[1:]))
    tier.close()


def test_background_populate_never_changes_stored_bytes():
    """The slab is populated (MADV_POPULATE_WRITE) while puts land in the same extents."""

    from kvc.cpu_tier import CpuTier, Entry
    from kvc.record import checksum
    tier = CpuTier(256 << 20, pin=False, reader_threads=1)
    rng = np.random.default_rng(1)
    payloads = {bytes([i % 256, i // 256]) * 8: rng.integers(0, 255, 1 << 20, dtype=np.uint8) for i in range(200)}
    for h, p in payloads.items():
        assert tier.put(h, Entry(b"r" * 16, b"p" * 16, b"", "uint8", (1 << 20,), 1 << 20, checksum(p)), p)
    dst = torch.empty(1 << 20, dtype=torch.uint8)
    for h, p in payloads.items():
        assert tier.read_into(h, dst) and np.array_equal(dst.numpy(), p)
    tier.close()


def test_a_chain_put_in_small_calls_is_ordered_once_at_its_end(tmp_path):
    """An offer cut into calls (chain_continues) walks the chain's LRU order once, at the last call:
    the result is the order of one call with every page, deepest page oldest."""
    ha, pa = make_pages(NS, list(range(40)))  # 10 pages
    with TieredStore(kvc_config(tmp_path, disk_path=None)) as one, \
            TieredStore(kvc_config(tmp_path / "b", disk_path=None)) as cut:
        one.put_pages(NS, pa)
        for i in range(0, len(pa), 3):
            cut.put_pages(NS, pa[i:i + 3], chain_continues=i + 3 < len(pa))
        assert list(cut.cpu.entries) == list(one.cpu.entries) == [NS.root + h for h in ha[::-1]]


def test_a_put_at_the_end_of_a_long_chain_makes_the_whole_chain_recent_in_both_tiers(tmp_path):
    """The chain walk collects the ancestors, then touches them in bulk: the order is the same as
    touching them one by one (deepest first, so the root is the most recent), cpu and disk alike."""
    with TieredStore(kvc_config(tmp_path, disk_write="through")) as s:
        hs, ps = make_pages(NS, list(range(4 * 40)))  # a chain of 40 pages
        hx, px = make_pages(NS, list(range(1000, 1008)))  # another chain, put after it
        s.put_pages(NS, ps[:39])
        s.put_pages(NS, px)
        s.flush()
        s.put_pages(NS, ps[39:])  # one page at depth 39
        s.flush()
        want = keys(*reversed(hs))
        assert list(s.cpu.entries) == keys(*reversed(hx)) + want
        assert list(s.disk.index) == keys(*reversed(hx)) + want


def test_stored_bytes_are_counted_once_per_stored_page(tmp_path):
    """put_pages counts kvc_store_bytes_total{tier="cpu"} once per batch: stored pages only, not
    duplicates or refused ones."""
    with TieredStore(kvc_config(tmp_path, disk_path=None)) as s:
        ha, pa = make_pages(NS, list(range(12)))
        assert s.put_pages(NS, pa[:2]).stored == 2
        assert metric(s, "kvc_store_bytes_total", tier="cpu") == 2 * SPEC.page_bytes
        res = s.put_pages(NS, [pa[1], pa[2]])  # one duplicate, one new
        assert (res.stored, res.duplicate) == (1, 1)
        assert metric(s, "kvc_store_bytes_total", tier="cpu") == 3 * SPEC.page_bytes


def test_lookup_from_a_held_page_equals_the_whole_lookup_from_there(tmp_path):
    """lookup_from(parent, run) answers for a run hanging from a page the caller holds: the same
    tiers as the whole prompt's lookup from that page on; a wrong parent or tokens end the run."""
    with TieredStore(kvc_config(tmp_path, disk_path=None)) as s:
        toks = list(range(4 * 10))
        ha, pa = make_pages(NS, toks)
        s.put_pages(NS, pa[:8])
        raw = hashing.tokens_bytes(toks)
        whole = s.lookup(NS, tokens=toks).located
        assert whole == ["cpu"] * 8
        for k in (1, 5, 7, 8):
            got = s.lookup_from(NS, ha[k - 1], ha[k:], raw[16 * k:])
            assert got == whole[k:], k
        assert s.lookup_from(NS, NS.root, ha, toks) == whole  # from the root: the plain lookup
        assert s.lookup_from(NS, ha[3], ha[5:], raw[16 * 5:]) == []  # page 5's parent is ha[4]
        bad = bytearray(raw[16 * 4:])
        bad[20] ^= 1  # a token of page 5
        assert s.lookup_from(NS, ha[3], ha[4:], bytes(bad)) == ["cpu"]
        with pytest.raises(ValueError, match="token ids for"):
            s.lookup_from(NS, ha[3], ha[4:], raw[16 * 4:16 * 5])


@contextlib.contextmanager
def store_with_a_chain(tmp_path):
    """A store whose cpu tier holds 20 pages (watermarks 0.9 / 0.4) with chain A's 18 pages in it,
    and chain B's 10 pages to put next: (store, A's hashes, A's pages, B's hashes, B's pages)."""
    page = SPEC.page_bytes
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=20 * page / (1 << 30), high_watermark=0.9, low_watermark=0.4)
    with TieredStore(cfg) as s:
        ha, pa = make_pages(NS, list(range(4 * 18)))
        hb, pb = make_pages(NS, list(range(1000, 1000 + 4 * 10)))
        s.put_pages(NS, pa)
        yield s, ha, pa, hb, pb


@pytest.mark.parametrize("native", [True, False])
def test_a_batch_of_demotions_writes_every_record_whole(tmp_path, monkeypatch, native):
    """An eviction batch's records are built in one buffer by one native copy (the per-record
    copy where it does not build), before the freed slots take the new pages: every demoted page
    reads back from disk equal to what was put."""
    from kvc import pagecopy
    if native and pagecopy.library() is None:
        pytest.skip("the native put path does not build here")
    if not native:
        monkeypatch.setattr(pagecopy, "library", lambda cc=None: None)
    with store_with_a_chain(tmp_path) as (s, ha, pa, hb, pb):
        sizes, real = [], s._records_steps
        s._records_steps = lambda items: (sizes.append(len(items)), real(items))[1]
        s.put_pages(NS, pb)  # one batch demotes A's oldest pages down to the low watermark
        s.flush()
        assert max(sizes) >= 8, sizes
        assert metric(s, "kvc_evictions_total", tier="cpu", reason="capacity") >= 8
        assert s.disk.pages >= 8
        got = s.get_pages(NS, ha)
        assert len(got) == 18 and all(torch.equal(g.data, p.data) for g, p in zip(got, pa))
        got = s.get_pages(NS, hb)
        assert len(got) == 10 and all(torch.equal(g.data, p.data) for g, p in zip(got, pb))


def test_demotions_build_no_records_the_disk_writer_would_refuse(tmp_path):
    """With the disk writer's backlog full (it writes slower than the puts demote), a demotion
    builds records only for the pages the backlog still takes: the others are counted as refused
    (kvc_store_pages_total{tier="disk", result="backlog_full"}) and dropped from the cpu tier
    without a copy of their bytes (what the writer took reads back as before: the test above)."""
    import threading

    from kvc.record import record_len
    from kvc.store import key
    opened = threading.Event()
    with store_with_a_chain(tmp_path) as (s, ha, pa, hb, pb):
        s.set_write_gate(lambda: opened.wait(10))
        e = next(iter(s.cpu.entries.values()))
        rec = record_len(e.tokens, e.dtype, e.shape, e.nbytes)
        s.disk.max_backlog_bytes = 3 * rec + rec // 2  # room for three records
        built, real = [], s._records_steps
        s._records_steps = lambda items: (built.append(len(items)), real(items))[1]
        s.put_pages(NS, pb)  # demotes A's oldest pages down to the low watermark: more than three
        evicted = metric(s, "kvc_evictions_total", tier="cpu", reason="capacity")
        refused = metric(s, "kvc_store_pages_total", tier="disk", result="backlog_full")
        assert evicted >= 8 and sum(built) == 3 and refused == evicted - 3, (built, evicted, refused)
        opened.set()
        s.flush()
        assert s.disk.pages == 3
        assert sum(s.disk.get(key(NS.root, h)) is not None for h in ha) == 3  # the pages taken


@pytest.mark.parametrize("native", [True, False], ids=["native", "no-compiler"])
def test_demotions_let_go_of_the_store_lock_between_chunks(tmp_path, monkeypatch, native):
    """A put into a full cpu tier demotes DEMOTE_CHUNK pages per hold of the store lock and calls
    its pause between holds with the lock free, so a load waits for one chunk's records, not the
    whole batch's (runs BT / BU: a 32K cpu hit waited 117-145 ms behind ~1,000 pages of records
    built under the lock). The pages evicted, and what reads back, are as with one batch; and so
    where no compiler builds the native copies (the records built in Python paused nowhere)."""
    import threading

    from kvc import pagecopy
    from kvc import store as store_mod
    monkeypatch.setattr(store_mod, "DEMOTE_CHUNK", 4, raising=False)
    if not native:
        monkeypatch.setattr(pagecopy, "library", lambda cc=None: None)
    with store_with_a_chain(tmp_path) as (s, ha, pa, hb, pb):
        sizes = count_demotions(s)
        lock_free = []

        def pause():  # another thread (a load) can take the store's lock here
            got = []

            def take():
                got.append(s._lock.acquire(blocking=False))
                if got[-1]:
                    s._lock.release()
            t = threading.Thread(target=take)
            t.start()
            t.join()
            lock_free.append((sum(sizes), got[0]))
        s.put_pages(NS, pb, pause=pause)
        s.flush()
        # 18 of 20 pages held: the 3rd page of B finds the tier full and the batch goes down to the
        # low watermark, 8 pages: 13 of A's pages, its tail first (deepest first in the LRU)
        assert sizes == [4, 4, 4, 1], sizes
        # a pause after the checks, after each chunk's records' copy (a one-page chunk's record is
        # built in place: no copy to pause after) and after the checksums and slab copies
        assert [n for n, _ in lock_free] == [0, 4, 8, 12, 13] and all(free for _, free in lock_free), lock_free
        assert set(s.cpu.entries) == set(keys(*ha[:5], *hb))
        assert metric(s, "kvc_evictions_total", tier="cpu", reason="capacity") == 13
        got = s.get_pages(NS, ha)
        assert len(got) == 18 and all(torch.equal(g.data, p.data) for g, p in zip(got, pa))


def test_offering_held_pages_to_a_full_tier_demotes_nothing(tmp_path):
    page = SPEC.page_bytes
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=8 * page / (1 << 30), high_watermark=0.9, low_watermark=0.4)
    with TieredStore(cfg) as s:
        _, pa = make_pages(NS, list(range(4 * 8)))
        s.put_pages(NS, pa)
        before = list(s.cpu.entries)
        assert len(before) == 8  # full
        res = s.put_pages(NS, pa)
        assert res.duplicate == 8 and list(s.cpu.entries) == before
        assert metric(s, "kvc_evictions_total", tier="cpu", reason="capacity") == 0


@pytest.mark.parametrize("native", [True, False])
def test_cluster_writer_records_are_built_together_and_decode_to_the_pages(tmp_path, monkeypatch, native):
    """The cluster writer asks for a batch's records in one call: each decodes (checksum included)
    to the page that was put, and a page no longer in the cpu tier gives None in its place."""
    from kvc import pagecopy
    from kvc.record import decode
    if native and pagecopy.library() is None:
        pytest.skip("the native put path does not build here")
    if not native:
        monkeypatch.setattr(pagecopy, "library", lambda cc=None: None)
    with TieredStore(kvc_config(tmp_path, disk_path=None)) as s:
        ha, pa = make_pages(NS, list(range(4 * 6)))
        s.put_pages(NS, pa)
        s.delete(NS, ha[4:5])
        recs = s._cluster_records([(NS.root, h) for h in ha] + [(NS.root, b"\x07" * 16)])
        assert [r is None for r in recs] == [False] * 4 + [True, False, True]
        for rec, page in zip(recs[:4] + recs[5:6], pa[:4] + pa[5:6]):
            info, got = decode(bytes(rec))
            assert info.hash == page.hash and info.parent == page.parent
            assert torch.equal(got.data, page.data)


@pytest.mark.parametrize("cfg", [{"disk_write": "through"}, {"cpu_memory_size_GB": 0}])
def test_write_through_and_disk_only_records_read_back_whole(tmp_path, cfg):
    """Pages that go to disk as a put lands (write-through, or no cpu tier) have their records built
    for the whole put_pages call at once: a new store on the same disk reads every page back equal."""
    ha, pa = make_pages(NS, list(range(4 * 12)))
    with TieredStore(kvc_config(tmp_path, **cfg)) as s:
        assert s.put_pages(NS, pa[:7]).stored == 7
        assert s.put_pages(NS, pa[7:]).stored == 5
        s.flush()
        assert s.disk.pages == 12
    with TieredStore(kvc_config(tmp_path, **cfg)) as s:
        got = s.get_pages(NS, ha)
        assert len(got) == 12 and all(torch.equal(g.data, p.data) for g, p in zip(got, pa))


@pytest.mark.parametrize("cfg", [{"disk_write": "through"}, {"cpu_memory_size_GB": 0}])
def test_a_put_publishes_in_groups_in_order(tmp_path, monkeypatch, cfg):
    """A put's pages are committed and offered PUBLISH_GROUP at a time (groups of 3 here: 3, 3, 1,
    the last one's record built alone): every page lands once, parents before children across the
    groups, the cpu tier counts each stored page's bytes once, and the disk reads them back whole."""
    from kvc import store as store_mod
    monkeypatch.setattr(store_mod, "PUBLISH_GROUP", 3)
    ha, pa = make_pages(NS, list(range(4 * 7)))
    with TieredStore(kvc_config(tmp_path, **cfg)) as s:
        before = s._m_cpu_stored._value.get()
        r = s.put_pages(NS, pa)
        assert (r.stored, r.duplicate, r.rejected) == (7, 0, 0)
        cpu = 7 * SPEC.page_bytes if s.cpu.capacity else 0
        assert s._m_cpu_stored._value.get() - before == cpu
        assert s.put_pages(NS, pa).duplicate == 7
        s.flush()
        assert s.disk.pages == 7
    with TieredStore(kvc_config(tmp_path, **cfg)) as s:
        got = s.get_pages(NS, ha)
        assert len(got) == 7 and all(torch.equal(g.data, p.data) for g, p in zip(got, pa))


def test_get_into_a_host_buffer_equals_get_pages_and_stops_at_a_corrupt_page(tmp_path):
    """get_into (the engine's load: bytes and a count, no Page objects) lands what get_pages
    returns, calls landed once for the rows that landed, and ends at a page that fails its sum."""
    with TieredStore(kvc_config(tmp_path, disk_path=None)) as s:
        hashes, pages = make_pages(NS, list(range(40)))
        s.put_pages(NS, pages)
        out = torch.zeros((len(hashes), *SPEC.shape))
        seen = []
        assert s.get_into(NS, hashes, out, lambda lo, hi: seen.append((lo, hi))) == len(hashes)
        assert seen == [(0, len(hashes))]
        assert all(torch.equal(out[i], pages[i].data) for i in range(len(hashes)))
        s.cpu.view(NS.root + hashes[6])[3] ^= 0x10
        assert s.get_into(NS, hashes, out.zero_()) == 6
        with pytest.raises(ValueError, match="out must be"):
            s.get_into(NS, hashes, torch.zeros((2, *SPEC.shape)))


def test_first_none_finds_the_first_missing_entry_by_identity():
    """The lookup's search for a column's first missing page: the index of the first None in
    col[:n], or n; it never compares entries with == (an Entry whose __eq__ would say it equals
    None must not count as missing)."""
    from kvc.store import _first_none

    class EqualsAnything:
        def __eq__(self, other):
            return True

    e = EqualsAnything()
    assert _first_none([e, e, None, e, None], 5) == 2
    assert _first_none([e, e, e], 3) == 3
    assert _first_none([e, None], 1) == 1  # only col[:n] is searched
    assert _first_none([None, e], 2) == 0
    assert _first_none([], 0) == 0


def test_keys_of_equals_key_per_page_for_any_buffer():
    """The bulk tier keys equal key(root, bytes(h)) page by page, for hashes given as bytes,
    bytearray or memoryview (a client's decoded hashes), and are bytes."""
    from kvc.store import key, keys_of
    root = bytes(range(16))
    hs = [bytes([i] * 16) for i in range(5)]
    mixed = [hs[0], bytearray(hs[1]), memoryview(hs[2]), hs[3], bytearray(hs[4])]
    for given in (hs, mixed, []):
        got = keys_of(root, given)
        assert got == [key(root, bytes(h)) for h in given]
        assert all(type(k) is bytes for k in got)


class _Done:  # a layered get's last event, already passed (the verdict's bookkeeping is what is tested)
    def synchronize(self):
        pass


def test_a_layered_gets_verdict_survives_pages_deleted_or_stored_again_meanwhile(tmp_path):
    """finish_layers runs after the store's lock was let go (the copies were only queued): an admin
    delete may drop a page of the run meanwhile, and a put may store it again in a new slot. The
    verdict then neither fails (its LRU touches and its corrupt-page drop skip a missing page) nor
    drops the new, good copy of a page whose old slot failed its checksum; a page still the one
    read is dropped as before."""
    from kvc.store import LayeredGet, keys_of
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=4 / 1024, disk_path=None)) as s:
        hashes, pages = make_pages(NS, list(range(4 * 6)))
        s.put_pages(NS, pages)
        keys = keys_of(NS.root, hashes)

        def started(bad, n=6):
            flags = torch.zeros(n, dtype=torch.bool)
            flags[bad] = True
            return LayeredGet(keys[:n], n, torch.device("cpu"), [s.cpu.entries[k] for k in keys[:n]],
                              flags=flags, done=_Done())
        got = started(2)
        s.delete(NS, [hashes[2], hashes[4]])  # page 2's slot failed; page 4 is gone before the touches
        assert s.put_pages(NS, [pages[2]]).stored == 1  # and page 2 stored again, a new entry
        assert s.finish_layers(got) == 2
        assert s.cpu.get(keys[2]) is not None and s.cpu.get(keys[4]) is None
        assert s.finish_layers(started(3, n=4)) == 3  # nothing changed meanwhile: the bad page is dropped
        assert s.cpu.get(keys[3]) is None
        assert not s._reading


def test_a_layered_gets_verdict_is_handed_out_before_its_bookkeeping(tmp_path):
    """on_verdict gets the count as soon as it is known: the run's pages are still marked as read
    and a corrupt page is still in the tier then; after the return both are done."""
    from kvc.store import LayeredGet, keys_of
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=4 / 1024, disk_path=None)) as s:
        hashes, pages = make_pages(NS, list(range(4 * 6)))
        s.put_pages(NS, pages)
        keys = keys_of(NS.root, hashes)
        flags = torch.zeros(6, dtype=torch.bool)
        flags[4] = True
        got = LayeredGet(keys, 6, torch.device("cpu"), [s.cpu.entries[k] for k in keys], flags=flags, done=_Done())
        for k in keys:
            s._reading[k] = s._reading.get(k, 0) + 1  # as start_layers_into marks them
        seen = []

        def verdict(n):
            seen.append((n, len(s._reading), s.cpu.get(keys[4]) is not None))
        assert s.finish_layers(got, on_verdict=verdict) == 4
        assert seen == [(4, 6, True)]
        assert not s._reading and s.cpu.get(keys[4]) is None


def test_record_len_is_the_size_of_the_record_pack_header_starts():
    """record_len (a demotion's check of the disk backlog) says what pack_header + payload make."""
    import numpy as np

    from kvc.record import pack_header, record_len
    for tokens, dtype, shape, n in [(np.arange(4, dtype="<u4").tobytes(), "float32", (2, 2, 4, 2, 4), 512),
                                    (np.arange(16, dtype="<u4").tobytes(), "bfloat16", (12, 2, 16, 4, 128), 393216)]:
        head = pack_header(b"r" * 16, b"h" * 16, b"p" * 16, 7, tokens, dtype, shape, n)
        assert record_len(tokens, dtype, shape, n) == len(head) + n


def test_a_disk_read_does_not_hold_the_store_lock(tmp_path, monkeypatch):
    """A get that reads pages from disk (a slow device, or many pages) leaves the store's lock free
    while the disk is read: another client's put and lookup go on meanwhile (the
    shared service: one engine's disk hit must not stall every other engine's puts and hits), and
    the read pages come back whole."""
    import threading
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=0)) as s:
        ha, pa = make_pages(NS, list(range(16)))
        assert s.put_pages(NS, pa).stored == 4
        s.flush()
        assert s.lookup(NS, hashes=ha).located == ["disk"] * 4
        reading, release = threading.Event(), threading.Event()
        real = s.disk._read_group

        def slow_read(*args, **kw):  # the disk read blocks until the test lets it go
            reading.set()
            assert release.wait(10)
            return real(*args, **kw)
        monkeypatch.setattr(s.disk, "_read_group", slow_read)
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("pages", s.get_pages(NS, ha)))
        t.start()
        try:
            assert reading.wait(10)
            hb, pb = make_pages(NS, list(range(100, 108)), seed=3)
            done = threading.Event()
            other = threading.Thread(target=lambda: (s.put_pages(NS, pb), s.lookup(NS, hashes=hb), done.set()))
            other.start()
            assert done.wait(5), "a put and a lookup waited for another client's disk read"
            other.join()
        finally:
            release.set()
            t.join(10)
        assert [p.hash for p in got["pages"]] == ha
        assert all(torch.equal(g.data, p.data) for g, p in zip(got["pages"], pa))


def test_disk_reads_beside_puts_and_evictions_return_right_bytes_or_stop(tmp_path):
    """With the disk read outside the store's lock, pages can be evicted or promoted between the
    run's planning and its read: a get then ends early (a shorter hit), and every page it returns
    is the page asked for, byte for byte."""
    import threading
    # a cpu tier of 16 pages and a disk of ~32: chains 0-3 start on disk, and every get promotes
    # (demoting others) while the writer's puts evict from both tiers
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=8 / 2**20, disk_size_GB=1 / 1024)) as s:
        chains = [make_pages(NS, list(range(1000 * c, 1000 * c + 32)), seed=c) for c in range(6)]
        want = {p.hash: p.data for _, ps in chains for p in ps}
        for _, ps in chains:
            s.put_pages(NS, ps)
        s.flush()
        assert all(s.lookup(NS, hashes=chains[c][0]).located == ["disk"] * 8 for c in range(3))
        errors, stop = [], threading.Event()

        def reader(c: int) -> None:
            hs = chains[c][0]
            while not stop.is_set():
                try:
                    for p in s.get_pages(NS, hs):
                        if not torch.equal(p.data, want[p.hash]):
                            errors.append(f"wrong bytes for {p.hash.hex()}")
                except Exception as e:  # noqa: BLE001 - any error is the finding
                    errors.append(repr(e))

        def writer() -> None:
            for r in range(40):
                _, ps = make_pages(NS, list(range(50000 + 100 * r, 50000 + 100 * r + 32)), seed=100 + r)
                want.update({p.hash: p.data for p in ps})
                s.put_pages(NS, ps)
        threads = [threading.Thread(target=reader, args=(c,)) for c in range(3)]
        for t in threads:
            t.start()
        writer()
        stop.set()
        for t in threads:
            t.join(10)
        assert not errors, errors[:3]
        assert metric(s, "kvc_transfer_bytes_total", src="disk", dst="cpu") > 0


def test_a_disk_hit_into_a_full_cpu_tier_demotes_in_chunks(tmp_path, monkeypatch):
    """A get that promotes disk pages into a full cpu tier makes room as a put does: DEMOTE_CHUNK
    pages per hold of the store lock, before its disk read, not one batch down to the low watermark
    under the lock at the first promotion. What reads back is the same."""
    from kvc import store as store_mod
    with store_with_a_chain(tmp_path) as (s, ha, pa, hb, pb):
        s.put_pages(NS, pb)  # A's tail goes to disk: A[:5] and B in the cpu tier (15 of 20)
        s.flush()
        hc, pc = make_pages(NS, list(range(2000, 2000 + 4 * 5)))
        s.put_pages(NS, pc)  # full: 20 of 20
        s.flush()
        assert len(s.cpu.entries) == 20 and s.lookup(NS, hashes=ha).located[5:] == ["disk"] * 13
        monkeypatch.setattr(store_mod, "DEMOTE_CHUNK", 4, raising=False)
        sizes = count_demotions(s)
        got = s.get_pages(NS, ha)
        assert len(got) == 18 and all(torch.equal(g.data, p.data) for g, p in zip(got, pa))
        assert sizes and max(sizes) <= 4, sizes


def drive_started(steps, between):
    """Drive a store generator as an engine's thread does: each piece of byte work started (a
    native thread where the library builds) and polled; between() runs while it is in flight."""
    send = None
    while True:
        try:
            work = steps.send(send)
        except StopIteration as stop:
            return stop.value
        send = None
        if work is not None:
            pending = work.start()
            between()
            while not pending.done():
                between()
            send = pending.result()


def test_puts_with_started_byte_work_store_what_the_blocking_put_stores(tmp_path):
    """put_steps with its copies on native threads, other threads' lookups and gets running while
    each copy is in flight, into a full tier that demotes chunk by chunk: the same pages end in the
    same tiers as with put_pages, and every page reads back equal."""
    results = []
    for started in (False, True):
        with store_with_a_chain(tmp_path / str(started)) as (s, ha, pa, hb, pb):
            reads = []

            def between():
                got = s.get_pages(NS, hb[:2])  # hits or misses, never wrong bytes
                reads.append(all(torch.equal(g.data, p.data) for g, p in zip(got, pb)))
                s.lookup(NS, hashes=ha)
            if started:
                res = drive_started(s.put_steps(NS, pb), between)
            else:
                res = s.put_pages(NS, pb)
            s.flush()
            assert all(reads)
            located = (s.lookup(NS, hashes=ha).located, s.lookup(NS, hashes=hb).located)
            results.append((res.stored, located, sorted(s.cpu.entries)))
            assert s.cpu.used == len(s.cpu.entries) * SPEC.page_bytes  # every detached slot given back
            got = s.get_pages(NS, ha)
            assert len(got) == 18 and all(torch.equal(g.data, p.data) for g, p in zip(got, pa))
            got = s.get_pages(NS, hb)
            assert len(got) == 10 and all(torch.equal(g.data, p.data) for g, p in zip(got, pb))
    assert results[0] == results[1]


def test_slab_and_block_runs_split_where_slots_or_ids_stop_being_adjacent():
    """The runs a CUDA get copies in (numpy): a new run wherever the next page's slab slot is not
    the next slot, or (into pool blocks) its block id not the next id; checked against a walk."""
    import random

    class E:
        def __init__(self, slot):
            self.slot = slot

    def walk(slots, ids, nbytes, lo, hi):
        runs, i = [], lo
        while i < hi:
            j = i + 1
            while j < hi and slots[j] == slots[j - 1] + nbytes and (ids is None or ids[j] == ids[j - 1] + 1):
                j += 1
            runs.append((i, j))
            i = j
        return runs
    r = random.Random(3)
    for _ in range(300):
        n = r.randrange(0, 30)
        slots, ids, s, b = [], [], 0, 4
        for _ in range(n):
            s += 16 if r.random() < 0.8 else r.choice([32, 48, -64])
            b += 1 if r.random() < 0.8 else r.choice([2, -3, 9])
            slots.append(s)
            ids.append(b)
        held = [E(x) for x in slots]
        lo = r.randrange(0, n + 1)
        hi = r.randrange(lo, n + 1)
        assert TieredStore._slab_runs(held, 16, lo, hi) == walk(slots, None, 16, lo, hi)
        assert TieredStore._slab_runs(held, 16, lo, hi, ids) == walk(slots, ids, 16, lo, hi)
