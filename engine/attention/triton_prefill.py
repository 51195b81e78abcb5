"""Prefill attention over the paged pool in one launch for all prefill pieces of a step.

Each piece is q_len new queries after k_len - q_len cached keys (bottom-right causal). The step's
own K/V are already in the pool (written through slot_mapping), so every key is read in place
through the piece's block table: key j lives at block_table[j // P] * P + j % P. Flash-attention
style: one program per (query tile, piece, kv head), online softmax in fp32. GQA: a tile's rows are
(query, query head) pairs over the group of query heads that share one kv head, so every K/V tile is
loaded once for the whole group (one program per query head read it group times: with 32 query
heads over 4 kv heads, a short suffix after a 32K prefix read 8x the pool's bytes). Any page size
works: the key tile is gathered per row.

A step with few query tiles over a long cached prefix (a short suffix after a prefix hit) would
leave most SMs idle, so it also splits the keys (split-K, as the decode kernel does) and merges
the slices afterwards.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_merge import TARGET_PROGRAMS, dot_precision, keys_per_split, merge_splits

WIDE_TILE_SMEM = 200 << 10  # shared memory per block the split-K 128x128 tiles are used from


def _limits(device: torch.device) -> tuple[int, int]:
    """(shared memory per block, SMs) of a CUDA device; (0, 0) elsewhere."""
    if device.type != "cuda":
        return 0, 0
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> tuple[int, int]:
    """Asked of the driver once: a query per call was host time in every split-K layer of a hit's
    launch-bound step."""
    from ..moe_kernels import smem_limit
    return smem_limit(index), torch.cuda.get_device_properties(index).multi_processor_count


def _slices(max_k: int, block_n: int, want: int) -> tuple[int, int]:
    """(keys per slice, slices): max_k keys in about `want` slices of whole block_n tiles."""
    tiles = triton.cdiv(max(max_k, 1), block_n)
    kps = triton.cdiv(tiles, max(1, min(tiles, want))) * block_n
    return kps, triton.cdiv(max_k, kps)


def one_wave(programs: int, max_k: int, block_n: int, sms: int) -> tuple[int, int]:
    """(keys per slice, slices) so that `programs` query-tile programs x slices is about one wave on
    `sms` SMs (at most sms programs, at least one slice, at most one slice per key tile): for split-K
    programs of which one fits an SM (the 160 KiB wide tiles)."""
    return _slices(max_k, block_n, sms // max(programs, 1))


@triton.jit
def _tile(acc, l_i, m_i, q, K, V, table, start, end, kv_head, q_pos, qk_scale, offs_n, offs_d, d_mask,
          stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
          PAGE: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, ACC_DOT: tl.constexpr):
    """One BLOCK_N tile of keys from `start` into the online softmax. MASKED=False: every key of the
    tile is below `end` and visible to every row (no bounds, no causal mask, no empty-row guard).
    ACC_DOT: the P.V product accumulates into the rescaled accumulator inside the dot (tl.dot(p, v,
    acc), as Triton's fused-attention tutorial does on Hopper) and the scale folds into the
    exponent's subtraction; a variant the benchmark compares (2% less GPU time at 32K + 64 on the
    H200, run BJ: not adopted)."""
    kj = start + offs_n  # [N] key positions
    if MASKED:
        n_mask = kj < end
        blk = tl.load(table + kj // PAGE, mask=n_mask, other=0).to(tl.int64)
    else:
        blk = tl.load(table + kj // PAGE).to(tl.int64)
    off = kj % PAGE
    k_ptrs = K + (blk * stride_kb + off * stride_kp + kv_head * stride_kh)[None, :] + offs_d[:, None]
    v_ptrs = V + (blk * stride_vb + off * stride_vp + kv_head * stride_vh)[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [D, N]
    else:
        k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
    if ACC_DOT:
        s = tl.dot(q, k, input_precision=PRECISION)  # [M, N], scaled below
    else:
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [M, N] in log2 units
    if MASKED:
        causal = (kj[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(causal, s, float("-inf"))
    if ACC_DOT:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    else:
        m_safe = m_new  # every row sees this tile's keys: finite
    if ACC_DOT:
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    else:
        p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [N, D]
    else:
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    if ACC_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _unmasked_loop(acc, l_i, m_i, q, K, V, table, lo, mid, end, kv_head, q_pos, qk_scale, offs_n, offs_d, d_mask,
                   stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, PAGE: tl.constexpr,
                   PRECISION: tl.constexpr, ACC_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The whole key tiles of [lo, mid) by pointer, unmasked."""
    for start in range(lo, mid, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, K, V, table, start, end, kv_head, q_pos, qk_scale, offs_n, offs_d,
                              d_mask, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, PAGE,
                              PRECISION, False, ACC_DOT)
    return acc, l_i, m_i


@triton.jit
def _tile_tma(acc, l_i, m_i, q, kd, vd, row, col, qk_scale, PRECISION: tl.constexpr):
    """_tile unmasked, its K and V tiles each one TMA box of BLOCK_N adjacent pool rows from `row`
    (the tile's pages adjacent in the pool: checked by _prefill_kernel). Measured and left out (run
    ED, commit 653ee02): the scale folded into the exponent's subtraction, the loop under Triton's
    warp specialisation, three stages: none more than 1% quicker."""
    k = kd.load([row, col])  # [N, D]
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N] in log2 units
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = vd.load([row, col])  # [N, D]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _prefill_kernel(Q, K, V, O, MidO, MidL, Tables, QStarts, QLens, KLens, sm_scale, keys_per_split,
                    num_splits, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_tb,
                    stride_mt, stride_mh, stride_ms, stride_lt, stride_lh, pool_rows,
                    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, UNMASKED: tl.constexpr, ACC_DOT: tl.constexpr,
                    TMA: tl.constexpr = False):
    QB: tl.constexpr = BLOCK_M // GROUP  # queries per tile: each tile row is a (query, head) pair
    m_blk = tl.program_id(0)
    piece = tl.program_id(1) // num_splits
    split = tl.program_id(1) % num_splits
    kv_head = tl.program_id(2)
    q_start = tl.load(QStarts + piece)
    q_len = tl.load(QLens + piece)
    if m_blk * QB >= q_len:
        return
    k_len = tl.load(KLens + piece)
    ctx = k_len - q_len  # cached keys before this piece's first query

    r = tl.arange(0, BLOCK_M)
    offs_m = m_blk * QB + r // GROUP  # [M] query row within the piece of each tile row
    head = kv_head * GROUP + r % GROUP  # [M] its query head: the GROUP heads of one kv head share K/V
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = (r < QB * GROUP) & (offs_m < q_len)
    d_mask = offs_d < HEAD_DIM
    q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [M, D]
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q_pos = ctx + offs_m  # [M] absolute position of each query
    # keys past the last query of this tile are masked for every row: stop there
    end = tl.minimum(k_len, ctx + (m_blk + 1) * QB)
    lo = 0
    if SPLIT:
        kps = keys_per_split
        if kps == 0:  # a plan fixed for any prefix (a captured graph): this piece's keys in num_splits
            kps = tl.cdiv(tl.cdiv(k_len, BLOCK_N), num_splits) * BLOCK_N
        lo = split * kps
        end = tl.minimum(end, lo + kps)
    table = Tables + piece * stride_tb
    mid = lo
    if UNMASKED:
        # keys before the tile's first query are visible to all its rows (a short suffix after a
        # long prefix: nearly every key): whole tiles of them skip the bounds and causal masks
        full = tl.minimum(end, ctx + m_blk * QB)
        mid = lo + tl.maximum(full - lo, 0) // BLOCK_N * BLOCK_N
        # TMA: where every key tile of [lo, mid) lies on adjacent pages (block ids consecutive within
        # the tile), the tiles are TMA boxes of BLOCK_N pool rows; else the pointer loop
        if TMA:
            TP: tl.constexpr = BLOCK_N // PAGE if BLOCK_N > PAGE else 1  # pages a tile spans
            p_hi = (mid + PAGE - 1) // PAGE
            # one pass over the range's block ids counts both: pages off their tile's ascending
            # run (scattered), and pages off one descending run of block ids ending at the range's
            # last page (rev; a sequence freed tail-first comes back so). A descending run's keys are
            # pool rows row0.. in the reverse order of their pages; no tile of [lo, mid) is masked,
            # so the order in which they are summed is free: TMA boxes over those rows in pool order.
            # That needs whole pages a tile (BLOCK_N >= PAGE), else rev stays nonzero.
            b_end = tl.load(table + tl.maximum(p_hi - 1, 0))  # a descending run's lowest block
            scattered = 0
            rev = 0
            for p0 in range(lo // PAGE, p_hi, 1024):
                pj = p0 + tl.arange(0, 1024)
                pm = pj < p_hi
                first = pj // TP * TP  # the first page of pj's tile (lo is a multiple of BLOCK_N)
                b = tl.load(table + pj, mask=pm, other=0)
                b0 = tl.load(table + first, mask=pm, other=0)
                scattered += tl.sum(((b - b0 != pj - first) & pm).to(tl.int32))
                rev += tl.sum(((b - b_end != p_hi - 1 - pj) & pm).to(tl.int32))
            if BLOCK_N < PAGE:
                rev = scattered * 0 + 1
            if scattered == 0 or rev == 0:
                kd = tl.make_tensor_descriptor(K, shape=[pool_rows, stride_kp], strides=[stride_kp, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])
                vd = tl.make_tensor_descriptor(V, shape=[pool_rows, stride_vp], strides=[stride_vp, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])
                # one loop for both (two pipelined loops took twice the shared memory: 288 KiB with
                # the wide tiles, past the H200's 227, run EL)
                asc = scattered == 0
                row0 = tl.load(table + tl.maximum(p_hi - 1, 0)) * PAGE - lo  # descending: the lowest block
                for start in range(lo, mid, BLOCK_N):
                    row = tl.load(table + start // PAGE) * PAGE + start % PAGE
                    row = tl.where(asc, row, row0 + start)
                    acc, l_i, m_i = _tile_tma(acc, l_i, m_i, q, kd, vd, row, kv_head * HEAD_DIM, qk_scale,
                                              PRECISION)
            else:
                acc, l_i, m_i = _unmasked_loop(acc, l_i, m_i, q, K, V, table, lo, mid, end, kv_head, q_pos, qk_scale,
                                               offs_n, offs_d, d_mask, stride_kb, stride_kp, stride_kh, stride_vb,
                                               stride_vp, stride_vh, PAGE, PRECISION, ACC_DOT, BLOCK_N)
        else:
            acc, l_i, m_i = _unmasked_loop(acc, l_i, m_i, q, K, V, table, lo, mid, end, kv_head, q_pos, qk_scale,
                                           offs_n, offs_d, d_mask, stride_kb, stride_kp, stride_kh, stride_vb,
                                           stride_vp, stride_vh, PAGE, PRECISION, ACC_DOT, BLOCK_N)
    for start in range(mid, end, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, K, V, table, start, end, kv_head, q_pos, qk_scale, offs_n,
                              offs_d, d_mask, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
                              PAGE, PRECISION, True, ACC_DOT)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    rows = (q_start + offs_m).to(tl.int64)
    if SPLIT:  # partial output and its log2-sum-exp; merge_splits combines the slices
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        base = rows * stride_mt + head * stride_mh + split * stride_ms
        tl.store(MidO + base[:, None] + offs_d[None, :], out, mask=m_mask[:, None] & d_mask[None, :])
        tl.store(MidL + rows * stride_lt + head * stride_lh + split, lse, mask=m_mask)
    else:
        o_ptrs = O + rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


class Plan(NamedTuple):
    """How prefill_attention launches: tiles, warps, stages, and the key slices (split-K)."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    block_d: int
    kps: int  # keys per slice; 0 with splits > 1: each piece splits its own keys (see _prefill_kernel)
    splits: int


def plan(q: torch.Tensor, Hkv: int, max_q: int, max_k: int, pieces: int,
         tiles: tuple[int, int, int, int] | None = None, splits: int | None = None) -> Plan:
    """The launch for `pieces` pieces of at most max_q queries and max_k keys (0: unknown, no split-K)
    of q [T, Hq, D] over Hkv kv heads; tiles and splits: prefill_attention's overrides."""
    Hq, D = q.shape[1], q.shape[2]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    G = Hq // Hkv
    rows = max_q * G  # tile rows are (query, head) pairs: a kv head's G query heads share each K/V load
    if q.element_size() == 4:  # fp32 tiles take twice the shared memory
        BLOCK_M, BLOCK_N, warps, stages = (64 if rows > 16 else 16), 32, 4, 2
    elif rows >= 128 and BLOCK_D <= 128:  # long pieces: bigger tiles, fewer K/V re-reads
        BLOCK_M, BLOCK_N, warps, stages = 128, 64, 8, 3
    else:
        BLOCK_M, BLOCK_N, warps, stages = (64 if rows > 16 else 16), (64 if BLOCK_D <= 128 else 32), 4, 2
    if tiles is not None:
        BLOCK_M, BLOCK_N, warps, stages = tiles
    BLOCK_M = max(BLOCK_M, triton.next_power_of_2(G))
    QB = BLOCK_M // G  # queries per tile
    programs = triton.cdiv(max_q, QB) * pieces * Hkv
    S, kps = 1, 0
    if max_k and programs < TARGET_PROGRAMS // 2:
        kps = keys_per_split(programs, max_k, BLOCK_N)
        S = triton.cdiv(max_k, kps)
    if (S > 1 and tiles is None and BLOCK_M == 128 and BLOCK_D <= 128 and q.element_size() == 2
            and _limits(q.device)[0] >= WIDE_TILE_SMEM):
        # split-K (a short suffix over a long prefix, the device hit's step): 128-key tiles in 2
        # stages, 7-18% faster than 64-key ones at 64 new tokens after 8K/32K (bench_attention.py,
        # run AU); ~160 KiB of shared memory, Hopper's (227 KiB), not Ampere's. One such program
        # fits an SM: about one wave of them (programs x slices ~ the SM count), not TARGET_PROGRAMS
        # (~4 waves, each program writing a partial the merge reads back): 8 slices instead of 32
        # at 64 new tokens, 0.161 -> 0.131 ms at 32K, 0.064 -> 0.043 ms at 8K (runs AY, AZ)
        BLOCK_N, stages = 128, 2
        kps, S = one_wave(programs, max_k, BLOCK_N, _limits(q.device)[1])
    if splits is not None and max_k:  # a benchmark's override of the slice count
        kps, S = _slices(max_k, BLOCK_N, splits)
    return Plan(BLOCK_M, BLOCK_N, warps, stages, BLOCK_D, kps, S)


def fixed_plan(q: torch.Tensor, Hkv: int, max_q: int, max_k: int) -> Plan:
    """A plan for any pieces of at most max_q queries over at most max_k keys, sized as for one
    piece: with slices, each piece splits its own keys in the kernel (kps 0), so one plan, and a
    CUDA graph holding its launch, serves every prefix length (engine.prefill_graphs)."""
    p = plan(q, Hkv, max_q, max_k, 1)
    return p._replace(kps=0) if p.splits > 1 else p


def split_buffers(T: int, Hq: int, p: Plan, device: torch.device):
    """(partial outputs [T, Hq, S, D] fp32 zeros, their log2-sum-exps [T, Hq, S] -inf, rows [T]) for
    a split-K launch over T rows: what no program writes (rows outside the pieces) merges to 0."""
    return (torch.zeros(T, Hq, p.splits, p.block_d, dtype=torch.float32, device=device),
            torch.full((T, Hq, p.splits), float("-inf"), dtype=torch.float32, device=device),
            torch.arange(T, device=device))


def launch(p: Plan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
           tables: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor, k_lens: torch.Tensor,
           max_q: int, scale: float, bufs=None, unmasked: bool = True, acc_dot: bool = False,
           tma: bool = False) -> None:
    """The kernel (and the merge of its slices) as planned, over tables.shape[0] pieces; bufs:
    split_buffers' when p.splits > 1; acc_dot: _tile's ACC_DOT variant (a benchmark's); tma: a
    program whose unmasked key tiles each lie on adjacent pages (consecutive block ids; fresh
    blocks are handed out ascending, so the pages of one prefill chunk are) or, with whole pages
    a tile, whose unmasked range's pages are one descending run of block ids (blocks freed
    tail-first come back so) reads them as TMA boxes,
    any other program by pointer as without it; only where tma_usable, and with a page size that
    divides the key tile or that it divides (any other: the pointer loop). Reads the
    pieces from device tensors only, so a fixed plan and fixed buffers can be captured in a CUDA
    graph (engine.prefill_graphs)."""
    S, G = p.splits, q.shape[1] // k_cache.shape[2]
    mid_o, mid_l, all_rows = bufs if S > 1 else (out, out, None)  # unused without slices
    P = k_cache.shape[1]
    # the kernel's adjacency check groups a tile's pages from the tile's first key: a tile must
    # start on a page (whole pages a tile) or lie inside one (whole tiles a page)
    tma = tma and (p.block_n % P == 0 or P % p.block_n == 0)
    if tma:
        from ..moe_kernels import tma_allocator
        tma_allocator()
    grid = (triton.cdiv(max_q, p.block_m // G), tables.shape[0] * S, k_cache.shape[2])
    _prefill_kernel[grid](q, k_cache, v_cache, out, mid_o, mid_l, tables, q_starts, q_lens, k_lens, scale,
                          p.kps, S, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                          k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                          v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tables.stride(0),
                          mid_o.stride(0), mid_o.stride(1), mid_o.stride(2) if S > 1 else 0,
                          mid_l.stride(0), mid_l.stride(1), k_cache.shape[0] * k_cache.shape[1],
                          GROUP=G, PAGE=P, HEAD_DIM=q.shape[2], SPLIT=S > 1,
                          BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_D=p.block_d,
                          PRECISION=dot_precision(q.dtype), UNMASKED=unmasked, ACC_DOT=acc_dot, TMA=tma, num_warps=p.warps,
                          num_stages=p.stages)
    if S > 1:
        # rows of T outside every piece (decodes) merge to zero; the decode pass writes them after
        merge_splits(mid_o, mid_l, out, all_rows)


def tma_usable(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_d: int) -> bool:
    """Whether launch(tma=True) can read these caches: Triton's in-kernel tensor descriptors on a
    CUDA device of compute capability 9+, 2-byte elements, head_dim a whole tile (block_d), each
    cache's pages of rows back to back ([N, P, Hkv, D] contiguous) and 16-byte aligned."""
    if not q.is_cuda or q.element_size() != 2 or q.shape[-1] != block_d:
        return False
    if not all(c.is_contiguous() and c.dtype == q.dtype and c.data_ptr() % 16 == 0 for c in (k_cache, v_cache)):
        return False
    return _tma_device(q.device.index if q.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _tma_device(index: int) -> bool:
    return (hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
            and torch.cuda.get_device_capability(index)[0] >= 9)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      tables: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
                      k_lens: torch.Tensor, max_q: int, scale: float, max_k: int = 0,
                      scratch: dict | None = None, unmasked: bool = True,
                      tiles: tuple[int, int, int, int] | None = None, splits: int | None = None,
                      acc_dot: bool = False, tma: bool | None = None) -> None:
    """q/out [T, Hq, D]; caches [N, P, Hkv, D]; tables [B, max_blocks] int; q_starts, q_lens [B]
    int32 (piece b owns rows q_starts[b] + [0, q_lens[b])); k_lens [B] int32 (cached + new keys).
    Writes the pieces' rows of out. max_q bounds q_lens; max_k (0: unknown) bounds k_lens and
    enables split-K when the query tiles alone cannot fill the GPU. scratch: a dict that lives for
    one step (the same pieces in every layer): split-K's buffers are made once there, not per layer.
    unmasked=False runs every key tile through the masks (the kernel before the unmasked loop: a
    benchmark's baseline); tiles (BLOCK_M, BLOCK_N, warps, stages) overrides the choice in `plan`;
    splits (with max_k) sets the number of key slices (a benchmark's sweep); acc_dot: the ACC_DOT
    variant of _tile (a benchmark's); tma: launch's, None where tma_usable (the engine's). Two
    variants measured and
    left out (runs AY/AZ, commit 9d92cfb): key tiles loaded as [N, D] rows (within 1-3%), and the
    slices merged by each query tile's last program instead of a second launch (~20 us less host
    time a call, 0.02-0.04 ms more GPU time: one program reads all of its tile's partials)."""
    T, Hq = q.shape[0], q.shape[1]
    B = k_lens.shape[0]
    if B == 0 or max_q == 0:
        return
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and out.stride(-1) == 1
    p = plan(q, k_cache.shape[2], max_q, max_k, B, tiles, splits)
    bufs = None
    if p.splits > 1:
        # a layer overwrites exactly what the one before wrote (the same pieces): zeros and -inf stay
        # where no program writes (rows outside the pieces merge to 0), so the buffers serve every
        # layer of a step
        key = ("prefill_split", T, Hq, p.splits, p.block_d, q.device)
        bufs = None if scratch is None else scratch.get(key)
        if bufs is None:
            bufs = split_buffers(T, Hq, p, q.device)
            if scratch is not None:
                scratch[key] = bufs
    if tma is None:
        tma = tma_usable(q, k_cache, v_cache, p.block_d)
    launch(p, q, k_cache, v_cache, out, tables, q_starts, q_lens, k_lens, max_q, scale, bufs, unmasked, acc_dot,
           tma)
