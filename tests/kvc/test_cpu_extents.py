"""The cpu tier's extents and slot index under hostile or mixed page sizes (issue 13)."""
import time
import tracemalloc

from kvc.hashing import Namespace, PageSpec
from kvc.store import TieredStore

from .conftest import kvc_config, make_pages

MiB = 1 << 20
A = Namespace("a", PageSpec(num_layers=4, num_kv_heads=4, head_dim=32, page_size=16, dtype="float32"))  # 64 KiB
B = Namespace("b", PageSpec(num_layers=4, num_kv_heads=4, head_dim=64, page_size=16, dtype="float32"))  # 128 KiB
TINY = Namespace("t", PageSpec(num_layers=1, num_kv_heads=1, head_dim=1, page_size=1, dtype="uint8", kv_parts=1))


def cfg(tmp_path, mib, **kw):
    return kvc_config(tmp_path, cpu_memory_size_GB=mib * MiB / (1 << 30), **kw)


def test_tiny_pages_cost_memory_per_page_not_per_slot(tmp_path):
    with TieredStore(cfg(tmp_path, 8, disk_path=None)) as s:
        _, pages = make_pages(TINY, [1, 2])  # two 1-byte pages
        tracemalloc.start()
        t0 = time.perf_counter()
        assert s.put_pages(TINY, pages).stored == 2
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 * MiB and elapsed < 0.5, (peak, elapsed)
        assert len(s.get_pages(TINY, [p.hash for p in pages])) == 2


def test_another_page_size_does_not_demote_a_small_tier(tmp_path):
    with TieredStore(cfg(tmp_path, 16)) as s:  # 16 MiB: 8 extents of 2 MiB
        ha, pa = make_pages(A, list(range(32 * 16)))  # 32 pages of 64 KiB: one extent
        assert s.put_pages(A, pa).stored == 32
        _, pb = make_pages(B, list(range(16)))
        assert s.put_pages(B, pb).stored == 1
        assert s.lookup(A, hashes=ha).located == ["cpu"] * 32  # nothing of A was demoted


def test_pinned_pages_of_one_size_leave_room_for_others(tmp_path):
    with TieredStore(cfg(tmp_path, 16, disk_path=None)) as s:
        ha, pa = make_pages(A, list(range(128 * 16)))  # 8 MiB of A, all pinned
        assert s.put_pages(A, pa).stored == 128
        assert s.pin(A, ha, ttl_s=600)
        for i in range(12):  # 12 MiB of B over time: the unpinned half of the tier serves it
            _, pb = make_pages(B, list(range(i * 128, (i + 1) * 128)), seed=i)
            assert s.put_pages(B, pb).stored == 8, i
        assert s.lookup(A, hashes=ha).num_pages == 128
