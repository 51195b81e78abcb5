"""MLA (DeepSeek-V2/V3) attention in latent space over the paged latent pool, split-K, no gather.

The pool holds one row [r + dr] per token (the compressed KV c [r], then the rotated k_pe [dr]).
In the absorbed form every query head is a query row of the one latent head: its query is
[q_nope @ W_UK (r), q_pe (dr)], the keys are the pool's rows and the values their first r columns,
so the kernel reads each cached row once per block of query rows and never builds per-head K/V.

One launch serves a group of "sequences", each with q_len queries (1 for decode) at the end of its
k_len keys: its rows are (query, head) pairs, row m = query m // H, head m % H, and row m sees the
keys up to its query's position (bottom-right causal; a decode row sees all k_len). A program
takes one sequence, BLOCK_M of its rows and one slice of its keys (slices of whole key tiles, as
many as an upper bound on k_len asks for, so one grid serves every length), writes the slice's
normalised output and log2-sum-exp, and `merge_splits` combines the slices. The gather + SDPA forms
in engine.mla are the CPU path and the oracle.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .triton_merge import dot_precision, keys_per_split, merge_splits, slice_keys, split_result

BLOCK_N = 32  # keys a tile: [32, 512] bf16 is 32 KiB of shared memory a stage
BLOCK_M = 16  # (query, head) rows a program (decode: one query's heads of V2-Lite); tl.dot's least M
# rows a program for a prefill piece of at least that many rows: each block reads every key of its
# slice, so wider blocks read the cached rows fewer times (H100, one V2-Lite layer: 64 x 32,768
# 0.56 ms at 64 rows against 0.86 at 16, 2,048 x 32,768 14.6 against 25.1; equal at 16 x 32,768)
PIECE_BLOCK_M = 64
# keys a tile for those blocks and their launch (decode's blocks: 32 keys, 4 warps, 2 stages): 64-key
# tiles in 3 stages took 27-30% less GPU time than 32 in 2 at 16-128 queries x 32,768 on an H100
# (bench_mla_pieces --tiles, benchmarks/RESULTS.md run GC); their pipelined [64, r + dr] tiles need
# most of an H100's shared memory, so a GPU with less (or a wider or fp32 pool) takes FALLBACK_TILE
PIECE_BLOCK_N, PIECE_WARPS, PIECE_STAGES = 64, 8, 3
FALLBACK_TILE = (32, 8, 2)  # block_n, warps, stages: the tile before run GC
# decode's launch (BLOCK_M rows a program: one query's heads) and the programs its slices aim at:
# 32-key tiles in 3 stages, 256 programs, 6-9% less GPU time than 2 stages and 512 at 8-32 decodes x
# 32K on an H100 (bench_mla_pieces --decode-tiles, RESULTS runs GF, GG; 64-key tiles were slower)
DECODE_BLOCK_N, DECODE_WARPS, DECODE_STAGES = 32, 4, 3
DECODE_TARGET_PROGRAMS = 256
DECODE_FALLBACK = (32, 4, 2)  # block_n, warps, stages where those do not fit: the launch before run GG
MERGE_COLUMNS = 64  # columns a merge program: 8 programs a row at r = 512
MIN_SPLIT_KEYS = 256  # keys a slice at least: a slice's partial output (16 rows x 512 fp32) is 32 KiB


@triton.jit
def _mla_split_kernel(Q, C, Starts, QLens, KLens, Tables, MidO, MidL, sm_scale, num_splits,
                      stride_qt, stride_qh, stride_cb, stride_cp, stride_tb,
                      stride_mb, stride_mm, stride_ms, stride_lb, stride_lm,
                      HEADS: tl.constexpr, R: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_DR: tl.constexpr, PRECISION: tl.constexpr, MIN_KEYS: tl.constexpr):
    b = tl.program_id(0)
    mblock = tl.program_id(1)
    split = tl.program_id(2)
    q_len = tl.load(QLens + b).to(tl.int32)
    k_len = tl.load(KLens + b).to(tl.int32)
    rows = q_len * HEADS
    if mblock * BLOCK_M >= rows:  # this sequence has fewer rows than the launch's widest
        return
    # keys of this slice: its share of this sequence's keys, at least MIN_KEYS (the launch's slices
    # come from a host bound, e.g. a CUDA graph's max_model_len, that can be far past k_len)
    kps = slice_keys(k_len, num_splits, BLOCK_N, MIN_KEYS)
    lo = split * kps
    if lo >= k_len:  # past this sequence's keys: nothing to write, the merge stops at its last live slice
        return
    offs_m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < rows
    query = offs_m // HEADS
    head = offs_m % HEADS
    row_end = k_len - q_len + query + 1  # [M] keys each row sees
    block_end = k_len - q_len + (tl.minimum(mblock * BLOCK_M + BLOCK_M, rows) - 1) // HEADS + 1
    hi = tl.minimum(lo + kps, block_end)
    offs_r = tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_DR)
    offs_n = tl.arange(0, BLOCK_N)
    r_mask = offs_r < R
    e_mask = offs_e < DR
    q_row = (tl.load(Starts + b).to(tl.int64) + query) * stride_qt + head * stride_qh  # [M]
    q_c = tl.load(Q + q_row[:, None] + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    q_e = tl.load(Q + q_row[:, None] + R + offs_e[None, :], mask=m_mask[:, None] & e_mask[None, :], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    table = Tables + b * stride_tb
    for start in range(lo, hi, BLOCK_N):
        kj = start + offs_n
        n_mask = kj < hi
        blk = tl.load(table + kj // PAGE, mask=n_mask, other=0).to(tl.int64)
        base = blk * stride_cb + (kj % PAGE) * stride_cp  # [N]
        c = tl.load(C + base[:, None] + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        e = tl.load(C + base[:, None] + R + offs_e[None, :], mask=n_mask[:, None] & e_mask[None, :], other=0.0)
        s = tl.dot(q_c, tl.trans(c), input_precision=PRECISION)
        s = tl.dot(q_e, tl.trans(e), s, input_precision=PRECISION) * qk_scale  # [M, N]
        s = tl.where(n_mask[None, :] & (kj[None, :] < row_end[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays empty
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m_i = m_new
    out, lse = split_result(acc, m_i, l_i)  # a slice past this row's keys contributes nothing
    mid = b * stride_mb + offs_m * stride_mm + split * stride_ms  # [M]
    seen = m_mask & (lse > float("-inf"))  # the merge reads no empty slice's output: not written
    tl.store(MidO + mid[:, None] + offs_r[None, :], out, mask=seen[:, None] & r_mask[None, :])
    tl.store(MidL + b * stride_lb + offs_m * stride_lm + split, lse, mask=m_mask)


def piece_tile(cache: torch.Tensor) -> dict:
    """The pieces' launch (mla_attention's block_m / block_n / num_warps / num_stages): PIECE_*, or
    FALLBACK_TILE where PIECE_*'s key tiles did not fit this GPU's shared memory for this pool
    (mla_attention found it and noted it in _TOO_BIG)."""
    return _noted_tile(cache, PIECE_BLOCK_M, (PIECE_BLOCK_N, PIECE_WARPS, PIECE_STAGES), FALLBACK_TILE)


def decode_tile(cache: torch.Tensor) -> dict:
    """Decode's launch: BLOCK_M rows and DECODE_*, or DECODE_FALLBACK where those did not fit (as
    piece_tile; pass fallback=DECODE_FALLBACK to mla_attention)."""
    return _noted_tile(cache, BLOCK_M, (DECODE_BLOCK_N, DECODE_WARPS, DECODE_STAGES), DECODE_FALLBACK)


def _noted_tile(cache: torch.Tensor, block_m: int, launch: tuple, fallback: tuple) -> dict:
    tile = dict(block_m=block_m, **dict(zip(("block_n", "num_warps", "num_stages"), launch)))
    if _tile_key(cache, tile) in _TOO_BIG:
        tile.update(zip(("block_n", "num_warps", "num_stages"), fallback))
    return tile


_TOO_BIG: set = set()  # (device, dtype, row width, block_m, block_n, warps, stages) that ran out of resources


def _tile_key(cache: torch.Tensor, tile: dict) -> tuple:
    return (cache.device, cache.dtype, cache.shape[-1], tile["block_m"], tile["block_n"], tile["num_warps"],
            tile["num_stages"])


def mla_attention(q: torch.Tensor, cache: torch.Tensor, r: int, starts: torch.Tensor, q_lens: torch.Tensor,
                  k_lens: torch.Tensor, tables: torch.Tensor, max_q: int, max_k: int, scale: float,
                  out: torch.Tensor, block_m: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None, fallback: tuple | None = None,
                  target_programs: int | None = None) -> None:
    """Latent attention of B sequences over the pool.

    q [T, H, r + dr] absorbed queries (contiguous last dim); cache [N, P, 1, r + dr]; starts, q_lens,
    k_lens [B] (first row of q, queries and keys per sequence, device); tables [B, max_blocks] block
    ids; max_q / max_k host bounds on q_lens / k_lens (the grid's size). out [B, max_q * H, >= r]:
    sequence b's row m (query m // H, head m % H) gets its latent output in out[b, m, :r]; rows past
    q_lens[b] * H (when sequences differ in q_len) get undefined values. block_m: rows a program
    (a power of two >= 16; default BLOCK_M); block_n: keys a tile (a power of two >= 16; default
    BLOCK_N); num_warps, num_stages: the launch's (default 4 warps for 16 rows a program, else 8;
    2 stages). fallback: if that launch needs more shared memory or registers than the GPU has,
    launch this (block_n, num_warps, num_stages) instead (FALLBACK_TILE, DECODE_FALLBACK) and note it
    (piece_tile / decode_tile then pick the fallback at once). target_programs: about how many
    programs the key slices should make (default triton_merge.TARGET_PROGRAMS)."""
    H, W = q.shape[1], q.shape[2]
    N, P = cache.shape[:2]
    B = starts.shape[0]
    if B == 0 or max_q == 0:
        return
    assert q.stride(-1) == 1 and cache.stride(-1) == 1 and out.stride(-1) == 1 and cache.shape[-1] == W
    c = cache.view(N, P, W)
    block_m = block_m or BLOCK_M
    block_n = block_n or BLOCK_N
    m_blocks = triton.cdiv(max_q * H, block_m)
    if m_blocks > 65535:
        raise ValueError(f"mla_attention: {max_q} queries x {H} heads is more rows than one launch takes")
    num_warps = num_warps or (4 if block_m <= 16 else 8)
    num_stages = num_stages or 2
    BLOCK_R = max(16, triton.next_power_of_2(r))

    def launch(block_n: int, num_warps: int, num_stages: int):
        S = triton.cdiv(max(max_k, 1), max(MIN_SPLIT_KEYS, keys_per_split(B * m_blocks, max_k, block_n,
                                                                                  target_programs)))
        mid_o = torch.empty(B, m_blocks * block_m, S, BLOCK_R, dtype=torch.float32, device=q.device)
        mid_l = torch.empty(B, m_blocks * block_m, S, dtype=torch.float32, device=q.device)
        _mla_split_kernel[(B, m_blocks, S)](
            q, c, starts, q_lens, k_lens, tables, mid_o, mid_l, scale, S,
            q.stride(0), q.stride(1), c.stride(0), c.stride(1), tables.stride(0),
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_l.stride(0), mid_l.stride(1),
            HEADS=H, R=r, DR=W - r, PAGE=P, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=BLOCK_R,
            BLOCK_DR=max(16, triton.next_power_of_2(W - r)), PRECISION=dot_precision(q.dtype),
            MIN_KEYS=triton.cdiv(MIN_SPLIT_KEYS, block_n) * block_n,
            num_warps=num_warps, num_stages=num_stages)
        return mid_o, mid_l, block_n
    try:
        mid_o, mid_l, block_n = launch(block_n, num_warps, num_stages)
    except OutOfResources:  # raised when the kernel is compiled or loaded, before anything runs
        if fallback is None:
            raise
        _TOO_BIG.add(_tile_key(cache, dict(block_m=block_m, block_n=block_n, num_warps=num_warps,
                                           num_stages=num_stages)))
        mid_o, mid_l, block_n = launch(*fallback)
    merge_splits(mid_o[:, :max_q * H], mid_l[:, :max_q * H], out[..., :r], torch.arange(B, device=q.device),
                 min(MERGE_COLUMNS, BLOCK_R), lens=k_lens, tile=block_n,
                 min_keys=triton.cdiv(MIN_SPLIT_KEYS, block_n) * block_n)
