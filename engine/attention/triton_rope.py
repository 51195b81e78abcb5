"""The per-head q/k RMSNorm and NeoX RoPE of q and k as one Triton launch (eager takes four norms and
ropes of several launches each), with eager's roundings: the norm as RMSNorm.reference, then x*cos
and rot*sin each rounded to the model dtype, then their sum. The same launch can copy v out of a
fused q/k/v projection's output (engine.layers: one GEMM for the three), so that the layer's q, k
and v land contiguous, in the prefill graphs' static buffers, in one launch after one GEMM."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

HEADS_PER_PROGRAM = 16  # a program's heads when a call has many tokens (1 a program for few tokens); run
                        # ET (bench_qkv, H200): 16 the quickest of 1-16 at 2,048-32,768 tokens
MANY_TOKENS = 64  # from this many tokens a program takes HEADS_PER_PROGRAM heads of one token


@triton.jit
def _qk_norm_rope_kernel(Q, K, V, QW, KW, YQ, YK, YV, Cos, Sin, KC, VC, Slots, stride_qt, stride_qh, stride_kt,
                         stride_kh, stride_vt, stride_vh, stride_ct, stride_st, stride_kc, stride_vc, eps,
                         HQ: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, NORM: tl.constexpr,
                         HALF: tl.constexpr, BLOCK: tl.constexpr, HB: tl.constexpr, STORE: tl.constexpr):
    """HB heads of one token, out of its HQ q heads, HK k heads and HV v heads (in that order): the
    per-head RMSNorm (NORM) then RoPE of q and k, with the eager roundings of RMSNorm.reference
    followed by apply_rope_reference; v's heads are copied as they are. Compiled, the norm's sum
    over a [HB, BLOCK] tile may round apart from one head a program's (run ET: a bf16 rounding).
    STORE: k's and v's rows also go to the paged pool at the token's slot (KC / VC rows of HK x
    2 HALF; a negative slot, a graph bucket's padding row, is skipped): store_kv's work."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * HB + tl.arange(0, HB)  # [HB]
    live = h < HQ + HK + HV
    is_q = h < HQ
    is_k = (h >= HQ) & (h < HQ + HK)
    is_v = h >= HQ + HK
    hq = tl.where(is_q, h, 0)
    hk = tl.where(is_k, h - HQ, 0)
    hv = tl.where(is_v & live, h - HQ - HK, 0)
    offs = tl.arange(0, BLOCK)
    col = offs < HALF
    mask = live[:, None] & col[None, :]
    dt = YQ.dtype.element_ty
    src = tl.where(is_q, Q + t * stride_qt + hq * stride_qh,
                   tl.where(is_k, K + t * stride_kt + hk * stride_kh, V + t * stride_vt + hv * stride_vh))
    x1 = tl.load(src[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)  # [HB, BLOCK]
    x2 = tl.load(src[:, None] + HALF + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    rot = (is_q | is_k)[:, None]
    if NORM:
        r = tl.math.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        w = tl.where(is_q, QW, KW)
        wm = mask & rot
        w1 = tl.load(w[:, None] + offs[None, :], mask=wm, other=0.0).to(tl.float32)
        w2 = tl.load(w[:, None] + HALF + offs[None, :], mask=wm, other=0.0).to(tl.float32)
        n1 = (w1 * (x1 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        n2 = (w2 * (x2 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x1 = tl.where(rot, n1, x1)
        x2 = tl.where(rot, n2, x2)
    c1 = tl.load(Cos + t * stride_ct + offs, mask=col, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(Cos + t * stride_ct + HALF + offs, mask=col, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(Sin + t * stride_st + offs, mask=col, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(Sin + t * stride_st + HALF + offs, mask=col, other=0.0).to(tl.float32)[None, :]
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    y1 = tl.where(rot, y1, x1)
    y2 = tl.where(rot, y2, x2)
    dst = tl.where(is_q, YQ + (t * HQ + hq) * (2 * HALF),
                   tl.where(is_k, YK + (t * HK + hk) * (2 * HALF), YV + (t * HV + hv) * (2 * HALF)))
    tl.store(dst[:, None] + offs[None, :], y1.to(dt), mask=mask)
    tl.store(dst[:, None] + HALF + offs[None, :], y2.to(dt), mask=mask)
    if STORE:
        slot = tl.load(Slots + t).to(tl.int64)
        if slot >= 0:
            cache = tl.where(is_k, KC + slot * stride_kc + hk * (2 * HALF), VC + slot * stride_vc + hv * (2 * HALF))
            cm = mask & (is_k | is_v)[:, None]
            y1c = y1.to(KC.dtype.element_ty)
            y2c = y2.to(KC.dtype.element_ty)
            tl.store(cache[:, None] + offs[None, :], y1c, mask=cm)
            tl.store(cache[:, None] + HALF + offs[None, :], y2c, mask=cm)


def _fits(buf, shape, dtype) -> bool:
    return buf is not None and buf.shape == shape and buf.dtype == dtype and buf.is_contiguous()


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight, k_weight, eps: float, cos: torch.Tensor,
                 sin: torch.Tensor, out: tuple | None = None, v: torch.Tensor | None = None,
                 heads_per_program: int | None = None, store: tuple | None = None) -> tuple:
    """q [T, Hq, D], k [T, Hkv, D] (last dim contiguous) -> new contiguous (q, k): per-head RMSNorm
    (when the weights are given: Qwen3) then NeoX RoPE, in one launch instead of four. out: the
    (q, k) (or (q, k, v)) to write instead where they are contiguous and of the result's shape and
    dtype (engine.prefill_graphs' static buffers, so that no copy follows); else new tensors.
    v [T, Hv, D] (last dim contiguous, of the result's dtype): copied in the same launch into a
    contiguous tensor (out[2] where it fits), returned third: (q, k, v).
    heads_per_program: heads a program takes (a power of two; default HEADS_PER_PROGRAM from
    MANY_TOKENS tokens on, else 1: a program a head).
    store (k_cache, v_cache [N, P, Hkv, D], slots [>= T], the first T read; needs v): the new k and
    v rows written into the pool too, at slots (block * P + offset; negative: skipped), in the same
    launch: what engine.attention.triton_cache.store_kv does after it."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    Hv = 0 if v is None else v.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1 and D % 2 == 0
    norm = q_weight is not None
    dtype = torch.result_type(q_weight, q) if norm else torch.result_type(q, cos)
    if v is not None and (v.shape != (T, Hv, D) or v.stride(-1) != 1 or v.dtype != dtype):
        raise ValueError(f"qk_norm_rope: v must be [{T}, heads, {D}] of {dtype} with its last dim contiguous, "
                         f"got {tuple(v.shape)} of {v.dtype} with strides {v.stride()}")
    outs = (None, None, None) if out is None else tuple(out) + (None,) * (3 - len(out))
    if _fits(outs[0], (T, Hq, D), dtype) and _fits(outs[1], (T, Hk, D), dtype):
        yq, yk = outs[0], outs[1]
    else:
        yq = torch.empty((T, Hq, D), dtype=dtype, device=q.device)
        yk = torch.empty((T, Hk, D), dtype=dtype, device=q.device)
    yv = None
    if v is not None:
        yv = outs[2] if _fits(outs[2], (T, Hv, D), dtype) else torch.empty((T, Hv, D), dtype=dtype, device=q.device)
    if store is not None:
        k_cache, v_cache, slots = store
        if v is None or k_cache.shape[-2:] != (Hk, D) or v_cache.shape != k_cache.shape or Hv != Hk \
                or k_cache.dtype != dtype or v_cache.dtype != dtype or slots.dim() != 1 or len(slots) < T \
                or not k_cache.is_contiguous() or not v_cache.is_contiguous():
            raise ValueError(f"qk_norm_rope: store needs v and contiguous caches [N, P, {Hk}, {D}] of {dtype} "
                             f"and slots [>= {T}]; got v {None if v is None else tuple(v.shape)}, caches "
                             f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)} of {k_cache.dtype}, slots "
                             f"{tuple(slots.shape)}")
        kc, vc = k_cache.view(-1, Hk * D), v_cache.view(-1, Hk * D)
    hb = heads_per_program or (HEADS_PER_PROGRAM if T >= MANY_TOKENS else 1)
    if hb & (hb - 1):
        raise ValueError(f"qk_norm_rope: heads_per_program must be a power of two, got {hb}")
    if T:
        src_v = k if v is None else v
        st = store is not None
        _qk_norm_rope_kernel[(T, triton.cdiv(Hq + Hk + Hv, hb))](
            q, k, src_v, q_weight if norm else q, k_weight if norm else k, yq, yk, yk if yv is None else yv,
            cos, sin, kc if st else yk, vc if st else yk, slots if st else cos, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), src_v.stride(0), src_v.stride(1), cos.stride(0), sin.stride(0),
            kc.stride(0) if st else 0, vc.stride(0) if st else 0, eps, HQ=Hq, HK=Hk, HV=Hv, NORM=norm,
            HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2), HB=hb, STORE=st,
            num_warps=1 if hb == 1 else min(4, hb // 2))
    return (yq, yk) if v is None else (yq, yk, yv)
