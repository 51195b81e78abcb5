"""The per-head q/k RMSNorm and NeoX RoPE of q and k as one Triton launch (eager takes four norms and
ropes of several launches each), with eager's roundings: the norm as RMSNorm.reference, then x*cos
and rot*sin each rounded to the model dtype, then their sum."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(Q, K, QW, KW, YQ, YK, Cos, Sin, stride_qt, stride_qh, stride_kt, stride_kh,
                         stride_ct, stride_st, eps, HQ: tl.constexpr, HK: tl.constexpr, NORM: tl.constexpr,
                         HALF: tl.constexpr, BLOCK: tl.constexpr):
    """One (token, head) of q or k: the per-head RMSNorm (NORM) then RoPE, with the eager roundings
    of RMSNorm.reference followed by apply_rope_reference."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    is_q = h < HQ
    hk = tl.where(is_q, 0, h - HQ)
    hq = tl.where(is_q, h, 0)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    dt = YQ.dtype.element_ty
    src = tl.where(is_q, Q + t * stride_qt + hq * stride_qh, K + t * stride_kt + hk * stride_kh)
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        r = tl.math.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
        w = tl.where(is_q, QW, KW)
        w1 = tl.load(w + offs, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2 * (x2 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    c1 = tl.load(Cos + t * stride_ct + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + t * stride_ct + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + t * stride_st + offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + t * stride_st + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    dst = tl.where(is_q, YQ + (t * HQ + hq) * (2 * HALF), YK + (t * HK + hk) * (2 * HALF))
    tl.store(dst + offs, y1.to(dt), mask=mask)
    tl.store(dst + HALF + offs, y2.to(dt), mask=mask)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight, k_weight, eps: float, cos: torch.Tensor,
                 sin: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] (last dim contiguous) -> new contiguous (q, k): per-head RMSNorm
    (when the weights are given: Qwen3) then NeoX RoPE, in one launch instead of four. out: the
    (q, k) to write instead where they are contiguous and of the result's shape and dtype
    (engine.prefill_graphs' static buffers, so that no copy follows); else new tensors."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1 and D % 2 == 0
    norm = q_weight is not None
    dtype = torch.result_type(q_weight, q) if norm else torch.result_type(q, cos)
    if out is not None and (out[0].shape == (T, Hq, D) and out[1].shape == (T, Hk, D)
                            and out[0].dtype == out[1].dtype == dtype and out[0].is_contiguous()
                            and out[1].is_contiguous()):
        yq, yk = out
    else:
        yq = torch.empty((T, Hq, D), dtype=dtype, device=q.device)
        yk = torch.empty((T, Hk, D), dtype=dtype, device=q.device)
    if T:
        _qk_norm_rope_kernel[(T, Hq + Hk)](
            q, k, q_weight if norm else q, k_weight if norm else k, yq, yk, cos, sin, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), cos.stride(0), sin.stride(0), eps, HQ=Hq, HK=Hk, NORM=norm, HALF=D // 2,
            BLOCK=triton.next_power_of_2(D // 2), num_warps=1)
    return yq, yk
