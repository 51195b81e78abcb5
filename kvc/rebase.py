"""Client-side translation between a namespace's own hash chain and the service's tenant chain.

With bearer tokens, the service replaces a namespace's cache_salt with its tenant's salt, so
its page hashes chain from another root. RemoteCache keeps the engine unaware of that: it learns
pairs (client hash, service hash) from lookups and puts, and rebases pages before sending them.
A chain is the same token sequence from either root, so a page can be rebased when its parent
is the root or a hash already learned; other pages cannot be placed and are rejected.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import xxhash

from .hashing import tokens_bytes
from .record import Page

CAPACITY = 1 << 18  # pairs remembered (about 60 MB at most)


class Rebase:
    def __init__(self, client_root: bytes, service_root: bytes, capacity: int = CAPACITY):
        self.client_root, self.service_root = client_root, service_root
        self.capacity = capacity
        self._c2s: OrderedDict[bytes, bytes] = OrderedDict()
        self._s2c: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Pairs remembered."""
        return len(self._c2s)

    def learn(self, client_hashes: Sequence[bytes], service_hashes: Sequence[bytes]) -> None:
        with self._lock:
            for c, s in zip(client_hashes, service_hashes):
                self._c2s[c] = s
                self._c2s.move_to_end(c)
                self._s2c[s] = c
            while len(self._c2s) > self.capacity:
                _, s = self._c2s.popitem(last=False)
                self._s2c.pop(s, None)

    def to_service(self, hashes: Sequence[bytes]) -> list[bytes]:
        """The service's hashes for the leading client hashes it knows (stops at the first unknown)."""
        out = []
        with self._lock:
            for h in hashes:
                s = self._c2s.get(h)
                if s is None:
                    break
                out.append(s)
        return out

    def to_client(self, h: bytes) -> bytes | None:
        if h == self.service_root:
            return self.client_root
        with self._lock:
            return self._s2c.get(h)

    def pages_to_service(self, pages: Sequence[Page]) -> tuple[list[Page], int]:
        """Rebased copies of the pages that can be placed, and how many could not."""
        out: list[Page] = []
        pairs: dict[bytes, bytes] = {}
        for p in pages:
            if p.parent == self.client_root:
                parent = self.service_root
            else:
                parent = pairs.get(p.parent) or next(iter(self.to_service([p.parent])), None)
            if parent is None:
                continue
            h = xxhash.xxh3_128_digest(parent + tokens_bytes(p.tokens))
            pairs[p.hash] = h
            out.append(Page(h, parent, p.tokens, p.data))
        self.learn(list(pairs), list(pairs.values()))
        return out, len(pages) - len(out)

    def page_to_client(self, p: Page) -> Page | None:
        h, parent = self.to_client(p.hash), self.to_client(p.parent)
        if h is None or parent is None:
            return None
        return Page(h, parent, p.tokens, p.data)
