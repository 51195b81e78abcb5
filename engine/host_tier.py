"""HostTier: data movement between the device pool and a CacheBackend (cpu, disk, remote tiers).

Only engine.prefix_cache calls it. Loads run on a background thread and write the blocks they
were given (their owner keeps them until the future is done). Puts never slow the engine: on
CUDA the offered pages leave the device on a side stream into reused pinned buffers, recorded
with an event; the put thread waits for the event, then does the checksum, slab and disk work.
The put queue is bounded and a put is dropped when it is full.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

from kvc.backend import CacheBackend, LookupResult
from kvc.hashing import Namespace
from kvc.device_pool import DevicePool
from kvc.record import Page, torch_dtype

log = logging.getLogger("kvc.engine")

Observer = Callable[[str, int, float], None]  # (tier, bytes, seconds) of one load run
MIN_SAMPLE_BYTES = 1 << 20  # smaller load runs measure latency, not bandwidth: not reported
PUT_BATCH = 16  # pages per put_pages call: the store's lock is held that long, not a chunk's worth


class HostTier:
    def __init__(self, cache: CacheBackend, max_pending_puts: int = 64, observe: Observer | None = None):
        self.cache = cache
        self.observe = observe
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvc-load")
        self._puts: queue.Queue = queue.Queue(maxsize=max_pending_puts)
        self.dropped_puts = 0
        self.failed_puts = 0
        self._staging: torch.Tensor | None = None  # used by the loader thread only
        self._load_stream = None
        self._put_stream = None
        self._pinned: dict[tuple, list[torch.Tensor]] = {}  # free pinned put buffers by shape
        self._pinned_lock = threading.Lock()
        self._putter = threading.Thread(target=self._put_loop, name="kvc-put", daemon=True)
        self._putter.start()

    def lookup(self, ns: Namespace, tokens: list[int], hashes: list[bytes] | None = None) -> LookupResult:
        return self.cache.lookup(ns, tokens=tokens, hashes=hashes)

    # -- loads ---------------------------------------------------------------------------------
    def load(self, ns: Namespace, hashes: Sequence[bytes], pool: DevicePool, blocks: Sequence[int],
             tiers: Sequence[str] | None = None) -> Future:
        """Fetch pages into `blocks` of the device pool in the background.

        The future gives how many leading pages landed (a miss or a failed checksum ends the run).
        `tiers` (the tier of each page, from lookup) splits the load into one get per tier run,
        so each tier's bandwidth is measured; on CUDA the copies are complete when the future is.
        """
        tiers = list(tiers) if tiers is not None else ["host"] * len(hashes)
        ready = None
        if pool.device.type == "cuda":  # kernels already queued may still touch these blocks
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(pool.device))
        return self._loader.submit(self._load, ns, list(hashes), pool, list(blocks), tiers, ready)

    def _load(self, ns: Namespace, hashes: list[bytes], pool: DevicePool, blocks: list[int],
              tiers: list[str], ready=None) -> int:
        cuda = pool.device.type == "cuda"
        if cuda:
            self._side(pool.device, "_load_stream").wait_event(ready)
        # On CUDA the staging buffer is on the device: the store copies its pinned slab straight
        # into it (verifying on its reader threads meanwhile); then one device-side scatter.
        staging = self._staging_for(ns, len(hashes), pool.device if cuda else torch.device("cpu"))
        done = 0
        while done < len(hashes):
            tier, end = tiers[done], done
            while end < len(hashes) and tiers[end] == tier:
                end += 1
            n = self._get_run(ns, hashes[done:end], tier, staging[done:end],
                              lambda n: pool.scatter(blocks[done:done + n], staging[done:done + n]))
            done += n
            if done < end:
                break
        return done

    def _get_run(self, ns: Namespace, hashes: list[bytes], tier: str, out: torch.Tensor,
                 then: Callable[[int], None] | None = None) -> int:
        """Get one tier's run of pages into `out` (then `then(n)` on the same stream); report the
        tier's bandwidth; how many leading pages landed."""
        t0 = time.perf_counter()
        if out.is_cuda:
            stream = self._side(out.device, "_load_stream")
            with torch.cuda.stream(stream):
                n = len(self.cache.get_pages(ns, hashes, out=out))
                if n and then is not None:
                    then(n)
                stream.synchronize()
        else:
            n = len(self.cache.get_pages(ns, hashes, out=out))
            if n and then is not None:
                then(n)
        if self.observe is not None and n * ns.spec.page_bytes >= MIN_SAMPLE_BYTES:
            self.observe(tier, n * ns.spec.page_bytes, time.perf_counter() - t0)
        return n

    def probe(self, ns: Namespace, hashes: Sequence[bytes], tier: str, device: torch.device) -> Future:
        """Read pages of one tier into the loader's staging buffer only to measure the tier's
        bandwidth (the load planner asks for it where it does not load from that tier); runs
        after the loads already queued, never into a request's blocks."""
        return self._loader.submit(self._probe, ns, list(hashes), tier, device)

    def _probe(self, ns: Namespace, hashes: list[bytes], tier: str, device: torch.device) -> int:
        try:
            staging = self._staging_for(ns, len(hashes), device if device.type == "cuda" else torch.device("cpu"))
            return self._get_run(ns, hashes, tier, staging[:len(hashes)])
        except Exception:  # a probe is advice: a failing tier shows up in the loads themselves
            log.warning("probing the %s tier failed", tier, exc_info=True)
            return 0

    def _side(self, device: torch.device, attr: str):
        s = getattr(self, attr)
        if s is None:
            s = torch.cuda.Stream(device)
            setattr(self, attr, s)
        return s

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

    # -- puts ----------------------------------------------------------------------------------
    def offer(self, ns: Namespace, hashes: list[bytes], parents: list[bytes], tokens: list[np.ndarray],
              data: torch.Tensor) -> bool:
        """Queue pages (data [n, L, parts, P, H, D], any device) for put; False if dropped.

        On CUDA `data` must be a fresh tensor made on the current stream (a gather): the side
        stream waits for it, copies it into a pinned buffer and records an event; the current
        stream never waits for the copy.
        """
        if self._puts.full():
            self.dropped_puts += 1
            return False
        event = buf = None
        if data.device.type == "cuda":
            side = self._side(data.device, "_put_stream")
            side.wait_stream(torch.cuda.current_stream(data.device))
            buf = self._take_pinned(tuple(data.shape), data.dtype)
            with torch.cuda.stream(side):
                buf[:data.shape[0]].copy_(data, non_blocking=True)  # device -> pinned host, off the compute stream
                event = torch.cuda.Event()
                event.record(side)
            data.record_stream(side)  # the allocator keeps `data` until the side stream is past it
            data = buf[:data.shape[0]]
        try:
            self._puts.put_nowait((ns, hashes, parents, tokens, data, event, buf))
            return True
        except queue.Full:
            self.dropped_puts += 1
            return False

    def _take_pinned(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A pinned buffer of >= shape[0] pages (capacity rounded up to a power of two, so a few
        buffers serve every offer size); the caller slices it."""
        key = (1 << max(0, shape[0] - 1).bit_length(), shape[1:], dtype)
        with self._pinned_lock:
            free = self._pinned.get(key)
            if free:
                return free.pop()
        return torch.empty((key[0], *shape[1:]), dtype=dtype, pin_memory=True)

    def _give_pinned(self, buf: torch.Tensor) -> None:
        with self._pinned_lock:
            free = self._pinned.setdefault((buf.shape[0], tuple(buf.shape[1:]), buf.dtype), [])
            if len(free) < 4:  # enough for the puts in flight at one size
                free.append(buf)

    def _put_loop(self) -> None:
        while True:
            item = self._puts.get()
            if item is None:
                return
            ns, hashes, parents, tokens, data, event, buf = item
            try:
                if event is not None:
                    event.synchronize()  # this thread waits for the copy; the engine does not
                pages = [Page(h, p, t, data[i]) for i, (h, p, t) in enumerate(zip(hashes, parents, tokens))]
                for i in range(0, len(pages), PUT_BATCH):
                    self.cache.put_pages(ns, pages[i:i + PUT_BATCH])
            except Exception:  # a failing tier must not stop the engine; say so and go on
                self.failed_puts += 1
                log.warning("offering %d pages to the host tiers failed", len(hashes), exc_info=True)
            finally:
                if buf is not None:
                    self._give_pinned(buf)
                self._puts.task_done()

    def flush(self) -> None:
        """Wait until queued puts are done (tests, shutdown)."""
        self._puts.join()

    def close(self) -> None:
        self._puts.put(None)
        self._putter.join(timeout=5)
        self._loader.shutdown(wait=True)
