"""Split-K (flash-decoding) attention for single-token queries over the paged pool, plus a reduce.

Each program takes one sequence, one kv head (all `group` query heads sharing it, padded to a
tile of at least 16 rows for tl.dot) and one slice of the sequence's keys, and writes a partial
output with its log-sum-exp; the reduce merges the slices. The number of slices comes from an upper
bound on the length (what a CUDA graph needs: one grid serves every batch), and each sequence cuts
its own keys into that many slices of whole key tiles (slices past its length write an empty
partial); lengths and block tables are read from device tensors. (Slices of a size fixed from the
bound left a decode graph, whose bound is the model's length, one busy slice a sequence: at 8K
tokens of context 32 requests' steps took 8.0 ms in the graphs against 5.8 eager, run EW.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_merge import dot_precision, keys_per_split, merge_splits, slice_keys, split_result

BLOCK_N = 64


@triton.jit
def _decode_split_kernel(Q, K, V, Rows, Tables, Lens, MidO, MidL, sm_scale, keys_per_split, num_splits,
                         stride_qt, stride_qh, stride_kb, stride_kp, stride_kh,
                         stride_vb, stride_vp, stride_vh, stride_tb, stride_mb, stride_mh, stride_ms,
                         stride_lb, stride_lh,
                         GROUP: tl.constexpr, G_PAD: tl.constexpr, PAGE: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(Lens + b).to(tl.int32)
    kps = keys_per_split
    if kps == 0:  # this sequence's keys in num_splits slices of whole tiles
        kps = slice_keys(length, num_splits, BLOCK_N, 0)
    lo = split * kps
    hi = tl.minimum(lo + kps, length)
    offs_g = tl.arange(0, G_PAD)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g  # [G] query heads of this kv head
    if lo >= length:  # a slice past this sequence's keys: its log-sum-exp only (the merge reads no output)
        tl.store(MidL + b * stride_lb + heads * stride_lh + split, tl.full([G_PAD], float("-inf"), tl.float32),
                 mask=g_mask)
        return
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    row = tl.load(Rows + b).to(tl.int64)
    q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [G, D]
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    table = Tables + b * stride_tb
    for start in range(lo, hi, BLOCK_N):
        kj = start + offs_n
        n_mask = kj < hi
        blk = tl.load(table + kj // PAGE, mask=n_mask, other=0).to(tl.int64)
        off = kj % PAGE
        k = tl.load(K + (blk * stride_kb + off * stride_kp + kv_head * stride_kh)[None, :] + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [D, N]
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [G, N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + (blk * stride_vb + off * stride_vp + kv_head * stride_vh)[:, None] + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out, lse = split_result(acc, m_i, l_i)  # a slice past the end (or an empty row) contributes nothing
    base = b * stride_mb + heads * stride_mh + split * stride_ms  # [G]
    tl.store(MidO + base[:, None] + offs_d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(MidL + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                     rows: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, max_len: int,
                     scale: float, per_sequence: bool = True) -> None:
    """q/out [T, Hq, D]; rows [B] (row of q/out per sequence); tables [B, max_blocks] int; lens [B]
    keys per sequence, each <= max_len (a host-side bound: the number of slices comes from it).
    per_sequence: each sequence's keys in that many slices; False (the kernel before run EX, for
    bench_attention --decode): slices of max_len / slices keys, the same for every sequence."""
    _, P, Hkv, D = k_cache.shape
    Hq = q.shape[1]
    B = rows.shape[0]
    if B == 0:
        return
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and out.stride(-1) == 1
    group = Hq // Hkv
    kps = keys_per_split(B * Hkv, max_len, BLOCK_N)
    S = triton.cdiv(max(max_len, 1), kps)
    if per_sequence:
        kps = 0
    BLOCK_D = max(16, triton.next_power_of_2(D))
    mid_o = torch.empty(B, Hq, S, BLOCK_D, dtype=torch.float32, device=q.device)  # [B, Hq, S, D]
    mid_l = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)  # [B, Hq, S] log2-sum-exp
    _decode_split_kernel[(B, Hkv, S)](
        q, k_cache, v_cache, rows, tables, lens, mid_o, mid_l, scale, kps, S,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_l.stride(0), mid_l.stride(1),
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), PAGE=P, HEAD_DIM=D,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=dot_precision(q.dtype), num_warps=4, num_stages=2)
    # each sequence's own slices: the merge stops at its last live one (a decode graph's bound,
    # the model's length, leaves most slices of a short context empty: 1 x 2K read 128, run GJ)
    merge_splits(mid_o, mid_l, out, rows, lens=lens if per_sequence else None, tile=BLOCK_N)
