"""Shared pieces of the attention kernels: dot precision, and merging split-K partial outputs.

A split-K pass writes, per (row, head, slice), the slice's softmax-normalised output and its
log2-sum-exp (-inf for a slice that saw no key); `merge_splits` combines the slices of each row
(given each row's keys, only the slices that hold some).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 512  # programs per launch that fill an H200's 132 SMs a few times over
MERGE_HEADS = 32768  # heads (MLA: query x head rows) a merge launch, under CUDA's grid-y cap


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 models get fp32 dots, not TF32


def keys_per_split(programs: int, max_len: int, block_n: int, target: int | None = None) -> int:
    """Keys per slice (a multiple of block_n) so that `programs` x slices fills the GPU (about
    target programs in all, default TARGET_PROGRAMS)."""
    tiles = triton.cdiv(max(max_len, 1), block_n)
    splits = max(1, min(tiles, triton.cdiv(target or TARGET_PROGRAMS, max(programs, 1))))
    return triton.cdiv(tiles, splits) * block_n


@triton.jit
def slice_keys(length, num_splits, TILE: tl.constexpr, MIN_KEYS: tl.constexpr):
    """Keys of each of a sequence's num_splits slices (the split kernels' cut, which the merge's
    count of live slices must match): its keys' tiles shared out, at least MIN_KEYS."""
    return tl.maximum(tl.cdiv(tl.cdiv(length, TILE), num_splits) * TILE, MIN_KEYS)


@triton.jit
def split_result(acc, m_i, l_i):
    """A split-K slice's online-softmax state -> (its normalised output [rows, D], its log2-sum-exp
    [rows]); a row that saw no key in the slice gets 0 and -inf, so the merge weighs it 0."""
    empty = l_i == 0.0
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    return acc / tl.where(empty, 1.0, l_i)[:, None], lse


@triton.jit
def _merge_kernel(MidO, MidL, O, Rows, Lens, num_splits, stride_mb, stride_mh, stride_ms,
                          stride_lb, stride_lh, stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                          HAS_LENS: tl.constexpr, TILE: tl.constexpr, MIN_KEYS: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    d_mask = offs_d < HEAD_DIM
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    live = num_splits
    if HAS_LENS:  # the slices that hold keys: the split kernels' own cut of this row's keys
        length = tl.load(Lens + b).to(tl.int32)
        kps = tl.maximum(slice_keys(length, num_splits, TILE, MIN_KEYS), 1)  # 1: no keys, no slice
        live = tl.minimum(tl.cdiv(length, kps), num_splits)
    for s0 in range(0, live, BLOCK_S):
        sj = s0 + offs_s
        s_mask = sj < live
        lse = tl.load(MidL + b * stride_lb + head * stride_lh + sj, mask=s_mask, other=float("-inf"))  # [S]
        seen = s_mask & (lse > float("-inf"))  # an empty slice's output is not read (nor always written)
        o = tl.load(MidO + b * stride_mb + head * stride_mh + sj[:, None] * stride_ms + offs_d[None, :],
                    mask=seen[:, None] & d_mask[None, :], other=0.0)  # [S, D]
        m_new = tl.maximum(m_i, tl.max(lse, 0))  # [1]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(lse - m_safe)  # [S]; empty slices weigh 0
        alpha = tl.math.exp2(m_i - m_safe)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        l_i = l_i * alpha + tl.sum(w, 0)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    row = tl.load(Rows + b).to(tl.int64)
    tl.store(O + row * stride_ot + head * stride_oh + offs_d, (acc / l_i).to(O.dtype.element_ty), mask=d_mask)


def merge_splits(mid_o: torch.Tensor, mid_l: torch.Tensor, out: torch.Tensor, rows: torch.Tensor,
                 block_d: int | None = None, lens: torch.Tensor | None = None, tile: int = 1,
                 min_keys: int = 0) -> None:
    """mid_o [B, Hq, S, D] fp32, mid_l [B, Hq, S] fp32 -> out[rows[b], h] for every b, h.
    block_d: columns a program (a power of two dividing D; default all D): narrower columns give
    more programs where B x Hq alone would leave most of the GPU idle (MLA's 512-wide rows).
    lens [B] (device): each b's keys, where the split kernel cut them into S slices of
    max(ceil(tiles / S) tiles of `tile` keys, min_keys) keys: the merge then reads only the slices
    that hold keys (neither those slices' outputs nor their log-sum-exps need be written). Without
    lens it reads all S (a graph's bound far past the keys: mostly empty slices, run GJ)."""
    B, Hq, S, D = mid_o.shape
    block_d = block_d or D
    for h in range(0, Hq, MERGE_HEADS):  # launches of at most MERGE_HEADS heads: CUDA caps grid y at 65,535
        n = min(MERGE_HEADS, Hq - h)
        _merge_kernel[(B, n, D // block_d)](mid_o[:, h:], mid_l[:, h:], out[:, h:], rows,
                                            rows if lens is None else lens, S, mid_o.stride(0),
                                            mid_o.stride(1), mid_o.stride(2), mid_l.stride(0), mid_l.stride(1),
                                            out.stride(0), out.stride(1), HEAD_DIM=out.shape[-1], BLOCK_D=block_d,
                                            BLOCK_S=16, HAS_LENS=lens is not None, TILE=tile, MIN_KEYS=min_keys,
                                            num_warps=4)
