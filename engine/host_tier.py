"""HostTier: the engine's side of a CacheBackend (cpu, disk, remote tiers).

Loads run on a background thread (the request waits in LOADING while others run); puts go through
a bounded queue to another thread and are dropped when it is full: the engine never waits for put.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from kvc.backend import CacheBackend
from kvc.hashing import Namespace
from kvc.device_pool import DevicePool
from kvc.record import Page, torch_dtype

log = logging.getLogger("kvc.engine")


class HostTier:
    def __init__(self, cache: CacheBackend, max_pending_puts: int = 64):
        self.cache = cache
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvc-load")
        self._puts: queue.Queue = queue.Queue(maxsize=max_pending_puts)
        self.dropped_puts = 0
        self._staging: torch.Tensor | None = None  # used by the loader thread only
        self._stream = None
        self.failed_puts = 0
        self._putter = threading.Thread(target=self._put_loop, name="kvc-put", daemon=True)
        self._putter.start()

    def lookup(self, ns: Namespace, tokens: list[int], hashes: list[bytes] | None = None) -> int:
        """Leading full pages of `tokens` held by the host tiers (hashes: already computed)."""
        return self.cache.lookup(ns, tokens=tokens, hashes=hashes).num_pages

    def load(self, ns: Namespace, hashes: list[bytes], pool: DevicePool, blocks: list[int]) -> Future:
        """Fetch pages into `blocks` of the device pool in the background.

        The future gives how many leading pages landed (a miss or a failed checksum ends the run).
        The blocks belong to the loading request alone, so writing them off the engine thread is
        safe; on CUDA the copy runs on its own stream and is complete when the future is.
        """
        return self._loader.submit(self._load, ns, list(hashes), pool, list(blocks))

    def _load(self, ns: Namespace, hashes: list[bytes], pool: DevicePool, blocks: list[int]) -> int:
        cuda = pool.device.type == "cuda"
        # On CUDA the buffer is on the device: the store copies its pinned slab straight into it
        # (verifying on its reader threads meanwhile); then one device-side scatter. Elsewhere
        # it is a host buffer.
        staging = self._staging_for(ns, len(hashes), pool.device if cuda else torch.device("cpu"))
        if cuda:
            with torch.cuda.stream(self._side_stream(pool.device)):
                n = len(self.cache.get_pages(ns, hashes, out=staging))
                if n:
                    pool.scatter(blocks[:n], staging[:n])
                torch.cuda.current_stream(pool.device).synchronize()
            return n
        n = len(self.cache.get_pages(ns, hashes, out=staging))
        if n:
            pool.scatter(blocks[:n], staging[:n])
        return n

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _staging_for(self, ns: Namespace, n: int, device: torch.device) -> torch.Tensor:
        """A reused buffer [>= n, *page shape] on `device`; used by the loader thread only."""
        spec = ns.spec
        dtype = torch_dtype(spec.dtype)
        s = self._staging
        if (s is None or s.shape[0] < n or tuple(s.shape[1:]) != spec.shape or s.dtype != dtype
                or s.device.type != device.type):
            s = torch.empty((n, *spec.shape), dtype=dtype, device=device)
            self._staging = s
        return s

    def offer(self, ns: Namespace, hashes: list[bytes], parents: list[bytes], tokens: list[np.ndarray],
              data: torch.Tensor) -> bool:
        """Queue pages (data [n, L, parts, P, H, D], any device) for put; False if dropped."""
        try:
            self._puts.put_nowait((ns, hashes, parents, tokens, data))
            return True
        except queue.Full:
            self.dropped_puts += 1
            return False

    def _put_loop(self) -> None:
        while True:
            item = self._puts.get()
            if item is None:
                return
            ns, hashes, parents, tokens, data = item
            try:
                data = data.cpu()  # the copy waits for the device here, not in the engine's thread
                pages = [Page(h, p, t, data[i]) for i, (h, p, t) in enumerate(zip(hashes, parents, tokens))]
                self.cache.put_pages(ns, pages)
            except Exception:  # a failing tier must not stop the engine; say so and go on
                self.failed_puts += 1
                log.warning("offering %d pages to the host tiers failed", len(hashes), exc_info=True)
            finally:
                self._puts.task_done()

    def flush(self) -> None:
        """Wait until queued puts are done (tests, shutdown)."""
        self._puts.join()

    def close(self) -> None:
        self._puts.put(None)
        self._putter.join(timeout=5)
        self._loader.shutdown(wait=True)
