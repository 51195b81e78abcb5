"""KVCache: the device pool and the page naming of requests (namespaces and chained page hashes).

The model runner reads KV through `pool`; everything that changes a request's block table or the
pool's hash map lives in engine.prefix_cache.
"""
from __future__ import annotations

import torch

from kvc.device_pool import DevicePool
from kvc.hashing import Namespace, PageSpec, page_hashes

from .request import Request


class KVCache:
    def __init__(self, spec: PageSpec, num_blocks: int, device: torch.device, architecture: str,
                 weights_digest: str):
        self.pool = DevicePool(spec, num_blocks, device)
        self.blocks = self.pool.blocks
        self.page_size = spec.page_size
        self._architecture, self._digest, self.spec = architecture, weights_digest, spec
        self._ns: dict[str, Namespace] = {}
        self._layer_waits: list[list] | None = None  # per layer, events the next step waits for

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (K, V) of the pool, for the step being launched: first the current stream
        waits for the events of loads landing layer by layer (`wait_layers`), so layer i's
        attention reads their pages while later layers are still being copied."""
        waits = self._layer_waits
        if waits is not None and waits[i]:
            stream = torch.cuda.current_stream(self.pool.device)
            for ev in waits[i]:
                stream.wait_event(ev)
            waits[i] = []
        return self.pool.layer(i)

    def wait_layers(self, events: list) -> None:
        """Until `clear_layer_waits`: layer i of the steps launched waits for events[i] (one per layer)."""
        if self._layer_waits is None:
            self._layer_waits = [[] for _ in events]
        for w, ev in zip(self._layer_waits, events):
            w.append(ev)

    def wait_all_layers(self) -> None:
        """The current stream waits for every pending layer event now (a step that does not fetch
        its layers through `layer`: a captured decode graph)."""
        for i in range(len(self._layer_waits or ())):
            self.layer(i)

    def clear_layer_waits(self) -> None:
        self._layer_waits = None

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
            req.hashes += page_hashes(parent, req.ids_bytes(start * P, full * P), P)

    def parent(self, req: Request, page: int) -> bytes:
        return req.hashes[page - 1] if page else self.namespace(req.cache_salt).root
