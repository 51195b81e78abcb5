"""Apply expert placement, CPU offload and the activation recorder to a loaded model, from outside.

`setup_experts` swaps each MoE block's experts backend (MoEBlock.set_experts); the model itself
knows nothing of this. With neither experts.num_gpu_experts nor experts.gpu_experts_ratio set,
every expert stays on the device, as before.
"""
from __future__ import annotations

import logging
import os

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from kvc.config import ExpertsConfig

from ..moe import MoEBlock, grouped_mm_works
from . import native
from .experts import OffloadContext, OffloadedExperts
from .metrics import ExpertsMetrics
from .placement import load_counts, place, total_device_experts
from .recorder import ExpertRecorder, RecordingExperts
from .worker import CpuWorker, CudaStaging, HostStaging

log = logging.getLogger("kvc.engine.experts")


def offloading(cfg: ExpertsConfig) -> bool:
    return cfg.num_gpu_experts is not None or cfg.gpu_experts_ratio is not None


def approximate_experts(cfg: ExpertsConfig, model_dtype: torch.dtype) -> str:
    """The CPU experts' weight format where it is not the model's own (int8, or bfloat16 under a
    float32 model), else "". KV computed through such experts is not the exact model's KV (int8
    pages differ by ~0.1 from exact ones), so the engine keys its cache namespace with it and a
    page computed one way is never reused by an engine that computes the other way."""
    if not offloading(cfg) or cfg.cpu_expert_dtype == "auto":
        return ""
    return "" if cfg.cpu_expert_dtype == str(model_dtype).removeprefix("torch.") else cfg.cpu_expert_dtype


def experts_load_device(cfg: ExpertsConfig) -> str | None:
    """Where the loader should put expert weights: CPU memory when offloading, else with the rest."""
    return "cpu" if offloading(cfg) else None


def moe_blocks(model: nn.Module) -> dict[int, MoEBlock]:
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoEBlock)}


def worker_threads(device: torch.device) -> int:
    """All cores but one for the CPU experts when a GPU computes; the torch default on a CPU device."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1) if device.type == "cuda" else torch.get_num_threads()


class ExpertsRuntime:
    """The expert split of one engine: placement table, per-layer backends, recorder, worker."""

    def __init__(self, placement: torch.Tensor | None, backends: dict[int, object],
                 recorder: ExpertRecorder | None, context: OffloadContext | None):
        self.placement, self.backends = placement, backends  # placement [L, E] bool or None
        self.recorder, self.context = recorder, context

    def device_table(self) -> torch.Tensor | None:
        """The live placement [L, E] (dynamic update moves it), or None when all are on the device."""
        if self.placement is None:
            return None
        table = torch.zeros_like(self.placement)
        for i, b in self.backends.items():
            table[i, b.device_ids] = True
        return table

    def step(self) -> None:
        if self.recorder is not None:
            self.recorder.step()

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        if self.context is not None:
            self.context.worker.close()


def setup_experts(model: nn.Module, cfg: ExpertsConfig, device: torch.device,
                  registry: CollectorRegistry) -> ExpertsRuntime:
    return apply_experts(moe_blocks(model), model.args.num_layers, cfg, device, registry)


def apply_experts(blocks: dict[int, MoEBlock], num_layers: int, cfg: ExpertsConfig, device: torch.device,
                  registry: CollectorRegistry) -> ExpertsRuntime:
    """Swap the experts backend of `blocks` (layer index -> MoE block of a `num_layers` model)."""
    layers = sorted(blocks)
    if not layers:
        return ExpertsRuntime(None, {}, None, None)
    first = blocks[layers[0]]
    E, hidden, top_k = first.gate.out_features, first.gate.in_features, first.top_k
    total = total_device_experts(cfg.num_gpu_experts, cfg.gpu_experts_ratio, len(layers), E)
    backends: dict[int, object] = {i: b.experts for i, b in blocks.items()}
    table = context = None
    if total is not None:
        counts = None
        if cfg.placement_strategy == "frequency":
            if cfg.init_expert_location is None:
                log.warning("experts.placement_strategy=frequency without experts.init_expert_location: "
                            "all counts are equal, so the pick is the first layers' lowest ids")
            else:
                counts = load_counts(cfg.init_expert_location, num_layers, E)
        table = place(cfg.placement_strategy, total, layers, num_layers, E, counts)
        context = _context(cfg, first, device, registry, hidden, top_k)
        for i in layers:
            backends[i] = _offload_layer(context, blocks[i], table[i], device)
        n_dev = int(table.sum())
        context.metrics.placement(n_dev, len(layers) * E - n_dev)
        kinds: dict[tuple[str, str], list[int]] = {}
        for i in layers:
            kinds.setdefault((backends[i].cpu.fmt, backends[i].cpu.kernel), []).append(i)
            context.metrics.cpu_kernel(i, backends[i].cpu.fmt, backends[i].cpu.kernel)
        log.info("experts: %d of %d (layer, expert) pairs on %s, %d in CPU memory (strategy %s, %s); per MoE "
                 "layer on device: %s; cpu experts (dtype/kernel: layers) %s, grouped over %d threads (cpu "
                 "capability %s, amx %s%s); "
                 "dynamic update %s (threshold %d tokens)", n_dev, len(layers) * E, device,
                 len(layers) * E - n_dev, cfg.placement_strategy,
                 f"num_gpu_experts={cfg.num_gpu_experts}" if cfg.num_gpu_experts is not None
                 else f"gpu_experts_ratio={cfg.gpu_experts_ratio}",
                 [int(table[i].sum()) for i in layers],
                 "; ".join(f"{f}/{k}: {ls}" for (f, k), ls in kinds.items()),
                 context.worker.threads, torch.backends.cpu.get_cpu_capability(), amx(), _native_note(backends, layers),
                 "on" if cfg.dynamic_update else "off", cfg.gpu_prefill_token_threshold)
    recorder = None
    if cfg.record_expert_stats is not None:
        recorder = ExpertRecorder(cfg.record_expert_stats, num_layers, E, device)
        log.info("experts: recording routing counts to %s", recorder.path)
        backends = {i: RecordingExperts(b, recorder, i) for i, b in backends.items()}
    if table is not None or recorder is not None:
        for i, b in backends.items():
            blocks[i].set_experts(b)
    return ExpertsRuntime(table, {i: _unwrap(b) for i, b in backends.items()} if table is not None else {},
                          recorder, context)


def amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN then runs bf16 and int8 GEMMs on them)."""
    probe = getattr(torch._C._cpu, "_init_amx", None)  # True once the kernel grants the tiles
    return bool(probe and probe())


def _native_note(backends: dict, layers: list[int]) -> str:
    """', native <isa>, torch above N pairs per expert' when some layer runs the native kernel."""
    cpu = next((backends[i].cpu for i in layers if backends[i].cpu.kernel == "native"), None)
    if cpu is None:
        return ""
    hand = f"{cpu.fallback} above {cpu.max_rows:g} pairs per expert" if cpu.fallback else "at every size"
    return f", native {native.library().isa}, {hand}"


def _unwrap(b):
    return b.inner if isinstance(b, RecordingExperts) else b


def _context(cfg: ExpertsConfig, block: MoEBlock, device: torch.device, registry: CollectorRegistry,
             hidden: int, top_k: int) -> OffloadContext:
    w2 = block.experts.w2
    model_dtype = w2.dtype
    fmt = str(model_dtype).removeprefix("torch.") if cfg.cpu_expert_dtype == "auto" else cfg.cpu_expert_dtype
    staging = CudaStaging(device, hidden, top_k, model_dtype) if device.type == "cuda" else HostStaging()
    return OffloadContext(device, CpuWorker(worker_threads(device)), staging, ExpertsMetrics(registry),
                          fmt, device.type == "cuda" and grouped_mm_works(device, model_dtype, *w2.shape[1:]),
                          cfg.dynamic_update, cfg.gpu_prefill_token_threshold,
                          cpu_kernel=cfg.cpu_expert_kernel)


def _offload_layer(ctx: OffloadContext, block: MoEBlock, on_device: torch.Tensor,
                   device: torch.device) -> OffloadedExperts:
    """Move the block's stacked weights to (pinned) CPU memory in place and build the split backend."""
    ex = block.experts
    for p in (ex.w13, ex.w2):
        host = p.data.to("cpu")
        p.data = host.pin_memory() if device.type == "cuda" and not host.is_pinned() else host
    return OffloadedExperts(ctx, ex.w13.data, ex.w2.data, on_device.nonzero().squeeze(1).tolist())
