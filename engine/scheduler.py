"""Scheduler: each step is "tokens per request" under one token budget, FCFS.

Running requests go first (a decode takes 1 token, an unfinished prefill a chunk); when the pool
is short the running tail is preempted (recompute: its pages are freed but stay cached). Waiting
requests are admitted next, unless something was preempted this step. Admission looks up the
prefix in the device pool, then in the host tiers; a host hit sends the request to LOADING while
the pages are fetched in the background, and it rejoins the waiting queue's head when they land.
A prefix hit only sets the first uncomputed position: chunked prefill continues from there.
"""
from __future__ import annotations

import logging

from collections import deque
from concurrent.futures import Future


from kvc.config import SchedulerConfig

from .host_tier import HostTier
from .kv_cache import KVCache
from .request import Request, Status

log = logging.getLogger("kvc.engine")


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, chunk_size: int, kv: KVCache, host: HostTier | None,
                 prefix_caching: bool = True):
        self.max_tokens, self.max_seqs, self.chunk = cfg.max_num_batched_tokens, cfg.max_num_seqs, chunk_size
        self.kv, self.host = kv, host
        self.prefix_caching = prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: list[tuple[Request, Future, int]] = []  # (request, pages future, first page)
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def schedule(self) -> list[tuple[Request, int]]:
        self.finish_loads()
        budget, out, preempted = self.max_tokens, [], False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, self.chunk, budget)
            assert n > 0, f"running request {req.request_id} has nothing to compute"
            while not self.kv.grow(req, self.kv.blocks_needed(req, n)):
                victim = self.running.pop()  # FCFS: the latest arrival gives way
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break
            out.append((req, n))
            budget -= n
            i += 1
        if preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            req = self.waiting[0]
            fresh = not req.block_table
            if fresh and self._admit_prefix(req):
                continue  # went to LOADING
            n = min(req.num_tokens - req.num_computed, self.chunk, budget)
            if not self.kv.grow(req, self.kv.blocks_needed(req, n)):
                if fresh:  # give back the hits we touched; retry next step
                    self.kv.free(req)
                    req.num_computed = req.num_registered = 0
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.append((req, n))
            budget -= n
        return out

    def _admit_prefix(self, req: Request) -> bool:
        """Take the device hit; start a host load if the host tiers extend it. True if LOADING."""
        P = self.kv.page_size
        if not self.prefix_caching:
            self._count_hit(req)
            return False
        cap = (req.num_tokens - 1) // P  # at least one token is computed, for its logits
        hits = self.kv.match(req, cap)
        if not req.admitted:
            req.num_device_hit_tokens = len(hits) * P
        self.kv.blocks.touch(hits)
        req.block_table = list(hits)
        req.num_computed, req.num_registered = len(hits) * P, len(hits)
        if self.host is not None and cap > len(hits):
            ns = self.kv.namespace(req.cache_salt)
            n_host = self.host.lookup(ns, req.ids(0, cap * P), req.hashes[:cap])
            if n_host > len(hits) and self.kv.grow(req, n_host - len(hits)):
                req.status = Status.LOADING
                self.waiting.popleft()
                blocks = req.block_table[len(hits):n_host]
                self.loading.append((req, self.host.load(ns, req.hashes[len(hits):n_host], self.kv.pool, blocks),
                                     len(hits)))
                return True
        self._count_hit(req)
        return False

    def _count_hit(self, req: Request) -> None:
        if not req.admitted:  # a preempted request's recompute is never a hit
            req.num_cached_tokens = min(req.num_computed, len(req.prompt_ids))
            req.admitted = True

    def finish_loads(self, wait: bool = False) -> None:
        """Copy landed host pages into their blocks and requeue those requests at the head."""
        if wait and self.loading and not self.waiting and not self.running:
            self.loading[0][1].exception()  # nothing else to run: block until the first load ends
        still = []
        for req, fut, start in self.loading:
            if not fut.done():
                still.append((req, fut, start))
                continue
            try:
                n = fut.result()  # pages already in their blocks
            except Exception:  # a failed load is a miss: the request computes those pages
                log.warning("loading %s's prefix from the host tiers failed; recomputing it",
                            req.request_id, exc_info=True)
                n = 0
            self.kv.blocks.free(req.block_table[start + n:])
            req.block_table = req.block_table[:start + n]
            req.num_computed = (start + n) * self.kv.page_size
            req.num_registered = start
            self.kv.register_full_pages(req)  # loaded pages are hits for others now; not offered back
            req.status = Status.WAITING
            self._count_hit(req)
            self.waiting.appendleft(req)
        self.loading = still

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed = req.num_registered = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def remove(self, req: Request) -> None:
        """Drop a finished or aborted request wherever it is and free its pages."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            self.loading = [x for x in self.loading if x[0] is not req]
        self.kv.free(req)
