"""Decode steps as CUDA graphs: one graph per bucketed batch size, replayed over static buffers.

A decode-only step of B requests runs the graph of the smallest bucket >= B (1, 2, 4, ..., up to
scheduler.max_num_seqs). Rows past B are padding: slot -1 (the K/V store skips them), length 0
(attention reads nothing), token 0; their logits are dropped. The graph covers embedding, every
layer (norms, RoPE, the K/V store, split-K decode attention sized for `max_blocks` pages, router
and the fused MoE kernels) and the lm_head; sampling stays outside. Graphs are captured lazily, the
first time a bucket is needed. engine.model.CausalLM and engine.deepseek.DeepseekCausalLM (its
MLA layers decode through the latent kernel, their rows stored by a launch that skips slot -1)
with their own device experts qualify: offloaded or recording experts, CPU, missing triton,
`attn.backend: reference` or `model.enforce_eager` keep steps eager (engine.prefill_graphs
splits both models' layers around attention for the other steps).

Capture uses capture_error_mode="thread_local": the engine's other threads keep using CUDA while a
bucket is captured (the kvc-load thread copies pages host -> device on its own stream and
synchronizes it, the kvc-put thread waits on events). In the default "global" mode any such call
from any thread during the capture fails ("operation not permitted when stream is capturing") and
invalidates the capture. thread_local forbids unsafe calls only on the capturing thread, and the
captured region itself makes none: every input is already on the device (static buffers), the
warm-up before it compiles the Triton kernels and settles the experts' path, and the MoE path
counts tokens per expert on the device (no host read-back).
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from kvc import pinned

from .attention import use_kernels
from .deepseek import DeepseekCausalLM
from .kv_cache import KVCache
from .layers import AttnMetadata
from .model import CausalLM
from .request import Request, pending_patch, table_ids

log = logging.getLogger(__name__)


def buckets(max_num_seqs: int) -> list[int]:
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return out + [max_num_seqs]


def ensure_captured(owner, size: int, what: str) -> bool:
    """Whether owner.graphs holds bucket `size`, capturing it now (owner._capture) if needed. A
    failed capture sets owner.disabled, logs once, and the caller runs the step eagerly."""
    if size in owner.graphs:
        return True
    try:
        owner._capture(size)
        return True
    except Exception as e:  # a model whose steps cannot be captured: stay eager
        owner.disabled = f"capture failed: {e}"
        log.warning("%s CUDA graphs off: %s", what, owner.disabled)
        return False


@functools.lru_cache(maxsize=None)
def capture_streams(index: int) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(warm-up stream, capture stream) of device `index`, made once and shared by every capture
    (one runs at a time, on the engine's thread). From the high-priority pool: torch.cuda.Stream()
    hands out the 32 streams of its default-priority pool round-robin, so a stream asked for per
    capture (as the warm-up's was) came round to the one the loader, put or verify work of the
    host tier had been given, and a capture then took that thread's copies into the graph (run BF:
    "operation not permitted on an event last recorded in a capturing stream", the load failed,
    layer-by-layer loads and the prefill graphs turned off). Those streams are default priority;
    these two are never one of them."""
    with torch.cuda.device(index):
        return torch.cuda.Stream(priority=-1), torch.cuda.Stream(priority=-1)


def warm_and_capture(device: torch.device, pool, fn, count: int = 1, check=None):
    """fn(j) for j in range(count) once on the warm-up stream (Triton compiles, cuBLAS picks, the
    experts decide their path), check() (it raises when they cannot be captured), then each
    fn(j) captured into its own graph on the capture stream (capture_streams), in `pool` (None: a
    new one). Returns (graphs, their outputs)."""
    side, capture = capture_streams(device.index if device.index is not None else torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode():
        for j in range(count):
            fn(j)
    torch.cuda.current_stream(device).wait_stream(side)
    if check is not None:
        check()
    graphs, outs = [], []
    with torch.inference_mode():
        for j in range(count):
            g = torch.cuda.CUDAGraph()
            # thread_local: other engine threads' CUDA calls meanwhile must not void it (module doc)
            with torch.cuda.graph(g, pool=pool, stream=capture, capture_error_mode="thread_local"):
                outs.append(fn(j))
            if pool is None:
                pool = g.pool()
            graphs.append(g)
    return graphs, outs


def graphs_supported(model: torch.nn.Module, device: torch.device, backend: str = "auto") -> str | None:
    """None when decode graphs can be used (backend: attn.backend), else why not."""
    if device.type != "cuda":
        return "not on CUDA"
    if type(model) not in (CausalLM, DeepseekCausalLM):
        return f"{type(model).__name__} is not engine.model.CausalLM or engine.deepseek.DeepseekCausalLM"
    if backend == "reference":
        return "attn.backend is reference"
    if not use_kernels(torch.empty(0, device=device)):
        return "triton kernels unavailable"
    if any(b._backend is not None for b in model.moe_blocks()):
        return "MoE experts are offloaded or recorded (their execution syncs with the host)"
    return None


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv: KVCache, device: torch.device, max_num_seqs: int,
                 max_model_len: int):
        self.model, self.kv, self.device = model, kv, device
        self.sizes = buckets(max_num_seqs)
        P = kv.page_size
        self.max_blocks = (max_model_len + P - 1) // P
        B = self.sizes[-1]
        long = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros(B, **long)  # [B] static inputs
        self.positions = torch.zeros(B, **long)
        self.slots = torch.full((B,), -1, **long)
        self.rows = torch.arange(B, **long)
        self.tables = torch.zeros(B, self.max_blocks, dtype=torch.int32, device=device)  # [B, max_blocks]
        self.lens = torch.zeros(B, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.disabled: str | None = None
        self.replays = 0

    def _meta(self, B: int) -> AttnMetadata:
        return AttnMetadata(self.positions[:B], self.slots[:B], [], self.rows[:B], self.tables[:B],
                            self.lens[:B], decode_max_len=self.max_blocks * self.kv.page_size)

    def _forward(self, B: int) -> torch.Tensor:
        hidden = self.model(self.ids[:B], self._meta(B), self.kv.pool.layer)  # [B, H]
        return self.model.logits(hidden)  # [B, vocab] fp32

    def _capture(self, B: int) -> None:
        blocker = getattr(self.model, "graph_blocker", None)  # checked before the warm-up runs the step
        if blocker is not None and (why := blocker()):
            raise RuntimeError(why)
        self._pad(0, B)

        def check() -> None:
            if not all(getattr(b.experts, "capturable", False) for b in self.model.moe_blocks()):
                raise RuntimeError("neither the fused MoE kernels nor grouped expert GEMMs run for this "
                                   "device/dtype; the per-expert loop syncs with the host")
        graphs, outs = warm_and_capture(self.device, self.pool, lambda _j: self._forward(B), check=check)
        if self.pool is None:
            self.pool = graphs[0].pool()
        self.graphs[B] = (graphs[0], outs[0])

    def _pad(self, start: int, end: int) -> None:
        self.ids[start:end] = 0
        self.positions[start:end] = 0
        self.slots[start:end] = -1
        self.lens[start:end] = 0

    def can_run(self, sched: list[tuple[Request, int]]) -> bool:
        return (self.disabled is None and 0 < len(sched) <= self.sizes[-1] and all(n == 1 for _, n in sched))

    def step_inputs(self, sched: list[tuple[Request, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decode step's inputs on the host: (ids, positions, slots) [3, B] long (a pending
        token's id 0, patched on the device), key counts [B] int32, block tables [B, width] int32
        (each request's blocks up to its last key, then 0). The tables are row copies of their
        ids arrays (engine.request.BlockTable): as nested lists through torch.tensor they cost
        ~3.6 ms a step for 32 requests at 32K tokens of context on the 2-core VM (probe_prepare)."""
        P = self.kv.page_size
        ids, pos, slots, lens = [], [], [], []
        for req, _ in sched:
            p = req.num_computed
            ids.append(req.ids(p, p + 1)[0] if not req.pending else 0)
            pos.append(p)
            slots.append(req.block_table[p // P] * P + p % P)
            lens.append(p + 1)
        width = max(((n + P - 1) // P for n in lens), default=0)
        rows = np.zeros((len(sched), width), np.int32)
        for i, ((req, _), n_keys) in enumerate(zip(sched, lens)):
            nb = (n_keys + P - 1) // P
            rows[i, :nb] = table_ids(req.block_table, nb)
        return (torch.tensor([ids, pos, slots], dtype=torch.long), torch.tensor(lens, dtype=torch.int32),
                torch.from_numpy(rows))

    def logits(self, sched: list[tuple[Request, int]], runner) -> torch.Tensor | None:
        """Logits [B, vocab] fp32 of a decode-only step, or None when it must run eagerly. A pending
        token's id is patched in from the step in flight by runner.patch_pending."""
        B = len(sched)
        size = next(s for s in self.sizes if s >= B)
        if not ensure_captured(self, size, "decode"):
            return None
        host, lens, table = self.step_inputs(sched)
        self.ids[:B].copy_(host[0], non_blocking=True)
        self.positions[:B].copy_(host[1], non_blocking=True)
        self.slots[:B].copy_(host[2], non_blocking=True)
        self.lens[:B].copy_(lens, non_blocking=True)
        self.tables[:B, :table.shape[1]].copy_(table, non_blocking=True)  # entries past a length are never read
        patch_rows, patch_srcs = pending_patch(sched)
        if patch_rows:
            patch = pinned.upload(torch.tensor([patch_rows, patch_srcs], dtype=torch.long), self.device)
            runner.patch_pending(self.ids, patch[0], patch[1])
        self._pad(B, size)
        g, out = self.graphs[size]
        g.replay()
        self.replays += 1
        return out[:B]
