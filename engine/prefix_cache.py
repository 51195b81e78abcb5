"""PrefixCache: the engine's one owner of prefix reuse and of every request's block table.

It matches prompts against the device pool, looks the rest up in the host tiers, decides how
much of a host hit to load (engine.load_policy), runs the loads, registers computed pages and
offers them to the host tiers. The scheduler asks it for room through `admit` / `grow` and gets
a small `Admission` back; it never touches the pool or the host tiers itself.

A load whose writes are all queued on the GPU (not yet verified) may go back to the queue early
when the engine has nothing else to run: its step waits for the load's event on the GPU instead
of the engine thread waiting for the loader, and `settle` voids the step's work for the request
if a page then fails its checksum (it recomputes from that page; nothing of the failed pages was
registered or offered). A cpu-tier load on CUDA lands layer by layer (HostTier's LayerEvents):
its request goes back once every layer is queued, and each layer of its step waits for that
layer's event, so the step's first layers run while the last layers are still being copied.

Requests that start alike share what is computed as soon as it is launched: an admission first
commits the running requests with its first page (their launched steps' pages become hits, as
vLLM caches a block when its step is scheduled), and a request whose next page a running
prefill is still to compute waits for it (Grant.WAIT) instead of computing it beside it. A chat's
next turn reuses every full page of the last turn's prompt and output (pages are committed as
they fill, decode steps included; a last partial page is not kept).

Invariants that keep the engine from stalling:
- a request that `admit` cannot place holds no blocks afterwards (its pages stay cached in the
  pool's hash map, so retrying costs nothing unless they are evicted meanwhile);
- a LOADING request holds exactly the blocks its load writes plus room for its next chunk; the
  loader thread finishes on its own, so those blocks always come back;
- a request freed while LOADING (abort) keeps its blocks until the load is done (deferred free):
  the loader thread may still be writing them.
"""
from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

import numpy as np
import torch

from .host_tier import HostTier, LayerEvents
from .kv_cache import KVCache
from .load_policy import LoadPlanner
from .request import BlockTable, Request, Status

log = logging.getLogger("kvc.engine")
REOFFER_EVERY_S = 30.0
REOFFERS_KEPT = 4096  # prefixes whose re-offer time is kept; an older one may be re-offered sooner
MEMO_MIN_PAGES = 256  # device hits this long are remembered (_Memo); shorter ones match fast enough
MEMO_ENTRIES = 8  # the shared prefixes and the live conversations' latest hits, least recently used dropped


class Grant(enum.Enum):
    RUN = "run"          # blocks for the next chunk are allocated
    LOADING = "loading"  # host pages are being loaded; the request waits in LOADING
    NO_ROOM = "no_room"  # the pool is short; the request now holds no blocks
    WAIT = "wait"        # another request's load or prefill brings its next pages; it holds nothing meanwhile


@dataclass(frozen=True)
class Admission:
    grant: Grant
    num_tokens: int = 0  # tokens to compute this step (RUN)


@dataclass
class _Load:
    req: Request
    future: Future
    start: int          # first loaded page (the device hit ends there)
    pages: int          # pages asked for
    queued: Future      # the loader's on_queued: the event every write of the load is queued before
    freed: bool = False  # the request was freed (aborted) meanwhile: free when the load ends
    early: bool = False  # the request went back to the queue before the load was verified
    landed: int | None = None  # the future's count, once read


@dataclass
class _Memo:
    """A long device hit, remembered so that the next prompt with the same prefix skips hashing and
    matching it page by page (an agent's system prompt, a RAG document: every request resends
    them). Valid while the pool still holds the same record for each of its blocks (a page evicted,
    or its block given to another page, changes or drops the record): while the pool has dropped
    no record since they were last seen to hold, that is one int compare; otherwise one list
    compare, ~10x less host time than hashing 2,048 pages and matching them (bench_host_path)."""
    salt: str
    tokens: bytes  # the prefix's ids as little-endian uint32, whole pages
    hashes: list[bytes]
    blocks: list[int]
    records: list  # the pool's record of each block when it matched (BlockPool.records)
    forgotten: int  # the pool's count of dropped records when those were last seen to hold
    # Made from a hit that started from another memo (a conversation's next turn over its earlier
    # one): superseded when its own next turn extends it. A memo made from a page-by-page match (a
    # system prompt, a document) stays while it is used, whatever extends it.
    extension: bool = False


class PrefixCache:
    def __init__(self, kv: KVCache, host: HostTier | None, chunk: int, prefix_caching: bool = True,
                 planner: LoadPlanner | None = None):
        self.kv, self.host, self.chunk = kv, host, chunk
        self.blocks, self.page_size = kv.blocks, kv.page_size
        self.prefix_caching = prefix_caching
        self.planner = planner or LoadPlanner("auto", kv.page_size, kv.spec.page_bytes)
        self._loads: dict[Request, _Load] = {}
        # page hash -> when a device hit was last offered again, oldest first (at most REOFFERS_KEPT)
        self._reoffered: OrderedDict[bytes, float] = OrderedDict()
        # loaded pages not yet in the pool's hash map (request -> pages to register up to): registered
        # at the next step launch, while the GPU runs the step, or at the request's commit or free
        # (registering a 32K load's 2,048 pages sat in the 3.4 ms between the load's end and the
        # request's step in run W's timeline, probe_cpu_hit.py)
        self._unregistered: dict[Request, int] = {}
        # The last step's bookkeeping, done after its tokens went out (run_deferred): requests whose
        # newly full pages are still to register and offer, and finished ones whose pages to free
        self._deferred: dict[Request, None] = {}
        self._deferred_free: list[Request] = []
        self._memos: list[_Memo] = []  # long device hits, the latest last (_remembered)
        # requests placed to run (they hold blocks and compute): an admission commits those that
        # start as its prompt does first (_share), so it reuses what their launched steps computed
        self._live: dict[Request, None] = {}
        self.memo_hits = 0  # device hits that started from a _Memo
        self.early_loads = 0  # loads whose request went back to the queue before they were verified
        self.early_loads_failed = 0  # of those, loads whose pages then failed: the step's work was voided

    # -- admission ---------------------------------------------------------------------------------
    def admit(self, req: Request, budget: int) -> Admission:
        """Place a waiting request: reuse its cached prefix, start a host load (or wait for another
        request's load of the same pages: WAIT), or give it room for its next chunk of at most
        `budget` tokens."""
        fresh = not req.block_table
        if fresh and self.prefix_caching:
            loading = self._match(req)
            if loading is not None:
                return loading
        n = min(req.num_tokens - req.num_computed, self.chunk, budget)
        if self._grow(req, self._blocks_needed(req, n)):
            self._count_hit(req)
            self._live[req] = None
            return Admission(Grant.RUN, n)
        self.release(req)
        return Admission(Grant.NO_ROOM)

    def _match(self, req: Request) -> Admission | None:
        """Take the device hit; start a host load when the host tiers extend it and loading pays."""
        P = self.page_size
        cap = (req.num_tokens - 1) // P  # at least one token is computed, for its logits
        if self._unregistered:  # another request's verified load that starts as this prompt does:
            first = req.ids_bytes(0, P)  # its pages are hits for this one once registered
            for other in list(self._unregistered):
                if other.cache_salt == req.cache_salt and other.ids_bytes(0, P) == first:
                    self._register_loaded(other)
        if self._live and cap:
            self._share(req)
        memo, k = self._remembered(req, cap)
        if memo is not None and len(req.hashes) < k:
            req.hashes = memo.hashes[:k]  # the same ids under the same salt: the same hashes
        self.kv.update_hashes(req)
        n = min(cap, len(req.hashes))
        parents = [self.kv.parent(req, k)] + req.hashes[k:n - 1] if n > k else []  # page i's parent: hash i-1
        hits = self.blocks.match_prefix(req.hashes[k:n], parents, req.ids_bytes(k * P, n * P))
        if memo is not None:
            self.memo_hits += 1
            hits = memo.blocks[:k] + hits
        if len(hits) >= MEMO_MIN_PAGES and len(hits) > k:
            self._remember(req, hits, memo, k)
        if not req.admitted:
            req.num_device_hit_tokens = len(hits) * P
        req.block_table = BlockTable(hits)
        self.blocks.touch(req.block_table)  # (its ids as they are: no conversion of its own)
        req.num_computed, req.num_registered = len(hits) * P, len(hits)
        if self._live and len(hits) < cap and self._computing(req, len(hits)):
            # A running request's prefill computes this prompt's next page (agents arriving together
            # with one system prompt, a chunk smaller than the step's budget): wait for it, holding
            # nothing, instead of computing the same pages beside it step after step (each arrival
            # computed the whole shared prefix again, in lockstep with the first)
            self.release(req)
            return Admission(Grant.WAIT)
        if self.host is None or cap <= len(hits):
            return None
        if self._loads and self._loading(req.hashes[len(hits)], len(hits)):
            # Another request's load brings the next pages (the same prompt arriving at once after
            # its prefix left the device pool): wait for it instead of loading them again into
            # blocks of its own (N identical arrivals held N copies of the prefix and read the host
            # tiers N times). It holds nothing meanwhile; once that load lands they are device hits.
            self.release(req)
            return Admission(Grant.WAIT)
        ns = self.kv.namespace(req.cache_salt)
        located = self._host_located(req, ns, len(hits), cap)
        if len(located) < len(hits) and self._may_reoffer(req.hashes[len(located)]):
            # The host tiers lack part of what the device pool holds: its puts were lost (a cache
            # service that was down) or evicted there. Offer those pages again: otherwise the
            # service refuses every later page of the prompt (its parent is unknown there) and no
            # other engine reuses this prefix until our device pool forgets it.
            self._offer(req, range(len(located), len(hits)))
        plan = self.planner.plan(located, len(hits))
        if plan.probe is not None:  # the planner measures a tier it does not load from
            a, b = plan.probe
            self.host.probe(ns, req.hashes[a:b], located[a], self.kv.pool.device)
        end = plan.end
        if end <= len(hits):
            return None
        rest = min(req.num_tokens - end * P, self.chunk)  # room for the chunk after the load too
        if not self._grow(req, end - len(hits) + self._blocks_after(end, rest)):
            self.release(req)
            return Admission(Grant.NO_ROOM)
        req.status = Status.LOADING
        blocks = req.block_table[len(hits):end]
        queued: Future = Future()

        def on_queued(event) -> None:  # the loader thread
            if not queued.done():
                queued.set_result(event)
        fut = self.host.load(ns, req.hashes[len(hits):end], self.kv.pool, blocks, located[len(hits):end],
                             on_queued=on_queued)
        self._loads[req] = _Load(req, fut, len(hits), end - len(hits), queued)
        return Admission(Grant.LOADING)

    def _share(self, req: Request) -> None:
        """Commit the running requests that start as req's prompt does (same salt, same first page)
        and have full pages past their registered ones: what their launched steps computed becomes
        a hit for req now, not after its own step (a step's pages are otherwise committed beside the
        next step's launch, after that step's admissions: agents arriving together with one system
        prompt, a step's budget one chunk, each computed the pages the others' earlier steps had).
        As vLLM, which caches a block when the step that computes it is scheduled. Safe for the same
        reason the commit beside a launch is: the KV of a launched step is written before any later
        step reads it (one stream; the CPU runs steps in order), a pending token's page has no hash
        yet, and a step that read an early load (whose work a failed page voids) is read back before
        anything is scheduled after it; a request whose load is not settled is left alone."""
        P = self.page_size
        first = None
        for other in list(self._live):
            if (other.num_computed // P <= other.num_registered or other in self._loads
                    or other.cache_salt != req.cache_salt):
                continue
            if first is None:
                first = req.ids_bytes(0, P)
            if other.ids_bytes(0, P) == first:
                self.commit(other)

    def _computing(self, req: Request, page: int) -> bool:
        """Whether a running request's prefill is still to compute page `page` of req's prompt (the
        same chained hash: the same prefix under the same salt). A request whose load is not
        settled is not counted; one that is preempted leaves _live, so a wait always ends."""
        h, end = req.hashes[page], (page + 1) * self.page_size
        return any(len(x.hashes) > page and x.hashes[page] == h and x.num_computed < end <= len(x.prompt_ids)
                   and x not in self._loads for x in self._live)

    def _loading(self, h: bytes, page: int) -> bool:
        """Whether a running load brings page `page` of hash h (a chained hash: the same prefix)."""
        return any(x.start <= page < x.start + x.pages and x.req.hashes[page] == h for x in self._loads.values())

    def _remembered(self, req: Request, cap: int) -> tuple[_Memo | None, int]:
        """(the longest valid _Memo whose prefix starts req's prompt, how many of its pages to take:
        at most cap) or (None, 0). Entries whose blocks no longer hold what they matched are
        dropped on the way; the one taken becomes the most recently used."""
        raw = req.prompt_bytes
        if raw is None or cap < MEMO_MIN_PAGES:
            return None, 0
        last = 4 * self.page_size  # a memo's last page first: other conversations' entries differ there
        fits = [m for m in self._memos if m.salt == req.cache_salt and len(m.tokens) <= len(raw)
                and raw.startswith(m.tokens[-last:], len(m.tokens) - last) and raw.startswith(m.tokens)]
        forgotten = self.blocks.forgotten
        for m in sorted(fits, key=lambda m: len(m.tokens), reverse=True):
            k = min(len(m.blocks), cap)
            self._memos.remove(m)
            # no record dropped since they were seen to hold, or each block's record unchanged (a
            # page evicted, or its block given to another page, changes or drops it)
            if m.forgotten == forgotten or self.blocks.records(m.blocks) == m.records:
                m.forgotten = forgotten
                self._memos.append(m)
                return m, k
        return None, 0

    def _remember(self, req: Request, hits: list[int], base: _Memo | None, k: int) -> None:
        """Keep req's device hit (MEMO_MIN_PAGES pages or more; its first k pages from the memo
        `base`, if any, the rest matched) as the most recently used _Memo. It replaces base only
        where base was itself an extension (a conversation's earlier turn): a shared prefix that
        conversations extend stays for the next conversation that starts from it (dropping it, or
        the entries that extend it, made every other request over one system prompt hash and match
        page by page). The least recently used past MEMO_ENTRIES are dropped."""
        n = len(hits)
        tokens = req.ids_bytes(0, n * self.page_size)
        keep = [m for m in self._memos if not ((m is base and m.extension)
                                               or (m.salt == req.cache_salt and m.tokens == tokens))]
        records = (base.records[:k] if base is not None else []) + self.blocks.records(hits[k:])  # base's held
        keep.append(_Memo(req.cache_salt, tokens, req.hashes[:n], list(hits), records, self.blocks.forgotten,
                          extension=base is not None))
        self._memos = keep[-MEMO_ENTRIES:]

    def _host_located(self, req: Request, ns, hits: int, cap: int) -> list[str]:
        """The host tiers' tier for each of the request's first pages (at most cap), as far as they
        hold a verified run; pages before `hits` are in the device pool.

        With a device hit, only its last page and the pages after it are looked up: the host
        tiers evict a chain tail first (a put makes every ancestor newer than its pages), so a
        held last page means a held prefix. The planner reads the tiers from `hits` on only; the
        earlier entries repeat the last page's tier. A 32K-token prompt's device hit then asks
        about 1 + its new pages instead of 2,048. Where the last page is missing (puts lost or
        evicted) or the backend cannot answer that, the whole prompt is looked up, which is what
        finds pages to offer again."""
        P = self.page_size
        if hits:
            tail = self.host.lookup_from(ns, self.kv.parent(req, hits - 1), req.hashes[hits - 1:cap],
                                         req.ids_bytes((hits - 1) * P, cap * P))
            if tail:
                return [tail[0]] * (hits - 1) + tail
        return self.host.lookup(ns, req.ids_bytes(0, cap * P), req.hashes[:cap]).located[:cap]

    def _may_reoffer(self, h: bytes) -> bool:
        """At most one re-offer of a prefix (named by its first missing page) per REOFFER_EVERY_S:
        while a cache service is down its lookups answer nothing, and every request that reuses a
        prefix from the device pool would otherwise copy it out again."""
        now = time.monotonic()
        seen = self._reoffered
        if now - seen.get(h, -REOFFER_EVERY_S) < REOFFER_EVERY_S:
            return False
        seen.pop(h, None)
        seen[h] = now  # in time order: the oldest first
        while seen and (len(seen) > REOFFERS_KEPT or now - next(iter(seen.values())) >= REOFFER_EVERY_S):
            seen.popitem(last=False)  # O(1) a call in a long outage (the whole map was rebuilt each call)
        return True

    def _blocks_after(self, pages: int, tokens: int) -> int:
        return (pages * self.page_size + tokens + self.page_size - 1) // self.page_size - pages

    def grow(self, req: Request, n: int) -> bool:
        """Room for n more tokens of a running request; False (nothing changed) when short."""
        return self._grow(req, self._blocks_needed(req, n))

    def _blocks_needed(self, req: Request, n: int) -> int:
        P = self.page_size
        return max(0, (req.num_computed + n + P - 1) // P - len(req.block_table))

    def _grow(self, req: Request, n: int) -> bool:
        if n <= 0:
            return True
        got = self.blocks.allocate(n)
        if got is None:
            return False
        # ascending: fresh blocks may go to any page, and runs of consecutive ids let a cpu-tier load
        # copy straight into them (HostTier.direct_loads); a request's blocks come back to the free
        # queue tail first, so the next allocation of them is descending without this
        req.block_table += sorted(got) if n > 1 else got
        return True

    def _count_hit(self, req: Request) -> None:
        if not req.admitted:  # a preempted request's recompute is never a hit
            req.num_cached_tokens = min(req.num_computed, len(req.prompt_ids))
            req.admitted = True

    # -- release -----------------------------------------------------------------------------------
    def release(self, req: Request) -> None:
        """Give back a request's blocks to retry later from scratch (preemption, no room); its
        registered pages stay cached in the pool and match again."""
        self.free(req)
        req.num_computed = req.num_registered = 0

    def commit_later(self, req: Request) -> None:
        """commit(req) at run_deferred: the engine hands the step's tokens out first."""
        if self.prefix_caching:
            self._deferred[req] = None

    def free_later(self, req: Request) -> None:
        """free(req) at run_deferred, after its commit (a request the step finished)."""
        self._deferred_free.append(req)

    def run_deferred(self, running: bool = True) -> bool:
        """The last step's bookkeeping: the finished requests' commits and frees (before the next
        step schedules: its allocations get their blocks, its admissions see their pages), and
        with `running` the commits of the requests still running. Those can wait for the next
        step's launch (step_launched: the GPU runs meanwhile; their blocks stay theirs, and the
        step only writes past their full pages); anything that reads or changes what they touch
        (a free, a reset of the pool, flush, close) runs them all first. Whether there was any."""
        frees, self._deferred_free = self._deferred_free, []
        for req in frees:
            self.free(req)  # commits it first
        did = bool(frees)
        if running:
            did = did or bool(self._deferred)
            while self._deferred:
                self.commit(next(iter(self._deferred)))
        return did

    def free(self, req: Request) -> None:
        """Drop a request's blocks; while its load runs they stay taken (deferred free). Loaded
        pages are registered first: they stay cached in the pool and match again."""
        self._live.pop(req, None)
        if req in self._deferred:  # its last step's pages are registered before they are freed
            self.commit(req)
        load = self._loads.get(req)
        if load is not None:
            if not load.early:
                load.freed = True
                return
            # back in the queue early: its blocks are in its table, which the caller may reuse
            # (a retry after release); the load's writes are queued, so its end is near
            self._settle(req, load)
        self._register_loaded(req)
        self.blocks.free(req.block_table)
        req.block_table = BlockTable()

    # -- loads -------------------------------------------------------------------------------------
    @property
    def num_loading(self) -> int:
        return sum(not (x.freed or x.early) for x in self._loads.values())

    def poll(self, wait_one: bool = False, timeout: float | None = None) -> list[Request]:
        """Requests whose load ended, now WAITING with their loaded pages computed and registered
        (hits for others too). wait_one (the engine has nothing else to run): block until a load
        ends or has every write queued on the GPU (or `timeout` seconds pass); a queued one goes
        back early (see `settle`)."""
        if wait_one and self._loads and not any(self._ready(x) for x in self._loads.values()):
            waits = [x.future for x in self._loads.values()]
            waits += [x.queued for x in self._loads.values() if not (x.early or x.freed)]
            wait(waits, timeout=timeout, return_when=FIRST_COMPLETED)
        back = []
        for req, load in list(self._loads.items()):
            if load.future.done():
                if load.freed:
                    self._end_freed(req, load)
                    continue
                del self._loads[req]
                keep = load.start + self._result(load)
                self._landed(req, keep)
                if not load.early:  # an early one is back in the queue already (its step not run yet)
                    req.status = Status.WAITING
                    back.append(req)
            elif wait_one and not (load.early or load.freed) and load.queued.done():
                load.early = True
                self.early_loads += 1
                self._landed(req, load.start + load.pages, registered=False)
                req.status = Status.WAITING
                back.append(req)
        return back

    def end_freed_loads(self, wait: bool = False) -> bool:
        """Give back the blocks of freed (aborted) requests whose load has ended (wait: wait for
        every such load). The scheduler's poll does this at each step; an idle engine calls it so
        that an abort's blocks do not stay taken until the next request. Whether any came back."""
        ended = [(req, load) for req, load in self._loads.items() if load.freed and (wait or load.future.done())]
        for req, load in ended:
            self._end_freed(req, load)
        return bool(ended)

    def _end_freed(self, req: Request, load: _Load) -> None:
        """The load of a freed (aborted) request ended (waits for it): its blocks come back."""
        del self._loads[req]
        keep = load.start + self._result(load)
        req.num_computed = keep * self.page_size
        self._register(req, keep)  # loaded pages are hits now; they are not offered back
        self.free(req)

    @staticmethod
    def _ready(load: _Load) -> bool:
        return load.future.done() or (not (load.early or load.freed) and load.queued.done())

    @staticmethod
    def _result(load: _Load) -> int:
        """How many pages the load verified into their blocks (waits for its end)."""
        if load.landed is None:
            try:
                load.landed = load.future.result()
            except Exception:  # a failed load is a miss: the request computes those pages
                log.warning("loading %s's prefix from the host tiers failed; recomputing it",
                            load.req.request_id, exc_info=True)
                load.landed = 0
        return load.landed

    def _landed(self, req: Request, keep: int, registered: bool = True) -> None:
        """The request's first `keep` pages are in its blocks (registered: verified, so they are
        registered, not offered back, at the next launch); the load's blocks past them stay as room
        for the next chunk, up to its need."""
        self._rewind(req, keep)
        if registered:
            self._unregistered[req] = keep
        need = keep + self._blocks_after(keep, min(req.num_tokens - req.num_computed, self.chunk))
        self.blocks.free(req.block_table[need:])
        del req.block_table[need:]
        self._count_hit(req)

    def _rewind(self, req: Request, keep: int) -> None:
        """The request's computed tokens end at page `keep` (a load's verified end); an early count
        of cached tokens the load did not keep comes down with them."""
        req.num_computed = keep * self.page_size
        if req.num_cached_tokens > req.num_computed:
            req.num_cached_tokens = req.num_computed

    def step_waits(self, sched) -> bool:
        """Before a step: the GPU waits for the queued writes of early loads among its requests.
        Whether there are any (then `settle` each request after the step)."""
        early = False
        self.kv.clear_layer_waits()
        if not self._loads:
            return early
        for req, _ in sched:
            load = self._loads.get(req)
            if load is not None and load.early:
                early = True
                event = load.queued.result()
                if isinstance(event, LayerEvents):  # a load landing layer by layer: each layer waits for its own
                    self.kv.wait_layers(event)
                elif event is not None:
                    event.wait(torch.cuda.current_stream(self.kv.pool.device))
        return early

    def settle(self, req: Request) -> bool:
        """After a step that ran `req`: whether the step's work for it stands. False when the
        request came back early and a page of its load then failed: its state is back at the
        first bad page (the step read bytes that failed their checksum; its token is void, its
        KV past that page is recomputed over). Waits for the load's end (its writes were queued
        before the step, so the step's own wait covered them)."""
        load = self._loads.get(req)
        if load is None or not load.early:
            return True
        return self._settle(req, load)

    def _settle(self, req: Request, load: _Load) -> bool:
        del self._loads[req]
        keep = load.start + self._result(load)
        self._unregistered[req] = keep
        if keep == load.start + load.pages:
            return True
        self.early_loads_failed += 1
        log.warning("request %s used loaded pages that failed their checksum; recomputing from page %d",
                    req.request_id, keep)
        self._rewind(req, keep)
        return False

    # -- registration and offers -------------------------------------------------------------------
    def commit(self, req: Request) -> None:
        """After a step: register the request's newly full pages and offer them to the host tiers."""
        if not self.prefix_caching:
            return
        self._deferred.pop(req, None)
        self._register_loaded(req)
        start = req.num_registered
        new = self._register(req, req.num_computed // self.page_size)
        if self.host is not None and new:
            self._offer(req, range(start, start + new))

    def _offer(self, req: Request, pages: range) -> None:
        """Offer the request's pages (registered, in its block table) to the host tiers."""
        P = self.page_size
        if not self.host.room(len(pages), self.kv.pool.device.type == "cuda"):
            self.host.dropped_puts += len(pages)  # no gather for an offer that would be dropped
            return
        data = self.kv.pool.gather(req.block_table[pages.start:pages.stop])  # [n, L, parts, P, H, D]
        a, b = pages.start, pages.stop
        tokens = np.frombuffer(req.ids_bytes(a * P, b * P), dtype="<u4").astype(np.uint32, copy=False)
        self.host.offer(self.kv.namespace(req.cache_salt), req.hashes[a:b],
                        [self.kv.parent(req, a)] + req.hashes[a:b - 1],
                        list(tokens.reshape(b - a, P)), data)  # one row view per page: no per-page conversion

    def _register(self, req: Request, full: int) -> int:
        """Register pages [num_registered, full) in the pool's hash map; returns how many."""
        self.kv.update_hashes(req)
        full = min(full, len(req.hashes))
        start = req.num_registered
        if full > start:  # in bulk: a 32K-token load registers 2048 pages at once
            P, step = self.page_size, 4 * self.page_size
            packed = req.ids_bytes(start * P, full * P)
            self.blocks.cache_blocks(req.block_table[start:full], req.hashes[start:full],
                                     [self.kv.parent(req, start)] + req.hashes[start:full - 1],
                                     [packed[i * step:(i + 1) * step] for i in range(full - start)])
        req.num_registered = max(start, full)
        return max(0, full - start)

    # -- engine-wide -------------------------------------------------------------------------------
    def step_started(self) -> None:
        """The engine's thread began a step (the host tier's puts tell a busy engine from an idle one)."""
        if self.host is not None:
            self.host.step_started()

    def gpu_wait(self, waiting: bool, ready=None) -> None:
        """The engine's thread starts or ends waiting for a step's samples (`ready`: their CUDA
        event); puts run meanwhile, on this thread or the put thread (HostTier.put_gate)."""
        if self.host is not None:
            self.host.gpu_wait(waiting, ready)

    def step_launched(self) -> None:
        """The runner queued the step's kernels: register the pages loads brought in while the GPU
        runs them, and let puts use the GPU's busy time."""
        self.kv.clear_layer_waits()  # the step's layers have their waits queued
        self.run_deferred()  # the last step's running requests' pages, beside this step's kernels
        for req in list(self._unregistered):
            self._register_loaded(req)
        for req, load in self._loads.items():  # early loads already verified (the others settle after
            if load.early and load.future.done() and self._result(load) == load.pages:  # the step and
                self._register(req, load.start + load.pages)  # register at commit: a layer-by-layer
                # load is still copying its last layers while this step runs, waiting would stall here)
        if self.host is not None and self.kv.pool.device.type == "cuda":
            self.host.step_launched(self.kv.pool.device)

    def _register_loaded(self, req: Request) -> None:
        keep = self._unregistered.pop(req, None)
        if keep is not None:
            self._register(req, keep)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    def reset_device_cache(self) -> int:
        """Forget every cached page of the device pool that no request holds; returns how many."""
        self.run_deferred()
        return self.blocks.reset_cache()

    def flush(self) -> None:
        """Wait until offered pages are in the host tiers and the loads of freed (aborted) requests
        have ended, their blocks free again (tests, benchmarks). A live request's load is left to
        the scheduler, which takes the request back when it ends."""
        self.end_freed_loads(wait=True)
        self.run_deferred()
        if self.host is not None:
            self.host.flush()

    def close(self) -> None:
        """Wait for running loads (their blocks come back), then stop the host tier's threads."""
        try:
            self.run_deferred()  # the last step's pages reach the host tiers before they close
        except Exception:  # closing goes on: a tier that fails here loses those pages, nothing else
            log.warning("the last step's page bookkeeping failed at close", exc_info=True)
        while self._loads:
            self.poll(wait_one=True)
        if self.host is not None:
            self.host.close()
