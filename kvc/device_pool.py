"""The device tier: a block pool (ids, ref counts, hash map, LRU free queue) and the KV tensors.

BlockPool knows nothing of tensors, requests or tiers. Eviction policy is the order of the free
queue: blocks are freed tail-first, so the deepest page of a chain is evicted before its parent;
a freed block that holds no page (a partial last page, a decode's, one forgotten by reset_cache)
goes to the front, so it is handed out before any cached page is evicted, and blocks so freed come
back in sequence order (a prompt's pages then lie on consecutive block ids where they can, which
the attention kernels read as one slice or as TMA boxes). The reference counts and the free queue
live in C (blockq.c, built at first use: a 32K-token hit touches and later frees 2,048 blocks) or,
where no compiler is, in a Python list and OrderedDict with the same order rules.
DevicePool holds the per-layer K and V tensors and moves whole pages in and out with one
batched gather or scatter per direction.
"""
from __future__ import annotations

import array
import ctypes
import logging
from collections import OrderedDict
from itertools import islice
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import native, pinned
from .hashing import PageSpec
from .record import torch_dtype

log = logging.getLogger("kvc.device_pool")


# A cached block's record: a plain tuple (hash, parent, tokens as little-endian uint32 bytes). The
# cyclic GC untracks a tuple of bytes at its first collection, so the records of a large pool add
# nothing to later collections (kvc.gcfree), and a tuple is cheaper to build than a dataclass with
# an explicit untrack (a 32K-token load registers 2,048 at once).
HASH, PARENT, TOKENS = 0, 1, 2


class BlockPool:
    """Block ids, reference counts, the free queue and the records of cached pages, in Python (a
    list and an OrderedDict): the path where no C compiler is, and the reference the C one
    (NativeBlockPool, blockq.c) is tested against. `BlockPool.create` picks the C one."""

    def __init__(self, num_blocks: int):
        self._init_records(num_blocks)
        self.ref_count = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @staticmethod
    def create(num_blocks: int) -> "BlockPool":
        """The C pool where blockq.c builds (a 32K-token hit's 2,048 blocks touched or freed in
        ~10-20 us instead of 0.1-0.3 ms of Python), else this one."""
        lib = _native_blockq()
        return BlockPool(num_blocks) if lib is None else NativeBlockPool(num_blocks, lib)

    def _init_records(self, num_blocks: int) -> None:
        assert num_blocks > 0, "a block pool needs at least one block"
        self.num_blocks = num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self._cached: dict[int, tuple[bytes, bytes, bytes]] = {}  # block -> (hash, parent, tokens)
        # Records dropped so far (evictions, forgotten pages). A block's record changes only by being
        # dropped and then replaced, so while this count stands every record read earlier still holds
        # (a remembered match skips comparing its 2,048 records then: engine.prefix_cache).
        self.forgotten = 0

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def free_order(self) -> list[int]:
        """The free blocks, the next one handed out first."""
        return list(self.free_queue)

    def block_hash(self, block: int) -> bytes | None:
        c = self._cached.get(block)
        return c[HASH] if c else None

    def match_prefix(self, hashes: Sequence[bytes], parents: Sequence[bytes], tokens: bytes) -> list[int]:
        """Blocks holding the longest prefix of `hashes` whose parent and tokens also match.

        `tokens`: the pages' token ids as little-endian uint32 bytes, back to back (at least
        len(hashes) pages). Done in bulk (dict lookups via map, one list compare for parents, one
        bytes compare for tokens); page by page only to find where a mismatch starts: a 32K-token
        prompt's 2,048 pages take ~0.1 ms instead of ~0.5."""
        blocks = list(map(self.hash_to_block.get, hashes))
        n = blocks.index(None) if None in blocks else len(blocks)
        if not n:
            return []
        held = list(map(self._cached.__getitem__, blocks[:n]))
        if [c[PARENT] for c in held] != list(parents[:n]):
            n = next(i for i, (c, p) in enumerate(zip(held, parents)) if c[PARENT] != p)
        step = len(held[0][TOKENS])
        if n and (len(tokens) < n * step or b"".join([c[TOKENS] for c in held[:n]]) != tokens[:n * step]):
            n = next((i for i, c in enumerate(held[:n]) if c[TOKENS] != tokens[i * step:(i + 1) * step]), n)
        return blocks[:n]

    def records(self, blocks: Sequence[int]) -> list:
        """Each block's cached record (None where it holds no page): what a remembered match
        compares to see that its blocks still hold the pages it matched (engine.prefix_cache)."""
        return list(map(self._cached.get, blocks))

    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on blocks (cached hits); a block at ref 0 leaves the free queue."""
        rc, free_queue = self.ref_count, self.free_queue
        for b in blocks:
            c = rc[b]
            if not c:
                del free_queue[b]
            rc[b] = c + 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks, evicting the least recently freed cached ones; None if too few are free."""
        free_queue = self.free_queue
        if n > len(free_queue):
            return None
        out = list(islice(free_queue, n))  # the oldest n, in order; then each one's state inline
        cached, h2b, rc = self._cached, self.hash_to_block, self.ref_count  # (a 32K-token load
        for b in out:                                                        # takes 2,048 at once)
            del free_queue[b]
            c = cached.pop(b, None)
            if c is not None:
                del h2b[c[HASH]]
                self.forgotten += 1
            rc[b] = 1
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop a reference on a request's blocks, given in sequence order.

        Cached blocks reaching ref 0 join the free queue's end tail-first, so a later allocation
        evicts the end of the sequence before its prefix. Those that hold no page go to its front
        (in sequence order): they are handed out before any cached page is evicted.
        """
        rc, free_queue, cached = self.ref_count, self.free_queue, self._cached  # (a 32K-token prompt
        front = free_queue.move_to_end                                          # frees 2,048)
        for b in reversed(blocks):
            c = rc[b] - 1
            if c < 0:
                raise AssertionError(f"block {b} freed more often than referenced")
            rc[b] = c
            if not c:
                free_queue[b] = None
                if b not in cached:
                    front(b, last=False)

    def cache_blocks(self, blocks: Sequence[int], hashes: Sequence[bytes], parents: Sequence[bytes],
                     tokens: Sequence[bytes]) -> int:
        """Register full, computed blocks under their hashes (a loaded or computed run of pages);
        a block whose hash (or the block itself) is already held is skipped. Returns how many registered.
        A run with none held (a load's pages, a prefill's new pages) goes in bulk, dict updates in C:
        a 32K-token load's 2,048 pages register after its step when the load ran layer by layer
        (probe_cpu_hit.py's commit rows: 1.0-1.5 ms on the H200 host, runs AG-AH)."""
        h2b, cached = self.hash_to_block, self._cached
        k = min(len(blocks), len(hashes), len(parents), len(tokens))
        if k != len(blocks) or k != len(hashes):
            blocks, hashes = blocks[:k], hashes[:k]
        if (len(set(hashes)) == k and len(set(blocks)) == k and not any(map(h2b.__contains__, hashes))
                and not any(map(cached.__contains__, blocks))):
            h2b.update(zip(hashes, blocks))
            cached.update(zip(blocks, zip(hashes, parents, tokens)))
            self._registered(blocks)
            return k
        done = []
        for b, h, p, t in zip(blocks, hashes, parents, tokens):
            if h in h2b or b in cached:
                continue
            h2b[h] = b
            cached[b] = (h, p, t)
            done.append(b)
        self._registered(done)
        return len(done)

    def _registered(self, blocks: Sequence[int]) -> None:
        """Blocks now hold a page: the C pool keeps a flag beside the records."""

    def reset_cache(self) -> int:
        """Forget every cached hash of unreferenced blocks; returns how many were dropped. They now
        hold nothing: to the free queue's front, in ascending block order."""
        dropped = self._unreferenced(list(self._cached))  # O(cached), not O(pool)
        cached, h2b = self._cached, self.hash_to_block
        for b in dropped:
            del h2b[cached.pop(b)[HASH]]
        self.forgotten += len(dropped)
        self._to_front(sorted(dropped, reverse=True))
        return len(dropped)

    def _unreferenced(self, blocks: list[int]) -> list[int]:
        return [b for b in blocks if self.ref_count[b] == 0]

    def _to_front(self, blocks: list[int]) -> None:
        """Free blocks that no longer hold a page to the queue's front, each in front of the one
        before it."""
        front = self.free_queue.move_to_end
        for b in blocks:
            front(b, last=False)


class _BlockQ(ctypes.Structure):
    _fields_ = [("rc", ctypes.c_void_p), ("prev", ctypes.c_void_p), ("next", ctypes.c_void_p),
                ("cached", ctypes.c_void_p), ("n", ctypes.c_int64), ("num_free", ctypes.c_int64)]


def _ids(blocks: Sequence[int]) -> array.array:
    """Block ids as uint32 for blockq.c: array('I') converts a list of ints in C (~6 ns an id); a
    sequence that carries its ids as an array('I') in `u32` (an engine's block table) is taken
    as it is."""
    u = getattr(blocks, "u32", None)
    if u is not None:
        return u
    try:
        return array.array("I", blocks)
    except (OverflowError, TypeError) as e:
        raise IndexError(f"block ids must be ints in [0, 2**32): {e}") from None


class NativeBlockPool(BlockPool):
    """BlockPool with its reference counts and free queue in C (blockq.c: a linked list over block
    ids in numpy arrays this object owns); the hash map and the records stay Python dicts. The
    same order rules and results as BlockPool (tests/kvc/test_device_pool.py runs both, and a
    random sequence of calls on each)."""

    def __init__(self, num_blocks: int, lib):
        self._init_records(num_blocks)
        if num_blocks >= 2 ** 31 - 1:
            raise ValueError(f"{num_blocks} blocks: the C block pool takes fewer than 2**31 - 1")
        self.ref_count = np.zeros(num_blocks, np.int32)
        self._prev = np.empty(num_blocks + 1, np.int32)
        self._next = np.empty(num_blocks + 1, np.int32)
        self._flags = np.zeros(num_blocks, np.uint8)
        self._out = np.empty(num_blocks, np.uint32)  # allocate's scratch
        self._evicted = np.empty(num_blocks, np.uint32)
        self._out_p, self._evicted_p = self._out.ctypes.data, self._evicted.ctypes.data  # (~15 us a read)
        self._q = _BlockQ(self.ref_count.ctypes.data, self._prev.ctypes.data, self._next.ctypes.data,
                          self._flags.ctypes.data, num_blocks, 0)
        self._qp = ctypes.byref(self._q)
        self._pending: list[int] = []  # registered since the last flag-reading call (_marks)
        self._lib = lib
        lib.kvc_bq_init(self._qp)

    @property
    def num_free(self) -> int:
        return self._q.num_free

    def free_order(self) -> list[int]:
        out = np.empty(self._q.num_free, np.uint32)
        self._lib.kvc_bq_order(self._qp, out.ctypes.data)
        return out.tolist()

    def _call(self, fn, blocks: Sequence[int], marks: bool = False) -> int:
        a = _ids(blocks)  # (before the marks are taken: a refused id must not lose them)
        r = fn(self._qp, a.buffer_info()[0], len(a), *(self._marks() if marks else ()))
        if 0 <= r < len(a):
            raise IndexError(f"block {a[r]} is not in this pool of {self.num_blocks}")
        return r

    def _marks(self) -> tuple:
        """The blocks registered since the last call that reads the flags, for that call; taken."""
        m = self._pending
        if not m:
            return None, 0
        self._pending = []
        self._marks_buf = a = array.array("I", m)  # alive through the call
        return a.buffer_info()[0], len(a)

    def touch(self, blocks: Sequence[int]) -> None:
        if blocks:  # (a first C call after other work costs ~10 us on the 2-core VM)
            self._call(self._lib.kvc_bq_touch, blocks)

    def free(self, blocks: Sequence[int]) -> None:
        if not blocks:
            return
        r = self._call(self._lib.kvc_bq_free, blocks, marks=True)
        if r >= 0:
            raise AssertionError(f"block {blocks[r - len(blocks)]} freed more often than referenced")

    def allocate(self, n: int) -> list[int] | None:
        e = self._lib.kvc_bq_take(self._qp, n, self._out_p, self._evicted_p, *self._marks())
        if e < 0:
            if e == -2:
                raise ValueError(f"cannot allocate {n} blocks")
            return None
        if e:
            cached, h2b = self._cached, self.hash_to_block
            for b in self._evicted[:e].tolist():
                del h2b[cached.pop(b)[HASH]]
            self.forgotten += e
        return self._out[:n].tolist()

    def _registered(self, blocks: Sequence[int]) -> None:
        # set by the next call that reads the flags (a commit costs no call of its own); cleared by
        # an eviction (kvc_bq_take) or reset_cache (kvc_bq_to_front)
        self._pending += blocks

    def _unreferenced(self, blocks: list[int]) -> list[int]:
        ids = np.array(blocks, dtype=np.int64)
        return ids[self.ref_count[ids] == 0].tolist()

    def _to_front(self, blocks: list[int]) -> None:
        self._call(self._lib.kvc_bq_to_front, blocks, marks=True)


_blockq_libs: dict = {}


def _load_blockq(path):
    lib = ctypes.PyDLL(str(path))  # keeps the GIL: calls are microseconds, the pool has one owner
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name, args, res in (("kvc_bq_init", [p], None), ("kvc_bq_touch", [p, p, i64], i64),
                            ("kvc_bq_free", [p, p, i64, p, i64], i64), ("kvc_bq_take", [p, i64, p, p, p, i64], i64),
                            ("kvc_bq_to_front", [p, p, i64, p, i64], i64), ("kvc_bq_order", [p, p], None)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def _native_blockq():
    cc = native.compiler()
    return native.once(_blockq_libs, (cc, str(native.cache_dir())),
                       lambda: _load_blockq(native.build(Path(__file__).with_name("blockq.c"), "kvc_blockq", cc)),
                       log, "device pool: native block queue unavailable",
                       "reference counts and the free queue are kept in Python")


class DevicePool:
    """KV tensors for all layers: kv[layer, part] is [num_blocks, page_size, kv_heads, head_dim]."""

    def __init__(self, spec: PageSpec, num_blocks: int, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        L, parts, P, H, D = spec.shape
        self.kv = torch.zeros((L, parts, num_blocks, P, H, D), dtype=torch_dtype(spec.dtype), device=self.device)
        self.blocks = BlockPool.create(num_blocks)

    @staticmethod
    def blocks_for_budget(spec: PageSpec, budget_bytes: int) -> int:
        return max(1, budget_bytes // spec.page_bytes)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) views of one layer; for an MLA latent pool both are the same tensor."""
        kv = self.kv[layer]
        return kv[0], kv[-1]

    def gather(self, blocks: Sequence[int]) -> torch.Tensor:
        """Pages of `blocks` as one [n, layers, parts, page_size, heads, head_dim] device tensor: one
        index_select over the pool seen page-major (a gather into the pool's layout and then a
        permuted copy was two passes over the bytes: +8.9 / +10.3 ms of GPU time a 2.4 GB batch of
        offers in runs BD / BE's profiles, +5.5-5.8 ms with one pass in BF / BG)."""
        return torch.index_select(self.kv.permute(2, 0, 1, 3, 4, 5), 0, self.index(blocks))

    def index(self, blocks: Sequence[int]) -> torch.Tensor:
        """blocks as a long tensor on the pool's device (gather, scatter; a layered load's
        scatter_layers calls share one). On CUDA through pinned memory, non-blocking:
        a copy from pageable memory first waits for everything queued on the stream, which stalled
        the engine's thread at every offer (5.7% of its time in a saturating H200 run); and through
        a buffer the calling thread reuses (kvc.pinned), not one pinned per call."""
        return pinned.upload_ids(blocks, self.device)

    def scatter_layers(self, lo: int, hi: int, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Write layers lo..hi-1 of pages into the blocks of `index` in one launch: rows [hi - lo, n, parts, page_size,
        heads, head_dim] (layer-major, as a layered load lands them)."""
        L, parts, P, H, D = self.spec.shape
        assert 0 <= lo < hi <= L and tuple(rows.shape) == (hi - lo, len(index), parts, P, H, D), \
            f"layers {lo}..{hi} rows shape {tuple(rows.shape)} != {(hi - lo, len(index), parts, P, H, D)}"
        self.kv[lo:hi].index_copy_(2, index, rows.transpose(1, 2))

    def scatter(self, blocks: Sequence[int], pages: torch.Tensor) -> None:
        """Write pages [n, layers, parts, page_size, heads, head_dim] (any device) into `blocks`."""
        n = len(blocks)
        assert tuple(pages.shape) == (n, *self.spec.shape), \
            f"pages shape {tuple(pages.shape)} != {(n, *self.spec.shape)}"
        idx = self.index(blocks)
        src = pages.to(self.device, non_blocking=True).permute(1, 2, 0, 3, 4, 5)
        self.kv.index_copy_(2, idx, src)
