"""The MoE layer: routing, stacked experts and the swappable expert execution.

Experts live as two stacked tensors, w13 [E, 2I, H] (gate rows first, then up, the layout
transformers v5 uses in memory) and w2 [E, H, I]. Execution is an `ExpertsBackend`: anything with
`forward(x, topk_ids, topk_weights) -> y`. `MoEBlock.set_experts` swaps it from outside the model
(CPU offload plugs in there). `experts_reference` is the slow, obviously-correct path;
`experts_sorted` (sort by expert, then grouped GEMMs) is the CPU path and is tested against it; on
CUDA (and under triton's interpreter) the router and the experts run as the fused Triton kernels of
engine.moe_kernels unless config attn.moe_kernel is "torch" ("triton": those kernels without their
TMA weight loads).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .attention import use_kernels


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, then top-k, optionally renormalised.

    router_logits [T, E] -> (ids [T, k] long, weights [T, k] fp32). Qwen3-MoE renormalises when
    `norm_topk_prob`; Mixtral always does.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


class ExpertsBackend(Protocol):
    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids [T, k], topk_weights [T, k] fp32 -> y [T, H] in x's dtype."""


def experts_reference(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, ids: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """Per (token, slot) einsum over gathered expert weights; memory O(T*k*I*H), tests only."""
    I = w2.shape[-1]
    g13 = w13[ids]  # [T, k, 2I, H]
    h = torch.einsum("th,tkih->tki", x, g13)  # [T, k, 2I]
    a = F.silu(h[..., :I]) * h[..., I:]  # [T, k, I]
    y = torch.einsum("tki,tkhi->tkh", a, w2[ids])  # [T, k, H]
    return (y.float() * weights[..., None]).sum(1).to(x.dtype)  # [T, H]


def grouped_mm_works(device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> bool:
    """Feature-detect torch._grouped_mm for this device, dtype and these sizes (a private op)."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    try:
        a = torch.zeros(4, hidden, device=device, dtype=dtype)
        b = torch.zeros(2, 2 * inter, hidden, device=device, dtype=dtype).transpose(1, 2)
        offs = torch.tensor([2, 4], device=device, dtype=torch.int32)
        c = torch.zeros(4, inter, device=device, dtype=dtype)
        d = torch.zeros(2, hidden, inter, device=device, dtype=dtype).transpose(1, 2)
        fn(a, b, offs=offs)
        fn(c, d, offs=offs)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def experts_sorted(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, ids: torch.Tensor,
                   weights: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Sort (token, slot) pairs by expert, run each expert's rows as one GEMM, scatter back."""
    T, k = ids.shape
    E, H, I = w2.shape
    flat = ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # [T*k]
    rows = order // k  # token of each sorted pair
    xs = x[rows]  # [N, H]
    if grouped:
        # scatter_add_, not bincount: bincount reads its max back to the host, which a CUDA graph
        # capture cannot do; every shape here is fixed by T, so decode steps are capturable
        counts = torch.zeros(E, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, 0).to(torch.int32)  # [E]
        h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [N, 2I]
        a = F.silu(h[:, :I]) * h[:, I:]  # [N, I]
        y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)  # [N, H]
    else:
        counts = torch.bincount(flat, minlength=E)  # [E]
        y = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                h = xs[start:start + n] @ w13[e].T  # [n, 2I]
                y[start:start + n] = (F.silu(h[:, :I]) * h[:, I:]) @ w2[e].T  # [n, H]
                start += n
    y = y.float() * weights.reshape(-1)[order][:, None]  # [N, H]
    unsorted = torch.empty_like(y)
    unsorted[order] = y  # back to (token, slot) order; index_add_ is far slower on CPU
    return unsorted.view(T, k, H).sum(1).to(x.dtype)  # [T, H]


class StackedExperts(nn.Module):
    """All experts of a layer on one device; the default ExpertsBackend."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))  # [E, 2I, H]
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter))  # [E, H, I]
        self._grouped: bool | None = None
        self.backend, self.kernel = "auto", "auto"  # attn.backend, attn.moe_kernel
        self.path: str | None = None  # the last forward's: "fused", "grouped" or "loop"

    @property
    def capturable(self) -> bool:
        """Whether the last forward ran without host read-backs (a CUDA graph can capture it)."""
        return self.path in ("fused", "grouped")

    def fused(self, x: torch.Tensor) -> bool:
        """Whether the router and these experts run as the fused Triton kernels (attn.moe_kernel)."""
        return self.kernel != "torch" and use_kernels(x, self.backend)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The experts' weighted sum [T, H]; residual (fused kernels only, see MoEBlock.forward): that
        plus residual, added in the kernels' last launch, written into out when given."""
        if self.fused(x):
            from .moe_kernels import fused_experts
            self.path = "fused"
            return fused_experts(self.w13, self.w2, x, topk_ids, topk_weights, tma=self.kernel != "triton",
                                 residual=residual, out=out)
        if residual is not None:
            raise ValueError("StackedExperts adds a residual only on the fused kernels' path")
        if self._grouped is None:  # decided once, on the device and dtype the weights ended on
            # On CPU the per-expert loop measured 2x faster than torch._grouped_mm (torch 2.13).
            self._grouped = self.w2.device.type == "cuda" and grouped_mm_works(
                self.w2.device, self.w2.dtype, self.w2.shape[1], self.w2.shape[2])
        self.path = "grouped" if self._grouped else "loop"
        return experts_sorted(self.w13, self.w2, x, topk_ids, topk_weights, self._grouped)


FUSED_RESIDUAL = True  # the residual add inside the fused experts' last launch (benchmarks set False to
                       # time the separate add side by side)


class MoEBlock(nn.Module):
    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int, renormalize: bool):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = nn.Linear(hidden, num_experts, bias=False)  # router
        self.experts = StackedExperts(num_experts, hidden, inter)
        self._backend: ExpertsBackend | None = None

    def set_experts(self, backend: ExpertsBackend) -> None:
        """Replace the expert execution (e.g. an offloaded implementation); routing stays here."""
        self._modules.pop("_backend", None)  # a module set earlier would refuse a plain object
        self._backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] -> the experts' weighted sum [T, H]; with residual [T, H], residual + that (the
        decoder layer's residual add: on the fused kernels' path inside their last launch, else
        one add), written into out when given (out may be residual)."""
        fused = self.experts.fused(x)
        if fused:
            from .moe_kernels import fused_route
            ids, weights = fused_route(self.gate(x), self.top_k, self.renormalize)  # one launch
        else:
            ids, weights = route(self.gate(x), self.top_k, self.renormalize)  # [T, k], [T, k]
        if (residual is not None and fused and self._backend is None and FUSED_RESIDUAL
                and all(t.is_contiguous() and t.dtype == x.dtype and t.shape == x.shape
                        for t in (residual, out) if t is not None)):
            return self.experts.forward(x, ids, weights, residual, out)
        backend = self._backend if self._backend is not None else self.experts
        y = backend.forward(x, ids, weights)
        if residual is None:
            return y
        return residual + y if out is None else torch.add(residual, y, out=out)
