"""KVCache: the engine's device tier. Owns the DevicePool and maps requests to pages in it.

Page hashes follow hash spec v1 under a namespace per cache salt. A page is registered in the
pool's hash map (and so becomes a prefix hit for others) only after the step that computed it.
"""
from __future__ import annotations

import torch

from kvc.device_pool import DevicePool
from kvc.hashing import Namespace, PageSpec, page_hashes, tokens_bytes

from .request import Request


class KVCache:
    def __init__(self, spec: PageSpec, num_blocks: int, device: torch.device, architecture: str,
                 weights_digest: str):
        self.pool = DevicePool(spec, num_blocks, device)
        self.blocks = self.pool.blocks
        self.page_size = spec.page_size
        self._architecture, self._digest, self.spec = architecture, weights_digest, spec
        self._ns: dict[str, Namespace] = {}

    def namespace(self, salt: str) -> Namespace:
        ns = self._ns.get(salt)
        if ns is None:
            ns = self._ns[salt] = Namespace(self._architecture, self.spec, self._digest, "", salt)
        return ns

    def update_hashes(self, req: Request) -> None:
        """Extend req.hashes to every full page of its tokens."""
        P = self.page_size
        full = req.num_tokens // P
        if len(req.hashes) < full:
            start = len(req.hashes)
            parent = req.hashes[-1] if start else self.namespace(req.cache_salt).root
            req.hashes += page_hashes(parent, req.ids(start * P, full * P), P)

    def parent(self, req: Request, page: int) -> bytes:
        return req.hashes[page - 1] if page else self.namespace(req.cache_salt).root

    def page_tokens(self, req: Request, page: int) -> bytes:
        P = self.page_size
        return tokens_bytes(req.ids(page * P, (page + 1) * P))

    def match(self, req: Request, max_pages: int) -> list[int]:
        """Device blocks holding the request's first pages (at most max_pages); not yet referenced."""
        self.update_hashes(req)
        n = min(max_pages, len(req.hashes))
        P = self.page_size
        raw = tokens_bytes(req.ids(0, n * P))  # packed once, sliced per page
        step = 4 * P
        return self.blocks.match_prefix(req.hashes[:n], [self.parent(req, i) for i in range(n)],
                                        [raw[i * step:(i + 1) * step] for i in range(n)])

    def blocks_needed(self, req: Request, num_new: int) -> int:
        P = self.page_size
        return max(0, (req.num_computed + num_new + P - 1) // P - len(req.block_table))

    def grow(self, req: Request, n: int) -> bool:
        """Allocate n more blocks for req; False (nothing changed) when the pool is short."""
        if n == 0:
            return True
        got = self.blocks.allocate(n)
        if got is None:
            return False
        req.block_table += got
        return True

    def free(self, req: Request) -> None:
        self.blocks.free(req.block_table)
        req.block_table = []

    def register_full_pages(self, req: Request) -> list[int]:
        """Register pages that became full and computed; returns their page indices."""
        self.update_hashes(req)
        done = min(req.num_computed // self.page_size, len(req.hashes))
        new = list(range(req.num_registered, done))
        for i in new:
            self.blocks.cache_block(req.block_table[i], req.hashes[i], self.parent(req, i), self.page_tokens(req, i))
        req.num_registered = max(req.num_registered, done)
        return new
