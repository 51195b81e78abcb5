"""TieredStore: the cpu and disk tiers behind one CacheBackend.

Policies (DESIGN section 5): puts land in the cpu tier (and on disk too with
`disk_write: through`); a page evicted from cpu is written back to disk; a disk hit is promoted
to cpu; eviction is LRU over unpinned pages with the deepest page of a chain first (pages of a
chain are touched tail-first), in batches between the watermarks. Every read verifies the
page's checksum; a mismatch is a miss, the page is dropped and counted. Hits are verified: the
stored parent hash and token ids must equal the query's.

With `kvc.cluster_url` a cluster tier (kvc/cluster_tier.py) sits below disk: lookups and gets
ask it for what cpu and disk lack (outside the store lock), its hits are promoted to cpu, and
admitted pages reach it write-behind from the cpu tier. `kvc.disk_admission_hits` gates what goes
down to disk and the cluster (kvc/admission.py).

Every tier keys a page by its namespace root and its hash (`key`), never by the hash alone: a
chain hash depends on the parent, not on the root, so a page put in namespace B under the last
page of A's prefix has the hash A's next page would have. Scoped keys keep it out of A's chain:
A's lookups never count it, and A's own put of that page is stored, not a "collision".
"""
from __future__ import annotations

import heapq
import itertools
import logging
import operator
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from . import cudacopy, gpu_checksum, hashing, hostcopy, pagecopy, pinned
from .admission import Admission
from .backend import BAD_PARENT, LookupResult, PinBudgetExceeded, PutResult
from .cluster_tier import ClusterTier, NullCluster
from .config import KvcConfig
from .cpu_tier import CpuTier, Entry, NullTier
from .disk_tier import DiskTier
from .hashing import DIGEST_BYTES, Namespace
from .metrics import KvcMetrics
from .record import Page, pack_header, record_len, torch_dtype

log = logging.getLogger("kvc.store")
GB = 1 << 30
MAX_LEASES = 1 << 16  # live leases per owner (tenant): each costs the service memory
# a CUDA get copies and hashes its cpu pages in this many parts (each >= MIN_VERIFY_PART pages), so
# the checksum kernel of one part overlaps the next part's copy and only the last part's is serial
VERIFY_PARTS = 4
MIN_VERIFY_PART = 64

Listener = Callable[[str, bytes, bytes, bytes, str], None]  # kind, ns_root, hash, parent, tier
# Pages demoted from the cpu tier per hold of the store lock: a demotion copies each page's record
# out of the slab under the lock (before its slot is reused), and a batch down to the low watermark
# is ~1,000 pages (~400 MB) for a 4 GB tier: one such hold kept a cpu hit's load waiting 117-145 ms
# (runs BT, BU; 150-270 ms on the 2-core VM for 400 pages). 32 pages are ~12 MiB a hold.
DEMOTE_CHUNK = 32
# A put's records for the disk and cluster writers are built (and offered) this many pages at a
# time, so a writer sends one group while the next is copied: on the 2-core VM a cluster-only put
# of 96 pages of 1.5 MiB spent ~42 ms building every record before its writer began ~105 ms of
# SETs (benchmarks/probe_cluster_put.py).
PUBLISH_GROUP = 16
# get_pages copies the pages it promotes from the cluster and disk tiers into the cpu tier in one
# native call a run (False: a numpy copy a page, as before; benchmarks compare the two)
BATCH_PROMOTIONS = True
# a layered get this large hashes its pages in two parts (TieredStore.checksum_parts), only the
# second after the last copy: at 32K tokens of 12-layer pages (0.81 GB, a 0.92 ms tail) the cpu hit
# was 1.1 / 1.6 ms quicker in runs DN / DO (0.8 ms slower in DM's five samples). Below it one launch
# after the last copy: at 8K (0.2 GB) the tail is ~0.2 ms, less than the spread between runs, and
# the extra launch is host work on a hit whose step waits for the host
CHECKSUM_PARTS_MIN_BYTES = 256 << 20


class _DeviceChecksumError(RuntimeError):
    """The device checksum kernel failed to build or launch (not a caller's callback)."""


_SLOT = operator.attrgetter("slot")


def key(root: bytes, h: bytes) -> bytes:
    """A page's key in the tiers: its namespace root, then its hash (32 bytes)."""
    return root + h


def keys_of(root: bytes, hashes) -> list[bytes]:
    """key(root, h) for each h (bytes or any buffer: the concatenation is bytes either way). A list
    comprehension: a 32K-token request's 2,051 keys in 0.07-0.12 ms on the 2-core VM, where
    list(map(root.__add__, map(bytes, hashes))) took 0.20-0.22 (probe_lookup.py)."""
    return [root + h for h in hashes]


def hash_of(k: bytes) -> bytes:
    return k[DIGEST_BYTES:]


def _first_none(col: list, n: int) -> int:
    """Index of the first None among col[:n], or n. By identity: list.index(None) compares with ==,
    which calls the dataclass __eq__ of every Entry before it from Python (0.14 ms for a 32K-token
    prompt's 2,051 entries on the 2-core VM); operator.is_ over the column runs in C (0.06 ms,
    probe_lookup.py)."""
    try:
        return list(map(operator.is_, itertools.islice(col, n), itertools.repeat(None))).index(True)
    except ValueError:
        return n


@dataclass
class _Tally:
    """What a put_pages call did, page by page."""
    stored: int = 0
    dup: int = 0
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        self.reasons.append(reason)


@dataclass(eq=False)
class LayeredGet:
    """A layer-by-layer get queued by TieredStore.start_layers_into; finish_layers gives its count."""
    keys: list[bytes]  # the run's keys (its pages are not evicted until finished)
    run: int
    device: torch.device
    entries: list = field(default_factory=list)  # the cpu tier's entries read (an admin delete may drop one)
    flags: torch.Tensor | None = None  # pinned bool [run], page i failed its device checksum (after done)
    done: "torch.cuda.Event | None" = None  # after the copies, the callbacks' work and the flags' copy
    verified: Callable | None = None  # the reader threads' verdict (host verify)
    finished: bool = False
    good: int = 0


def _pages_contiguous(t: torch.Tensor) -> bool:
    """Whether each t[i] is contiguous (t's first dimension may have any stride)."""
    want = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != want:
            return False
        want *= size
    return True


class TieredStore:
    def __init__(self, config: KvcConfig, metrics: KvcMetrics | None = None,
                 sum_copy: pagecopy.SumCopy | None = None):
        """sum_copy: how a put computes checksums and fills cpu slots (kvc.pagecopy); default the
        native batch where it builds, else the per-page path."""
        self.config = config
        self.metrics = metrics or KvcMetrics()
        self._lock = threading.RLock()
        # a CUDA get verifies the cpu tier's pages on the device, after the copy (one read of the
        # slab instead of two): kvc.gpu_checksum; False hashes them on the host (benchmarks compare)
        self.verify_on_device = True
        self._verify_streams: dict = {}  # device -> the side stream the device checksums run on
        # how a layer-by-layer get moves each layer: "dma" (kvc.cudacopy, strided copies) or "kernel"
        # (kvc.hostcopy, one launch a layer, the GPU reading the pinned slab; a benchmark's variant:
        # 50 GB/s against DMA's 53 alone (run BK), and the cpu hits it fed slower than DMA's in 7 of 8
        # interleaved rows, BL-BO). A kernel that fails to launch turns itself off (layer_copy_off
        # says why) and the get goes on as DMA
        self.layer_copy = "dma"
        self.layer_copy_off: str | None = None
        # a layered get of CHECKSUM_PARTS_MIN_BYTES or more hashes every group of layers but the last
        # as soon as they landed, the rest after the last copy (False: every layer after the last
        # copy, the path before; benchmarks compare)
        self.checksum_parts = True
        cpu_bytes = int(config.cpu_memory_size_GB * GB)
        disk_bytes = int(config.disk_size_GB * GB)
        self.cpu = CpuTier(cpu_bytes) if cpu_bytes > 0 and not config.gpu_only else NullTier("cpu")
        if config.disk_path and disk_bytes > 0 and not config.gpu_only:
            self.disk = DiskTier(config.disk_path, disk_bytes, self.metrics,
                                 config.high_watermark, config.low_watermark)
            self.disk.listener = lambda kind, ns, k, p: self._emit(kind, ns, hash_of(k), p, "disk")
        else:
            self.disk = NullTier("disk")
        self.admission = Admission(config.disk_admission_hits)
        if config.cluster_url and not config.gpu_only:
            self.cluster = ClusterTier(config.cluster_url, self.metrics, config.cluster_timeout_s)
            self.cluster.source = self._cluster_records
            self.cluster.listener = lambda kind, ns, h, p: self._emit(kind, ns, h, p, "cluster")
        else:
            self.cluster = NullCluster()
        self._pins: dict[bytes, int] = {}
        self._reading: dict[bytes, int] = {}  # key -> layered gets still reading its slab slot
        self._leases: dict[str, tuple[list[bytes], str | None, int]] = {}  # keys, owner, bytes
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, lease)
        self._pinned_bytes: dict[str | None, int] = {}  # owner -> page bytes of its live leases
        self._owner_leases: dict[str | None, int] = {}
        self.pin_budget = int(config.pin_budget_fraction * (self.cpu.capacity or self.disk.capacity))
        self._listeners: list[Listener] = []
        for tier in (self.cpu, self.disk):
            self.metrics.capacity.labels(tier=tier.name).set(tier.capacity)
        # a put's checksums and slab copies: one native call per batch where it builds
        self._sum_copy = sum_copy or pagecopy.best()
        self._slab = self.cpu.slab_np if isinstance(self.cpu, CpuTier) else None
        # the children counted once per page on the put path, looked up once
        self._m_cpu_stored = self.metrics.store_bytes.labels(tier="cpu")
        self._m_cpu_evicted = self.metrics.evictions.labels(tier="cpu", reason="capacity")
        self._m_put = {r: self.metrics.store_pages.labels(tier="any", result=r) for r in ("stored", "duplicate", "rejected")}
        # (tier, used gauge, pages gauge): set after every put, a labels() lookup each cost ~15 us a call
        self._gauges = [(t, self.metrics.used.labels(tier=t.name), self.metrics.pages.labels(tier=t.name))
                        for t in (self.cpu, self.disk)]
        self._update_gauges()

    # -- lookup --------------------------------------------------------------------------------
    def lookup(self, ns: Namespace, tokens=None, hashes=None) -> LookupResult:
        t0 = time.perf_counter()
        P = ns.spec.page_size
        root = ns.root
        if tokens is not None:
            raw = hashing.tokens_bytes(tokens)
            hashes = hashing.page_hashes(root, raw, P) if hashes is None else list(hashes)
            n_query = len(raw) // 4
        else:
            if hashes is None:
                raise ValueError("lookup needs tokens or page hashes")
            hashes, raw, n_query = list(hashes), None, len(hashes) * P
        # No store lock: the engine asks this on its own thread, and a put holds the lock for whole
        # batches (on the H200 a third of the engine thread's time waited here). The tiers' maps are
        # read with single dict.get calls, atomic under the GIL; the answer is advice that
        # get_pages verifies again, page by page, under the lock.
        located, tiers = self._located(ns, root, hashes, raw)
        self._count_lookup(P, len(hashes), n_query, located, t0)
        return LookupResult(hashes, tiers, located)

    def lookup_from(self, ns: Namespace, parent: bytes, hashes: Sequence[bytes], tokens) -> list[str]:
        """lookup for a run of pages that hangs from `parent`, a page the caller holds and has
        verified itself (an engine's device pool): the tier of each page of the run's longest
        verified prefix. `tokens`: the run's token ids (or their uint32 bytes). An engine that
        reuses a 32K-token prefix from its device pool asks this about the last pool page and the
        pages after it instead of the whole prompt (0.8-1.1 ms of lookup a request on the 2-core VM)."""
        t0 = time.perf_counter()
        hashes = list(hashes)
        raw = hashing.tokens_bytes(tokens)
        if len(raw) < 4 * ns.spec.page_size * len(hashes):
            raise ValueError(f"lookup_from: {len(raw) // 4} token ids for {len(hashes)} pages")
        located, _ = self._located(ns, parent, hashes, raw)
        self._count_lookup(ns.spec.page_size, len(hashes), len(raw) // 4, located, t0)
        return located

    def _located(self, ns: Namespace, parent: bytes, hashes: list[bytes], raw: bytes | None):
        """(located, tiers) of the longest verified run of `hashes` hanging from `parent`: the local
        tiers, then the cluster below them."""
        P = ns.spec.page_size
        located, tiers = self._verified_prefix(ns.root, hashes, raw, 4 * P, parent)
        n = len(located)
        if n < len(hashes) and not isinstance(self.cluster, NullCluster):  # below disk, outside the lock
            k = self.cluster.lookup(ns, hashes[n:], hashes[n - 1] if n else parent,
                                    raw[n * 4 * P:] if raw is not None else None)
            located += ["cluster"] * k
            tiers["cluster"] = k  # the cluster's run after the local tiers' (it is not asked about theirs)
        return located, tiers

    def _count_lookup(self, P: int, asked: int, n_query: int, located: list[str], t0: float) -> None:
        n = len(located)
        m = self.metrics
        m.lookup_requests.labels(result="hit" if n and n == asked else "partial" if n else "miss").inc()
        m.lookup_query_tokens.inc(n_query)
        for tier in ("cpu", "disk", "cluster"):
            k = located.count(tier)
            if k:
                m.lookup_hit_tokens.labels(tier=tier).inc(k * P)
        m.lookup_duration.observe(time.perf_counter() - t0)

    def _verified_prefix(self, root: bytes, hashes: list[bytes], raw: bytes | None, step: int,
                         parent: bytes | None = None):
        """(located, tiers): the tier of each page of the longest verified prefix, and per tier its
        own leading run. Done in bulk (dict lookups via map, one list compare for parents, one
        bytes compare for tokens); page by page only to find where a mismatch starts."""
        keys = keys_of(root, hashes)
        cpu = list(map(self.cpu.entries.get, keys))
        disk = list(map(self.disk.entries.get, keys))
        n = _first_none(cpu, len(cpu))
        if n == len(cpu) or disk[n] is None:  # the run is the cpu tier's (a cpu hit): no walk per page
            held = cpu[:n]
            located = ["cpu"] * n
        else:
            while n < len(cpu) and (cpu[n] is not None or disk[n] is not None):  # longest run held by some tier
                n += 1
            held = [c if c is not None else d for c, d in zip(cpu[:n], disk[:n])]
            located = ["disk" if c is None else "cpu" for c in cpu[:n]]
        parents = [root if parent is None else parent] + hashes[:n - 1] if n else []
        if [e.parent for e in held] != parents:
            n = next(i for i, (e, p) in enumerate(zip(held, parents)) if e.parent != p)
            del located[n:]
            self.metrics.collisions.inc()
        if raw is not None and n and b"".join([e.tokens for e in held[:n]]) != raw[:n * step]:
            n = next(i for i, e in enumerate(held[:n]) if e.tokens != raw[i * step:(i + 1) * step])
            del located[n:]
            self.metrics.collisions.inc()
        tiers = {}
        for tier, col in (("cpu", cpu), ("disk", disk)):
            if getattr(self, tier).capacity:
                tiers[tier] = _first_none(col, n)
        return located, tiers

    # -- get -----------------------------------------------------------------------------------
    def get_into(self, ns: Namespace, hashes: Sequence[bytes], out: torch.Tensor,
                 landed: Callable[[int, int], None] | None = None) -> int:
        """get_pages into `out` without Page objects (an engine's load needs the bytes and the
        count: building and dropping 2,048 Page objects sat in the ~2 ms around a 32K load's last
        copy in run V's timeline, probe_cpu_hit.py). How many leading pages landed and verified.

        landed(lo, hi): rows lo..hi of out are queued to land; called as soon as they are, on the
        stream they land on (on CUDA a side stream, beside the next rows' copies), so the caller
        can queue its own use of them there (the engine's scatter into its pool). Rows at or past
        the returned count may hold bytes that failed their checksum: use only the first count."""
        self._check_out(ns, hashes, out)
        if out.device.type == "cuda":
            return self._get_to_device(ns, list(hashes), out, landed=landed)
        n = len(self._get_host(ns, hashes, out, False))
        if n and landed is not None:
            landed(0, n)
        return n

    @staticmethod
    def _check_out(ns: Namespace, hashes: Sequence[bytes], out: torch.Tensor | None) -> None:
        spec = ns.spec
        if out is not None and (tuple(out.shape[1:]) != spec.shape or out.shape[0] < len(hashes)
                                or out.dtype != torch_dtype(spec.dtype)):
            raise ValueError(f"out must be a tensor [>={len(hashes)}, {spec.shape}] of {spec.dtype}")
        if out is not None and out.device.type == "cpu" and not _pages_contiguous(out):
            # its pages are read through byte views of its rows, which a page with gaps cannot give
            raise ValueError("out's pages must each be contiguous (rows may be apart, e.g. every other "
                             "row of a larger tensor)")

    def get_pages(self, ns: Namespace, hashes: Sequence[bytes], out: torch.Tensor | None = None) -> list[Page]:
        self._check_out(ns, hashes, out)
        if out is not None and out.device.type == "cuda":
            return self._get_to_device(ns, list(hashes), out, pages=True)
        return self._get_host(ns, hashes, out, True)

    def _get_host(self, ns: Namespace, hashes: Sequence[bytes], out: torch.Tensor | None,
                  want_pages: bool) -> list:
        """get_pages into a CPU `out` (or new tensors): the leading pages served, as Page objects, or
        with want_pages=False as None each (get_into's count: no tensor a page is made or dropped,
        each of which can hand the GIL to a busy thread and wait a switch interval to get it back)."""
        spec = ns.spec
        fetched = self._cluster_fetch(ns, list(hashes), out)  # before the lock: it is a network call
        t0 = time.perf_counter()
        root = ns.root
        n = len(hashes)
        flats = None  # out's rows as numpy bytes (one numpy view of out: no torch call a page)
        first, datas = n, ()  # out's page tensors from index `first` on (made by one unbind where wanted)

        def row(i: int) -> tuple[torch.Tensor | None, np.ndarray]:  # (page tensor or None, its flat bytes)
            nonlocal flats, first, datas
            if out is None:
                data = torch.empty(spec.shape, dtype=torch_dtype(spec.dtype))
                return data, data.view(torch.uint8).reshape(-1).numpy()
            if flats is None:
                flats = out[:n].view(torch.uint8).reshape(n, -1).numpy()
            if want_pages and i < first:
                first, datas = i, out[i:n].unbind(0)
            return (datas[i - first] if want_pages else None), flats[i]

        keys = [key(root, bytes(h)) for h in hashes]
        # cluster and disk pages promoted to the cpu tier: slots reserved under the lock, the bytes
        # copied in one native call a run (_commit_promotions) instead of a numpy copy a page, each
        # of which hands the GIL to a busy thread and waits a switch interval to get it back
        later: list | None = ([] if BATCH_PROMOTIONS and self._slab is not None and pagecopy.library() is not None
                              else None)
        try:
            return self._get_pages(ns, hashes, out, fetched, t0, keys, row, later, want_pages)
        finally:
            if later:  # an exception on the way: the reserved slots go back
                with self._lock:
                    for _, e, off, _ in later:
                        self.cpu.cancel(off, e.nbytes)

    def _get_pages(self, ns, hashes, out, fetched, t0, keys, row, later, want_pages: bool) -> list:
        """get_pages after its cluster fetch: the cpu run, then cpu, cluster and disk pages in order."""
        spec, root = ns.spec, ns.root
        disk_bytes = cluster_bytes = 0
        with self._lock:
            # the leading run of cpu pages is read (copied and verified) by the tier's threads
            run = 0
            for k in keys:
                e = self.cpu.get(k)
                if e is None or e.nbytes != spec.page_bytes or e.ns_root != root:
                    break
                run += 1
            datas: tuple = ()
            if run:  # the run's page tensors and flat bytes as views of one block (unbind, not a view op a page)
                block = out[:run] if out is not None else torch.empty((run, *spec.shape), dtype=torch_dtype(spec.dtype))
                datas = block.unbind(0)
                ok = self.cpu.read_many(keys[:run], block.view(torch.uint8).reshape(run, -1).unbind(0))
            else:
                ok = []
            good = next((i for i, v in enumerate(ok) if not v), run)
            pages = ([self._page_of(h, self.cpu.get(k), datas[i]) for i, (h, k) in enumerate(zip(hashes[:good], keys))]
                     if want_pages else [None] * good)
            if good < run:
                self._corrupt_cpu(keys[good])
        i = run if good == run else len(hashes)
        while i < len(hashes):
            with self._lock:
                step = self._get_step(root, hashes, keys, i, pages, row, fetched, later, want_pages)
            if step is None:  # the run ends here
                break
            if isinstance(step, int):  # a cpu or cluster page, read under the lock
                cluster_bytes += step
                i += 1
                continue
            # a run [i, j) of disk-only pages, read without the store's lock (its reader threads, a
            # slow device: other clients' puts, lookups and gets go on meanwhile); each page gets
            # its cpu-tier slot under the lock as soon as it and all before it are verified, and
            # the run's promotions are copied and published when the read ends
            self._commit_promotions(later)  # the cluster pages before the run, before its room is made
            j = step[1]
            if self._slab is not None:  # a full cpu tier: room for the promotions, a chunk per lock hold
                self._make_room(spec.page_bytes, j - i, lambda: keys[i:j], None)
            got = [row(x) for x in range(i, j)]

            def served(x: int, info, got=got) -> None:
                data, flat = got[x]
                e = Entry(info.ns_root, info.parent, info.tokens.astype("<u4").tobytes(),
                          info.dtype, info.shape, info.payload_len, info.checksum)
                pages.append(Page(info.hash, info.parent, info.tokens, data) if want_pages else None)
                with self._lock:
                    self._promote(key(info.ns_root, info.hash), e, flat, later)
            infos = self.disk.read_run(keys[i:j], [f for _, f in got], root, served)
            self._commit_promotions(later)
            disk_bytes += sum(info.payload_len for info in infos)
            if len(infos) < j - i:
                break
            i = j
        self._commit_promotions(later)
        with self._lock:
            for k in reversed(keys[:len(pages)]):  # tail first: the deepest page becomes the oldest
                if self.cpu.get(k) is not None:
                    self.cpu.touch(k)
                    self._hit(k)
                self.disk.touch(k)
            self._update_gauges()
        if disk_bytes:
            self.metrics.transfer_bytes.labels(src="disk", dst="cpu").inc(disk_bytes)
            self.metrics.transfer_duration.labels(src="disk", dst="cpu").observe(time.perf_counter() - t0)
        if cluster_bytes:
            self.metrics.transfer_bytes.labels(src="cluster", dst="cpu").inc(cluster_bytes)
            self.metrics.transfer_duration.labels(src="cluster", dst="cpu").observe(time.perf_counter() - t0)
        return pages

    def _promote(self, k: bytes, e: Entry, flat: np.ndarray, later: list | None) -> None:
        """Under the lock: a page get_pages read from the cluster or disk tier (its bytes in flat)
        into the cpu tier: with `later`, a reserved slot whose copy _commit_promotions makes with the
        rest of the run; else copied and published here."""
        if later is None:
            self._put_cpu(k, e, flat)
            return
        off = self._reserve_cpu(k, e.nbytes)
        if off is not None:
            later.append((k, e, off, flat.ctypes.data))

    def _commit_promotions(self, later: list | None) -> None:
        """_promote's queued pages: copied into their slots in one native call without the lock or
        the GIL, then published under the lock (a slot whose page another thread stored meanwhile,
        or queued twice by this get, goes back)."""
        if not later:
            return
        base = self._slab.ctypes.data
        pagecopy.library().copy([src for *_, src in later], [base + off for _, _, off, _ in later],
                                [e.nbytes for _, e, _, _ in later])
        items, later[:] = list(later), []  # from here on not get_pages' to give back
        with self._lock:
            for k, e, off, _ in items:
                if self.cpu.get(k) is None:
                    self._cpu_stored(k, e, off)
                else:
                    self.cpu.cancel(off, e.nbytes)

    def _get_step(self, root: bytes, hashes, keys: list[bytes], i: int, pages: list, row,
                  fetched: dict, later: list | None, want_pages: bool) -> "int | tuple[int, int] | None":
        """get_pages' next step from page i, under the lock: a cpu page (read and verified here) or a
        cluster page (its fetched record verified, promoted to the cpu tier): its bytes from the
        cluster (0 for a cpu page) after appending it to `pages`; a run of disk-only pages:
        (i, j), for the caller to read without the lock; None where the run ends."""
        h, k = hashes[i], keys[i]
        e = self.cpu.get(k)
        if e is not None:  # a cpu page after disk pages
            data, flat = row(i)
            if e.nbytes != flat.nbytes or e.ns_root != root:
                return None
            if not self.cpu.read_into(k, flat):
                self._corrupt_cpu(k)
                return None
            pages.append(self._page_of(h, e, data) if want_pages else None)
            return 0
        j = i
        while j < len(hashes) and self.cpu.get(keys[j]) is None and self.disk.get(keys[j]) is not None:
            j += 1
        if j > i:
            return i, j
        data, flat = row(i)  # neither cpu nor disk: the cluster tier's verified record, if fetched
        got1: dict = {}
        if not self._from_cluster(fetched.get(h), root, flat, got1):
            return None
        e = got1["e"]
        pages.append(self._page_of(h, e, data) if want_pages else None)
        self._promote(k, e, flat, later)  # promoted, as disk hits are
        return e.nbytes

    # -- cluster tier and admission ------------------------------------------------------------
    def _cluster_fetch(self, ns: Namespace, hashes: list[bytes],
                       out: torch.Tensor | None = None) -> dict[bytes, tuple]:
        """Verified cluster records for the pages from the first one that cpu and disk both lack:
        hash -> (info, record), or (info, record, address) where the payload was already copied
        into out's row at that address (with a caller's CPU `out` and the native library, each
        payload is checksummed as it is copied, one pass without the GIL instead of a checksum
        pass and a GIL-held copy)."""
        if isinstance(self.cluster, NullCluster):
            return {}
        root = ns.root
        with self._lock:
            i = next((i for i, h in enumerate(hashes)
                      if self.cpu.get(key(root, h)) is None and self.disk.get(key(root, h)) is None), len(hashes))
        lib = pagecopy.library() if out is not None and out.is_contiguous() else None
        if lib is None:
            return self.cluster.get(ns, hashes[i:])
        got = self.cluster.get(ns, hashes[i:], check_payload=False)
        run, src, dst, lens = [], [], [], []
        # out's rows by address (out is contiguous): no torch op a page, each of which may hand the
        # GIL to a busy thread and wait a switch interval to get it back
        base, row_bytes = out.data_ptr(), out[0].nbytes if len(out) else 0
        for j, h in enumerate(hashes[i:], start=i):
            rec = got.get(h)
            if rec is None or rec[0].payload_len != row_bytes:
                break  # _from_cluster refuses it too
            info, buf = rec
            run.append((h, info, buf))
            src.append(np.frombuffer(buf, dtype=np.uint8).ctypes.data + info.payload_offset)
            dst.append(base + j * row_bytes)
            lens.append(info.payload_len)
        sums = lib.pointers(src, dst, lens) if run else []
        fetched = {}
        for (h, info, buf), addr, s in zip(run, dst, sums):
            if s != info.checksum:
                self.cluster.reject(ns, h, "payload checksum mismatch")
                break
            fetched[h] = (info, buf, addr)
        return fetched

    @staticmethod
    def _from_cluster(rec, root: bytes, flat: np.ndarray, got: dict) -> bool:
        """Copy a verified cluster record's payload into flat (uint8; unless _cluster_fetch already
        did); its Entry goes to got["e"]."""
        if rec is None:
            return False
        info, buf = rec[0], rec[1]
        if info.payload_len != flat.nbytes or info.ns_root != root:
            return False
        if len(rec) < 3 or rec[2] != flat.ctypes.data:
            flat[:] = np.frombuffer(buf, dtype=np.uint8, offset=info.payload_offset)
        got["e"] = Entry(info.ns_root, info.parent, info.tokens.astype("<u4").tobytes(),
                         info.dtype, info.shape, info.payload_len, info.checksum)
        return True

    def _cluster_records(self, pages: list[tuple[bytes, bytes]]) -> list[memoryview | None]:
        """The records of cpu-tier pages (ns_root, hash) for the cluster writer (its thread), built
        together under one lock (_records: one native copy, without the GIL, where a GIL-held copy
        of 384 KiB per record stopped a busy engine thread); None for a page that left the tier."""
        with self._lock:
            found = []
            for i, (root, h) in enumerate(pages):
                k = key(root, h)
                e = self.cpu.get(k)
                if e is not None:
                    found.append((i, h, e, self.cpu.view(k)))
            records = self._records([(h, e, v) for _, h, e, v in found])
        out: list[memoryview | None] = [None] * len(pages)
        for (i, _, _, _), rec in zip(found, records):
            out[i] = rec
        return out

    @staticmethod
    def _record(h: bytes, e: Entry, payload: np.ndarray) -> memoryview:
        """The page's record (header + payload) in a fresh buffer, for the disk and cluster writers.

        One copy that keeps the GIL (a memoryview assignment, ~10 us for 384 KiB): beside a thread
        that always wants the GIL, a copy that hands it over (numpy's) costs the caller that
        thread's switch interval, 5 ms, to get it back, for every record of a put or demotion."""
        head = pack_header(e.ns_root, h, e.parent, e.checksum, e.tokens, e.dtype, e.shape, payload.nbytes)
        record = memoryview(np.empty(len(head) + payload.nbytes, dtype=np.uint8))
        record[:len(head)] = head
        record[len(head):] = payload.data
        return record

    def _records(self, items: list[tuple[bytes, Entry, np.ndarray]]) -> list[memoryview]:
        """The records of (hash, entry, payload) items, as _record builds them, in one buffer: the
        headers are written here, the payloads by one native call that lets go of the GIL once
        (kvc.pagecopy); one _record per item where it does not build."""
        return pagecopy.drive(self._records_steps(items))

    def _records_steps(self, items: list[tuple[bytes, Entry, np.ndarray]]):
        """_records as a generator of its byte work (pagecopy.drive runs it now; an engine's thread
        starts it and polls): yields the payloads' copy, returns the records."""
        lib = pagecopy.library() if len(items) > 1 else None
        if lib is None or not all(p.flags.c_contiguous for _, _, p in items):
            records = [self._record(h, e, p) for h, e, p in items]
            if len(items) > 1:  # built here (no native copy to wait for): a place to stop all the same,
                yield None      # so demotions pause between chunks without a compiler too
            return records
        heads = [pack_header(e.ns_root, h, e.parent, e.checksum, e.tokens, e.dtype, e.shape, p.nbytes)
                 for h, e, p in items]
        buf = np.empty(sum(len(hd) + p.nbytes for hd, (_, _, p) in zip(heads, items)), dtype=np.uint8)
        whole, base = memoryview(buf), buf.ctypes.data
        out, src, dst, lens, at, off = [], [], [], [], [], 0
        for hd, (_, _, p) in zip(heads, items):
            at.append(off)
            src.append(p.ctypes.data)
            dst.append(base + off + len(hd))
            lens.append(p.nbytes)
            out.append(whole[off:off + len(hd) + p.nbytes])  # the records keep the buffer alive
            off += len(hd) + p.nbytes
        # first: the fresh buffer's page faults (2 MiB each, zeroed) land in the native copy
        yield pagecopy.CopyWork(lib, src, dst, lens, keep=(buf, items))
        for hd, o in zip(heads, at):
            whole[o:o + len(hd)] = hd
        return out

    def _hit(self, k: bytes) -> None:
        """A cpu page was served; the use that admits it sends it down (write-through disk, cluster)."""
        if not self.admission.on_hit(k):
            return
        e = self.cpu.get(k)
        if self.config.disk_write == "through" and self.disk.get(k) is None:
            self._put_disk(k, e, self.cpu.view(k))
        self.cluster.offer(e.ns_root, hash_of(k))

    def _get_to_device(self, ns: Namespace, hashes: list[bytes], out: torch.Tensor, pages: bool = False,
                       landed: Callable[[int, int], None] | None = None):
        """get_pages into a CUDA tensor: cpu-tier pages go host-to-device straight from the
        pinned slab and are verified where they land (kvc.gpu_checksum, after the copies on the
        same stream: the slab is read once; where that kernel cannot run, the reader threads hash
        the slab bytes beside the copies); the copies are complete (and the slab slots free to
        change) before the lock is released. The rest of the run (disk pages) goes through a host
        buffer. pages: return the Page objects (get_pages), else the count (get_into); landed: as
        in get_into."""
        root = ns.root
        keys = keys_of(root, hashes)
        nbytes = out[0].numel() * out.element_size() if len(out) else 0
        with self._lock:
            held = self._cpu_run(keys, nbytes, root)
            run = len(held)
            flat = out.view(torch.uint8).reshape(-1)  # [n * page bytes] on the device
            rows = flat[:run * nbytes].view(run, nbytes)
            on_gpu = run > 0 and self.verify_on_device and gpu_checksum.supported(rows)
            bad = None
            if on_gpu:
                try:
                    bad = self._copy_and_hash(held, flat, rows, nbytes, landed)
                except _DeviceChecksumError as e:  # a kernel that does not build here: verify on the host
                    gpu_checksum.mark_broken(str(e))
                    on_gpu = False
            if not on_gpu:
                self._copy_runs(held, flat, nbytes, 0, run)
                if run and landed is not None:
                    landed(0, run)
            verified = self.cpu.start_verify(held) if bad is None else None  # on the reader threads, beside the copies
            got: list[Page] = []
            if pages:  # the per-page host work overlaps the copies (~5 us a page)
                views = out.unbind(0)
                got = [self._page_of(h, e, views[i]) for i, (h, e) in enumerate(zip(hashes, held))]
            self._touch_run(keys, run)  # overlaps the copies
            good = self._verdict(bad, verified, run, out.device)
            if good < run:
                del got[good:]
            self._served(keys, run, good)
        count = good
        if good == run and run < len(hashes):  # continue from the host tiers through a cpu buffer
            rest = hashes[run:]
            tmp = torch.empty((len(rest), *ns.spec.shape), dtype=out.dtype)  # pageable: disk reads are slower than its copy
            more = self._get_host(ns, rest, tmp, pages)
            if more:
                out[run:run + len(more)].copy_(tmp[:len(more)])
                if landed is not None:
                    landed(run, run + len(more))
                if pages:
                    got += [Page(p.hash, p.parent, p.tokens, out[run + i]) for i, p in enumerate(more)]
                count += len(more)
        return got if pages else count

    def get_layers_into(self, ns: Namespace, hashes: Sequence[bytes], out: torch.Tensor,
                        layer_landed: Callable[[int, int], None], layer_group: int = 1,
                        blocks: Sequence[int] | None = None) -> int:
        """get_into for a load that is used layer by layer: out [L, n, *page shape[1:]] (layer-major,
        contiguous, on CUDA; n = len(hashes)) receives the leading run of cpu-tier pages one layer at
        a time (kvc.cudacopy: one strided copy per layer and run of adjacent slab slots), so layer 0
        of every page lands first. layer_landed(layer, run): every page's `layer` of the run is
        queued to land; called on a side stream that waited for those copies (the engine scatters
        the layer into its pool there and records an event its step waits for before the layer's
        attention). Verified after the last layer (kvc.gpu_checksum over the layer-major rows, or
        on the reader threads), so the callbacks precede the verdict: a caller uses the bytes before
        the count only if it can void that use. How many leading pages landed and verified; stops
        at the first page not in the cpu tier (the caller loads the rest another way).
        layer_group=g: the layers land in groups of g (the last may be shorter), one event and one
        callback a group, layer_landed(layer, run) for the group's last layer: every layer up to
        it has landed (fewer launches and events for a small load whose copies outrun the host).
        blocks: straight into a device pool instead, out its KV tensor [L, parts, num_blocks, *page
        shape[2:]] (kvc.device_pool.DevicePool.kv) and page i's layers into block blocks[i] (no
        staging buffer, no scatter: one strided copy per layer, part and run of slab slots whose
        blocks are consecutive too; the checksums read the pages in their blocks).
        The same as start_layers_into then finish_layers on one thread."""
        return self.finish_layers(self.start_layers_into(ns, hashes, out, layer_landed, layer_group=layer_group,
                                                         blocks=blocks))

    def start_layers_into(self, ns: Namespace, hashes: Sequence[bytes], out: torch.Tensor,
                          layer_landed: Callable[[int, int], None], block: bool = True,
                          layer_group: int = 1, blocks: Sequence[int] | None = None) -> "LayeredGet | None":
        """The first half of get_layers_into: queue every layer's copies, the callbacks and the
        checksums, and return at once (nothing here waits for the GPU). finish_layers(get), on any
        thread, waits for the verdict and gives the count. Until then the run's pages are not
        evicted (their slab slots are still being read). block=False: None when the store's lock
        is held by another thread (an engine thread that must not wait for a put)."""
        spec = ns.spec
        L, n = spec.shape[0], len(hashes)
        nbytes = spec.page_bytes
        parts = spec.shape[1] if blocks is not None else 1  # a layer's segments: the pool's tensors (K, V)
        if blocks is None and (not out.is_cuda or out.dtype != torch_dtype(spec.dtype) or not out.is_contiguous()
                               or tuple(out.shape) != (L, n, *spec.shape[1:]) or nbytes % L):
            raise ValueError(f"out must be a contiguous CUDA tensor [{L}, {n}, {spec.shape[1:]}] of {spec.dtype}")
        if blocks is not None:
            self._check_pool(spec, out, blocks, n)
        seg = nbytes // L
        root = ns.root
        keys = keys_of(root, hashes)
        if not self._lock.acquire(blocking=block):
            return None
        try:
            held = self._cpu_run(keys, nbytes, root)
            run = len(held)
            got = LayeredGet(keys[:run], run, out.device, held)
            if not run:
                return got
            cur = torch.cuda.current_stream(out.device)
            side = self._verify_stream(out.device)
            base = self.cpu.slab.data_ptr()
            if blocks is None:
                lm = out.view(torch.uint8).view(L, n, seg)  # the checksums' view: a segment a layer
                runs = [(i, j, base + held[i].slot) for i, j in self._slab_runs(held, nbytes, 0, run)]
                kernel = self._kernel_copier(held, lm, seg, out.device)
            else:  # the pool seen as [L * parts, blocks, part bytes]: a segment a layer and part
                lm = out.view(torch.uint8).view(L * parts, out.shape[2], seg // parts)
                runs = [(i, j, base + held[i].slot, blocks[i]) for i, j in self._slab_runs(held, nbytes, 0, run, blocks)]
                kernel = None  # DMA only
            on_gpu = (self.verify_on_device and lm.shape[2] % gpu_checksum.BLOCK_BYTES == 0
                      and gpu_checksum.supported(lm[0, :run]))
            got.verified = None if on_gpu else self.cpu.start_verify(held)  # the slab, beside the copies
            g = max(1, min(L, int(layer_group)))
            groups = [(lo, min(L, lo + g)) for lo in range(0, L, g)]
            # the checksums in two parts: every group but the last as soon as those have landed, on a
            # stream of their own (beside the last group's copy and the step's first layers), then
            # the last group and the end of the hash (run DJ: 0.92 ms at 32K after the last copy)
            parted = (on_gpu and len(groups) > 1 and self.checksum_parts
                      and run * nbytes >= CHECKSUM_PARTS_MIN_BYTES)
            index = None  # where each page is, for checksums that read the pool's blocks
            if on_gpu and blocks is not None and parted:  # before the copies: the first part must not
                index = pinned.upload_ids(blocks[:run], out.device)  # wait behind them (run DR did: garbage)
            landed_at = None
            if kernel is None:  # DMA: every layer's copies first, so the copy engine starts now and the
                landed_at = []  # rest of this host work runs beside it; an event after each group
                for lo, hi in groups:
                    for layer in range(lo, hi):
                        if blocks is None:
                            self._copy_layer(lm, runs, layer, seg, nbytes, cur)
                        else:
                            self._copy_layer_to_blocks(lm, runs, layer, parts, seg, nbytes, cur)
                    landed_at.append(torch.cuda.Event())
                    landed_at[-1].record(cur)
            want = self._expected_sums(held, out.device) if on_gpu else None
            if on_gpu and blocks is not None and index is None:  # read after the last copy only
                index = pinned.upload_ids(blocks[:run], out.device)
            for k in got.keys:  # read until finish_layers: not evicted (their slots not reused) before
                self._reading[k] = self._reading.get(k, 0) + 1
            last_lo = groups[-1][0]
            with torch.cuda.stream(side):  # allocated where they are last used (freed after that)
                sums = torch.empty(run, dtype=torch.int64, device=out.device) if on_gpu else None
                acc = torch.empty((run, 8), dtype=torch.int64, device=out.device) if parted else None
            summer = self._verify_stream(out.device, "sums") if parted else None
            try:
                with torch.cuda.stream(side):  # the callbacks' stream (one switch for every group)
                    for k, (lo, hi) in enumerate(groups):
                        if landed_at is not None:
                            side.wait_event(landed_at[k])
                        else:
                            with torch.cuda.stream(cur):
                                for layer in range(lo, hi):
                                    if not kernel(layer):  # the kernel failed here: this layer and the rest by DMA
                                        self._copy_layer(lm, runs, layer, seg, nbytes, cur)
                            side.wait_stream(cur)
                        layer_landed(hi - 1, run)
                        if parted and hi == last_lo:
                            summer.wait_stream(side)  # every group before the last has landed
                            with torch.cuda.stream(summer):
                                gpu_checksum.xxh3_64_segmented(lm, sums, acc=acc, upto=last_lo * parts, index=index)
                    side.wait_stream(cur)  # every copy, and the expected sums' upload queued behind them
                    if parted:
                        side.wait_stream(summer)
                    if on_gpu:
                        gpu_checksum.xxh3_64_segmented(lm, sums, acc=acc, first=last_lo * parts if parted else 0,
                                                       index=index)
                        got.flags = torch.empty(run, dtype=torch.bool, pin_memory=True)
                        got.flags.copy_(sums != want, non_blocking=True)
                    got.done = torch.cuda.Event()
                    got.done.record()
            except BaseException:
                self._unread(got.keys)
                raise
            finally:  # the caller's stream goes on after everything queued on the side stream
                cur.wait_stream(side)
            return got
        finally:
            self._lock.release()

    def finish_layers(self, got: "LayeredGet | None", on_verdict: Callable[[int], None] | None = None) -> int:
        """The second half of get_layers_into (see start_layers_into): wait for the copies and the
        checksums, drop a corrupt page, count the uses, touch the run in the LRU; how many leading
        pages landed and verified. on_verdict(count) is called as soon as that count is known, before
        the bookkeeping (~0.3 ms of Python for a 32K-token run in run DJ's timeline), so a request
        waiting for the load goes on meanwhile."""
        if got is None or not got.run:
            return 0
        if got.finished:
            return got.good
        run = got.run
        try:
            if got.flags is not None:
                got.done.synchronize()  # the copies and the checksums
                good = int(got.flags.int().argmax()) if bool(got.flags.any()) else run
            else:
                ok = got.verified()
                got.done.synchronize()  # the copies (the count says which landed bytes to use)
                good = next((i for i, v in enumerate(ok) if not v), run)
            if on_verdict is not None:
                on_verdict(good)
        finally:
            with self._lock:
                self._unread(got.keys)
        with self._lock:
            # only the entries this get read: an admin delete may have dropped a page meanwhile (its
            # slot then failed the checksum, or not), and a put may have stored it again since
            live = [k for k, e in zip(got.keys, got.entries) if self.cpu.entries.get(k) is e]
            self._touch_run(live, len(live))
            if good < run and self.cpu.entries.get(got.keys[good]) is got.entries[good]:
                self._corrupt_cpu(got.keys[good])
            self._served(got.keys, good, good)  # admission counts the served pages
        got.finished, got.good = True, good
        return good

    def _unread(self, keys: list[bytes]) -> None:
        for k in keys:
            c = self._reading.get(k, 0) - 1
            if c > 0:
                self._reading[k] = c
            else:
                self._reading.pop(k, None)

    @staticmethod
    def _copy_layer(lm: torch.Tensor, runs: list, layer: int, seg: int, nbytes: int, stream) -> None:
        """One layer of a layered get by DMA: a strided copy per run of adjacent slab slots (lm
        uint8 [L, n, seg], contiguous)."""
        row0 = lm.data_ptr() + layer * lm.shape[1] * seg
        cudacopy.copy2d_many([(row0 + i * seg, seg, src + layer * seg, nbytes, seg, j - i) for i, j, src in runs],
                             stream)

    @staticmethod
    def _copy_layer_to_blocks(pv: torch.Tensor, runs: list, layer: int, parts: int, seg: int, nbytes: int,
                              stream) -> None:
        """One layer of a layered get straight into a device pool (pv: the pool as uint8 [L * parts,
        blocks, part]): a strided copy per part (K, V) and run of pages adjacent both in the slab
        and in the pool (runs: (first page, end, its slab address, its block))."""
        part, stride = pv.shape[2], pv.shape[1] * pv.shape[2]
        top = pv.data_ptr() + layer * parts * stride
        cudacopy.copy2d_many([(top + p * stride + b * part, part, src + layer * seg + p * part, nbytes, part, j - i)
                              for i, j, src, b in runs for p in range(parts)], stream)

    @staticmethod
    def _check_pool(spec, pool: torch.Tensor, blocks: Sequence[int], n: int) -> None:
        """A layered get into a device pool: pool is [L, parts, num_blocks, *page shape[2:]] (contiguous,
        CUDA, the pages' dtype) and blocks n distinct block ids in it."""
        L, parts = spec.shape[0], spec.shape[1]
        if (not pool.is_cuda or pool.dtype != torch_dtype(spec.dtype) or not pool.is_contiguous()
                or pool.dim() != len(spec.shape) + 1 or tuple(pool.shape[:2]) != (L, parts)
                or tuple(pool.shape[3:]) != tuple(spec.shape[2:]) or spec.page_bytes % (L * parts)):
            raise ValueError(f"a pool must be a contiguous CUDA tensor [{L}, {parts}, blocks, {spec.shape[2:]}] "
                             f"of {spec.dtype}, got {pool.dtype} {tuple(pool.shape)}")
        if len(blocks) != n or (n and (min(blocks) < 0 or max(blocks) >= pool.shape[2])) or len(set(blocks)) != n:
            raise ValueError(f"blocks must be {n} distinct ids below {pool.shape[2]}")

    def _kernel_copier(self, held: list[Entry], lm: torch.Tensor, seg: int, device: torch.device):
        """For layer_copy "kernel" (not turned off, every slot and layer 8-byte aligned): copy(layer)
        queues kvc.hostcopy's gather of that layer from the slab into lm [L, n, seg] on the current
        stream, or returns False when the kernel fails (it is then turned off: layer_copy_off says
        why). None otherwise: the get copies by DMA."""
        if (self.layer_copy != "kernel" or self.layer_copy_off is not None or seg % 8
                or any(e.slot % 8 for e in held)):
            return None
        slab = self.cpu.slab
        words = slab[:slab.numel() - slab.numel() % 8].view(torch.int64)
        offs = np.fromiter((e.slot // 8 for e in held), dtype=np.int64, count=len(held))
        offs = pinned.upload(torch.from_numpy(offs), device)  # each page's first word in the slab
        lm64 = lm.view(torch.int64)  # [L, n, seg / 8]

        def copy(layer: int) -> bool:
            if self.layer_copy_off is not None:
                return False
            try:
                hostcopy.gather_rows(lm64[layer, :len(held)], words, offs, layer * seg // 8)
                return True
            except Exception as e:  # e.g. a driver that does not map the slab: DMA from here on
                self.layer_copy_off = f"{type(e).__name__}: {e}"
                log.warning("layer copies by kernel disabled, copying by DMA: %s", self.layer_copy_off,
                            exc_info=True)
                return False
        return copy

    def _verify_stream(self, device: torch.device, which: str = "verify"):
        """A side stream of this store on device: "verify" (a get's callbacks and checksums) or
        "sums" (a layered get's first checksum part)."""
        side = self._verify_streams.get((device, which))
        if side is None:
            side = self._verify_streams[(device, which)] = torch.cuda.Stream(device)
        return side

    def _cpu_run(self, keys: list[bytes], nbytes: int, root: bytes) -> list[Entry]:
        """The cpu-tier entries of the leading run of keys (pages of nbytes in this namespace)."""
        held = []
        for e in map(self.cpu.entries.get, keys):
            if e is None or e.nbytes != nbytes or e.ns_root != root:
                break
            held.append(e)
        return held

    def _touch_run(self, keys: list[bytes], run: int) -> None:
        """LRU touches of a device get's cpu run (a corrupt page is removed later; pages after it are
        touched though not served, which only reorders the LRU)."""
        tail_first = keys[:run][::-1]  # the deepest page becomes the oldest
        self.cpu.touch_many(tail_first)
        self.disk.touch_many(tail_first)

    def _verdict(self, bad: torch.Tensor | None, verified, run: int, device: torch.device) -> int:
        """How many leading pages of a device get's run verified: from the device's flags (bad), or
        from the reader threads' answer (then after the current stream's copies are done)."""
        if bad is not None:
            flags = pinned.download(bad)  # waits for the copies and the checksums
            return int(flags.int().argmax()) if bool(flags.any()) else run
        ok = verified()
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return next((i for i, v in enumerate(ok) if not v), run)

    def _served(self, keys: list[bytes], run: int, good: int) -> None:
        """After a device get's verdict: a corrupt page leaves the tier; admission counts the uses."""
        if good < run:
            self._corrupt_cpu(keys[good])
        if self.admission.uses:  # a use, as in get_pages: admission counts it (served pages only;
            for k in keys[:good]:  # nothing is counted with disk_admission_hits 1)
                self._hit(k)

    @staticmethod
    def _slab_runs(held: list[Entry], nbytes: int, lo: int, hi: int,
                   blocks: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """Pages lo..hi of held as runs [i, j) of adjacent slab slots (puts in order fill them so);
        with blocks (page i's block id), also cut where the ids are not consecutive. In numpy, not a
        walk page by page: it is on a load's way to its first copy."""
        if hi <= lo:
            return []
        cut = np.diff(np.fromiter(map(_SLOT, held[lo:hi]), dtype=np.int64, count=hi - lo)) != nbytes
        if blocks is not None:
            cut |= np.diff(np.asarray(blocks[lo:hi], dtype=np.int64)) != 1
        cuts = (np.flatnonzero(cut) + (lo + 1)).tolist()
        return list(zip([lo] + cuts, cuts + [hi]))

    def _copy_runs(self, held: list[Entry], flat: torch.Tensor, nbytes: int, lo: int, hi: int) -> None:
        """Pages lo..hi of held from the slab into flat on the current stream: one H2D per run of
        adjacent slab slots."""
        for i, j in self._slab_runs(held, nbytes, lo, hi):
            flat[i * nbytes:j * nbytes].copy_(self.cpu.slab[held[i].slot:held[i].slot + (j - i) * nbytes],
                                              non_blocking=True)

    @staticmethod
    def _expected_sums(held: list[Entry], device: torch.device) -> torch.Tensor:
        """The entries' checksums as int64 on the device, uploaded from pinned memory this thread
        reuses (a pageable upload would first wait for the stream, i.e. for every copy queued)."""
        sums = np.fromiter((e.checksum for e in held), dtype=np.uint64, count=len(held)).view(np.int64)
        return pinned.upload(torch.from_numpy(sums), device)

    def _copy_and_hash(self, held: list[Entry], flat: torch.Tensor, rows: torch.Tensor, nbytes: int,
                       landed: Callable[[int, int], None] | None) -> torch.Tensor:
        """The copies in VERIFY_PARTS parts on the current stream, each part hashed on a side stream
        as soon as it landed (the kernel of one part runs beside the next part's copy), then
        landed(lo, hi) there; the current stream then waits for the side stream. Returns a bool
        [run] tensor: page i is bad (compared on the device)."""
        run = len(held)
        cur = torch.cuda.current_stream(flat.device)
        side = self._verify_stream(flat.device)
        sums = torch.empty(run, dtype=torch.int64, device=flat.device)
        step = max(MIN_VERIFY_PART, -(-run // VERIFY_PARTS))
        try:
            for lo in range(0, run, step):
                hi = min(run, lo + step)
                self._copy_runs(held, flat, nbytes, lo, hi)
                side.wait_stream(cur)
                with torch.cuda.stream(side):
                    try:
                        gpu_checksum.xxh3_64_rows(rows[lo:hi], out=sums[lo:hi])
                    except Exception as e:  # only the kernel's own failure turns device verifying off
                        raise _DeviceChecksumError(f"{type(e).__name__}: {e}") from e
                    if landed is not None:
                        landed(lo, hi)
            want = self._expected_sums(held, flat.device)  # after the copies are queued
        finally:  # whatever was queued on the side stream is done before the caller's stream goes on
            cur.wait_stream(side)
        return sums != want

    @staticmethod
    def _page_of(h: bytes, e: Entry, data: torch.Tensor) -> Page:
        return Page(h, e.parent, np.frombuffer(e.tokens, dtype=np.uint32), data)  # a view: no copy per page

    def _corrupt_cpu(self, k: bytes) -> None:
        e = self.cpu.remove(k)
        self.admission.forget(k)
        log.warning("cpu tier page %s failed its checksum; dropped", hash_of(k).hex())
        self.metrics.checksum_failures.labels(tier="cpu").inc()
        self.metrics.evictions.labels(tier="cpu", reason="corrupt").inc()
        self._emit("removed", e.ns_root, hash_of(k), e.parent, "cpu")

    # -- put -----------------------------------------------------------------------------------
    def put_pages(self, ns: Namespace, pages: Sequence[Page], chain_continues: bool = False,
                  pause: Callable[[], None] | None = None) -> PutResult:
        """Store pages (each hanging from the namespace's root, a held page or an earlier page of
        the call). Every page is checked first. Under the store lock each page is decided (a
        duplicate, a collision, a bad parent) and its cpu slot reserved; then, outside the lock, one
        call computes every checksum and fills every slot (with the native path a single GIL
        hand-off for the batch, kvc.pagecopy); then, under the lock again, the entries are published
        and pages sent down. No reader sees an entry before its bytes are in the slab, and no load
        waits for the lock while this call waits to get the GIL back.

        pause: called (no lock held) after each piece of byte work (the copies of a chunk of
        demoted pages' records, the checksums and slab copies), before the Python that follows,
        which holds the GIL: an engine's put thread waits there until its engine's thread is
        waiting on the GPU, rather than take the GIL back from it while it launches a step."""
        return pagecopy.drive(self.put_steps(ns, pages, chain_continues), pause)

    def put_steps(self, ns: Namespace, pages: Sequence[Page], chain_continues: bool = False):
        """put_pages as a generator: it yields its byte work (pagecopy.SumCopyWork / CopyWork, and
        None where a driver may stop for now) and takes each one's result back; it returns the
        PutResult. pagecopy.drive runs each piece at once (put_pages); an engine's thread starts
        each on a native thread and goes on with its own work until it is done (engine.host_tier).
        The store lock is never held across a yield. Invalid pages raise ValueError before any
        work is yielded."""
        spec = ns.spec
        root = ns.root
        packed = []  # each page's token ids as uint32le bytes, packed once
        for i, p in enumerate(pages):  # check everything first, then commit
            try:
                p.check(spec)
                packed.append(hashing.tokens_bytes(p.tokens))
            except ValueError as e:
                raise ValueError(f"page {i}: {e}") from None
            if hashing.chain_hash(p.parent, packed[-1]) != p.hash:
                raise ValueError(f"page {i}: hash {p.hash.hex()} is not xxh3_128(parent || tokens)")
        tally = _Tally()
        if self._slab is not None and pages:
            yield None  # the checks were Python: a place to stop
            yield from self._make_room_steps(spec.page_bytes, len(pages), lambda: (key(root, p.hash) for p in pages))
        with self._lock:
            todo, placed = self._plan_puts(ns, pages, packed, tally)
        # the checksums (from the source bytes) and the copies into the reserved slots: no entry
        # points at those slots, and a demoted page's record was copied out of its slot already
        try:
            sums = (yield pagecopy.SumCopyWork(self._sum_copy, [t[0].data for t in todo], [t[3] for t in todo],
                                               self._slab)) if todo else []
        except BaseException:  # the reserved slots go back; no entry points at them
            with self._lock:
                for _, _, e, off in todo:
                    if off is not None:
                        self.cpu.cancel(off, e.nbytes)
            raise
        with self._lock:
            self._publish_puts(root, todo, sums, placed, tally)
            if not chain_continues:  # one walk per offer: a walk costs the chain's depth, and an
                self._touch_chains(root, pages)  # offer cut in calls of 4 pages walked a 32K chain 512 times
            self._evict_disk()
            self._update_gauges()
        self._m_put["stored"].inc(tally.stored)
        self._m_put["duplicate"].inc(tally.dup)
        self._m_put["rejected"].inc(tally.rejected)
        return PutResult(tally.stored, tally.dup, tally.rejected, tuple(tally.reasons))

    def _held_as(self, p: Page, toks: bytes, held, placed: set[bytes], tally: "_Tally") -> bool:
        """Count a page some tier (or this call) holds already: a duplicate, or a collision; False if not held."""
        if held is None:
            return False
        if held.parent == p.parent and held.tokens == toks:
            tally.dup += 1
            placed.add(p.hash)
        else:
            self.metrics.collisions.inc()
            tally.reject(f"hash collision on {p.hash.hex()}")
        return True

    def _plan_puts(self, ns: Namespace, pages: Sequence[Page], packed: list[bytes], tally: "_Tally"):
        """(todo, placed) under the lock: the pages to store as (page, key, entry, reserved cpu slot
        or None), and the hashes a later page of the call may hang from."""
        root, spec = ns.root, ns.spec
        placed = {root}  # parents a page of this call may hang from besides held pages
        todo: list[tuple[Page, bytes, Entry, int | None]] = []
        planned: dict[bytes, Entry] = {}
        cpu_get, disk_get = self.cpu.get, self.disk.get
        no_cpu = not isinstance(self.cpu, CpuTier)
        for p, toks in zip(pages, packed):
            k = key(root, p.hash)
            if p.parent not in placed and not self._parent_ok(root, p.parent, placed):
                tally.reject(BAD_PARENT.format(p.hash.hex()))
                continue
            held = planned.get(k) or cpu_get(k) or disk_get(k) or (self._cluster_held(root, p.hash) if no_cpu else None)
            if held is not None and self._held_as(p, toks, held, placed, tally):
                continue
            e = planned[k] = Entry(root, p.parent, toks, spec.dtype, spec.shape, spec.page_bytes, 0)  # checksum later
            todo.append((p, k, e, self._reserve_cpu(k, spec.page_bytes, check_held=False)))
            placed.add(p.hash)  # for now: a page that lands nowhere is taken out when published
        placed -= {t[0].hash for t in todo}
        return todo, placed

    def _publish_puts(self, root: bytes, todo: list, sums: list[int], placed: set[bytes], tally: "_Tally") -> None:
        """Under the lock, after the copies: commit the reserved slots, send pages down, count."""
        pending = {t[0].hash for t in todo}
        for (_, _, e, _), csum in zip(todo, sums):
            e.checksum = csum
        cpu_bytes = sum(self._publish_group(root, todo[start:start + PUBLISH_GROUP], pending, placed, tally)
                        for start in range(0, len(todo), PUBLISH_GROUP))
        if cpu_bytes:
            self._m_cpu_stored.inc(cpu_bytes)

    def _publish_group(self, root: bytes, todo: list, pending: set[bytes], placed: set[bytes], tally: "_Tally") -> int:
        """_publish_puts for a group of pages in order: their records built (one native copy), then
        each page committed and offered, so that the disk and cluster writers send a group while
        the next one's records are built (PUBLISH_GROUP). Returns the bytes stored in the cpu tier."""
        cpu_bytes = 0
        records = self._put_records(todo)
        for p, k, e, off in todo:
            if p.parent in pending and p.parent not in placed:  # its parent of this call landed nowhere
                if off is not None:
                    self.cpu.cancel(off, e.nbytes)
                tally.reject(BAD_PARENT.format(p.hash.hex()))
                continue
            if self._held_as(p, e.tokens, self.cpu.get(k) or self.disk.get(k), placed, tally):
                if off is not None:  # a put on another thread stored it meanwhile
                    self.cpu.cancel(off, e.nbytes)
                continue
            ok = off is not None
            if ok:
                self._cpu_stored(k, e, off, count=False)
                cpu_bytes += e.nbytes
            # without a cpu tier nothing counts uses: pages go down at once
            down = not ok or self.admission.on_put(k)
            if down and self._disk_on_put(e.nbytes):
                ok = self._put_disk(k, e, self.cpu.view(k) if ok else p.payload(), records.get(k)) or ok
            if down and not isinstance(self.cluster, NullCluster):
                # from the cpu tier, read by the writer thread; without one, the record itself
                rec = None if self.cpu.get(k) is not None else (
                    records.get(k) or self._record(p.hash, e, p.payload()))
                ok = self.cluster.offer(root, p.hash, rec) or ok
            if ok:
                tally.stored += 1
                placed.add(p.hash)
            else:
                tally.reject(f"no room for page {p.hash.hex()}")
        return cpu_bytes

    def _parent_ok(self, root: bytes, parent: bytes, placed: set[bytes]) -> bool:
        """A page hangs from its namespace's root or from its own pages (the cluster's keys carry
        the namespace, and a parent may live there only)."""
        return (parent in placed or not isinstance(self.cluster, NullCluster)
                or bool(self.cpu.get(key(root, parent)) or self.disk.get(key(root, parent))))

    def _cluster_held(self, root: bytes, h: bytes) -> Entry | None:
        held = self.cluster.holds(h)
        if held is None or held[0] != root:
            return None
        return Entry(held[0], held[1], held[2], "", (), 0, 0)

    def _touch_chains(self, root: bytes, pages: Sequence[Page]) -> None:
        """Make each chain in `pages` most recent, deepest page first, ancestors included.

        A parent is then always newer than its children in the LRU order, so eviction takes the
        tail of a chain before its prefix and never strands a child without its parent.
        """
        parents = {p.parent for p in pages}
        cpu_get, disk_get = self.cpu.entries.get, self.disk.get
        for leaf in (p.hash for p in pages if p.hash not in parents):
            # collected first, then touched in two bulk calls (the disk tier takes its lock once):
            # an offer of a 32K-token prompt's next pages walks 2,048 ancestors under the GIL.
            # Ancestors on disk only are walked too: without a cpu tier (or past its part of the
            # chain) the disk tier's order was the pages' write order, and it evicted a prompt's
            # first pages first, stranding the rest
            chain, in_cpu, k = [], [], root + leaf
            while True:
                e = cpu_get(k)
                if e is not None:
                    in_cpu.append(k)
                elif (e := disk_get(k)) is None:
                    break
                chain.append(k)
                k = root + e.parent
            self.cpu.touch_many(in_cpu)
            self.disk.touch_many(chain)

    def _put_cpu(self, k: bytes, e: Entry, payload: np.ndarray) -> bool:
        off = self._reserve_cpu(k, e.nbytes)
        if off is None:
            return False
        self.cpu.slab_np[off:off + e.nbytes] = payload
        self._cpu_stored(k, e, off)
        return True

    def _reserve_cpu(self, k: bytes, nbytes: int, check_held: bool = True) -> int | None:
        """A cpu slot for a page of nbytes (LRU pages demoted to make room); None if none can be had.
        check_held=False: the caller looked k up in the cpu tier already (under the same lock hold)."""
        if not self.cpu.fits(nbytes) or (check_held and self.cpu.get(k) is not None):
            return None
        off = self.cpu.reserve(nbytes)  # a free slot: no victims to look for (the common case)
        if off is not None:
            return off
        victims = self.cpu.victims_for(nbytes, self._pinned)
        if victims is None:
            return None
        if victims and self.cpu.used + nbytes > self.config.high_watermark * self.cpu.capacity:
            victims = self._cpu_batch(nbytes, victims)
        pagecopy.drive(self._demote_steps(lambda: victims))
        return self.cpu.reserve(nbytes)

    def _make_room(self, nbytes: int, count: int, keys: Callable[[], Iterable[bytes]],
                   pause: Callable[[], None] | None) -> None:
        """_make_room_steps run here (pagecopy.drive), pause() after each chunk's copies."""
        pagecopy.drive(self._make_room_steps(nbytes, count, keys), pause)

    def _make_room_steps(self, nbytes: int, count: int, keys: Callable[[], Iterable[bytes]]):
        """Before `count` pages of nbytes (their tier keys: keys(), asked only when the free slots
        fall short) go into the cpu tier (a put, or a disk hit's promotions): demote what they will
        evict, as _reserve_cpu would once the tier is full (down to the low watermark when past the
        high one), but DEMOTE_CHUNK pages per hold of the store lock, each chunk's records copied
        outside it (yielded: an engine's put thread pauses after each while a load runs, so a hit
        waits for one chunk at most, not for the whole batch's records). Pages of another size class or pinned ones are left to
        _reserve_cpu."""
        cpu, cfg = self.cpu, self.config
        with self._lock:
            if not cpu.fits(nbytes):
                return
            free = cpu.free_slots(nbytes)
            if count <= free:  # the common case: no keys built
                return
            held = cpu.entries
            n = sum(k not in held for k in keys())  # a page held already takes no slot
            if n <= free:
                return
            full = cpu.used + free * nbytes  # the tier once this put took the free slots
            want = n - free
            if full + nbytes > cfg.high_watermark * cpu.capacity:
                want = max(want, -int(-(full + nbytes - cfg.low_watermark * cpu.capacity) // nbytes))
        while want > 0:
            chunk = min(want, DEMOTE_CHUNK)
            got = yield from self._demote_steps(lambda: self._lru_victims(nbytes, chunk))
            if not got:
                return
            want -= got

    def _cpu_stored(self, k: bytes, e: Entry, off: int, count: bool = True) -> None:
        """Publish a reserved slot whose bytes are in place (count=False: the caller counts the
        bytes in kvc_store_bytes_total itself, once for a batch)."""
        self.cpu.commit(k, e, off)
        if count:
            self._m_cpu_stored.inc(e.nbytes)
        self._emit("stored", e.ns_root, hash_of(k), e.parent, "cpu")

    def _cpu_batch(self, nbytes: int, first: list[bytes]) -> list[bytes]:
        """Extend a victim set of the same size class down to the low watermark."""
        target = self.cpu.used + nbytes - self.config.low_watermark * self.cpu.capacity
        freed = sum(self.cpu.get(k).nbytes for k in first)
        more = max(0, -int(-(target - freed) // nbytes))  # pages of nbytes still to free
        # a set: a list's `in` made this quadratic (~1,000 victims for a 4 GB tier)
        return list(first) + self._lru_victims(nbytes, more, set(first))

    def _lru_victims(self, nbytes: int, count: int, skip: set[bytes] = frozenset()) -> list[bytes]:
        """Up to count of the cpu tier's least recently used pages of nbytes that are not pinned
        (nor in skip), oldest first."""
        out: list[bytes] = []
        if count <= 0:
            return out
        for k, e in self.cpu.entries.items():
            if e.nbytes == nbytes and k not in skip and not self._pinned(k):
                out.append(k)
                if len(out) == count:
                    break
        return out

    def _demote_steps(self, choose: Callable[[], list[bytes]]):
        """Remove the victims choose() names (under the store lock) from the cpu tier, writing the
        admitted ones to disk; returns how many were removed. Their records are built together
        (_records_steps: one copy for the chunk, yielded: without the GIL, and on a native thread
        where an engine's thread drives the put): an eviction batch is ~1,000 pages of 384 KiB for
        a 4 GB tier, and one GIL-held copy per page held a busy engine thread off the GIL for 10-18
        ms at a time (probe_demote.py). While the records are copied the victims are out of the
        index (a lookup misses them) but their slots stay taken; they are given back, the records
        sent down and the events emitted once the copy is done."""
        removed, down, refused, room = [], [], 0, 0
        with self._lock:
            for k in choose():
                e = self.cpu.detach(k)  # out of the index; its slot stays taken until given back below
                removed.append((k, e))
                if not self.admission.admitted(k):  # used fewer than disk_admission_hits times
                    self.admission.forget(k)
                    self.metrics.store_pages.labels(tier="disk", result="not_admitted").inc()
                elif self.disk.get(k) is None and self.disk.fits(e.nbytes):
                    size = record_len(e.tokens, e.dtype, e.shape, e.nbytes)
                    if self.disk.accepts(room + size):  # no record built for a writer that would refuse it
                        down.append((k, e, self.cpu.slab_np[e.slot:e.slot + e.nbytes]))
                        room += size
                    else:
                        refused += 1
            if refused:
                self.disk.refused(refused)
            if removed:
                self._m_cpu_evicted.inc(len(removed))
        if not removed:
            return 0
        try:
            records = yield from self._records_steps([(hash_of(k), e, p) for k, e, p in down])
        finally:  # the copies are done (or never started): the slots may be reused
            with self._lock:
                for _, e in removed:
                    self.cpu.cancel(e.slot, e.nbytes)
        with self._lock:
            moved = 0
            for (k, e, _), record in zip(down, records):
                if self.disk.get(k) is None and self.disk.put(k, record, e.ns_root, e.parent, e.tokens):
                    moved += e.nbytes
                    self._emit("stored", e.ns_root, hash_of(k), e.parent, "disk")
            for k, e in removed:
                self._emit("removed", e.ns_root, hash_of(k), e.parent, "cpu")
            if moved:
                self.metrics.transfer_bytes.labels(src="cpu", dst="disk").inc(moved)
        return len(removed)

    def _disk_on_put(self, nbytes: int) -> bool:
        """Whether a page that goes down when it is put goes to disk at once: write-through, no cpu
        tier, or a page larger than a cpu extent (disk only); else disk gets it on demotion."""
        return self.config.disk_write == "through" or not isinstance(self.cpu, CpuTier) or not self.cpu.fits(nbytes)

    def _put_records(self, todo: list) -> dict[bytes, memoryview]:
        """Records built ahead, in one _records call, for the put's pages that _publish_puts may send
        down as records (to disk at once, or to the cluster without a cpu slot): one native copy
        for the batch instead of a GIL-held copy per page. Keyed by tier key."""
        cluster = not isinstance(self.cluster, NullCluster)
        items, keys = [], []
        for p, k, e, off in todo:
            if not ((self._disk_on_put(e.nbytes) and self.disk.fits(e.nbytes)) or (cluster and off is None)):
                continue
            payload = self.cpu.slab_np[off:off + e.nbytes] if off is not None else p.payload()
            items.append((p.hash, e, payload))
            keys.append(k)
        if len(items) < 2:
            return {}
        return dict(zip(keys, self._records(items)))

    def _put_disk(self, k: bytes, e: Entry, payload: np.ndarray, record: memoryview | None = None) -> bool:
        if not self.disk.fits(e.nbytes):
            return False
        if record is None:
            record = self._record(hash_of(k), e, payload)
        if not self.disk.put(k, record, e.ns_root, e.parent, e.tokens):
            return False
        self._emit("stored", e.ns_root, hash_of(k), e.parent, "disk")
        return True

    def _evict_disk(self) -> None:
        if not isinstance(self.disk, DiskTier) or not self.disk.over_budget():
            return
        for k, e in self.disk.remove(self.disk.lru_victims(self._pinned)):
            self.metrics.evictions.labels(tier="disk", reason="capacity").inc()
            self._emit("removed", e.ns_root, hash_of(k), e.parent, "disk")

    # -- pins ----------------------------------------------------------------------------------
    def _pinned(self, h: bytes) -> bool:
        """Not to be evicted: pinned by a lease, or read by a layered get not yet finished."""
        return self._pins.get(h, 0) > 0 or h in self._reading

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            if self._release(heapq.heappop(self._deadlines)[1]):
                self.metrics.forced_unpins.inc()

    def _release(self, lease: str) -> bool:
        entry = self._leases.pop(lease, None)
        if entry is None:
            return False
        keys, owner, cost = entry
        self._pinned_bytes[owner] -= cost
        self._owner_leases[owner] -= 1
        if not self._owner_leases[owner]:
            del self._owner_leases[owner], self._pinned_bytes[owner]
        for h in keys:
            self._pins[h] -= 1
            if not self._pins[h]:
                del self._pins[h]
        self.metrics.pinned_pages.set(len(self._pins))
        return True

    def pin(self, ns: Namespace, hashes: Sequence[bytes], ttl_s: float | None = None,
            owner: str | None = None) -> str:
        """A lease on the namespace's pages among `hashes`. The TTL is cut to kvc.max_lease_ttl_s
        (inf included); NaN, 0 and negative TTLs are errors. The owner's (tenant's) leases may
        cost at most kvc.pin_budget_fraction of the host tier: PinBudgetExceeded beyond."""
        ttl = self.config.lease_ttl_s if ttl_s is None else ttl_s
        if not ttl > 0:
            raise ValueError(f"pin ttl_s must be positive, got {ttl_s}")
        ttl = min(ttl, self.config.max_lease_ttl_s)
        hashes = [bytes(h) for h in hashes]
        if any(len(h) != DIGEST_BYTES for h in hashes):
            raise ValueError(f"page hashes must be {DIGEST_BYTES} bytes")
        lease = uuid.uuid4().hex
        root = ns.root
        with self._lock:
            self._expire()
            # only pages this namespace holds (another namespace's pages are not in its keys)
            hashes = [k for h in hashes if self.cpu.get(k := key(root, h)) or self.disk.get(k)]
            cost = sum(self._page_bytes(k) for k in hashes)
            held, n = self._pinned_bytes.get(owner, 0), self._owner_leases.get(owner, 0)
            if held + cost > self.pin_budget or n >= MAX_LEASES:
                raise PinBudgetExceeded(
                    f"pin budget exceeded: this lease needs {cost} bytes, {held} of {self.pin_budget} are "
                    f"pinned already by {n} leases (kvc.pin_budget_fraction, at most {MAX_LEASES} leases); "
                    "unpin or let leases expire")
            self._pinned_bytes[owner] = held + cost
            self._owner_leases[owner] = n + 1
            self._leases[lease] = (hashes, owner, cost)
            heapq.heappush(self._deadlines, (time.monotonic() + ttl, lease))
            for h in hashes:
                self._pins[h] = self._pins.get(h, 0) + 1
            self.metrics.pinned_pages.set(len(self._pins))
        return lease

    def _page_bytes(self, k: bytes) -> int:
        e = self.cpu.get(k)
        return e.nbytes if e is not None else self.disk.get(k).size

    def unpin(self, lease_id: str) -> bool:
        with self._lock:
            self._expire()
            return self._release(lease_id)

    # -- delete, stats, events -----------------------------------------------------------------
    def delete(self, ns: Namespace, hashes: Sequence[bytes] | None = None) -> int:
        root = ns.root
        with self._lock:
            cands = {k for k in set(self.cpu.entries) | set(self.disk.entries) if k[:DIGEST_BYTES] == root}
            targets = cands if hashes is None else {key(root, bytes(h)) for h in hashes} & cands
            dropped = set()
            for k in targets:
                e = self.cpu.get(k)
                if e is not None:
                    self.cpu.remove(k)
                    self.admission.forget(k)
                    dropped.add(k)
                    self.metrics.evictions.labels(tier="cpu", reason="admin").inc()
                    self._emit("removed", root, hash_of(k), e.parent, "cpu")
                d = self.disk.get(k)
                if d is not None:
                    self.disk.remove([k])
                    dropped.add(k)
                    self.metrics.evictions.labels(tier="disk", reason="admin").inc()
                    self._emit("removed", root, hash_of(k), d.parent, "disk")
            self._update_gauges()
        dropped |= self.cluster.delete(ns, None if hashes is None else [bytes(h) for h in hashes])
        return len(dropped)

    def stats(self) -> dict:
        with self._lock:
            self._expire()
            tiers = {t.name: {"capacity_bytes": t.capacity, "used_bytes": t.used, "pages": t.pages}
                     for t in (self.cpu, self.disk)}
            if isinstance(self.disk, DiskTier):
                tiers["disk"]["degraded"] = self.disk.degraded
                tiers["disk"]["path"] = self.disk.path
            if isinstance(self.cluster, ClusterTier):
                tiers["cluster"] = self.cluster.stats()
            return {"tiers": tiers, "pinned_pages": len(self._pins), "leases": len(self._leases)}

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def _emit(self, kind: str, ns_root: bytes, h: bytes, parent: bytes, tier: str) -> None:
        if not self._listeners:  # per page on the put path: most stores have none
            return
        for fn in list(self._listeners):
            try:
                fn(kind, ns_root, h, parent, tier)
            except Exception:  # a listener must never break the store
                log.exception("cache event listener failed")

    def _update_gauges(self) -> None:
        for t, used, pages in self._gauges:
            used.set(t.used)
            pages.set(t.pages)

    def flush(self) -> None:
        """Wait for queued disk and cluster writes (tests, shutdown)."""
        self.disk.flush()
        self.cluster.flush()

    def sync(self, timeout: float = 10.0) -> bool:
        """The durability point: True once every page the disk tier held when called is committed
        (it survives a kill of the process). Pages only in the cpu tier are not durable until
        written back; with `disk_write: through` every stored page goes to disk at once."""
        return self.disk.sync(timeout)

    def set_write_gate(self, gate) -> None:
        """A callable the disk writer calls before each few records (it may block), or None. An
        engine in the same process hands in its wait for GPU slack: LMDB's puts hold the GIL."""
        if isinstance(self.disk, DiskTier):
            self.disk.write_gate = gate

    def close(self) -> None:
        """Write cpu pages that are not on disk yet back to it (a warm restart keeps them), then close."""
        self.set_write_gate(None)  # the pages below are written at once, whatever an engine did
        if not pagecopy.wait_all():  # a put's byte work still running on a native thread writes the slab
            log.warning("byte work of a put still running after 30 s; closing the tiers anyway")
        with self._lock:
            if isinstance(self.cpu, CpuTier) and isinstance(self.disk, DiskTier):
                for i, (k, e) in enumerate(list(self.cpu.entries.items())):
                    if self.disk.get(k) is None and self.admission.admitted(k):
                        self._put_disk(k, e, self.cpu.view(k))
                    if i % 64 == 63:  # a cpu tier larger than the disk's must not overfill its file
                        self._evict_disk()
                self._evict_disk()
        self.cluster.close()
        self.disk.close()
        self.cpu.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

