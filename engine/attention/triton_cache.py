"""Write a step's new K/V rows (or MLA's latent rows) into the paged pool; rows with a negative slot
are skipped (the padding rows of a CUDA-graph batch)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(K, V, KC, VC, Slots, stride_kt, stride_vt, stride_cs, stride_vs,
                     ROW: tl.constexpr, BLOCK: tl.constexpr, HAS_V: tl.constexpr = True):
    t = tl.program_id(0)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        tl.store(KC + slot * stride_cs + offs, tl.load(K + t * stride_kt + offs, mask=mask), mask=mask)
        if HAS_V:
            tl.store(VC + slot * stride_vs + offs, tl.load(V + t * stride_vt + offs, mask=mask), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k/v [T, Hkv, D] (rows contiguous) -> caches [N, P, Hkv, D] at slots [T] (block * P + offset)."""
    T, H, D = k.shape
    if T == 0:
        return
    assert k.stride(1) == D and v.stride(1) == D and k.stride(2) == 1 and v.stride(2) == 1
    kc, vc = k_cache.view(-1, H * D), v_cache.view(-1, H * D)  # [N*P, Hkv*D]
    _store_kv_kernel[(T,)](k, v, kc, vc, slots, k.stride(0), v.stride(0), kc.stride(0), vc.stride(0),
                           ROW=H * D, BLOCK=triton.next_power_of_2(H * D), num_warps=4)


def store_rows(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """x [T, W] (rows contiguous) -> cache [N, P, 1, W] (MLA's latent pool) at slots [T]."""
    T, W = x.shape
    if T == 0:
        return
    assert x.stride(1) == 1
    c = cache.view(-1, W)  # [N*P, W]
    _store_kv_kernel[(T,)](x, x, c, c, slots, x.stride(0), x.stride(0), c.stride(0), c.stride(0),
                           ROW=W, BLOCK=triton.next_power_of_2(W), HAS_V=False, num_warps=4)
