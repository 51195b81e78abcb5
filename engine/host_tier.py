"""HostTier: data movement between the device pool and a CacheBackend (cpu, disk, remote tiers).

Only engine.prefix_cache calls it. Loads run on a background thread and write the blocks they
were given (their owner keeps them until the future is done); from an in-process store they land
part by part (TieredStore.get_into: on CUDA each part is verified on the device and scattered into
the pool beside the next part's copy). Puts never slow the engine: on
CUDA the offered pages leave the device on a side stream into a pinned ring (engine.pinned_ring),
recorded with an event; then the checksum, slab and disk work follows. Its Python (the store's
bookkeeping) holds the GIL, and a GIL held by another thread stalls every kernel launch of the
engine's thread: beside a busy engine the put thread cost no-reuse throughput 6-11% (runs BE-DE),
most of it the engine's thread waiting hundreds of times a batch to get the GIL back.

So with an in-process store (put_gate "engine", the default) the engine's thread does the put
work itself, in its waits for a step's samples (gpu_wait): one piece at a time (the Python of up
to PUT_BATCH pages) until the GPU has finished the step, with the byte work (checksums, slab and
record copies) started on native threads that never take the GIL (kvc.pagecopy's jobs) and polled.
No other Python thread then runs while the engine launches. The put thread takes the work over
only while the engine is idle (no step started for IDLE_S; always off CUDA, where no step leaves
the engine waiting) and never while a load runs. The other gates keep the put thread doing the
work beside the engine ("gpu-queued": whenever the GPU has queued work; "gpu-wait": while the
engine's thread waits for samples); benchmarks compare them. The put queue and the ring are
bounded; an offer that finds either full is dropped (counted).
"""
from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

from kvc import cudacopy, gpu_checksum, pagecopy
from kvc.backend import CacheBackend, LookupResult
from kvc.hashing import Namespace
from kvc.device_pool import DevicePool
from kvc.record import Page, torch_dtype

from .pinned_ring import PinnedRing

log = logging.getLogger("kvc.engine")

Observer = Callable[[str, int, float], None]  # (tier, bytes, seconds) of one load run
MIN_SAMPLE_BYTES = 1 << 20  # smaller load runs measure latency, not bandwidth: not reported
# pages per put_pages call. A call hands the GIL over once (its checksums and slab copies are one
# native call) and beside the engine's busy thread each hand-off costs the put thread a 5 ms switch
# interval: calls of 32 lose the spinning thread of probe_gil_put.py 3x less time per page than
# calls of 4. The store's lock and the GIL are held for the Python part only (~10-20 us a page).
PUT_BATCH = 32
LOOKUP_LOG_EVERY_S = 30.0  # a failing lookup is logged (with its traceback) at most this often
PUT_RING_BYTES = 1 << 30  # default size of the pinned ring offered pages are copied into on CUDA
IDLE_S = 0.02  # no step started or launched for this long: the engine is idle, puts run freely
# The "engine" gate when the engine is host-bound (its step is done before it waits: a small model,
# decode-heavy batches): no put work fits in its waits, and offers would only be put while it is
# idle. After STARVED_S with offers queued and no put work in its waits, its thread does a piece
# past the GPU now and then, at most FORCED_SHARE of its time (a starved cache loses hit rate; the
# share bounds what that costs the engine).
STARVED_S = 0.5
FORCED_SHARE = 0.02


class _EventWork:
    """A put's wait for its pages' copy into the ring, as a piece of work (kvc.pagecopy.Stepping)."""

    def __init__(self, event):
        self.event = event

    def run(self) -> None:
        self.event.synchronize()  # this thread waits for the copy; the engine does not

    def start(self) -> "_EventWork":
        return self

    def done(self) -> bool:
        return self.event.query()

    def result(self) -> None:
        return None


LAYER_GROUP_BYTES = 64 << 20
# a layered load goes straight into the pool's blocks only where they form fewer runs of consecutive
# ids than this (each run costs a strided copy per layer and part on the engine's thread; the engine's
# allocations hand out ascending ids, so a load's blocks are mostly a few runs)
DIRECT_MAX_RUNS = 16
# ... and only a load smaller than this: into the pool a DMA row is one part of a layer (16 KiB at
# Qwen3-30B-A3B's shapes; K and V are separate tensors) where the staging buffer takes the whole
# layer (32 KiB), and the copies alone ran at 47 against 53 GB/s (probe_copy_rows.py, run DS); a 32K
# hit was 5-6 ms slower straight into the pool (DR, DS), an 8K one 0.1-1.5 ms quicker (no scatter
# launches on the engine's thread; 1.2 ms in DT, DU and DV)
DIRECT_MAX_BYTES = 256 << 20


def _takes(fn, param: str) -> bool:
    """Whether fn (a backend's method, or None) takes the keyword `param` (a wrapper may not)."""
    try:
        return fn is not None and param in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class LayerEvents:
    """The events of a load landing layer by layer, one per layer in order, as the loader records
    them; get(i) waits (on the host) until event i is recorded. A loader that stops early (an
    error) ends the handle: get then gives None for the layers it never queued, and the load's
    future fails, which voids a step that used them."""

    def __init__(self, layers: int):
        self.layers = layers
        self.given = False  # handed to on_queued: a step may wait on it
        self._events: list = []
        self._ended = False
        self._cond = threading.Condition()

    def add(self, event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def get(self, layer: int):
        with self._cond:
            self._cond.wait_for(lambda: len(self._events) > layer or self._ended)
            return self._events[layer] if layer < len(self._events) else None


class HostTier:
    def __init__(self, cache: CacheBackend, max_pending_puts: int = 64, observe: Observer | None = None,
                 ring_bytes: int = PUT_RING_BYTES):
        self.cache = cache
        self.ring_bytes = int(ring_bytes)
        self.observe = observe
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvc-load")
        self._prober = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvc-probe")
        self._probe_stream = None
        self._puts: queue.Queue = queue.Queue(maxsize=max_pending_puts)
        self.dropped_puts = 0
        self.failed_puts = 0
        self.failed_lookups, self._lookup_logged = 0, -LOOKUP_LOG_EVERY_S  # answered as misses; last logged
        self._staging: torch.Tensor | None = None  # used by the loader thread only
        self.layer_loads = True  # cpu-tier loads on CUDA go layer by layer where they can (_layered)
        self.layer_loads_off: str | None = None  # why they stopped (a failure), if they did
        self.layered_loads = 0  # loads that went layer by layer
        # a layered load is queued on the thread that asks for it (_queue_layers_here), else on the
        # loader thread (the path before; benchmarks compare)
        self.queue_here = True
        # a layered load's layers land in groups of at least this many bytes (every page of the run),
        # one scatter and one event a group: an 8K-token hit's copies outrun the engine's thread,
        # which spent ~0.3 ms a layer queueing them (runs DH, DK); a 32K hit's layers (64 MiB each at
        # Qwen3-30B-A3B's shapes) stay one a group. 0: every layer on its own (the path before)
        self.layer_group_bytes = LAYER_GROUP_BYTES
        self._grouping = {name: _takes(getattr(cache, name, None), "layer_group")
                          for name in ("start_layers_into", "get_layers_into")}
        # a small layered load (under DIRECT_MAX_BYTES) copies each layer straight into the pool's
        # blocks where the store can (a `blocks` parameter, DMA copies) and the load's blocks form at
        # most DIRECT_MAX_RUNS runs of consecutive ids: no staging buffer and no scatter launches on
        # the engine's thread. False: always through the staging buffer and a scatter a group (the
        # path before; benchmarks compare)
        self.direct_loads = True
        self._direct_ok = {name: _takes(getattr(cache, name, None), "blocks")
                           for name in ("start_layers_into", "get_layers_into")}
        self.direct_layer_loads = 0  # layered loads that went straight into the pool
        self._layer_stream = None
        self._layer_staging: torch.Tensor | None = None  # used by the thread that queues loads here
        self._load_stream = None
        self._put_stream = None
        self._ring: PinnedRing | None = None  # made at the first CUDA offer
        self._launched = None  # the last launched step's kernels (a CUDA event)
        self._active = 0.0  # when the engine last started or launched a step (monotonic)
        self._launch_signal = threading.Event()  # set at each step_launched and load end: wakes a waiting put thread
        self._loads_in_flight = 0  # loads are on a request's critical path: puts and probes wait for them
        self._loads_lock = threading.Lock()
        # an in-process store's put pauses before publishing until the engine's thread waits on the
        # GPU (_wait_for_slack): run BD's paired batches, host tiers on vs off, had the same GPU busy
        # time and 109 ms more GPU idle a batch (the engine's thread kept from launching), not slower
        # kernels. Against the put path without it, in the same pairs: within their spread (BE-BG)
        self.pause_puts = _takes(cache.put_pages, "pause")
        # when puts may hold the GIL: "gpu-queued" (default) whenever the GPU has queued work (or the
        # engine is idle); "gpu-wait" only while the engine's thread waits for a step's samples
        # (gpu_wait) or is idle. With async scheduling the GPU always has queued work, so under
        # "gpu-queued" the put thread can take the GIL at any torch call of the engine's thread
        # (run BS: host tiers on 0.74x of off in one batch). "gpu-wait" was not better where both
        # ran in one run (BT's single batches: 4-7% slower), and a 32K cpu hit right after a cold
        # 32K prompt took 117 ms under it (BT; 27-35 ms under "gpu-queued" in BN-BR): it stays a
        # variant the benchmarks time, not the default
        # "engine" (default with an in-process store): the engine's thread does the put work in its
        # waits, the put thread only while the engine is idle (the module docstring)
        self.stepped = hasattr(cache, "put_steps")
        self.put_gate = "engine" if self.stepped else "gpu-queued"
        self._gpu_wait = False
        self._driver = threading.Lock()  # held by the thread advancing the put work ("engine" gate)
        self._task: pagecopy.Stepping | None = None  # the offer being put ("engine" gate)
        self._offered = threading.Event()  # set by offer: wakes an idle put thread
        self._closed = False
        self._stop = threading.Event()  # set by close(): wakes a put thread waiting for an idle engine
        self.engine_put_pieces = 0  # pieces of put work the engine's thread did in its waits
        self.engine_forced_pieces = 0  # ... past the GPU, starved (STARVED_S, FORCED_SHARE)
        self.thread_put_pieces = 0  # ... the put thread did (idle engine, or the other gates)
        self._slack_t = time.monotonic()  # the last piece in a wait, or the last time nothing was queued
        self._forced_t0, self._forced_s = time.monotonic(), 0.0  # the forced pieces' window and time
        self._putter = threading.Thread(target=self._put_loop, name="kvc-put", daemon=True)
        self._putter.start()

    def pace_disk_writes(self) -> None:
        """Hand the put thread's GPU-slack wait to an in-process store's disk writer (its LMDB puts
        hold the GIL like the put work does; measured: host tiers with disk 0.49x of off, cpu tier
        only 0.99x, run L). A remote cache has its own process and nothing to pace."""
        self._gate_disk_writes(self._wait_for_slack)

    def _gate_disk_writes(self, gate) -> None:
        setter = getattr(self.cache, "set_write_gate", None)
        if setter is not None:
            setter(gate)

    def warm(self, page_bytes: int, device: torch.device, layers: int = 1, parts: int = 0) -> None:
        """Start-up work for loads on `device`: an in-process store verifies cpu-tier pages on the
        device after their copy (kvc.gpu_checksum); its kernel is compiled now, not at the first
        hit (for pages of `layers` layers: a layered get hashes them in parts; and of `parts`
        tensors a layer: a get straight into the pool hashes them in their blocks)."""
        if device.type == "cuda" and getattr(self.cache, "verify_on_device", False):
            gpu_checksum.warm(page_bytes, device, layers, parts if self.direct_loads else 0)

    def lookup(self, ns: Namespace, tokens: list[int] | bytes, hashes: list[bytes] | None = None) -> LookupResult:
        """The host tiers' hit for a prompt; a miss if the backend raises (as a failing put is
        dropped: a failing tier must not stop the engine, whose scheduler calls this)."""
        try:
            return self.cache.lookup(ns, tokens=tokens, hashes=hashes)
        except Exception:
            self._lookup_failed()
            return LookupResult(hashes=list(hashes) if hashes is not None else [])

    def lookup_from(self, ns: Namespace, parent: bytes, hashes: list[bytes], tokens: bytes) -> list[str] | None:
        """The tiers of the leading verified pages of a run hanging from `parent` (a page the
        engine holds), where the backend can answer that (an in-process TieredStore); None where it
        cannot (the gRPC client: the caller looks the whole prompt up). No pages if it raises."""
        fn = getattr(self.cache, "lookup_from", None)
        if fn is None:
            return None
        try:
            return fn(ns, parent, hashes, tokens)
        except Exception:
            self._lookup_failed()
            return []

    def _lookup_failed(self) -> None:
        self.failed_lookups += 1
        now = time.monotonic()
        if now - self._lookup_logged >= LOOKUP_LOG_EVERY_S:
            self._lookup_logged = now
            log.warning("a host-tier lookup failed (%d so far); answered as a miss", self.failed_lookups,
                        exc_info=True)

    # -- loads ---------------------------------------------------------------------------------
    def load(self, ns: Namespace, hashes: Sequence[bytes], pool: DevicePool, blocks: Sequence[int],
             tiers: Sequence[str] | None = None,
             on_queued: Callable[[torch.cuda.Event | None], None] | None = None) -> Future:
        """Fetch pages into `blocks` of the device pool in the background.

        The future gives how many leading pages landed (a miss or a failed checksum ends the run).
        `tiers` (the tier of each page, from lookup) splits the load into one get per tier run,
        so each tier's bandwidth is measured; on CUDA the copies are complete when the future is.

        on_queued(event): called on the loader thread once the writes of every page into its
        block are queued, before they are verified (on CUDA the event follows them on the load's
        stream; elsewhere None: the writes are done). Work queued behind the event sees the
        pages' bytes; only the future says whether they passed their checksums. Not called when
        the load ends early (a miss, a failed page before the last part). A load that goes layer
        by layer (`_layered`) passes a LayerEvents instead, once all its layers are queued: work
        behind its get(i) sees layer i of every page."""
        tiers = list(tiers) if tiers is not None else ["host"] * len(hashes)
        with self._loads_lock:
            self._loads_in_flight += 1
        fut = None
        if (pool.device.type == "cuda" and self.queue_here and self._layered(ns, tiers)
                and hasattr(self.cache, "start_layers_into")):
            try:
                fut = self._queue_layers_here(ns, list(hashes), pool, list(blocks), on_queued)
            except Exception:  # before anything was queued (its own errors end in a future): the loader's way
                log.warning("queueing a layer-by-layer load here failed; the loader thread takes it", exc_info=True)
                fut = None
        if fut is None:
            ready = None
            if pool.device.type == "cuda":  # kernels already queued may still touch these blocks
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(pool.device))
            fut = self._loader.submit(self._load, ns, list(hashes), pool, list(blocks), tiers, ready, on_queued)
        getattr(fut, "finished", fut).add_done_callback(self._load_ended)
        return fut

    def _queue_layers_here(self, ns: Namespace, hashes: list[bytes], pool: DevicePool, blocks: list[int],
                           on_queued) -> Future | None:
        """A layer-by-layer cpu-tier load queued on the calling thread (the engine's): every
        layer's copies, scatters and events and the checksums go on the GPU's queues now, no thread
        hop and no host wait, and on_queued(handle) is called before this returns, so the step that
        reads the layers can be launched at once and run beside the copies. The loader thread only
        waits for the verdict (the future). None where it cannot start here (the store's lock is
        held by a put: the engine does not wait for it): the caller hands the load to the loader.

        Queued from the loader thread instead (run BL's timeline, 8K), the engine's step launch
        began 3.6 ms after the request arrived and its upload and the loader's checksum launch
        waited on each other for ~1 ms (the two threads' Python on the GIL), so the step's GPU work
        ran after the copies instead of beside them."""
        spec = ns.spec
        L, n = spec.shape[0], len(hashes)
        device = pool.device
        stream = self._side(device, "_layer_stream")
        stream.wait_stream(torch.cuda.current_stream(device))  # kernels already queued may touch these blocks
        handle = LayerEvents(L)
        try:
            with torch.cuda.stream(stream):
                extra = self._layered_args("start_layers_into", ns, pool, blocks)
                if "blocks" in extra:
                    lm, into = None, pool.kv  # straight into the pool
                else:
                    staging = self._layer_staging_for(ns, n, device)
                    lm = into = staging.view(-1)[:n * staging[0].numel()].view(L, n, *spec.shape[1:])  # layer-major
                start = torch.cuda.Event(enable_timing=True)
                start.record()
                layer_landed = self._layer_landed(pool, blocks, lm, handle, on_queued, L, n)
                got = self.cache.start_layers_into(ns, hashes, into, layer_landed, block=False, **extra)
                if got is None:  # a put holds the store: the loader thread takes the load
                    return None
                end = torch.cuda.Event(enable_timing=True)
                end.record()
        except Exception as e:  # the driver's strided copy or the kernel: whole pages from now on
            self.layer_loads_off = f"{type(e).__name__}: {e}"
            log.warning("layer-by-layer loads disabled, loading whole pages: %s", self.layer_loads_off,
                        exc_info=True)
            if not handle.given:  # the loader's whole-page load comes after what was queued here
                torch.cuda.current_stream(device).wait_stream(stream)
                return None
            failed: Future = Future()  # a step may already read these layers: fail the load (the step is void)
            failed.set_exception(e)
            return failed
        finally:
            handle.end()  # a step waiting for a layer never recorded goes on (its load then fails: void)
        fut: Future = Future()  # done at the verdict, before the store's bookkeeping and the rate sample
        # the load counts as in flight (puts keep off the store's lock) until the loader is done
        fut.finished = self._loader.submit(self._finish_layers, got, start, end, spec.page_bytes, fut,
                                           "blocks" in extra)
        return fut

    def _finish_layers(self, got, start, end, page_bytes: int, fut: Future | None = None,
                       direct: bool = False) -> int:
        """The loader thread's part of a load queued by _queue_layers_here: its verdict, into fut
        as soon as it is known (finish_layers' on_verdict), then the bookkeeping."""
        def verdict(n: int) -> None:
            if fut is not None and not fut.done():
                fut.set_result(n)
        try:
            n = self.cache.finish_layers(got, on_verdict=verdict)
            verdict(n)  # a wrapper may not call on_verdict: the count it returns is the verdict
        except Exception as e:  # a step may have read these layers: the load fails (the step is void)
            if fut is not None and not fut.done():
                fut.set_exception(e)
            self.layer_loads_off = f"{type(e).__name__}: {e}"
            log.warning("layer-by-layer loads disabled, loading whole pages: %s", self.layer_loads_off,
                        exc_info=True)
            raise
        end.synchronize()
        self.layered_loads += 1
        self.direct_layer_loads += int(direct)
        seconds = start.elapsed_time(end) / 1e3  # GPU time from the load's start to its last write
        if self.observe is not None and n * page_bytes >= MIN_SAMPLE_BYTES and seconds > 0:
            self.observe("cpu", n * page_bytes, seconds)
        return n

    def _load_ended(self, _fut: Future) -> None:
        with self._loads_lock:
            self._loads_in_flight -= 1
        self._launch_signal.set()  # a put thread waiting for the load to end looks again

    def _load(self, ns: Namespace, hashes: list[bytes], pool: DevicePool, blocks: list[int],
              tiers: list[str], ready=None, on_queued=None) -> int:
        cuda = pool.device.type == "cuda"
        if cuda:
            # Wait here (then the load stream has nothing to wait for): the tier's bandwidth is timed
            # from here, and kernels queued before the load (another request's prefill) are not the
            # tier's cost (on the H200 timing them in measured the cpu tier at 3.7 GB/s and the
            # planner stopped loading).
            ready.synchronize()
        if cuda and self._layered(ns, tiers):
            handle = LayerEvents(ns.spec.shape[0])
            try:
                return self._load_layers(ns, hashes, pool, blocks, on_queued, handle)
            except Exception as e:  # the driver's strided copy or the kernel: whole pages from now on
                self.layer_loads_off = f"{type(e).__name__}: {e}"
                log.warning("layer-by-layer loads disabled, loading whole pages: %s", self.layer_loads_off,
                            exc_info=True)
                if handle.given:  # a step may already read these layers: fail the load (the step is void)
                    raise
        # Whole pages. On CUDA the staging buffer is on the device: an in-process store copies its
        # pinned slab straight into it part by part, and each part is scattered into the pool as it lands.
        staging = self._staging_for(ns, len(hashes), pool.device if cuda else torch.device("cpu"))
        total = len(hashes)

        def landed(lo: int, hi: int, d: int) -> None:  # on the stream the rows land on
            pool.scatter(blocks[d + lo:d + hi], staging[d + lo:d + hi])
            if on_queued is not None and d + hi == total:  # the last rows: every write is queued
                event = None
                if cuda:
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(pool.device))
                on_queued(event)
        done = 0
        while done < total:
            tier, end = tiers[done], done
            while end < total and tiers[end] == tier:
                end += 1
            n = self._get_run(ns, hashes[done:end], tier, staging[done:end],
                              lambda lo, hi, d=done: landed(lo, hi, d))
            done += n
            if done < end:
                break
        return done

    def _layered(self, ns: Namespace, tiers: list[str]) -> bool:
        """Whether a load goes layer by layer: on CUDA, every page from the cpu tier of an in-process
        store, a page that splits into layers, and strided copies available (kvc.cudacopy)."""
        L = ns.spec.shape[0]
        return (self.layer_loads and self.layer_loads_off is None and L > 1 and ns.spec.page_bytes % L == 0
                and tiers.count("cpu") == len(tiers) and hasattr(self.cache, "get_layers_into")
                and cudacopy.available())

    def _load_layers(self, ns: Namespace, hashes: list[bytes], pool: DevicePool, blocks: list[int],
                     on_queued, handle: "LayerEvents") -> int:
        """A cpu-tier load on CUDA, layer by layer (TieredStore.get_layers_into): each layer of every
        page is scattered into the pool as soon as its copy lands, and records an event into
        `handle`; on_queued(handle) once every layer is queued (when the run covers every page), and
        the step that waits for the load runs layer i's attention after event i while later layers
        copy. (Handing the request back after the first layer instead, so the step's launch overlaps
        the queueing, was slower at 8K in run AG: the two threads' Python work convoyed on the GIL.)"""
        spec = ns.spec
        L, n = spec.shape[0], len(hashes)
        extra = self._layered_args("get_layers_into", ns, pool, blocks)
        if "blocks" in extra:
            lm, into = None, pool.kv  # straight into the pool
        else:
            staging = self._staging_for(ns, n, pool.device)
            lm = into = staging.view(-1)[:n * staging[0].numel()].view(L, n, *spec.shape[1:])  # layer-major
        stream = self._side(pool.device, "_load_stream")
        t0 = time.perf_counter()
        try:
            with torch.cuda.stream(stream):
                got = self.cache.get_layers_into(ns, hashes, into,
                                                 self._layer_landed(pool, blocks, lm, handle, on_queued, L, n), **extra)
                stream.synchronize()
        finally:
            handle.end()  # a step waiting for a layer never recorded goes on (its load then fails: void)
        self.layered_loads += 1
        self.direct_layer_loads += int("blocks" in extra)
        if self.observe is not None and got * spec.page_bytes >= MIN_SAMPLE_BYTES:
            self.observe("cpu", got * spec.page_bytes, time.perf_counter() - t0)
        return got

    def _layer_group(self, ns: Namespace, n: int) -> int:
        """Layers a group of a layered load of n pages (layer_group_bytes)."""
        L = ns.spec.shape[0]
        per_layer = max(1, n * (ns.spec.page_bytes // L))
        return max(1, min(L, -(-int(self.layer_group_bytes) // per_layer)))

    def _layered_args(self, name: str, ns: Namespace, pool: DevicePool, blocks: list[int]) -> dict:
        """The keyword arguments of a layered get (`name`) of pages into `blocks`: its layer group
        where the store takes one, and blocks=blocks where the load goes straight into the pool
        (direct_loads, a store that takes it and copies by DMA, a contiguous pool, a load under
        DIRECT_MAX_BYTES in at most DIRECT_MAX_RUNS runs of consecutive block ids)."""
        extra = {"layer_group": self._layer_group(ns, len(blocks))} if self._grouping[name] else {}
        if (self.direct_loads and self._direct_ok[name] and getattr(self.cache, "layer_copy", "dma") == "dma"
                and pool.kv.is_contiguous() and 0 < len(blocks) * ns.spec.page_bytes < DIRECT_MAX_BYTES
                and np.count_nonzero(np.diff(np.asarray(blocks, dtype=np.int64)) != 1) < DIRECT_MAX_RUNS):
            extra["blocks"] = blocks
        return extra

    @staticmethod
    def _layer_landed(pool: DevicePool, blocks: Sequence[int], lm: torch.Tensor | None, handle: "LayerEvents",
                      on_queued, L: int, n: int):
        """A layered get's callback: layer_landed(layer, run) once every layer up to `layer` of the
        run's pages has landed (each one, or a group's last): scatter the layers not yet scattered
        from the layer-major staging `lm` into the pool's `blocks` (one launch, on the stream they
        landed on; nothing to scatter where lm is None: the get copied into the blocks) and record
        one event for them into `handle`; once the last layer of every page is queued, hand the
        handle to on_queued. The blocks' index is uploaded at the first call, after the get queued
        its copies (at 32K tokens the upload of 2,048 block ids came before the first copy, which
        every later byte waits behind)."""
        done = [0]  # layers scattered so far
        idx: list = []  # the blocks' index on the device, made at the first call

        def layer_landed(layer: int, run: int) -> None:
            lo = done[0]
            if lm is not None:
                if not idx:
                    idx.append(pool.index(blocks))
                pool.scatter_layers(lo, layer + 1, idx[0][:run], lm[lo:layer + 1, :run])
            ev = torch.cuda.Event()
            ev.record()
            for _ in range(lo, layer + 1):
                handle.add(ev)
            done[0] = layer + 1
            if on_queued is not None and layer == L - 1 and run == n:
                handle.given = True
                on_queued(handle)
        return layer_landed

    def _get_run(self, ns: Namespace, hashes: list[bytes], tier: str, out: torch.Tensor,
                 landed: Callable[[int, int], None] | None = None, stream_attr: str = "_load_stream") -> int:
        """Get one tier's run of pages into `out`, landed(lo, hi) on the stream rows lo..hi land on
        (an in-process store calls it part by part, so the scatter of one part overlaps the next
        part's copy; otherwise once for the rows that landed); report the tier's bandwidth; how
        many leading pages landed (only those are used: later rows may have been scattered with
        bytes that failed their checksum, into blocks the caller does not register)."""
        t0 = time.perf_counter()
        get_into = getattr(self.cache, "get_into", None)

        def get() -> int:
            if get_into is not None:  # no Page objects, the landed rows used part by part
                return get_into(ns, hashes, out, landed)
            n = len(self.cache.get_pages(ns, hashes, out=out))
            if n and landed is not None:
                landed(0, n)
            return n
        if out.is_cuda:
            stream = self._side(out.device, stream_attr)
            with torch.cuda.stream(stream):
                n = get()
                stream.synchronize()
        else:
            n = get()
        if self.observe is not None and n * ns.spec.page_bytes >= MIN_SAMPLE_BYTES:
            self.observe(tier, n * ns.spec.page_bytes, time.perf_counter() - t0)
        return n

    def probe(self, ns: Namespace, hashes: Sequence[bytes], tier: str, device: torch.device) -> Future:
        """Read pages of one tier into a scratch buffer only to measure the tier's bandwidth (the
        load planner asks for it where it does not load from that tier). A probe is not urgent:
        it runs on its own thread, after the engine's GPU work like the puts (it must not slow
        the recompute it stands beside), never into a request's blocks."""
        return self._prober.submit(self._probe, ns, list(hashes), tier, device)

    def _probe(self, ns: Namespace, hashes: list[bytes], tier: str, device: torch.device) -> int:
        try:
            self._wait_for_slack()
            spec = ns.spec
            out = torch.empty((len(hashes), *spec.shape), dtype=torch_dtype(spec.dtype),
                              device=device if device.type == "cuda" else "cpu")
            return self._get_run(ns, hashes, tier, out, stream_attr="_probe_stream")
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

    def _layer_staging_for(self, ns: Namespace, n: int, device: torch.device) -> torch.Tensor:
        """_staging_for's buffer for loads queued on the engine's thread (the loader's own may be in
        use by a whole-page load at the same time). Allocated on the current (layer) stream; when
        it grows, the old one may still be read by an earlier load's scatters and checksums on
        other streams: the device finishes its queued work first (once per larger load: the engine's
        thread waits for the step in flight then)."""
        spec = ns.spec
        dtype = torch_dtype(spec.dtype)
        s = self._layer_staging
        if s is None or s.shape[0] < n or tuple(s.shape[1:]) != spec.shape or s.dtype != dtype:
            if s is not None:
                torch.cuda.synchronize(device)
            s = torch.empty((n, *spec.shape), dtype=dtype, device=device)
            self._layer_staging = s
        return s

    # -- puts ----------------------------------------------------------------------------------
    def step_started(self) -> None:
        """The engine's thread began a step (scheduling, then kernel launches)."""
        self._active = time.monotonic()

    def step_launched(self, device: torch.device) -> None:
        """The step's kernels are queued on `device`'s current stream (called before the step's
        host sync): puts may run until the GPU has finished them."""
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(device))
        self._launched = ev
        self._active = time.monotonic()
        self._launch_signal.set()

    def gpu_wait(self, waiting: bool, ready=None) -> None:
        """The engine's thread starts (True) or ends (False) waiting for a step's samples (ready:
        the CUDA event it waits for): the GPU is the limit meanwhile. Under the "engine" gate the
        put work runs here, on the engine's thread, until `ready` has happened; under "gpu-wait"
        the put thread may take the GIL meanwhile."""
        self._gpu_wait = waiting
        if waiting:
            if self.put_gate == "engine":
                if ready is not None:
                    self._work_until(ready)
            else:
                self._launch_signal.set()

    def _work_until(self, ready) -> None:
        """Put work on the engine's thread while the GPU runs the step `ready` ends: a piece at a
        time, each started piece of byte work polled between checks of `ready`. Stops at once if
        a load is in flight (a request waits for it) or the put thread holds the work (an idle
        engine's puts: it lets go within a piece)."""
        if self._loads_in_flight or not self._driver.acquire(blocking=False):
            return
        try:
            if ready.query():
                self._forced_piece()
                return
            while not ready.query() and not self._loads_in_flight:
                st = self._advance()
                if st == "idle":
                    return
                if st == "ran":
                    self.engine_put_pieces += 1
                    self._slack_t = time.monotonic()
                else:  # busy: the byte work runs on its native thread; give the GIL to others meanwhile
                    time.sleep(0)
        finally:
            self._driver.release()

    def _forced_piece(self) -> None:
        """The engine's step was done before it waited (host-bound): one piece of put work anyway if
        offers have waited STARVED_S without any done in its waits, within FORCED_SHARE of its time."""
        now = time.monotonic()
        if self._task is None and self._puts.empty():
            self._slack_t = now  # nothing waits: not starved
            return
        if now - self._slack_t < STARVED_S:
            return
        if now - self._forced_t0 > 10.0:  # a fresh window, with one second's allowance
            self._forced_t0, self._forced_s = now - 1.0, 0.0
        if self._forced_s > FORCED_SHARE * (now - self._forced_t0):
            return
        st = self._advance()
        self._forced_s += time.monotonic() - now
        if st == "ran":
            self.engine_forced_pieces += 1

    def _advance(self, start: bool = True) -> str:
        """One piece of the put work on the calling thread, which holds the driver lock: 'ran',
        'busy' (the current offer waits for its byte work or its copy into the ring) or 'idle'
        (nothing queued). start=False: the piece's byte work runs here before the return."""
        t = self._task
        if t is None:
            try:
                item = self._puts.get_nowait()
            except queue.Empty:
                return "idle"
            if item is None:  # close()
                self._closed = True
                self._puts.task_done()
                return "idle"
            t = self._task = pagecopy.Stepping(self._offer_steps(item))
        st = t.advance(start)
        if st == "done":
            self._task = None
            return "ran"
        return st

    def _engine_idle(self) -> bool:
        return not self._loads_in_flight and time.monotonic() - self._active > IDLE_S

    def _wait_for_slack(self) -> None:
        """Hold the put thread while the engine's own thread limits the engine. Under the default
        gate (put_gate "gpu-queued") puts run whenever the GPU has queued work (slower launches
        cost nothing then: if they fall behind, the GPU catches up and puts stop) or when the
        engine is idle; under "gpu-wait" only while the engine's thread waits for a step's samples
        or when the engine is idle. Never while a load runs: a request waits for it (its TTFT), and the load
        needs the GIL and the store's lock that puts take. The wait sleeps on an event that the
        engine's wait, the next launch or the end of a load sets: no polling that would take the
        GIL (cleared before the checks, so a set between them is not missed)."""
        while True:
            self._launch_signal.clear()
            if not self._loads_in_flight:
                if self.put_gate == "gpu-wait":
                    if self._gpu_wait:
                        return
                else:
                    ev = self._launched
                    if ev is not None and not ev.query():
                        return
                if time.monotonic() - self._active > IDLE_S:
                    return
            self._launch_signal.wait(IDLE_S)

    def room(self, n: int, on_cuda: bool) -> bool:
        """Whether an offer of n pages would be taken now (callers skip the gather otherwise): the
        put queue has a place and, on CUDA, the pinned ring has n adjacent free slots (not only n
        slots in all: a full ring dropped the offer after its gather)."""
        if self._puts.full():
            return False
        ring = self._ring
        return not on_cuda or ring is None or ring.can_take(n)

    def offer(self, ns: Namespace, hashes: list[bytes], parents: list[bytes], tokens: list[np.ndarray],
              data: torch.Tensor) -> bool:
        """Queue pages (data [n, L, parts, P, H, D], any device) for put; False if dropped.

        On CUDA `data` must be a fresh tensor made on the current stream (a gather): the side
        stream waits for it, copies it into the pinned ring and records an event; the current
        stream never waits for the copy.
        """
        if self._puts.full():
            self.dropped_puts += len(hashes)
            return False
        event = slot = ring = None
        n = data.shape[0]
        if data.device.type == "cuda":
            ring = self._ring_for(tuple(data.shape[1:]), data.dtype)
            slot = ring.take(n)
            if slot is None:
                self.dropped_puts += len(hashes)
                return False
            side = self._side(data.device, "_put_stream")
            side.wait_stream(torch.cuda.current_stream(data.device))
            with torch.cuda.stream(side):
                ring.buf[slot:slot + n].copy_(data, non_blocking=True)  # device -> pinned host, off the compute stream
                event = torch.cuda.Event()
                event.record(side)
            data.record_stream(side)  # the allocator keeps `data` until the side stream is past it
            data = ring.buf[slot:slot + n]
        try:
            self._puts.put_nowait((ns, hashes, parents, tokens, data, event, slot, ring))
            self._offered.set()
            return True
        except queue.Full:  # not reached while this thread is the only producer; kept for safety
            if slot is not None:
                ring.untake(slot)
            self.dropped_puts += len(hashes)
            return False

    def _ring_for(self, page_shape: tuple, dtype: torch.dtype) -> PinnedRing:
        ring = self._ring
        if ring is None or not ring.fits(page_shape, dtype):  # one model per engine: made once
            page_bytes = int(np.prod(page_shape)) * torch.empty(0, dtype=dtype).element_size()
            ring = PinnedRing(max(1, self.ring_bytes // page_bytes), page_shape, dtype)
            self._ring = ring
        return ring

    def _offer_steps(self, item):
        """One offer's put as a generator of work (kvc.pagecopy.Stepping): the wait for
        its copy into the ring, then the store's put_steps for each PUT_BATCH pages (a remote
        cache's put_pages, which has no steps, as one piece each). A failure is logged and counted
        here; the ring slot and the queue's count are given back at the end."""
        ns, hashes, parents, tokens, data, event, slot, ring = item
        try:
            if event is not None:
                yield _EventWork(event)
            pages = list(map(Page, hashes, parents, tokens, data.unbind(0)))
            for i in range(0, len(pages), PUT_BATCH):
                more = i + PUT_BATCH < len(pages)
                yield None  # a place to stop between batches
                if self.stepped:
                    yield from self.cache.put_steps(ns, pages[i:i + PUT_BATCH], chain_continues=more)
                else:
                    self.cache.put_pages(ns, pages[i:i + PUT_BATCH], chain_continues=more)
        except Exception:  # a failing tier must not stop the engine; say so and go on
            self.failed_puts += 1
            log.warning("offering %d pages to the host tiers failed", len(hashes), exc_info=True)
        finally:
            if slot is not None:
                ring.give(slot)
            self._puts.task_done()

    def _put_loop(self) -> None:
        """The put thread. Under the "engine" gate it does the put work only while the engine is
        idle (or not on CUDA), starting the byte work on native threads like the engine's thread;
        under the others it runs each piece's byte work itself (one GIL hand-over a piece) and
        waits for GPU slack before each piece's Python (_wait_for_slack; before each offer only
        with pause_puts off)."""
        while True:
            if self._closed and self._task is None:
                return
            engine = self.put_gate == "engine"
            if engine and not self._engine_idle():
                # asleep until the engine could be idle (not woken by each launch: a wake takes the GIL)
                self._stop.wait(max(self._active + IDLE_S - time.monotonic(), IDLE_S / 4))
                continue
            if not engine and (self.pause_puts or not self.stepped or self._task is None):
                self._wait_for_slack()  # pause_puts off: before each offer only (benchmarks compare)
            with self._driver:
                st = self._advance(start=engine)
            if st == "ran":
                self.thread_put_pieces += 1
            elif st == "busy":
                time.sleep(0.0002)
            elif not self._closed:
                self._offered.wait(IDLE_S)
                self._offered.clear()

    def flush(self) -> None:
        """Wait until queued puts are done (tests, shutdown)."""
        self._puts.join()

    def close(self) -> None:
        self._gate_disk_writes(None)
        self._puts.put(None)
        self._offered.set()
        self._stop.set()
        self._putter.join(timeout=5)
        self._prober.shutdown(wait=True)
        self._loader.shutdown(wait=True)
