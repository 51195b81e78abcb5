"""RMSNorm as one Triton kernel (eager RMSNorm is seven small launches), optionally after the residual
add (`add_rms_norm`: the add and the norm in one launch), the same arithmetic as
engine.layers.RMSNorm.reference: fp32 statistics, cast to the input dtype, then times the weight
with one rounding to the output dtype, as torch does for weight * h.to(x.dtype). Equal to it up
to the order of the fp32 sum."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, D, S, W, Y, stride_x, stride_d, stride_s, stride_y, eps, N: tl.constexpr,
                     BLOCK: tl.constexpr, ADD: tl.constexpr):
    """One row: Y = norm(X) or, with ADD, S = X + D (rounded as torch's add) and Y = norm(S)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        s = (x + tl.load(D + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + row * stride_s + offs, s, mask=mask)  # the residual stream
        x = s.to(tl.float32)
    r = tl.math.rsqrt(tl.sum(x * x, 0) / N + eps)
    h = (x * r).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + offs, (w * h).to(Y.dtype.element_ty), mask=mask)


def _launch(x2, d2, s2, weight, y, eps, add: bool) -> None:
    N = x2.shape[-1]
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, d2, s2, weight, y, x2.stride(0), d2.stride(0), s2.stride(0),
                                         y.stride(0), eps, N=N, BLOCK=triton.next_power_of_2(N), ADD=add,
                                         num_warps=4 if N <= 4096 else 8)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N] -> [..., N] in torch.result_type(weight, x)'s dtype."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    _launch(x2, x2, x2, weight, y, eps, add=False)  # D and S unused
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, rms_norm(x + delta)) in one launch instead of two; x, delta [T, N] of one dtype."""
    x, delta = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, delta))
    s = torch.empty_like(x)
    y = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    _launch(x, delta, s, weight, y, eps, add=True)
    return s, y
