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
CHUNK_BYTES = 64 << 20  # host loads move in chunks of this size on CUDA (two in flight)


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
        if pool.device.type != "cuda":
            staging = self._staging_for(ns, 1, len(hashes), False)[0]
            n = len(self.cache.get_pages(ns, hashes, out=staging))
            if n:
                pool.scatter(blocks[:n], staging[:n])
            return n
        # CUDA: chunks through two pinned halves, so reading chunk i+1 from the host tiers
        # overlaps the host-to-device copy of chunk i on the side stream.
        chunk = max(1, min(len(hashes), CHUNK_BYTES // ns.spec.page_bytes))
        halves = self._staging_for(ns, 2, chunk, True)
        stream = self._stream = self._stream or torch.cuda.Stream(pool.device)
        events = [None, None]
        done = 0
        for c, start in enumerate(range(0, len(hashes), chunk)):
            half = c % 2
            if events[half] is not None:
                events[half].synchronize()  # the copy that used this half has landed
            got = len(self.cache.get_pages(ns, hashes[start:start + chunk], out=halves[half]))
            if got:
                with torch.cuda.stream(stream):
                    pool.scatter(blocks[start:start + got], halves[half][:got])
                    events[half] = torch.cuda.Event()
                    events[half].record(stream)
            done += got
            if got < len(hashes[start:start + chunk]):
                break
        stream.synchronize()
        return done

    def _staging_for(self, ns: Namespace, halves: int, n: int, pin: bool) -> torch.Tensor:
        """A reused staging buffer [halves, >= n, *page shape] (pinned for CUDA copies)."""
        spec = ns.spec
        dtype = torch_dtype(spec.dtype)
        s = self._staging
        if (s is None or s.shape[0] != halves or s.shape[1] < n or tuple(s.shape[2:]) != spec.shape
                or s.dtype != dtype):
            s = torch.empty((halves, n, *spec.shape), dtype=dtype, pin_memory=pin)
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
