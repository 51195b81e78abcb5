"""Fused MoE experts in Triton: the (token, slot) pairs of a step sorted by expert in padded blocks,
two kernels that read the expert weights in place.

`fused_experts(w13, w2, x, ids, weights)` equals `engine.moe.experts_sorted` (the torch path: sort,
gather rows, torch._grouped_mm, SiLU, weight, scatter, sum) up to rounding, in four steps:
1. align: pairs grouped by expert, each expert's run padded to a multiple of BLOCK_M
   (`sorted_ids`, sentinel = number of pairs) and the expert of every block (`block_expert`, >= E
   past the end), in two small launches (atomics give each pair its slot, so the order inside an
   expert is not stable: every row is computed on its own, the result is the same).
2. gate/up GEMM: each block's rows are gathered from x inside the kernel (no copy of x per pair),
   gate and up tiles accumulate side by side, SiLU(gate) * up is stored: `act` [pairs, I].
3. down GEMM: act rows times w2, scaled by the routing weight in the epilogue: `y` [pairs, H].
4. the sum over each token's k rows of y, in fp32: on CUDA one Triton pass (`sum_slots`; torch's
   y.view(T, k, H).sum(1) read at ~2.1-2.6 TB/s on the H200, 0.028 against 0.020 ms at 2,048
   tokens, 0.415 against 0.274 at 32,768, run EQ), elsewhere torch's sum; given the decoder
   layer's residual, the same pass adds it (engine.moe.MoEBlock), rounded as torch's two launches.
Every shape is fixed by T, nothing is read back to the host: decode steps stay capturable in a CUDA
graph. Block sizes: small M tiles when few rows land on each expert (decode), large ones for prefill.
On Hopper and newer, prefill-sized calls load the weight tiles by TMA (tensor descriptors) on a
persistent grid (launch_tma); the pointer-load kernels stay for the rest and as the comparison.
"""
from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from .attention.triton_merge import dot_precision

log = logging.getLogger(__name__)


@triton.jit
def _block_experts(pend, BlockExpert, NB, BLOCK_B: tl.constexpr, BM: tl.constexpr):
    """Each block's expert from the ends of the experts' padded runs (pend [BLOCK_E], a cumsum):
    the number of experts whose run ends at or before the block's first slot (>= E past the end)."""
    for b0 in range(0, NB, BLOCK_B):
        ob = b0 + tl.arange(0, BLOCK_B)
        first = ob * BM  # [BLOCK_B] first slot of each block
        ex = tl.sum((pend[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(BlockExpert + ob, ex, mask=ob < NB)


@triton.jit
def _align_kernel(Ids, SortedIds, BlockExpert, Scratch, Slots, N, E, P, NB,
                  BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_B: tl.constexpr, BM: tl.constexpr):
    """One program: counts per expert and each pair's slot in its expert by atomics (pass 1), the
    padded starts by a cumsum, then every pair to start + slot (pass 2) and each block's expert."""
    offs_e = tl.arange(0, BLOCK_E)
    tl.store(Scratch + offs_e, tl.zeros([BLOCK_E], tl.int32))  # per-expert counters
    for p0 in range(0, P, BLOCK_P):  # every slot starts as padding
        op = p0 + tl.arange(0, BLOCK_P)
        tl.store(SortedIds + op, tl.full([BLOCK_P], 0, tl.int32) + N, mask=op < P)
    tl.debug_barrier()
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < N
        ids = tl.load(Ids + offs_n, mask=valid, other=0).to(tl.int32)
        slot = tl.atomic_add(Scratch + ids, tl.full([BLOCK_N], 1, tl.int32), mask=valid)  # rank in expert
        tl.store(Slots + offs_n, slot, mask=valid)
    tl.debug_barrier()
    counts = tl.load(Scratch + offs_e, mask=offs_e < E, other=0)  # [BLOCK_E]
    padded = (counts + BM - 1) // BM * BM
    pend = tl.cumsum(padded, 0)  # [BLOCK_E] end of each expert's padded run
    tl.store(Scratch + BLOCK_E + offs_e, pend - padded)
    tl.debug_barrier()
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < N
        ids = tl.load(Ids + offs_n, mask=valid, other=0).to(tl.int32)
        start = tl.load(Scratch + BLOCK_E + ids, mask=valid, other=0)
        slot = tl.load(Slots + offs_n, mask=valid, other=0)
        tl.store(SortedIds + start + slot, offs_n.to(tl.int32), mask=valid)
    _block_experts(pend, BlockExpert, NB, BLOCK_B, BM)


@triton.jit
def _count_kernel(Ids, Cnt, Slots, SortedIds, N, P, G, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    """Program g: its share of the padding fill, then each of its BLOCK_N pairs' rank among the
    program's pairs of the same expert (atomics on the program's own counters, row g of Cnt)."""
    g = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    tl.store(Cnt + g * BLOCK_E + offs_e, tl.zeros([BLOCK_E], tl.int32))
    for p0 in range(g * BLOCK_P, P, G * BLOCK_P):  # every slot starts as padding
        op = p0 + tl.arange(0, BLOCK_P)
        tl.store(SortedIds + op, tl.full([BLOCK_P], 0, tl.int32) + N, mask=op < P)
    tl.debug_barrier()
    offs_n = g * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs_n < N
    ids = tl.load(Ids + offs_n, mask=valid, other=0).to(tl.int32)
    slot = tl.atomic_add(Cnt + g * BLOCK_E + ids, tl.full([BLOCK_N], 1, tl.int32), mask=valid)
    tl.store(Slots + offs_n, slot, mask=valid)


@triton.jit
def _place_kernel(Ids, Slots, Cnt, SortedIds, BlockExpert, N, G, E, NB, BLOCK_N: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr, BM: tl.constexpr):
    """Program g: each expert's padded run (the totals over the programs' counters, rounded up to BM,
    a cumsum) and where its own pairs of expert e start in it (the run's start plus the counts of
    programs before g), then every one of its pairs to that start + its rank; program g also writes
    the expert of blocks g, g + G, ... Every program sums the whole count matrix (G x E ints from L2)
    instead of one program writing the offsets for the others: one launch less, and no single
    program walking G rows (the offsets launch took 9 us at 2,048 tokens and 97 at 32,768, run EP)."""
    g = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    total = tl.zeros([BLOCK_E], tl.int32)
    before = tl.zeros([BLOCK_E], tl.int32)
    for g0 in range(0, G, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)
        c = tl.load(Cnt + rows[:, None] * BLOCK_E + offs_e[None, :], mask=rows[:, None] < G, other=0)
        total += tl.sum(c, 0)
        before += tl.sum(tl.where(rows[:, None] < g, c, 0), 0)
    padded = tl.where(offs_e < E, (total + BM - 1) // BM * BM, 0)
    pend = tl.cumsum(padded, 0)  # [BLOCK_E] end of each expert's padded run
    tl.store(Cnt + G * BLOCK_E + g * BLOCK_E + offs_e, pend - padded + before)  # this program's starts
    tl.debug_barrier()
    offs_n = g * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs_n < N
    ids = tl.load(Ids + offs_n, mask=valid, other=0).to(tl.int32)
    slot = tl.load(Slots + offs_n, mask=valid, other=0)
    base = tl.load(Cnt + G * BLOCK_E + g * BLOCK_E + ids, mask=valid, other=0)
    tl.store(SortedIds + base + slot, offs_n.to(tl.int32), mask=valid)
    for b0 in range(g * BLOCK_B, NB, G * BLOCK_B):
        ob = b0 + tl.arange(0, BLOCK_B)
        first = ob * BM  # [BLOCK_B] first slot of each block
        ex = tl.sum((pend[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(BlockExpert + ob, ex, mask=ob < NB)


ALIGN_BLOCK_N = 1024  # pairs per program of the align's count and place launches


def padded_size(n_pairs: int, E: int, bm: int) -> int:
    """Slots of the padded layout: every expert with a pair may waste up to bm - 1."""
    return triton.cdiv(n_pairs + min(E, n_pairs) * (bm - 1), bm) * bm


def align(ids: torch.Tensor, E: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_ids [P] int32, block_expert [P // bm] int32): pairs grouped by expert,
    each expert's run padded to a multiple of bm (sentinel: the number of pairs), and the expert of
    each block (>= E past the end); every shape fixed by T (capturable). Up to ALIGN_BLOCK_N pairs
    (decode-sized calls): one program, one launch. More: two launches, programs of ALIGN_BLOCK_N
    pairs count and rank their pairs per expert, then each program turns all the counts into padded
    runs and its own offsets and places its pairs. (One program did it for every size: on the H200
    0.23 ms of an 8,192-token call's 1.66, its atomics on 128 counters serialised in one SM; three
    launches, one program between them computing every program's offsets, took 0.018 ms of GPU
    time at 2,048 tokens and 0.1 at 32,768, runs EP.) The tests check both against a sorted torch
    version."""
    flat = ids.reshape(-1)
    N = flat.numel()
    P = padded_size(N, E, bm)
    NB = P // bm
    dev = ids.device
    sorted_ids = torch.empty(P, dtype=torch.int32, device=dev)
    block_expert = torch.empty(NB, dtype=torch.int32, device=dev)
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_N = min(ALIGN_BLOCK_N, triton.next_power_of_2(max(N, 1)))
    G = max(1, triton.cdiv(N, BLOCK_N))
    slots = torch.empty(N, dtype=torch.int32, device=dev)
    if G == 1:  # a decode-sized call: one program does it all (one launch, one graph node)
        scratch = torch.empty(2 * BLOCK_E, dtype=torch.int32, device=dev)
        _align_kernel[(1,)](flat, sorted_ids, block_expert, scratch, slots, N, E, P, NB, BLOCK_N=BLOCK_N,
                            BLOCK_E=BLOCK_E, BLOCK_P=1024, BLOCK_B=64, BM=bm, num_warps=8)
        return sorted_ids, block_expert
    cnt = torch.empty(2 * G, BLOCK_E, dtype=torch.int32, device=dev)  # counts, then each program's starts
    _count_kernel[(G,)](flat, cnt, slots, sorted_ids, N, P, G, BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_E, BLOCK_P=1024,
                        num_warps=4)
    _place_kernel[(G,)](flat, slots, cnt, sorted_ids, block_expert, N, G, E, NB, BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_E,
                        BLOCK_G=max(1, min(16, 4096 // BLOCK_E)), BLOCK_B=64, BM=bm, num_warps=4)
    return sorted_ids, block_expert


@triton.jit
def _moe_gemm_kernel(A, B, C, Wt, SortedIds, BlockExpert, num_pairs, E, N, K, row_div,
                     stride_am, stride_be, stride_bn, stride_bk, stride_cm, gate_off,
                     GATED: tl.constexpr, MUL_W: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, ONE_DOT: tl.constexpr = False):
    """C[pair, n] = A[pair // row_div] . B[expert, n] (GATED: silu(gate) * up, up rows at n +
    gate_off), times Wt[pair] when MUL_W; blocks of BLOCK_M pairs of one expert. ONE_DOT (GATED
    only): the gate and up tiles are one B tile of 2 * BLOCK_N columns, interleaved (even columns
    gate, odd up), so each K step is one dot twice as wide instead of two (Hopper's MMA is more
    efficient the wider its N); the accumulator is split back into gate and up at the end."""
    pid = tl.program_id(0)
    num_m = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)  # GROUP_M row blocks share their B tiles in L2
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    e = tl.load(BlockExpert + pid_m)
    if e >= E:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(SortedIds + offs_m)  # [BM]
    valid = pair < num_pairs
    rows = (pair // row_div).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * stride_am + offs_k[None, :]
    if GATED and ONE_DOT:
        offs_j = tl.arange(0, 2 * BLOCK_N)
        col = pid_n * BLOCK_N + offs_j // 2  # [2BN] output column of each B column
        brow = col + (offs_j % 2) * gate_off  # even: the gate row, odd: the up row
        b2_ptrs = B + e.to(tl.int64) * stride_be + brow[None, :] * stride_bn + offs_k[:, None] * stride_bk
        acc2 = tl.zeros([BLOCK_M, 2 * BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b2_ptrs, mask=k_mask[:, None] & (col < N)[None, :], other=0.0)
            acc2 = tl.dot(a, b, acc2, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b2_ptrs += BLOCK_K * stride_bk
        gate, up = tl.split(tl.reshape(acc2, [BLOCK_M, BLOCK_N, 2]))
        acc = gate / (1.0 + tl.exp(-gate)) * up
    else:
        b_ptrs = B + e.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if GATED:
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if GATED:
                bu = tl.load(b_ptrs + gate_off * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc_up = tl.dot(a, bu, acc_up, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_W:
        acc = acc * tl.load(Wt + pair, mask=valid, other=0.0)[:, None]
    c_ptrs = C + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


SMEM_BYTES = 227 * 1024  # shared memory a block may use on Hopper (A100: 163 KiB, Ada: 99 KiB)


@functools.lru_cache(maxsize=None)
def smem_limit(device_index: int) -> int:
    """The device's shared memory per block (opt-in), from Triton's driver; 0 when it cannot say
    (then only the tiles every GPU since Ampere holds are chosen)."""
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:  # no driver query here: stay with the small tiles
        return 0


def smem_bytes(cfg: dict, elem_bytes: int, gated: bool) -> int:
    """The pipelined tiles' shared memory: num_stages x (an A tile + the B tiles a K step loads)."""
    b_cols = cfg["BLOCK_N"] * (2 if gated else 1)  # two B tiles, or one of twice the width (ONE_DOT)
    return cfg["num_stages"] * (cfg["BLOCK_M"] + b_cols) * cfg["BLOCK_K"] * elem_bytes


def configs(n_pairs: int, E: int, elem_bytes: int = 2, smem: int = SMEM_BYTES) -> tuple[dict, dict]:
    """Tile sizes (gate/up, down) by rows per expert: small M tiles for decode-sized steps.
    elem_bytes: the weights' element size; smem: the device's shared memory per block. The
    2,048-token chunk's tiles need Hopper's (192 KiB in bf16); elsewhere, and in fp32, the
    64-row tiles below them (72 KiB in bf16)."""
    per_expert = n_pairs / E
    # chosen with `bench_moe.py --sweep` on the H200 (RESULTS.md, "Fused MoE kernels: tile sweep")
    if per_expert <= 8:
        return (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=3),
                dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=8, num_stages=3))
    wide = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, ONE_DOT=True)
    if 96 <= per_expert <= 256 and smem_bytes(wide, elem_bytes, True) <= smem:
        # a 2,048-token prefill chunk of top-8 of 128: the gate/up dot 256 wide (ONE_DOT, M128 N128 K64,
        # 4 stages: 0.286 ms against the two 64-wide dots' 0.321, run AN); the down GEMM at 128-row
        # tiles too (0.175 ms against 0.179 at 64: one align for both, run AP)
        return (wide, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3))
    if per_expert <= 256:
        return (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
                dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3))
    return (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3))


def _launch(a, b, c, wt, sorted_ids, block_expert, num_pairs, E, N, K, row_div, gated, mul_w, cfg):
    grid = (block_expert.numel() * triton.cdiv(N, cfg["BLOCK_N"]),)
    _moe_gemm_kernel[grid](a, b, c, wt, sorted_ids, block_expert, num_pairs, E, N, K, row_div,
                           a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0), N,
                           GATED=gated, MUL_W=mul_w, PRECISION=dot_precision(a.dtype), **cfg)


def interleave_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """w13 [E, 2I, H] (gate rows, then up rows) -> [E, 2I, H] with row 2c the gate row c and row
    2c + 1 the up row c: the ONE_DOT tile's B columns as one box of rows (launch_tma)."""
    E, I2, H = w13.shape
    return w13.view(E, 2, I2 // 2, H).transpose(1, 2).reshape(E, I2, H).contiguous()


@triton.jit
def _tma_epilogue(acc, acc_up, C, Wt, pair, num_pairs, N, pid_n, stride_cm, GATED: tl.constexpr,
                  SPLIT: tl.constexpr, MUL_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  slot0=0, C_SORTED: tl.constexpr = False):
    """One tile's output: SiLU(gate) * up when GATED (acc holds gate and up interleaved, or gate
    with acc_up the up half when SPLIT), times the routing weight when MUL_W, stored to the rows of
    its pairs (padding rows masked), or with C_SORTED to the tile's own rows of the sorted layout
    from slot0 (padding rows too: their A rows were zeros, so they hold SiLU(0) * 0 = 0)."""
    valid = pair < num_pairs
    if GATED:
        if SPLIT:
            out = acc / (1.0 + tl.exp(-acc)) * acc_up
        else:
            gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
            out = gate / (1.0 + tl.exp(-gate)) * up
    else:
        out = acc
    if MUL_W:
        out = out * tl.load(Wt + pair, mask=valid, other=0.0)[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if C_SORTED:
        rows = (slot0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        tl.store(C + rows[:, None] * stride_cm + offs_n[None, :], out.to(C.dtype.element_ty),
                 mask=(offs_n < N)[None, :])
    else:
        c_ptrs = C + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=valid[:, None] & (offs_n < N)[None, :])


@triton.jit
def _tma_k_loop(acc, acc_up, a_ptrs, valid, desc, row0, N, K, offs_k, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """One tile's K loop: A rows by pointer, the weight box (and the up box N rows further when
    SPLIT) by TMA, accumulated into acc (and acc_up)."""
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k < K - k0)[None, :], other=0.0)
        b = desc.load([row0, k0])
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        if SPLIT:
            bu = desc.load([row0 + N, k0])
            acc_up = tl.dot(a, tl.trans(bu), acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
    return acc, acc_up


@triton.jit
def _tma_k_loop_a(acc, acc_up, adesc, arow, desc, row0, N, K, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """_tma_k_loop with the A rows one TMA box too (A_TMA: rows in the sorted layout)."""
    for k0 in range(0, K, BLOCK_K):
        a = adesc.load([arow, k0])
        b = desc.load([row0, k0])
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        if SPLIT:
            bu = desc.load([row0 + N, k0])
            acc_up = tl.dot(a, tl.trans(bu), acc_up, input_precision=PRECISION)
    return acc, acc_up


@triton.jit
def _tma_k_loop_two(acc, acc_up, acc2, acc2_up, a_ptrs, valid, a2_ptrs, valid2, desc, row0, N, K, offs_k,
                    SPLIT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """_tma_k_loop for the two row tiles of a TWO_M block: each weight box loaded once, two dots."""
    for k0 in range(0, K, BLOCK_K):
        km = (offs_k < K - k0)[None, :]
        a = tl.load(a_ptrs, mask=valid[:, None] & km, other=0.0)
        a2 = tl.load(a2_ptrs, mask=valid2[:, None] & km, other=0.0)
        b = desc.load([row0, k0])
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        acc2 = tl.dot(a2, tl.trans(b), acc2, input_precision=PRECISION)
        if SPLIT:
            bu = desc.load([row0 + N, k0])
            acc_up = tl.dot(a, tl.trans(bu), acc_up, input_precision=PRECISION)
            acc2_up = tl.dot(a2, tl.trans(bu), acc2_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        a2_ptrs += BLOCK_K
    return acc, acc_up, acc2, acc2_up


@triton.jit
def _moe_gemm_tma_kernel(A, B, C, Wt, SortedIds, BlockExpert, num_pairs, E, N, K, NB, row_div, stride_am, stride_cm,
                         GATED: tl.constexpr, SPLIT: tl.constexpr, MUL_W: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         NUM_PROGS, FLATTEN: tl.constexpr, TWO_M: tl.constexpr, A_TMA: tl.constexpr = False,
                         A_ROWS=0, C_SORTED: tl.constexpr = False, WS: tl.constexpr = False):
    """_moe_gemm_kernel's GEMMs with their weight tiles loaded by TMA, over the output tiles of the
    blocks that hold pairs (block_expert < E: sentinel blocks cost nothing), program p taking tiles
    p, p + NUM_PROGS, ... (one tile each when launched on every tile; a persistent grid of about one
    program an SM otherwise, its loop flattened by Triton's pipeliner when FLATTEN so the next
    tile's loads overlap this tile's epilogue). B is viewed [E * R, K] by a tensor descriptor, R = 2N
    when GATED else N; K's tail reads as zeros. GATED: SPLIT reads w13 as it is (gate and up boxes
    of BLOCK_N rows, two dots), else B = interleave_gate_up(w13) (one box of 2 * BLOCK_N rows split
    back into gate and up as ONE_DOT does). The A rows are gathered by pointer (TMA has no row
    gather on Hopper). Columns go fastest. TWO_M: a block is 2 * BLOCK_M rows (align with that
    block size) and each weight tile loaded serves both halves; the second half's dots run only when
    it holds pairs (an expert's pairs come first in its padded run), so an expert with up to
    2 * BLOCK_M pairs streams its weights once, where 128-row blocks stream them again for a partly
    filled last block. A_TMA: A is already in the sorted layout (A_ROWS rows, one per slot of
    SortedIds, padding rows included), its tiles TMA boxes too; C_SORTED: the output goes to the
    sorted layout's rows (gate/up writing what a down launch with A_TMA reads); WS: the tile loop
    under Triton's warp specialisation (producer warps issuing the loads). fused_experts runs it for
    prefill-sized calls where tma_ready; bench_moe --tma, --tma-rows, --tma-two-m, --tma-halves and
    --tma-sorted time its variants."""
    num_n = tl.cdiv(N, BLOCK_N)
    nvalid = 0  # block_expert is non-decreasing; the sentinel blocks (>= E) come last
    for b0 in range(0, NB, 1024):
        ob = b0 + tl.arange(0, 1024)
        nvalid += tl.sum((tl.load(BlockExpert + ob, mask=ob < NB, other=E) < E).to(tl.int32))
    num_tiles = nvalid * num_n
    ROWS: tl.constexpr = 2 if (GATED and not SPLIT) else 1  # B rows a box holds per output column
    BLOCK_ROWS: tl.constexpr = 2 * BLOCK_M if TWO_M else BLOCK_M  # the rows of one aligned block
    UP: tl.constexpr = BLOCK_N if SPLIT else 1  # the up accumulator's width (unused unless SPLIT)
    desc = tl.make_tensor_descriptor(B, shape=[E * (2 if GATED else 1) * N, K], strides=[K, 1],
                                     block_shape=[ROWS * BLOCK_N, BLOCK_K])
    if A_TMA:
        adesc = tl.make_tensor_descriptor(A, shape=[A_ROWS, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    offs_k = tl.arange(0, BLOCK_K)
    tile_c = tl.program_id(0) - NUM_PROGS  # the epilogue's own tile counter (as Triton's persistent tutorial)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=FLATTEN, warp_specialize=WS):
        pid_m = tile // num_n
        pid_n = tile % num_n
        e = tl.load(BlockExpert + pid_m)
        pair = tl.load(SortedIds + pid_m * BLOCK_ROWS + tl.arange(0, BLOCK_M))
        valid = pair < num_pairs
        a_ptrs = A + (pair // row_div).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        if GATED:
            if SPLIT:
                row0 = e * 2 * N + pid_n * BLOCK_N  # gate rows; up rows N further (a tail box reads masked columns)
            else:
                row0 = (e * N + pid_n * BLOCK_N) * 2
        else:
            row0 = e * N + pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, ROWS * BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, UP], tl.float32)
        acc2 = tl.zeros([BLOCK_M, ROWS * BLOCK_N if TWO_M else 1], tl.float32)
        acc2_up = tl.zeros([BLOCK_M, UP if TWO_M else 1], tl.float32)
        if TWO_M:
            pair2 = tl.load(SortedIds + pid_m * BLOCK_ROWS + BLOCK_M + tl.arange(0, BLOCK_M))
            a2_ptrs = A + (pair2 // row_div).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
            if tl.load(SortedIds + pid_m * BLOCK_ROWS + BLOCK_M) < num_pairs:  # both halves hold pairs
                acc, acc_up, acc2, acc2_up = _tma_k_loop_two(acc, acc_up, acc2, acc2_up, a_ptrs, valid, a2_ptrs,
                                                             pair2 < num_pairs, desc, row0, N, K, offs_k, SPLIT,
                                                             PRECISION, BLOCK_K)
            else:
                acc, acc_up = _tma_k_loop(acc, acc_up, a_ptrs, valid, desc, row0, N, K, offs_k, SPLIT, PRECISION,
                                          BLOCK_K)
        elif A_TMA:
            acc, acc_up = _tma_k_loop_a(acc, acc_up, adesc, pid_m * BLOCK_ROWS, desc, row0, N, K, SPLIT, PRECISION,
                                        BLOCK_K)
        else:
            acc, acc_up = _tma_k_loop(acc, acc_up, a_ptrs, valid, desc, row0, N, K, offs_k, SPLIT, PRECISION, BLOCK_K)
        tile_c += NUM_PROGS
        pid_mc = tile_c // num_n
        pid_nc = tile_c % num_n
        pair_c = tl.load(SortedIds + pid_mc * BLOCK_ROWS + tl.arange(0, BLOCK_M))
        _tma_epilogue(acc, acc_up, C, Wt, pair_c, num_pairs, N, pid_nc, stride_cm, GATED, SPLIT, MUL_W,
                      BLOCK_M, BLOCK_N, pid_mc * BLOCK_ROWS, C_SORTED)
        if TWO_M:
            pair2_c = tl.load(SortedIds + pid_mc * BLOCK_ROWS + BLOCK_M + tl.arange(0, BLOCK_M))
            _tma_epilogue(acc2, acc2_up, C, Wt, pair2_c, num_pairs, N, pid_nc, stride_cm, GATED, SPLIT, MUL_W,
                          BLOCK_M, BLOCK_N)


_tma_scratch_set = False


def tma_allocator() -> None:
    """In-kernel tensor descriptors need a scratch allocator: set once, process-wide (Triton has
    one), to device memory from torch's allocator on the current device, so a CUDA-graph capture
    takes it from its pool (the MoE GEMMs' and the prefill attention's TMA paths)."""
    global _tma_scratch_set
    if not _tma_scratch_set:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda")
                             if torch.cuda.is_available() else torch.empty(size, dtype=torch.int8))
        _tma_scratch_set = True


def launch_tma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, wt: torch.Tensor | None, sorted_ids: torch.Tensor,
               block_expert: torch.Tensor, num_pairs: int, row_div: int, gated: bool, cfg: dict) -> None:
    """_launch's GEMM through _moe_gemm_tma_kernel: gated, c [pairs, I] = silu(a . gate) * (a . up)
    with b = w13 when cfg["SPLIT"], else b = interleave_gate_up(w13); not gated, c [pairs, N] =
    a . b[e] (b = w2 [E, N, K]) times wt[pair] when given. cfg: BLOCK_M / BLOCK_N / BLOCK_K /
    num_warps / num_stages, and SPLIT, PERSISTENT (a grid of one program an SM), FLATTEN, TWO_M
    (sorted_ids / block_expert from align with 2 * BLOCK_M rows a block; default off), and the
    sorted layout's options (not with TWO_M): A_TMA (a holds one row per slot of sorted_ids, read by
    TMA boxes; see sorted_rows), C_SORTED (c gets one row per slot), WS (the tile loop warp
    specialised). The descriptors need tma_allocator's scratch."""
    tma_allocator()
    cfg = dict(cfg)
    two_m = bool(cfg.pop("TWO_M", False))
    a_tma, c_sorted = bool(cfg.pop("A_TMA", False)), bool(cfg.pop("C_SORTED", False))
    ws = bool(cfg.pop("WS", False))
    if two_m and (a_tma or c_sorted):
        raise ValueError("launch_tma: A_TMA / C_SORTED take 128-row blocks, not TWO_M")
    if a_tma and a.shape[0] != sorted_ids.numel():
        raise ValueError(f"launch_tma: A_TMA needs a row per sorted slot ({sorted_ids.numel()}), got {a.shape[0]}")
    if c_sorted and c.shape[0] != sorted_ids.numel():
        raise ValueError(f"launch_tma: C_SORTED needs a row per sorted slot ({sorted_ids.numel()}), got {c.shape[0]}")
    split = bool(cfg.pop("SPLIT", False)) and gated
    persistent = bool(cfg.pop("PERSISTENT", False))
    flatten = bool(cfg.pop("FLATTEN", False))
    E, R, K = b.shape
    N = R // 2 if gated else R
    NB = block_expert.numel()
    tiles = NB * triton.cdiv(N, cfg["BLOCK_N"])
    progs = min(tiles, _num_sms(a.device)) if persistent else tiles
    _moe_gemm_tma_kernel[(max(progs, 1),)](
        a, b.view(E * R, K), c, wt if wt is not None else c, sorted_ids, block_expert, num_pairs, E, N, K, NB,
        row_div, a.stride(0), c.stride(0), GATED=gated, SPLIT=split, MUL_W=wt is not None,
        PRECISION=dot_precision(a.dtype), NUM_PROGS=max(progs, 1), FLATTEN=flatten, TWO_M=two_m, A_TMA=a_tma,
        A_ROWS=a.shape[0], C_SORTED=c_sorted, WS=ws, **cfg)


def sorted_rows(x: torch.Tensor, sorted_ids: torch.Tensor, row_div: int) -> torch.Tensor:
    """x [T, H] -> [P, H]: row s is x's row of the pair in slot s of align's sorted_ids (pair //
    row_div), zeros in the padding slots: a gate/up launch_tma with A_TMA reads it."""
    pad = torch.cat([x, x.new_zeros(1, x.shape[1])])  # the sentinel (the number of pairs) // row_div -> row T
    return pad.index_select(0, (sorted_ids // row_div).clamp_(max=x.shape[0]))


@triton.jit
def _sum_slots_kernel(Y, R, Out, H, K: tl.constexpr, BLOCK_H: tl.constexpr, RESIDUAL: tl.constexpr):
    """Program (t, j): Out[t, j-th BLOCK_H columns] = the sum of Y's K rows of token t, in fp32
    (RESIDUAL: rounded to Out's dtype, then R's row added in fp32 and rounded again: torch's
    residual + sum, bit for bit)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = cols < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(Y + (t * K + j) * H + cols, mask=m, other=0.0).to(tl.float32)
    dt = Out.dtype.element_ty
    if RESIDUAL:
        acc = acc.to(dt).to(tl.float32) + tl.load(R + t * H + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Out + t * H + cols, acc.to(dt), mask=m)


def _slot_sum(y: torch.Tensor, T: int, k: int, residual: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """fused_experts' last step: sum_slots on CUDA, torch's sum (and add) for CPU tensors (the
    interpreter's tests; there torch's is the reference the kernel is checked against)."""
    if y.is_cuda:
        return sum_slots(y, T, k, residual, out)
    s = y.view(T, k, -1).sum(1)
    if residual is None:
        return s
    return residual + s if out is None else torch.add(residual, s, out=out)


def sum_slots(y: torch.Tensor, T: int, k: int, residual: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """y [T * k, H] (a token's k weighted expert rows back to back) -> [T, H], summed in fp32: what
    y.view(T, k, H).sum(1) computes, as one pass that reads each row once. residual [T, H]: returns
    residual + that sum (rounded as torch rounds the two steps) in the same pass, the decoder
    layer's residual add without a launch of its own. out: written instead of a new tensor
    (contiguous [T, H] of y's dtype; it may be residual itself)."""
    if y.dim() != 2 or y.shape[0] != T * k or not y.is_contiguous():
        raise ValueError(f"sum_slots: y must be a contiguous [T * k, H] = [{T * k}, H] tensor, got "
                         f"{tuple(y.shape)} with strides {y.stride()}")
    H = y.shape[1]
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and (t.shape != (T, H) or t.dtype != y.dtype or not t.is_contiguous()):
            raise ValueError(f"sum_slots: {name} must be a contiguous [{T}, {H}] tensor of {y.dtype}, got "
                             f"{tuple(t.shape)} of {t.dtype} with strides {t.stride()}")
    if out is None:
        out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    if T:
        BLOCK_H = min(1024, triton.next_power_of_2(H))
        _sum_slots_kernel[(T, triton.cdiv(H, BLOCK_H))](y, out if residual is None else residual, out, H, K=k,
                                                        BLOCK_H=BLOCK_H, RESIDUAL=residual is not None,
                                                        num_warps=4)
    return out


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a persistent grid's size); 4 elsewhere (the
    interpreter's tests)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    """Asked once a device: every eager prefill-sized MoE call sizes its persistent grid from it."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# The TMA GEMMs' tiles for prefill-sized calls (>= TMA_MIN_ROWS pairs an expert on average), from
# bench_moe --tma on the H200 (RESULTS.md, run CP): gate/up over w13 as it is (two boxes, two dots)
# on a persistent grid; down on 256-wide tiles, a persistent grid whose tile loop is flattened.
TMA_GATE_UP = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, SPLIT=True, PERSISTENT=True)
TMA_DOWN = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, PERSISTENT=True, FLATTEN=True)
TMA_MIN_ROWS = 96  # measured at 128, 512 and 2,048 rows an expert (2,048, 8,192 and 32,768 tokens, top-8 of 128)


def tma_ready(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether launch_tma can take this call: a CUDA device of compute capability 9 or newer (TMA),
    a Triton with in-kernel tensor descriptors, 2-byte weights in x's dtype, contiguous weights
    whose rows are 16-byte aligned (TMA's rule), and shared memory for both tiles."""
    if not (x.is_cuda and w13.is_cuda and hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or w13.dtype != x.dtype or w2.dtype != x.dtype:
        return False
    if not (w13.is_contiguous() and w2.is_contiguous()) or w13.data_ptr() % 16 or w2.data_ptr() % 16:
        return False
    E, H, I = w2.shape
    if (H * x.element_size()) % 16 or (I * x.element_size()) % 16:
        return False
    return _tma_device(x.device.index if x.device.index is not None else torch.cuda.current_device(),
                       x.element_size())


@functools.lru_cache(maxsize=None)
def _tma_device(device_index: int, elem_bytes: int) -> bool:
    """tma_ready's device half (asked once a device): compute capability 9+, the tiles' shared memory."""
    if torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    need = max(smem_bytes(TMA_GATE_UP, elem_bytes, True), smem_bytes(TMA_DOWN, elem_bytes, False))
    return need <= smem_limit(device_index)


_tma_broken: str | None = None  # set when the TMA path failed once (its first compile, say); pointer loads take over


def _tma_experts(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor, residual=None, out=None) -> torch.Tensor | None:
    """fused_experts through the TMA GEMMs (TMA_GATE_UP / TMA_DOWN, one 128-row align for both), or
    None when they fail: a Triton that cannot build them (an older compiler with tensor descriptors
    but not the persistent loop's options, say) logs one warning and turns the TMA path off for
    the process, as a failed cuDNN prefill does. Compile errors come before anything is queued, so
    the caller's pointer-load path runs the call instead, in a graph capture too."""
    global _tma_broken
    T, k = ids.shape
    E, H, I = w2.shape
    n_pairs = T * k
    try:
        sorted_ids, block_expert = align(ids, E, TMA_GATE_UP["BLOCK_M"])
        act = torch.empty(n_pairs, I, dtype=x.dtype, device=x.device)
        launch_tma(x, w13, act, None, sorted_ids, block_expert, n_pairs, k, True, TMA_GATE_UP)
        y = torch.empty(n_pairs, H, dtype=x.dtype, device=x.device)
        launch_tma(act, w2, y, weights.reshape(-1).float().contiguous(), sorted_ids, block_expert, n_pairs, 1,
                   False, TMA_DOWN)
    except Exception as e:  # triton's CompilationError and friends have no common base
        _tma_broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("MoE TMA kernels off, using the pointer-load kernels: %s", _tma_broken)
        return None
    return _slot_sum(y, T, k, residual, out)


def fused_experts(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor, cfg: tuple[dict, dict] | None = None, tma: bool = True,
                  residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """w13 [E, 2I, H], w2 [E, H, I], x [T, H], ids [T, k], weights [T, k] fp32 -> [T, H] in x's dtype.
    residual [T, H]: returns residual + that, added in the last launch (sum_slots); out: written
    instead of a new tensor (it may be residual).

    cfg: (gate/up, down) tile sizes instead of `configs`' choice (benchmarks; pointer loads). tma:
    prefill-sized calls (TMA_MIN_ROWS pairs an expert or more) load their weight tiles by TMA where
    tma_ready says they can (launch_tma, TMA_GATE_UP / TMA_DOWN) and they have not failed
    (_tma_experts); False keeps the pointer-load kernels everywhere (config attn.moe_kernel: triton)."""
    T, k = ids.shape
    E, H, I = w2.shape
    if T == 0:
        return x.new_zeros(0, H) if residual is None else residual.clone() if out is None else out
    x = x.contiguous()
    n_pairs = T * k
    if cfg is None and tma and _tma_broken is None and n_pairs >= TMA_MIN_ROWS * E and tma_ready(x, w13, w2):
        y = _tma_experts(w13, w2, x, ids, weights, residual, out)
        if y is not None:
            return y
    if cfg is None:
        smem = smem_limit(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
            if x.is_cuda else SMEM_BYTES
        cfg = configs(n_pairs, E, x.element_size(), smem)
    cfg13, cfg2 = cfg
    sorted_ids, block_expert = align(ids, E, cfg13["BLOCK_M"])
    act = torch.empty(n_pairs, I, dtype=x.dtype, device=x.device)  # [T*k, I]
    _launch(x, w13, act, weights, sorted_ids, block_expert, n_pairs, E, I, H, k, True, False, cfg13)
    if cfg2["BLOCK_M"] != cfg13["BLOCK_M"]:
        sorted_ids, block_expert = align(ids, E, cfg2["BLOCK_M"])
    y = torch.empty(n_pairs, H, dtype=x.dtype, device=x.device)  # [T*k, H], weighted
    _launch(act, w2, y, weights.reshape(-1).float().contiguous(), sorted_ids, block_expert, n_pairs, E, H, I,
            1, False, True, cfg2)
    return _slot_sum(y, T, k, residual, out)


@triton.jit
def _route_kernel(L, Ids, Wt, T, E, stride_l, K: tl.constexpr, RENORM: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Softmax over the experts in fp32, top-k, optionally renormalised: engine.moe.route's math."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rm = rows < T
    cols = tl.arange(0, BLOCK_E)
    cm = cols < E
    logit = tl.load(L + rows[:, None].to(tl.int64) * stride_l + cols[None, :], mask=rm[:, None] & cm[None, :],
                    other=float("-inf")).to(tl.float32)  # [BT, BE]
    logit = tl.where(rm[:, None], logit, 0.0)  # rows past T: finite, never stored
    p = tl.exp(logit - tl.max(logit, 1)[:, None])
    p = tl.where(cm[None, :], p, 0.0)
    p = p / tl.sum(p, 1)[:, None]
    kk = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], tl.int64)
    for j in tl.static_range(K):
        best = tl.max(p, 1)  # [BT]
        idx = tl.argmax(p, 1)  # first index of the largest
        top_w = tl.where(kk[None, :] == j, best[:, None], top_w)
        top_i = tl.where(kk[None, :] == j, idx[:, None].to(tl.int64), top_i)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)  # taken
    if RENORM:
        top_w = top_w / tl.sum(top_w, 1)[:, None]
    km = rm[:, None] & (kk[None, :] < K)
    tl.store(Ids + rows[:, None] * K + kk[None, :], top_i, mask=km)
    tl.store(Wt + rows[:, None] * K + kk[None, :], top_w, mask=km)


def fused_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """engine.moe.route in one launch (five small launches in torch): logits [T, E] -> (ids [T, k]
    int64, weights [T, k] fp32). The same choice up to exact ties between probabilities."""
    T, E = router_logits.shape
    ids = torch.empty(T, top_k, dtype=torch.long, device=router_logits.device)
    w = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    if T:
        logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
        BLOCK_E = triton.next_power_of_2(E)
        BLOCK_T = max(1, min(16, 4096 // BLOCK_E))
        _route_kernel[(triton.cdiv(T, BLOCK_T),)](logits, ids, w, T, E, logits.stride(0), K=top_k,
                                                  RENORM=renormalize, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E,
                                                  BLOCK_K=triton.next_power_of_2(top_k), num_warps=4)
    return ids, w
