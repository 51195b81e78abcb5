"""Per-page records stay out of the cyclic GC: a full collection's cost must not grow with the
pages a store or a device pool holds (kvc.gcfree; the pool's records are plain tuples)."""
import gc

import numpy as np
import torch

from kvc.cpu_tier import Entry
from kvc.device_pool import BlockPool
from kvc.disk_tier import DiskEntry
from kvc.gcfree import untrack
from kvc.hashing import page_hashes
from kvc.record import Page
from kvc.store import TieredStore

from .conftest import NS, kvc_config


def test_records_are_untracked():
    assert not gc.is_tracked(Entry(b"r" * 16, b"p" * 16, b"t" * 16, "float32", (2, 3), 24, 7, 0))
    assert not gc.is_tracked(DiskEntry(b"r" * 16, b"p" * 16, b"t" * 16, 1, 100))
    pool = BlockPool(4)
    pool.cache_blocks([0], [b"h" * 16], [b"p" * 16], [b"t" * 16])
    gc.collect()  # a tuple of bytes is untracked at the first collection that sees it
    assert not gc.is_tracked(pool._cached[0])
    box = [1]
    untrack(box)  # the helper itself; the caller promises atomic contents
    assert not gc.is_tracked(box)


def tracked() -> int:
    gc.collect()
    return len(gc.get_objects())


def test_tracked_objects_do_not_grow_with_stored_pages(tmp_path):
    n = 2000
    P = NS.spec.page_size
    toks = np.arange(n * P, dtype=np.uint32) % 50_000
    hashes = page_hashes(NS.root, toks, P)
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=16 / 1024)) as s:
        pages, parent = [], NS.root
        for i, h in enumerate(hashes):
            pages.append(Page(h, parent, toks[i * P:(i + 1) * P], torch.zeros(NS.spec.shape)))
            parent = h
        before = tracked()
        for lo in range(0, n, 100):
            s.put_pages(NS, pages[lo:lo + 100])
        s.flush()
        assert len(s.cpu.entries) == n
        assert tracked() - before < n // 20  # one tracked Entry a page before
        pool = BlockPool(n)
        before = tracked()
        pool.cache_blocks(list(range(n)), hashes, [NS.root] + hashes[:-1],
                          [toks[i * P:(i + 1) * P].tobytes() for i in range(n)])
        assert tracked() - before < n // 20
        assert pool.match_prefix(hashes[:5], [NS.root] + hashes[:4], toks[:5 * P].tobytes()) == [0, 1, 2, 3, 4]
