"""NeoX RoPE as one Triton kernel per tensor (eager apply_rope is five launches), with eager's
roundings: x*cos and rot*sin each rounded to the model dtype, then their sum."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(X, Y, Cos, Sin, stride_xt, stride_xh, stride_ct, stride_st,
                 H: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    dt = Y.dtype.element_ty
    x1 = tl.load(X + t * stride_xt + h * stride_xh + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + t * stride_xt + h * stride_xh + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(Cos + t * stride_ct + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + t * stride_ct + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + t * stride_st + offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + t * stride_st + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)  # rot = cat(-x2, x1)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    base = Y + (t * H + h) * (2 * HALF)
    tl.store(base + offs, y1.to(dt), mask=mask)
    tl.store(base + HALF + offs, y2.to(dt), mask=mask)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] (last dim contiguous), cos/sin [T, D] -> new contiguous [T, H, D]."""
    T, H, D = x.shape
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1 and D % 2 == 0
    y = torch.empty((T, H, D), dtype=torch.result_type(x, cos), device=x.device)
    if T:
        _rope_kernel[(T, H)](x, y, cos, sin, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                             H=H, HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2), num_warps=1)
    return y
