"""The device tier: a block pool (ids, ref counts, hash map, LRU free queue) and the KV tensors.

BlockPool knows nothing of tensors, requests or tiers. Eviction policy is the order of the free
queue: blocks are freed tail-first, so the deepest page of a chain is evicted before its parent;
a freed block that holds no page (a partial last page, a decode's, one forgotten by reset_cache)
goes to the front, so it is handed out before any cached page is evicted, and blocks so freed come
back in sequence order (a prompt's pages then lie on consecutive block ids where they can, which
the attention kernels read as one slice or as TMA boxes).
DevicePool holds the per-layer K and V tensors and moves whole pages in and out with one
batched gather or scatter per direction.
"""
from __future__ import annotations

from collections import OrderedDict
from itertools import islice
from typing import Sequence

import torch

from . import pinned
from .hashing import PageSpec
from .record import torch_dtype


# A cached block's record: a plain tuple (hash, parent, tokens as little-endian uint32 bytes). The
# cyclic GC untracks a tuple of bytes at its first collection, so the records of a large pool add
# nothing to later collections (kvc.gcfree), and a tuple is cheaper to build than a dataclass with
# an explicit untrack (a 32K-token load registers 2,048 at once).
HASH, PARENT, TOKENS = 0, 1, 2


class BlockPool:
    def __init__(self, num_blocks: int):
        assert num_blocks > 0, "a block pool needs at least one block"
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self._cached: dict[int, tuple[bytes, bytes, bytes]] = {}  # block -> (hash, parent, tokens)
        # Records dropped so far (evictions, forgotten pages). A block's record changes only by being
        # dropped and then replaced, so while this count stands every record read earlier still holds
        # (a remembered match skips comparing its 2,048 records then: engine.prefix_cache).
        self.forgotten = 0

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

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
        h2b, cached, n = self.hash_to_block, self._cached, 0
        k = min(len(blocks), len(hashes), len(parents), len(tokens))
        if k != len(blocks) or k != len(hashes):
            blocks, hashes = blocks[:k], hashes[:k]
        if (len(set(hashes)) == k and len(set(blocks)) == k and not any(map(h2b.__contains__, hashes))
                and not any(map(cached.__contains__, blocks))):
            h2b.update(zip(hashes, blocks))
            cached.update(zip(blocks, zip(hashes, parents, tokens)))
            return k
        for b, h, p, t in zip(blocks, hashes, parents, tokens):
            if h in h2b or b in cached:
                continue
            h2b[h] = b
            cached[b] = (h, p, t)
            n += 1
        return n

    def _uncache(self, b: int) -> None:
        c = self._cached.pop(b, None)
        if c is not None:
            del self.hash_to_block[c[HASH]]
            self.forgotten += 1

    def reset_cache(self) -> int:
        """Forget every cached hash of unreferenced blocks; returns how many were dropped. They now
        hold nothing: to the free queue's front, in ascending block order."""
        dropped = [b for b in self._cached if self.ref_count[b] == 0]  # O(cached), not O(pool)
        for b in dropped:
            self._uncache(b)
        front = self.free_queue.move_to_end
        for b in sorted(dropped, reverse=True):
            front(b, last=False)
        return len(dropped)


class DevicePool:
    """KV tensors for all layers: kv[layer, part] is [num_blocks, page_size, kv_heads, head_dim]."""

    def __init__(self, spec: PageSpec, num_blocks: int, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        L, parts, P, H, D = spec.shape
        self.kv = torch.zeros((L, parts, num_blocks, P, H, D), dtype=torch_dtype(spec.dtype), device=self.device)
        self.blocks = BlockPool(num_blocks)

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
