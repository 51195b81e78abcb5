"""Prefill attention over the paged pool in one launch for all prefill pieces of a step.

Each piece is q_len new queries after k_len - q_len cached keys (bottom-right causal). The step's
own K/V are already in the pool (written through slot_mapping), so every key is read in place
through the piece's block table: key j lives at block_table[j // P] * P + j % P. Flash-attention
style: one program per (query tile, piece, query head), online softmax in fp32, GQA by mapping
query head h to kv head h // group. Any page size works: the key tile is gathered per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 models get fp32 dots, not TF32


@triton.jit
def _prefill_kernel(Q, K, V, O, Tables, QStarts, QLens, KLens, sm_scale,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_tb,
                    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr):
    m_blk = tl.program_id(0)
    piece = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(QStarts + piece)
    q_len = tl.load(QLens + piece)
    if m_blk * BLOCK_M >= q_len:
        return
    k_len = tl.load(KLens + piece)
    ctx = k_len - q_len  # cached keys before this piece's first query

    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] query rows within the piece
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [M, D]
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q_pos = ctx + offs_m  # [M] absolute position of each query
    # keys past the last query of this tile are masked for every row: stop there
    end = tl.minimum(k_len, ctx + (m_blk + 1) * BLOCK_M)
    table = Tables + piece * stride_tb
    for start in range(0, end, BLOCK_N):
        kj = start + offs_n  # [N] key positions
        n_mask = kj < end
        blk = tl.load(table + kj // PAGE, mask=n_mask, other=0).to(tl.int64)
        off = kj % PAGE
        k_ptrs = K + (blk * stride_kb + off * stride_kp + kv_head * stride_kh)[None, :] + offs_d[:, None]
        k = tl.load(k_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [D, N]
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [M, N] in log2 units
        causal = (kj[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows see no key at all
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V + (blk * stride_vb + off * stride_vp + kv_head * stride_vh)[:, None] + offs_d[None, :]
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_ptrs = O + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      tables: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
                      k_lens: torch.Tensor, max_q: int, scale: float) -> None:
    """q/out [T, Hq, D]; caches [N, P, Hkv, D]; tables [B, max_blocks] int; q_starts, q_lens [B]
    int32 (piece b owns rows q_starts[b] + [0, q_lens[b])); k_lens [B] int32 (cached + new keys).
    Writes the pieces' rows of out, each <= max_q long."""
    _, P, Hkv, D = k_cache.shape
    Hq = q.shape[1]
    B = k_lens.shape[0]
    if B == 0 or max_q == 0:
        return
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and out.stride(-1) == 1
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if q.element_size() == 4:  # fp32 tiles take twice the shared memory
        BLOCK_M, BLOCK_N, warps, stages = (64 if max_q > 16 else 16), 32, 4, 2
    elif max_q >= 128 and BLOCK_D <= 128:  # long pieces: bigger query tiles, fewer K/V re-reads
        BLOCK_M, BLOCK_N, warps, stages = 128, 64, 8, 3
    else:
        BLOCK_M, BLOCK_N, warps, stages = (64 if max_q > 16 else 16), (64 if BLOCK_D <= 128 else 32), 4, 2
    grid = (triton.cdiv(max_q, BLOCK_M), B, Hq)
    _prefill_kernel[grid](q, k_cache, v_cache, out, tables, q_starts, q_lens, k_lens, scale,
                          q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                          k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                          v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tables.stride(0),
                          GROUP=Hq // Hkv, PAGE=P, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                          BLOCK_D=BLOCK_D, PRECISION=dot_precision(q.dtype),
                          num_warps=warps, num_stages=stages)
