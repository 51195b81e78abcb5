"""Scheduler: each step is "tokens per request" under one token budget, FCFS.

Running requests go first (a decode takes 1 token, an unfinished prefill a chunk); when the pool
is short the running tail is preempted (recompute: its pages are freed but stay cached). Then
requests whose host load landed are placed, then the waiting queue, unless something was
preempted this step. All room comes from the PrefixCache: a request it cannot place holds no
blocks, so nothing in the waiting queue ever holds blocks while it cannot run (the engine cannot
stall behind it). A prefix hit only sets the first uncomputed position: chunked prefill
continues from there. With a step in flight (the engine's async scheduling) a running request may
have a pending token: it is scheduled as a decode of that token, unless the token ends it by length.
"""
from __future__ import annotations

from collections import deque

from kvc.config import SchedulerConfig

from .prefix_cache import Grant, PrefixCache
from .request import Request, Status


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, chunk_size: int, cache: PrefixCache):
        self.max_tokens, self.max_seqs, self.chunk = cfg.max_num_batched_tokens, cfg.max_num_seqs, chunk_size
        self.cache = cache
        self.waiting: deque[Request] = deque()  # none of these holds blocks
        self.loaded: list[Request] = []  # back from LOADING, holding their pages: placed first
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.loaded or self.running or self.cache.num_loading)

    def schedule(self) -> list[tuple[Request, int]]:
        self.loaded += self.cache.poll()
        budget, out, preempted = self.max_tokens, [], False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.stops_by_length_ahead():  # its pending token ends it: nothing left to compute
                i += 1
                continue
            n = min(req.num_tokens_ahead - req.num_computed, self.chunk, budget)
            assert n > 0, f"running request {req.request_id} has nothing to compute"
            while not self.cache.grow(req, n):
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
        if preempted:  # no admissions this step; loaded requests wait without their blocks
            for req in reversed(self.loaded):
                self.cache.release(req)
                self.waiting.appendleft(req)
            self.loaded = []
            return out
        queue = self.loaded + list(self.waiting)
        self.loaded, self.waiting = [], deque()
        for k, req in enumerate(queue):
            if budget <= 0 or len(self.running) >= self.max_seqs:  # they can run next step
                self.loaded = [r for r in queue[k:] if r.block_table]
                self.waiting.extend(r for r in queue[k:] if not r.block_table)
                break
            got = self.cache.admit(req, budget)
            if got.grant is Grant.LOADING:
                continue
            if got.grant is Grant.NO_ROOM:  # it holds nothing now; nor do those behind it
                for r in queue[k + 1:]:
                    if r.block_table:
                        self.cache.release(r)
                self.waiting.extend(queue[k:])
                break
            req.status = Status.RUNNING
            self.running.append(req)
            out.append((req, got.num_tokens))
            budget -= got.num_tokens
        return out

    def wait_for_loads(self) -> None:
        """Block until a running load ends (when nothing else can run)."""
        self.loaded += self.cache.poll(wait_one=True)

    def _preempt(self, req: Request) -> None:
        self.cache.release(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def remove(self, req: Request, free: bool = True) -> None:
        """Drop a finished or aborted request wherever it is and free its pages (a LOADING
        request's pages once its load is done); free=False: the caller has them freed later."""
        for q in (self.running, self.loaded, self.waiting):
            if req in q:
                q.remove(req)
                break
        if free:
            self.cache.free(req)
