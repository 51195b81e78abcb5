"""OffloadedExperts: the ExpertsBackend of one MoE layer whose experts are split device / CPU.

Device experts sit in slots ([S, 2I, H] / [S, H, I]) with `logical_to_slot[E]` (-1 = CPU); every
expert's weights also stay in CPU memory (pinned under CUDA), the source for the CPU worker and
for streaming. A call (research/engine.md 5.4):
1. remap ids to slots on the device; the CPU pairs are the ones whose slot is -1;
2. stage x, the CPU ids (device ones set to -1) and weights to the host, submit the CPU job;
3. run the device slots meanwhile (the overlap window);
4. wait for the job, bring its fp32 sum back and add: exact, every pair computed once.
With `dynamic_update`, a call of at least `gpu_prefill_token_threshold` tokens runs all experts on
the device from a shared full-layer scratch (CPU experts streamed in), then keeps the batch's
most used experts in the slots, updated in place.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .grouped import CpuExpertWeights, grouped_cpu_experts, prepare
from .metrics import ExpertsMetrics
from .placement import top_ids
from .worker import CpuWorker, CudaStaging, HostStaging, Stage, cpu_experts


def device_experts(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, slots: torch.Tensor,
                   weights: torch.Tensor, grouped: bool) -> torch.Tensor:
    """fp32 [T, H] over the pairs whose slot >= 0 (slot -1 = not here, contributes zero).

    Sorted by slot with -1 mapped past the last slot, so grouped GEMMs stop before those rows
    and no host sync is needed on the grouped path.
    """
    T, k = slots.shape
    S, H, I = w2.shape
    flat = slots.reshape(-1)  # [T*k]
    key = torch.where(flat < 0, S, flat)
    order = torch.argsort(key, stable=True)  # [T*k]
    rows = order // k
    xs = x[rows]  # [T*k, H]
    counts = torch.bincount(key, minlength=S + 1)[:S]  # [S]
    if grouped:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [T*k, 2I]; rows past offs unset
        y = torch._grouped_mm(F.silu(h[:, :I]) * h[:, I:], w2.transpose(1, 2), offs=offs)  # [T*k, H]
    else:
        y = torch.zeros_like(xs)
        start = 0
        for s, n in enumerate(counts.tolist()):
            if n:
                h = xs[start:start + n] @ w13[s].T  # [n, 2I]
                y[start:start + n] = (F.silu(h[:, :I]) * h[:, I:]) @ w2[s].T  # [n, H]
                start += n
    here = (key[order] < S)[:, None]
    y = torch.where(here, y.float() * weights.reshape(-1)[order][:, None], 0.0)  # [T*k, H]
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return unsorted.view(T, k, H).sum(1)  # [T, H] fp32


@dataclass
class OffloadContext:
    """What the MoE layers of one model share: the worker, staging, metrics, knobs and scratch."""
    device: torch.device
    worker: CpuWorker
    staging: HostStaging | CudaStaging
    metrics: ExpertsMetrics
    cpu_format: str  # the CPU experts' weights, one of grouped.FORMATS
    grouped: bool
    dynamic_update: bool
    threshold: int
    grouped_cpu: bool = True  # False: the per-expert loop (`cpu_experts`), kept as the benchmark's baseline
    cpu_kernel: str = "auto"  # experts.cpu_expert_kernel: "auto" (native where it builds) or "torch"
    _scratch: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def full_layer(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A device scratch shaped like one whole layer (one layer of extra memory, allocated once)."""
        if self._scratch is None or self._scratch[0].shape != w13.shape:
            self._scratch = (torch.empty(w13.shape, dtype=w13.dtype, device=self.device),
                             torch.empty(w2.shape, dtype=w2.dtype, device=self.device))
        return self._scratch


class OffloadedExperts:
    def __init__(self, ctx: OffloadContext, w13: torch.Tensor, w2: torch.Tensor, device_ids: list[int]):
        """w13 [E, 2I, H], w2 [E, H, I]: all of the layer's experts in CPU memory, model dtype."""
        self.ctx = ctx
        self.src13, self.src2 = w13, w2
        self.cpu: CpuExpertWeights = prepare(w13, w2, ctx.cpu_format, kernel=ctx.cpu_kernel)  # shares w13/w2 when no conversion
        self.num_experts = E = w13.shape[0]
        ids = torch.tensor(sorted(device_ids), dtype=torch.long)
        dev = ctx.device
        self.slot13 = torch.empty((len(ids), *w13.shape[1:]), dtype=w13.dtype, device=dev)  # [S, 2I, H]
        self.slot2 = torch.empty((len(ids), *w2.shape[1:]), dtype=w2.dtype, device=dev)  # [S, H, I]
        for s, e in enumerate(ids.tolist()):  # expert by expert from the pinned source, no gather copy
            self.slot13[s].copy_(w13[e], non_blocking=True)
            self.slot2[s].copy_(w2[e], non_blocking=True)
        self.slot_to_logical = ids.to(dev)  # [S]
        self.logical_to_slot = torch.full((E,), -1, dtype=torch.long, device=dev)  # [E]
        self.logical_to_slot[self.slot_to_logical] = torch.arange(len(ids), device=dev)
        self.device_ids = ids.tolist()

    @property
    def num_slots(self) -> int:
        return len(self.device_ids)

    @property
    def cpu_ids(self) -> list[int]:
        on = set(self.device_ids)
        return [e for e in range(self.num_experts) if e not in on]

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        T, k = topk_ids.shape
        if self.num_slots == self.num_experts:
            ctx.metrics.tokens.labels(location="device").inc(T * k)
            return device_experts(self.slot13, self.slot2, x, self.logical_to_slot[topk_ids], topk_weights,
                                  ctx.grouped).to(x.dtype)
        if ctx.dynamic_update and T >= ctx.threshold:
            return self._layerwise(x, topk_ids, topk_weights).to(x.dtype)
        slots = self.logical_to_slot[topk_ids]  # [T, k]
        stage = ctx.staging.send(x, topk_ids.masked_fill(slots >= 0, -1), topk_weights)
        job = ctx.worker.submit(self._cpu_job, stage, T * k)
        y = None
        if self.num_slots:
            y = device_experts(self.slot13, self.slot2, x, slots, topk_weights, ctx.grouped)  # [T, H]
        job.result()
        y_cpu = ctx.staging.receive(stage)  # [T, H] fp32
        return (y_cpu if y is None else y + y_cpu).to(x.dtype)

    def _cpu_job(self, stage: Stage, pairs: int) -> None:
        with torch.inference_mode():
            stage.wait_ready()
            t0 = time.perf_counter()
            stage.wait_free()
            if self.ctx.grouped_cpu:
                n = grouped_cpu_experts(self.cpu, stage.x, stage.ids, stage.weights, stage.out,
                                        self.ctx.worker.experts)
            else:
                n = cpu_experts(self.cpu.w13, self.cpu.w2, stage.x, stage.ids, stage.weights, stage.out)
            self.ctx.metrics.cpu_call(time.perf_counter() - t0, n, pairs - n)

    def _layerwise(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """All experts on the device for this call; then re-pick the slots from its routing."""
        ctx = self.ctx
        f13, f2 = ctx.full_layer(self.src13, self.src2)
        f13.index_copy_(0, self.slot_to_logical, self.slot13)
        f2.index_copy_(0, self.slot_to_logical, self.slot2)
        for e in self.cpu_ids:  # pinned source: asynchronous H2D copies in stream order
            f13[e].copy_(self.src13[e], non_blocking=True)
            f2[e].copy_(self.src2[e], non_blocking=True)
        y = device_experts(f13, f2, x, ids, weights, ctx.grouped)  # [T, H] fp32
        ctx.metrics.layerwise.inc()
        ctx.metrics.tokens.labels(location="device").inc(ids.numel())
        if ctx.dynamic_update:
            self._repick(torch.bincount(ids.reshape(-1), minlength=self.num_experts), f13, f2)
        return y

    def _repick(self, counts: torch.Tensor, f13: torch.Tensor, f2: torch.Tensor) -> None:
        """Keep the most used experts (ties: lower id) in the slots; tensors updated in place."""
        top = top_ids(counts, self.num_slots)  # [S] ascending
        self.slot13.copy_(f13[top])
        self.slot2.copy_(f2[top])
        self.slot_to_logical.copy_(top)
        self.logical_to_slot.fill_(-1)
        self.logical_to_slot[top] = torch.arange(len(top), device=top.device)
        self.device_ids = top.tolist()
        self.ctx.metrics.updates.inc()
