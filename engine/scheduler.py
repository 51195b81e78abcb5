"""Scheduler: each step is "tokens per request" under one token budget, FCFS.

Running requests go first (a decode takes 1 token, an unfinished prefill a chunk); when the pool
is short the running tail is preempted (recompute: its pages are freed but stay cached). Then
requests whose host load landed are placed, then the waiting queue, unless something was
preempted this step. All room comes from the PrefixCache: a request it cannot place holds no
blocks, so nothing in the waiting queue ever holds blocks while it cannot run (the engine cannot
stall behind it). A request whose next pages another request's host load brings, or another
running request's prefill is still to compute (agents arriving together with one system prompt),
waits for them (holding nothing, keeping its place) and the queue behind it goes on. A prefix hit only
sets the first uncomputed position: chunked prefill continues from there. With a step in flight
(the engine's async scheduling) a running request may have a pending token: it is scheduled as a
decode of that token, unless the token ends it by length.
"""
from __future__ import annotations

from collections import OrderedDict

from kvc.config import SchedulerConfig

from .prefix_cache import Grant, PrefixCache
from .request import Request, Status


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, chunk_size: int, cache: PrefixCache):
        self.max_tokens, self.max_seqs, self.chunk = cfg.max_num_batched_tokens, cfg.max_num_seqs, chunk_size
        self.cache = cache
        # none of these holds blocks. In arrival order (a preempted request goes back to the front),
        # with O(1) removal: a burst of queued requests whose clients go away is aborted one at a
        # time on the engine's thread, and a scan of the queue per abort (a deque) was quadratic
        self.waiting: OrderedDict[Request, None] = OrderedDict()
        self.loaded: list[Request] = []  # back from LOADING, holding their pages: placed first
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting[req] = None

    def _requeue(self, reqs: list[Request]) -> None:
        """Put requests back at the front of the waiting queue, in their order."""
        for req in reversed(reqs):
            self.waiting[req] = None
            self.waiting.move_to_end(req, last=False)

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
            self._requeue(self.loaded)
            self.loaded = []
            return out
        # Then the loaded requests (holding their pages), then the waiting queue from its front: only
        # the requests looked at are touched (a queue of thousands is not copied every step)
        loaded, self.loaded = self.loaded, []
        for k, req in enumerate(loaded):
            if budget <= 0 or len(self.running) >= self.max_seqs:  # they can run next step
                self.loaded = loaded[k:]
                return out
            got = self.cache.admit(req, budget)
            if got.grant is Grant.LOADING:
                continue
            if got.grant is Grant.NO_ROOM:  # it holds nothing now; nor do those behind it
                for r in loaded[k + 1:]:
                    self.cache.release(r)
                self._requeue(loaded[k:])
                return out
            budget = self._run(req, got.num_tokens, out, budget)
        later = []  # waiting for another request's load (holding nothing): they keep their place
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            req = next(iter(self.waiting))
            got = self.cache.admit(req, budget)
            if got.grant is Grant.NO_ROOM:  # it holds nothing now; it stays first
                break
            del self.waiting[req]
            if got.grant is Grant.WAIT:
                later.append(req)
            elif got.grant is Grant.RUN:
                budget = self._run(req, got.num_tokens, out, budget)
        self._requeue(later)
        return out

    def _run(self, req: Request, n: int, out: list, budget: int) -> int:
        req.status = Status.RUNNING
        self.running.append(req)
        out.append((req, n))
        return budget - n

    def wait_for_loads(self, timeout: float | None = None) -> None:
        """Block until a running load ends (when nothing else can run), or `timeout` seconds pass."""
        self.loaded += self.cache.poll(wait_one=True, timeout=timeout)

    def _preempt(self, req: Request) -> None:
        self.cache.release(req)
        req.status = Status.WAITING
        self._requeue([req])
        self.num_preemptions += 1

    def remove(self, req: Request, free: bool = True) -> None:
        """Drop a finished or aborted request wherever it is and free its pages (a LOADING
        request's pages once its load is done); free=False: the caller has them freed later."""
        if self.waiting.pop(req, False) is False:
            for q in (self.running, self.loaded):
                if req in q:
                    q.remove(req)
                    break
        if free:
            self.cache.free(req)
