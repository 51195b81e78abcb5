"""The CPU side of an offloaded MoE layer: expert compute, the worker thread, staging buffers.

Staging is chosen once: `CudaStaging` moves inputs into pinned buffers on a side stream (double
buffered by call parity, as kt does by layer parity) and the fp32 result back with a non-blocking
H2D copy; `HostStaging` is for a CPU "device", where there is nothing to move. The worker polls
CUDA events rather than blocking on them or synchronising (research/engine.md 5.4: blocking waits
were erratic, polling overlapped reliably) and sets its torch thread count inside the thread.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .grouped import ExpertThreads

POLL_S = 2e-5


def cpu_experts(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor, out: torch.Tensor) -> int:
    """out [T, H] fp32 = sum over the pairs with ids >= 0 of weight * expert(x); returns that pair count.

    w13 [E, 2I, H] and w2 [E, H, I] are CPU weights in the CPU expert dtype; x [T, H], ids [T, k]
    (-1 = run elsewhere), weights [T, k] fp32. Pairs are sorted by expert so each active expert
    is one GEMM over its rows.
    """
    T, k = ids.shape
    I = w2.shape[-1]
    out.zero_()
    flat = ids.reshape(-1)  # [T*k]
    pairs = torch.nonzero(flat >= 0).squeeze(1)  # [N] positions in (token, slot) order
    if pairs.numel() == 0:
        return 0
    experts = flat[pairs]
    order = torch.argsort(experts, stable=True)
    pairs, experts = pairs[order], experts[order]
    rows = pairs // k  # token of each sorted pair
    xs = x[rows].to(w13.dtype)  # [N, H]
    ys = torch.empty(len(rows), w2.shape[1], dtype=w13.dtype)  # [N, H]
    start = 0
    for e, n in zip(*(t.tolist() for t in torch.unique_consecutive(experts, return_counts=True))):
        h = F.linear(xs[start:start + n], w13[e])  # [n, 2I]
        ys[start:start + n] = F.linear(F.silu(h[:, :I]) * h[:, I:], w2[e])  # [n, H]
        start += n
    out.index_add_(0, rows, ys.float() * weights.reshape(-1)[pairs][:, None])
    return len(rows)


@dataclass
class Stage:
    """One call's host-side tensors: inputs to read once `ready`, `out` to fill once `free`."""
    x: torch.Tensor  # [T, H]
    ids: torch.Tensor  # [T, k], -1 = device expert
    weights: torch.Tensor  # [T, k] fp32
    out: torch.Tensor  # [T, H] fp32
    ready: torch.cuda.Event | None = None  # inputs landed in pinned memory
    free: torch.cuda.Event | None = None  # the previous H2D copy out of `out` finished
    turn: int = 0  # which buffer set

    def wait_ready(self) -> None:
        _poll(self.ready)

    def wait_free(self) -> None:
        _poll(self.free)


def _poll(event) -> None:
    if event is not None:
        while not event.query():
            time.sleep(POLL_S)


class HostStaging:
    """The device is the CPU: the worker reads the inputs and writes a fresh output in place."""

    def send(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Stage:
        return Stage(x, ids, weights, torch.empty(x.shape, dtype=torch.float32))

    def receive(self, stage: Stage) -> torch.Tensor:
        return stage.out


class CudaStaging:
    """Pinned input/output buffers, two sets used in turn; copies on a side stream."""

    def __init__(self, device: torch.device, hidden: int, top_k: int, x_dtype: torch.dtype):
        self.device, self.hidden, self.top_k, self.x_dtype = device, hidden, top_k, x_dtype
        self.stream = torch.cuda.Stream(device)
        self.capacity = 0
        self.bufs: list[dict[str, torch.Tensor]] = []
        self.out_done: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def _grow(self, T: int) -> None:
        cap = max(64, 1 << (T - 1).bit_length())
        H, k = self.hidden, self.top_k
        pin = dict(pin_memory=True)
        self.bufs = [dict(x=torch.empty(cap, H, dtype=self.x_dtype, **pin),
                          ids=torch.empty(cap, k, dtype=torch.long, **pin),
                          w=torch.empty(cap, k, dtype=torch.float32, **pin),
                          out=torch.empty(cap, H, dtype=torch.float32, **pin)) for _ in range(2)]
        self.capacity = cap  # the caching host allocator keeps old blocks until their copies end

    def send(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Stage:
        T = x.shape[0]
        if T > self.capacity:
            self._grow(T)
        self.turn ^= 1
        b = self.bufs[self.turn]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            b["x"][:T].copy_(x, non_blocking=True)
            b["ids"][:T].copy_(ids, non_blocking=True)
            b["w"][:T].copy_(weights, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        for t in (x, ids, weights):  # the caller may drop these (ids is a temporary) before the side
            t.record_stream(self.stream)  # stream copies them: the allocator must not hand them out meanwhile
        return Stage(b["x"][:T], b["ids"][:T], b["w"][:T], b["out"][:T], ready, self.out_done[self.turn],
                     self.turn)

    def receive(self, stage: Stage) -> torch.Tensor:
        y = stage.out.to(self.device, non_blocking=True)  # [T, H] fp32
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self.out_done[stage.turn] = done
        return y


class CpuWorker:
    """One thread that runs CPU expert jobs in submission order, and the pool their experts split over."""

    def __init__(self, threads: int):
        self.threads = threads
        self.experts = ExpertThreads(threads)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvc-cpu-experts",
                                        initializer=torch.set_num_threads, initargs=(threads,))

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.experts.close()
