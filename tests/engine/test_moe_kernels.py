"""The fused Triton MoE kernels (engine.moe_kernels) against the per-pair reference: routings with
idle experts, one expert taking every token, the align kernels against a sorted torch version (more
pairs than one of their programs holds included), the gate/up GEMM as one interleaved dot (ONE_DOT),
fp32 and bf16; the TMA GEMMs (launch_tma: every variant against the fused GEMMs, compiled ahead of
time for sm_90, the fallback when they fail, the config switch that turns them off).

On CUDA (`-m gpu`) at Qwen3-30B-A3B expert shapes; on CPU under triton's interpreter
(TRITON_INTERPRET=1, in a subprocess because the flag is read when the kernels are defined) at tiny
shapes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.moe import experts_reference, experts_sorted, route

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(script: str) -> None:
    """Run `script` under triton's interpreter in a subprocess (the flag is read when the kernels
    are defined); it must print "ok"."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def close_bf16(got: torch.Tensor, want: torch.Tensor) -> bool:
    """got equals want up to bf16 rounding (2% of want's largest magnitude)."""
    return (got.float() - want.float()).abs().max().item() <= 0.02 * want.float().abs().max().item() + 1e-3


def check_sum_residual(y: torch.Tensor, T: int, k: int) -> None:
    """sum_slots with a residual: the sum then torch's add (two roundings), bit for bit, into a new
    tensor, a given one and the residual itself; wrong residual / out buffers refused."""
    import engine.moe_kernels as mk
    H = y.shape[1]
    g = torch.Generator().manual_seed(5)
    r = torch.randn(T, H, generator=g).to(device=y.device, dtype=y.dtype)
    want = r + mk.sum_slots(y, T, k)  # the engine's two launches before (the sum is checked against torch's)
    assert torch.equal(mk.sum_slots(y, T, k, r), want), "sum_slots residual"
    out = torch.full_like(r, float("nan"))
    assert mk.sum_slots(y, T, k, r, out) is out and torch.equal(out, want), "sum_slots residual, out"
    same = r.clone()
    assert mk.sum_slots(y, T, k, same, same) is same and torch.equal(same, want), "sum_slots residual, in place"
    for name, bad in (("residual", r[1:]), ("residual", r.t().contiguous().t() if T > 1 else r.double()),
                      ("out", r.double())):
        try:
            mk.sum_slots(y, T, k, bad if name == "residual" else r, bad if name == "out" else None)
        except ValueError as e:
            assert f"{name} must be a contiguous" in str(e), e
        else:
            raise AssertionError((name, bad.shape, bad.dtype))


def case(T, E, k, H, I, dtype, device, skew=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.05).to(dtype).to(device)  # [E, 2I, H]
    w2 = (torch.randn(E, H, I, generator=g) * 0.05).to(dtype).to(device)  # [E, H, I]
    x = torch.randn(T, H, generator=g).to(dtype).to(device)
    logits = torch.randn(T, E, generator=g)
    logits[:, E // 2:] -= 50  # half the experts never chosen (idle experts)
    if skew:
        logits[:, 1] += 100  # one expert in every token's top-k
    ids, w = route(logits.to(device), k, True)
    return w13, w2, x, ids, w


def align_torch(ids: torch.Tensor, E: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """align's layout from torch ops (a stable sort): the oracle the align kernel is checked against."""
    from engine.moe_kernels import padded_size
    flat = ids.reshape(-1).long()
    N = flat.numel()
    P = padded_size(N, E, bm)
    counts = torch.zeros(E, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + bm - 1) // bm * bm  # [E]
    pend = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)  # [N]
    e_sorted = flat[order]
    rank = torch.arange(N, device=ids.device) - (torch.cumsum(counts, 0) - counts)[e_sorted]
    sorted_ids = torch.full((P,), N, dtype=torch.int32, device=ids.device)
    sorted_ids[(pend - padded)[e_sorted] + rank] = order.to(torch.int32)
    starts = torch.arange(0, P, bm, device=ids.device)
    return sorted_ids, torch.searchsorted(pend, starts, right=True).to(torch.int32)


def check_align(ids, E, bm):
    """align's layout is valid and has the same blocks as the sorted torch version."""
    from engine.moe_kernels import align
    s, b = align(ids, E, bm)
    s2, b2 = align_torch(ids, E, bm)
    flat = ids.reshape(-1)
    N = flat.numel()
    assert sorted(s[s < N].tolist()) == list(range(N))  # every pair exactly once
    assert torch.equal(b.clamp(max=E), b2.clamp(max=E))  # the same expert per block
    for blk, e in enumerate(b.tolist()):
        rows = s[blk * bm:(blk + 1) * bm]
        rows = rows[rows < N].long()
        assert (e >= E and rows.numel() == 0) or bool((flat[rows] == e).all())
    for e in range(E):  # an expert's pairs in its blocks (their order inside the expert is free)
        mine, theirs = s.view(-1, bm)[b == e].flatten(), s2.view(-1, bm)[b2 == e].flatten()
        assert torch.equal(mine.sort().values, theirs.sort().values)


INTERP = r"""
import torch
import engine.moe_kernels as mk
from tests.engine.test_moe_kernels import case, check_align
from engine.moe import experts_reference, route
for T, E, k, skew in [(1, 8, 2, False), (5, 8, 2, False), (40, 16, 4, True), (1100, 8, 8, False), (600, 16, 8, True),
                      (300, 60, 4, False), (220, 160, 6, True)]:  # E not a power of two; E > 128
    w13, w2, x, ids, w = case(T, E, k, 32, 16, torch.float32, "cpu", skew)
    for bm in (16, 64):
        check_align(ids, E, bm)
    y = mk.fused_experts(w13, w2, x, ids, w)
    ref = experts_reference(w13, w2, x, ids, w)
    assert (y - ref).abs().max() < 1e-5, (T, (y - ref).abs().max())
    # the gate and up tiles as one interleaved dot (ONE_DOT), I not a multiple of the tile
    w13, w2, x, ids, w = case(T, E, k, 32, 24, torch.float32, "cpu", skew)
    one = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1, ONE_DOT=True)
    two = dict(one, ONE_DOT=False)
    y = mk.fused_experts(w13, w2, x, ids, w, (one, two))
    ref = experts_reference(w13, w2, x, ids, w)
    assert (y - ref).abs().max() < 1e-5, (T, "ONE_DOT", (y - ref).abs().max())
for T, E, k, renorm in [(1, 128, 8, True), (37, 128, 8, False), (5, 8, 2, True), (20, 60, 4, True)]:
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T)) * 3
    ids, w = mk.fused_route(logits, k, renorm)
    ref_ids, ref_w = route(logits, k, renorm)
    assert torch.equal(ids, ref_ids) and ids.dtype == ref_ids.dtype, (ids, ref_ids)
    assert torch.allclose(w, ref_w, rtol=1e-5, atol=1e-7)
print("ok")
"""


def test_fused_moe_interpreter():
    run_interpreted(INTERP)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 7, 32, 256, 2048, 8192])
@pytest.mark.parametrize("skew", [False, True])
def test_fused_moe_cuda_bf16(T, skew):
    from engine.moe_kernels import fused_experts
    w13, w2, x, ids, w = case(T, 128, 8, 2048, 768, torch.bfloat16, "cuda", skew, seed=T)
    check_align(ids, 128, 16)
    y = fused_experts(w13, w2, x, ids, w).float()
    ref = experts_sorted(w13, w2, x, ids, w, grouped=True).float()  # the torch path (grouped_mm)
    tol = 0.02 * ref.abs().max().item() + 1e-3
    assert (y - ref).abs().max().item() < tol
    n = min(T, 4)  # fp32 per-pair reference on a few tokens (it gathers [n, k, 2I, H] weights)
    exact = experts_reference(w13.float(), w2.float(), x[:n].float(), ids[:n], w[:n])
    assert (y[:n] - exact).abs().max().item() < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_moe_cuda_fp32_and_graph():
    """fp32 is exact (IEEE dots); a CUDA-graph replay of the fused path equals the eager call."""
    from engine.moe_kernels import fused_experts
    w13, w2, x, ids, w = case(32, 64, 4, 256, 128, torch.float32, "cuda", True)
    ref = experts_reference(w13, w2, x, ids, w)
    assert (fused_experts(w13, w2, x, ids, w) - ref).abs().max().item() < 1e-4
    w13, w2, x, ids, w = case(16, 128, 8, 2048, 768, torch.bfloat16, "cuda")
    eager = fused_experts(w13, w2, x, ids, w)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_experts(w13, w2, x, ids, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fused_experts(w13, w2, x, ids, w)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_tiles_fit_shared_memory():
    """Every tile `configs` picks fits the device's shared memory per block at every size: in
    bf16/fp16 on Hopper and A100, in fp32 on Hopper (the 2,048-token ONE_DOT tile takes
    192 KiB in bf16 and would take 384 KiB in fp32: it is chosen only where it fits)."""
    from engine.moe_kernels import SMEM_BYTES, configs, smem_bytes
    for smem in (SMEM_BYTES, 163 * 1024):  # Hopper, A100
        for elem in (2, 4):
            for n_pairs in (1, 8, 64, 512, 1024, 4096, 12288, 16384, 32768, 65536, 262144):
                c13, c2 = configs(n_pairs, 128, elem, smem)
                if elem == 2:
                    assert smem_bytes(c13, elem, gated=True) <= smem, (smem, elem, n_pairs, c13)
                    assert smem_bytes(c2, elem, gated=False) <= smem, (smem, elem, n_pairs, c2)
                else:
                    assert smem_bytes(c13, elem, gated=True) <= SMEM_BYTES, (smem, elem, n_pairs, c13)
    assert configs(16384, 128, 2, SMEM_BYTES)[0].get("ONE_DOT")  # the 2,048-token tile on Hopper
    assert not configs(16384, 128, 2, 163 * 1024)[0].get("ONE_DOT")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_smem_limit_from_the_driver():
    """The driver's shared memory per block reaches configs (0 would silently keep Hopper on the
    small 2,048-token tiles)."""
    from engine.moe_kernels import configs, smem_limit
    limit = smem_limit(torch.cuda.current_device())
    assert limit >= 48 * 1024
    if torch.cuda.get_device_capability()[0] == 9:  # Hopper: 227 KiB, the ONE_DOT tile is chosen
        assert limit >= 227 * 1024
        assert configs(16384, 128, 2, limit)[0].get("ONE_DOT")


INTERP_TMA = r"""
import torch
from engine import moe_kernels as mk
from engine.moe import route
from tests.engine.test_moe_kernels import check_sum_residual
g = torch.Generator().manual_seed(0)
E, I, H, T, k = 4, 24, 40, 8, 2  # I not a multiple of the N tile, H not of the K tile: both tails
w13 = torch.randn(E, 2 * I, H, generator=g) * 0.1
x = torch.randn(T, H, generator=g)
ids, w = route(torch.randn(T, E, generator=g), k, True)
n = T * k
cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2)
s, b = mk.align(ids, E, 16)
want = torch.empty(n, I)
mk._launch(x, w13, want, w, s, b, n, E, I, H, k, True, False, dict(cfg, GROUP_M=1, ONE_DOT=True))
for extra in ({}, dict(PERSISTENT=True), dict(PERSISTENT=True, FLATTEN=True)):
    got = torch.full((n, I), float("nan"))
    mk.launch_tma(x, mk.interleave_gate_up(w13), got, None, s, b, n, k, True, dict(cfg, **extra))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (extra, (got - want).abs().max())
    got = torch.full((n, I), float("nan"))
    mk.launch_tma(x, w13, got, None, s, b, n, k, True, dict(cfg, SPLIT=True, **extra))  # w13 as it is
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (extra, (got - want).abs().max())
w2 = torch.randn(E, H, I, generator=g) * 0.1  # the down GEMM: N = H = 40 (a tail), K = I = 24 (a tail)
wf = w.reshape(-1).float().contiguous()
want2 = torch.empty(n, H)
mk._launch(want, w2, want2, wf, s, b, n, E, H, I, 1, False, True, dict(cfg, GROUP_M=1))
for extra in ({}, dict(PERSISTENT=True), dict(PERSISTENT=True, FLATTEN=True)):
    got2 = torch.full((n, H), float("nan"))
    mk.launch_tma(want, w2, got2, wf, s, b, n, 1, False, dict(cfg, **extra))
    assert torch.allclose(got2, want2, atol=1e-5, rtol=1e-5), (extra, (got2 - want2).abs().max())
il = mk.interleave_gate_up(w13)
assert torch.equal(il[:, 0::2], w13[:, :I]) and torch.equal(il[:, 1::2], w13[:, I:])
# TWO_M: blocks of 2 x 16 rows; 80 pairs over 4 experts, the second expert in every token's top-2,
# so one expert fills both halves of its blocks and the others one half or both
T2 = 40
x2 = torch.randn(T2, H, generator=g)
logits = torch.randn(T2, E, generator=g)
logits[:, 1] += 100
ids2, w2r = route(logits, k, True)
n2 = T2 * k
counts = torch.bincount(ids2.reshape(-1), minlength=E)
assert (counts > 16).any() and ((counts % 32 > 0) & (counts % 32 <= 16)).any(), counts  # both cases
s16, b16 = mk.align(ids2, E, 16)
want = torch.empty(n2, I)
mk._launch(x2, w13, want, w2r, s16, b16, n2, E, I, H, k, True, False, dict(cfg, GROUP_M=1, ONE_DOT=True))
wf2 = w2r.reshape(-1).float().contiguous()
want2 = torch.empty(n2, H)
mk._launch(want, w2, want2, wf2, s16, b16, n2, E, H, I, 1, False, True, dict(cfg, GROUP_M=1))
s32, b32 = mk.align(ids2, E, 32)
for extra in ({}, dict(PERSISTENT=True), dict(PERSISTENT=True, FLATTEN=True)):
    for weights, split in ((il, False), (w13, True)):
        got = torch.full((n2, I), float("nan"))
        mk.launch_tma(x2, weights, got, None, s32, b32, n2, k, True, dict(cfg, TWO_M=True, SPLIT=split, **extra))
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), ("two_m", split, extra, (got - want).abs().max())
    got2 = torch.full((n2, H), float("nan"))
    mk.launch_tma(want, w2, got2, wf2, s32, b32, n2, 1, False, dict(cfg, TWO_M=True, **extra))
    assert torch.allclose(got2, want2, atol=1e-5, rtol=1e-5), ("two_m", extra, (got2 - want2).abs().max())
# the sorted layout: gate/up writes a row per slot of the 16-row align (C_SORTED), from x's rows
# gathered into that layout (A_TMA) or by pointer; down reads it by TMA boxes (A_TMA)
P = s16.numel()
valid = s16 < n2
xs = mk.sorted_rows(x2, s16, k)
assert xs.shape == (P, H) and torch.equal(xs[valid], x2[s16[valid].long() // k]) and not xs[~valid].any()
for extra in (dict(PERSISTENT=True), dict(PERSISTENT=True, FLATTEN=True), dict(PERSISTENT=True, WS=True)):
    for a_in, a_tma in ((xs, True), (x2, False)):
        act_s = torch.full((P, I), float("nan"))
        mk.launch_tma(a_in, w13, act_s, None, s16, b16, n2, k, True,
                      dict(cfg, SPLIT=True, A_TMA=a_tma, C_SORTED=True, **extra))
        assert torch.allclose(act_s[valid], want[s16[valid].long()], atol=1e-5, rtol=1e-5), ("sorted", a_tma, extra)
        # the padding rows of the experts' blocks hold SiLU(0) * 0; the sentinel blocks past the
        # last expert's are no tile's (down skips them too)
        used = (b16 < E).repeat_interleave(16)
        assert not act_s[used & ~valid].any() and act_s[~used].isnan().all(), ("padding rows", a_tma, extra)
    got2 = torch.full((n2, H), float("nan"))
    mk.launch_tma(act_s, w2, got2, wf2, s16, b16, n2, 1, False, dict(cfg, A_TMA=True, **extra))
    assert torch.allclose(got2, want2, atol=1e-5, rtol=1e-5), ("sorted down", extra, (got2 - want2).abs().max())
summed = mk.sum_slots(got2, T2, k)  # the k slots' sum in one pass, as torch's
assert torch.allclose(summed, got2.view(T2, k, H).sum(1), atol=1e-6, rtol=1e-6), "sum_slots"
check_sum_residual(got2, T2, k)
for bad in (got2[1:], got2.t().contiguous().t()):  # a row short; not row-major
    try:
        mk.sum_slots(bad, T2, k)
    except ValueError as e:
        assert "contiguous [T * k, H]" in str(e), e
    else:
        raise AssertionError(bad.shape)
for bad in (dict(A_TMA=True), dict(C_SORTED=True)):  # a buffer that is not one row per slot is refused
    try:
        mk.launch_tma(x2, w13, torch.empty(n2, I), None, s16, b16, n2, k, True, dict(cfg, SPLIT=True, **bad))
    except ValueError as e:
        assert "row per sorted slot" in str(e), e
    else:
        raise AssertionError(bad)
print("ok")
"""


def test_tma_gemms_equal_the_fused_ones_interpreter():
    """The TMA variants of the gate/up and down GEMMs (bench_moe --wide-tiles' candidates) compute
    what the fused GEMMs compute, with tails in N and K, under triton's interpreter."""
    run_interpreted(INTERP_TMA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tma_gemms_equal_the_fused_ones_cuda():
    """The TMA variants on the H200 at a 2,048-token chunk's shapes, tiles bench_moe times."""
    from engine import moe_kernels as mk
    w13, w2, x, ids, w = case(2048, 128, 8, 2048, 768, torch.bfloat16, "cuda", seed=5)
    n, E, I, H, k = 2048 * 8, 128, 768, 2048, 8
    s, b = mk.align(ids, E, 128)
    want = torch.empty(n, I, dtype=x.dtype, device=x.device)
    cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
    mk._launch(x, w13, want, w, s, b, n, E, I, H, k, True, False, dict(cfg, GROUP_M=8, ONE_DOT=True))
    wf = w.reshape(-1).float().contiguous()
    want2 = torch.empty(n, H, dtype=x.dtype, device=x.device)
    mk._launch(want, w2, want2, wf, s, b, n, E, H, I, 1, False, True, dict(cfg, GROUP_M=8, num_stages=3))
    w13i = mk.interleave_gate_up(w13)
    for extra in ({}, dict(PERSISTENT=True), dict(PERSISTENT=True, FLATTEN=True)):
        for weights, split in ((w13i, False), (w13, True)):
            got = torch.full_like(want, float("nan"))
            mk.launch_tma(x, weights, got, None, s, b, n, k, True, dict(cfg, SPLIT=split, **extra))
            assert close_bf16(got, want), (extra, split)
        got2 = torch.full_like(want2, float("nan"))
        mk.launch_tma(want, w2, got2, wf, s, b, n, 1, False, dict(cfg, BLOCK_N=256, **extra))
        assert close_bf16(got2, want2), extra
    s256, b256 = mk.align(ids, E, 256)  # TWO_M: 256-row blocks, two 128-row dots a weight tile
    for extra in (dict(PERSISTENT=True), dict(PERSISTENT=True, FLATTEN=True)):
        for weights, split in ((w13i, False), (w13, True)):
            got = torch.full_like(want, float("nan"))
            mk.launch_tma(x, weights, got, None, s256, b256, n, k, True,
                          dict(cfg, BLOCK_N=64, SPLIT=split, TWO_M=True, **extra))
            assert close_bf16(got, want), ("two_m", extra, split)
        got2 = torch.full_like(want2, float("nan"))
        mk.launch_tma(want, w2, got2, wf, s256, b256, n, 1, False, dict(cfg, TWO_M=True, **extra))
        assert close_bf16(got2, want2), ("two_m", extra)
    # the sorted layout (bench_moe --tma-sorted): gate/up into a row per slot, A by pointer or from
    # x gathered first; down's A by TMA from it; each also under warp specialisation
    valid = s < n
    pairs = s[valid].long()
    xs = mk.sorted_rows(x, s, k)
    for ws in (False, True):
        for a_in, a_tma in ((x, False), (xs, True)):
            act_s = torch.zeros(s.numel(), I, dtype=x.dtype, device=x.device)
            mk.launch_tma(a_in, w13, act_s, None, s, b, n, k, True,
                          dict(mk.TMA_GATE_UP, A_TMA=a_tma, C_SORTED=True, WS=ws))
            assert close_bf16(act_s[valid], want[pairs]), ("sorted", a_tma, ws)
        got2 = torch.full_like(want2, float("nan"))
        mk.launch_tma(act_s, w2, got2, wf, s, b, n, 1, False, dict(mk.TMA_DOWN, A_TMA=True, WS=ws))
        assert close_bf16(got2, want2), ("sorted down", ws)
        got = torch.full_like(want, float("nan"))
        mk.launch_tma(x, w13, got, None, s, b, n, k, True, dict(mk.TMA_GATE_UP, WS=ws))
        assert close_bf16(got, want), ("ws gate/up", ws)
    assert close_bf16(mk.sum_slots(want2, 2048, k), want2.view(2048, k, H).sum(1)), "sum_slots"
    check_sum_residual(want2, 2048, k)
    # TWO_M with 64-row halves of the engine's own 128-row blocks (bench_moe --tma-halves)
    halves = dict(cfg, BLOCK_M=64, TWO_M=True, PERSISTENT=True, FLATTEN=True)
    got = torch.full_like(want, float("nan"))
    mk.launch_tma(x, w13, got, None, s, b, n, k, True, dict(halves, SPLIT=True))
    assert close_bf16(got, want), "halves"
    got2 = torch.full_like(want2, float("nan"))
    mk.launch_tma(want, w2, got2, wf, s, b, n, 1, False, dict(halves, BLOCK_N=256))
    assert close_bf16(got2, want2), "halves"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1536, 2048, 8192])
def test_fused_experts_on_tma_equal_the_pointer_kernels_cuda(T):
    """Prefill-sized calls take the TMA GEMMs on Hopper (tma_ready); their output equals the
    pointer-load kernels' (tma=False) up to bf16 rounding, eager and replayed from a CUDA graph."""
    from engine import moe_kernels as mk
    w13, w2, x, ids, w = case(T, 128, 8, 2048, 768, torch.bfloat16, "cuda", skew=T == 1536, seed=T)
    if torch.cuda.get_device_capability()[0] < 9:
        assert not mk.tma_ready(x, w13, w2)
        pytest.skip("TMA needs compute capability 9 or newer")
    assert mk.tma_ready(x, w13, w2)
    assert not mk.tma_ready(x.float(), w13.float(), w2.float())  # 4-byte weights: pointer loads
    assert not mk.tma_ready(x, w13[:, :, :-8], w2)  # not contiguous
    want = mk.fused_experts(w13, w2, x, ids, w, tma=False).float()
    got = mk.fused_experts(w13, w2, x, ids, w).float()
    assert close_bf16(got, want)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mk.fused_experts(w13, w2, x, ids, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = mk.fused_experts(w13, w2, x, ids, w)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.float(), got)


def test_tma_is_not_taken_off_cuda():
    """On CPU (the interpreter's and torch's paths) fused_experts never asks for TMA."""
    from engine import moe_kernels as mk
    w13, w2, x, ids, w = case(4, 4, 2, 16, 8, torch.float32, "cpu")
    assert not mk.tma_ready(x, w13, w2)
    assert not mk.tma_ready(x.bfloat16(), w13.bfloat16(), w2.bfloat16())


def _compile_tma_for_hopper(consts: dict, warps: int, stages: int):
    """The TMA kernel compiled ahead of time for sm_90 (no GPU needed: Triton's own compiler and
    ptxas, tests/aot_record.compile_one): what the H200 would build for these constants."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.compiler")
    from tests import aot_record
    sig = {"A": "*bf16", "B": "*bf16", "C": "*bf16", "Wt": "*fp32", "SortedIds": "*i32", "BlockExpert": "*i32",
           "num_pairs": "i32", "E": "i32", "N": "i32", "K": "i32", "NB": "i32", "row_div": "i32",
           "stride_am": "i32", "stride_cm": "i32", "NUM_PROGS": "i32", "A_ROWS": "i32"}
    consts = {**dict(PRECISION="ieee", FLATTEN=False, TWO_M=False, SPLIT=False, A_TMA=False, C_SORTED=False,
                     WS=False), **consts}
    sig.update({k: "constexpr" for k in consts})
    rec = dict(module="engine.moe_kernels", name="_moe_gemm_tma_kernel", signature=sig, constexprs=consts,
               options={"num_warps": warps, "num_stages": stages})
    try:
        return aot_record.compile_one(rec)
    except FileNotFoundError as e:  # no ptxas in this triton
        pytest.skip(f"cannot compile for CUDA here: {e}")


@pytest.mark.parametrize("case", ["engine-gate-up", "engine-down", "two-m-gate-up", "two-m-down",
                                  "halves-gate-up", "halves-down", "sorted-gate-up", "sorted-down",
                                  "sorted-ws-gate-up", "sorted-ws-down", "ws-gate-up", "ws-down"])
def test_tma_kernel_compiles_for_hopper(case):
    """Every TMA kernel configuration the engine launches (TMA_GATE_UP / TMA_DOWN) and the variants
    bench_moe times (TWO_M: 256-row blocks, 64-row halves of the engine's 128-row blocks; the sorted
    layout with its A rows by TMA; warp specialisation) compile for sm_90 on a machine without a
    GPU: Triton's interpreter runs code the compiler rejects (a name bound only under a constexpr
    branch, used under a runtime one, passed the interpreter and failed this)."""
    from engine import moe_kernels as mk
    if "sorted" in case or "ws" in case:
        cfg = dict(mk.TMA_GATE_UP if case.endswith("gate-up") else mk.TMA_DOWN, WS="ws" in case)
        if "sorted" in case:
            cfg.update(A_TMA=True, C_SORTED=case.endswith("gate-up"))
    elif case.startswith("engine"):
        cfg = dict(mk.TMA_GATE_UP if case == "engine-gate-up" else mk.TMA_DOWN)
    elif case.startswith("halves"):
        cfg = dict(BLOCK_M=64, BLOCK_N=128 if case == "halves-gate-up" else 256, BLOCK_K=64, num_warps=8,
                   num_stages=4, SPLIT=case == "halves-gate-up", TWO_M=True, PERSISTENT=True, FLATTEN=True)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=64 if case == "two-m-gate-up" else 128, BLOCK_K=64, num_warps=8,
                   num_stages=4, SPLIT=case == "two-m-gate-up", TWO_M=True, PERSISTENT=True)
    gated = "gate-up" in case
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    cfg.pop("PERSISTENT", None)
    c = _compile_tma_for_hopper(dict(cfg, GATED=gated, MUL_W=not gated), warps, stages)
    assert c.asm["cubin"] and c.metadata.shared <= 227 * 1024


INTERP_TMA_FALLBACK = r"""
import logging
import torch
from engine import moe_kernels as mk
from engine.moe import route
g = torch.Generator().manual_seed(0)
E, I, H, T, k = 4, 24, 40, 64, 2  # 128 pairs: 32 an expert on average (TMA_MIN_ROWS lowered below)
w13 = torch.randn(E, 2 * I, H, generator=g) * 0.1
w2 = torch.randn(E, H, I, generator=g) * 0.1
x = torch.randn(T, H, generator=g)
ids, w = route(torch.randn(T, E, generator=g), k, True)
want = mk.fused_experts(w13, w2, x, ids, w, tma=False)
calls = []
def broken(*a, **kw):
    calls.append(1)
    raise RuntimeError("PassManager::run failed (a Triton that cannot build the TMA kernel)")
mk.launch_tma, mk.tma_ready, mk.TMA_MIN_ROWS = broken, lambda *a: True, 8
seen = []
logging.getLogger("engine.moe_kernels").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: seen.append(r.getMessage())})())
got = mk.fused_experts(w13, w2, x, ids, w)
assert torch.equal(got, want), (got - want).abs().max()
assert calls == [1] and mk._tma_broken and "PassManager" in mk._tma_broken, (calls, mk._tma_broken)
assert len(seen) == 1 and "TMA kernels off" in seen[0], seen
assert torch.equal(mk.fused_experts(w13, w2, x, ids, w), want) and calls == [1]  # not tried again
print("ok")
"""


def test_a_failing_tma_path_falls_back_to_the_pointer_kernels():
    """If the TMA kernels fail (a Triton that cannot build them), fused_experts logs once, turns the
    TMA path off and computes the call with the pointer-load kernels: same output, no error."""
    run_interpreted(INTERP_TMA_FALLBACK)


@pytest.mark.parametrize("moe_kernel,tma", [("auto", True), ("triton", False)])
def test_attn_moe_kernel_reaches_the_tma_switch(monkeypatch, moe_kernel, tma):
    """config attn.moe_kernel, handed to the experts by set_attention_backend, decides whether
    fused_experts may take the TMA path: "auto" may, "triton" keeps the pointer-load kernels."""
    from engine import moe, moe_kernels
    from engine.layers import set_attention_backend
    seen = []
    monkeypatch.setattr(moe, "use_kernels", lambda x, backend: True)
    monkeypatch.setattr(moe_kernels, "fused_experts", lambda *a, **kw: seen.append(kw) or a[2])
    block = nn.Module()
    block.experts = moe.StackedExperts(4, 8, 4)
    set_attention_backend(block, "auto", "auto", moe_kernel)
    x = torch.zeros(2, 8)
    block.experts(x, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))
    assert seen == [dict(tma=tma, residual=None, out=None)] and block.experts.path == "fused"
