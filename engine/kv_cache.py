"""KVCache: the device pool and the page naming of requests (namespaces and chained page hashes).

The model runner reads KV through `pool`; everything that changes a request's block table or the
pool's hash map lives in engine.prefix_cache.
"""
from __future__ import annotations

import torch

from kvc.device_pool import DevicePool
from kvc.hashing import Namespace, PageSpec, page_hashes

from .request import Request


# Namespaces kept by cache_salt (a request's first page hashes from its namespace's root): a client
# that sends a fresh cache_salt with every request would otherwise grow the map by one entry each,
# forever. Past this many the oldest is dropped; it is rebuilt if its salt comes back (one xxh3 of
# ~200 bytes; an equal Namespace, so the same root and the same pages).
NAMESPACES_KEPT = 1024


class KVCache:
    def __init__(self, spec: PageSpec, num_blocks: int, device: torch.device, architecture: str,
                 weights_digest: str):
        self.pool = DevicePool(spec, num_blocks, device)
        self.blocks = self.pool.blocks
        self.page_size = spec.page_size
        self._architecture, self._digest, self.spec = architecture, weights_digest, spec
        self._ns: dict[str, Namespace] = {}
        self._loads = []  # LayerEvents of loads the step being launched waits for, layer by layer
        self._waited: list[int] = []  # per layer: how many of those loads it has waited for
        # layer i of such a step waits for layer i + layer_lag of each load (its last layer at most):
        # 0 runs each layer as soon as its own pages landed, beside the later layers' copies; more
        # keeps the step's HBM-bound kernels (a 64-token step reads nearly every expert of a layer)
        # off more of the copies, which slow down beside them (a benchmarks' variant: in run DY lag 2
        # read 0.7 ms quicker at 32K and 0.4 ms slower at 8K, every layer waiting for the last 2.5 ms
        # slower; one run, not adopted)
        self.layer_lag = 0

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (K, V) of the pool, for the step being launched: first the current stream
        waits for layer i's event of each load landing layer by layer (`wait_layers`; the host
        waits until the loader has recorded it), so layer i's attention reads their pages while
        later layers are still being copied (layer_lag: for layer i + layer_lag's event instead)."""
        if self._loads and self._waited[i] < len(self._loads):
            stream = torch.cuda.current_stream(self.pool.device)
            for handle in self._loads[self._waited[i]:]:
                ev = handle.get(min(handle.layers - 1, i + self.layer_lag))
                if ev is not None:  # None: the loader stopped before it (the load fails, the step is void)
                    stream.wait_event(ev)
            self._waited[i] = len(self._loads)
        return self.pool.layer(i)

    def wait_layers(self, handle) -> None:
        """Until `clear_layer_waits`: layer i of the steps launched waits for handle.get(i)
        (an engine.host_tier.LayerEvents)."""
        if not self._loads:
            self._waited = [0] * handle.layers
        self._loads.append(handle)

    def wait_all_layers(self) -> None:
        """The current stream waits for every pending layer event now (a step that does not fetch
        its layers through `layer`: a captured decode graph)."""
        for i in range(len(self._waited) if self._loads else 0):
            self.layer(i)

    def clear_layer_waits(self) -> None:
        self._loads = []

    def namespace(self, salt: str) -> Namespace:
        ns = self._ns.get(salt)
        if ns is None:
            if len(self._ns) >= NAMESPACES_KEPT:
                del self._ns[next(iter(self._ns))]  # the oldest made
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
