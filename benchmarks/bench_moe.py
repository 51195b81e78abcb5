"""One MoE layer's experts on the GPU: the torch path (sort, gather, torch._grouped_mm, scatter) against
the fused Triton kernels (engine.moe_kernels), Qwen3-30B-A3B expert shapes, by tokens per call.

Prints ms per call, the achieved TFLOP/s, and the weight-read floor (bytes of the experts touched /
--hbm-tbps). --sweep also times a grid of tile sizes per row count and prints the best (how the
defaults in engine.moe_kernels.configs were chosen). --parts times each launch of the call on its
own, as GPU time in CUDA-graph replays (align, gate/up GEMM, down GEMM, the final sum), the gate/up GEMM with its gate and up tiles
as one interleaved dot (ONE_DOT) at several tiles and the down GEMM at 128-row tiles.

    python benchmarks/bench_moe.py                    # H200
    python benchmarks/bench_moe.py --sweep
    python benchmarks/bench_moe.py --parts --tokens 2048
    python benchmarks/bench_moe.py --grouped --tokens 2048 8192 32768   # against torch._grouped_mm
    python benchmarks/bench_moe.py --tma-halves --tokens 2048 8192 32768  # 64-row halves, empty ones skipped
    python benchmarks/bench_moe.py --tma-sorted --tokens 2048 8192         # down's A by TMA, warp specialisation
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.moe import experts_sorted, route  # noqa: E402
from engine.moe_kernels import _launch, align, configs, fused_experts, interleave_gate_up, launch_tma  # noqa: E402


def timeit(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def grid(wide: bool = False):
    """Tile configurations to time. wide: for prefill-sized calls (>= 64 rows per expert) also
    a deeper pipeline (num_stages 4) and other L2 groupings (GROUP_M 1, 16, 32)."""
    for bm, bn, bk, warps, stages in itertools.product((16, 32, 64, 128), (64, 128), (64, 128), (4, 8), (3,)):
        if bm * bn * bk > 128 * 128 * 64 or (bm == 128 and warps == 4):
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8 if bm >= 64 else 1, num_warps=warps,
                   num_stages=stages)
    if wide:
        for bm, bn, bk, warps, stages, group in itertools.product((64, 128), (64, 128), (64, 128), (4, 8), (4,),
                                                                   (1, 16, 32)):
            if bm * bn * bk > 128 * 128 * 64 or (bm == 128 and warps == 4):
                continue
            yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages)


def graph_time(fn, iters):
    """GPU time of fn, ms: `iters` calls captured in one CUDA graph and replayed. A small launch
    timed back to back from Python (timeit) measures the host's launch rate, not the kernel; in
    the engine, steps up to prefill_graph_tokens replay graphs, so this is the time that counts."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def one_dot_grid():
    """gate/up tiles for ONE_DOT (the dot is 2 * BLOCK_N wide)."""
    for bm, bn, bk, warps, stages in itertools.product((64, 128), (64, 128), (32, 64), (4, 8), (3, 4)):
        if bm == 128 and warps == 4:
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages, ONE_DOT=True)


def _launch_setup(w2, x, ids, w):
    """What timing single launches of fused_experts needs: (T, k, E, H, I, pairs, the default
    tiles c13 and c2, their aligned ids and block experts s13, b13, s2, b2, the act and y outputs,
    the flat fp32 weights)."""
    T, k = ids.shape
    E, H, I = w2.shape
    n = T * k
    c13, c2 = configs(n, E)
    s13, b13 = align(ids, E, c13["BLOCK_M"])
    s2, b2 = align(ids, E, c2["BLOCK_M"]) if c2["BLOCK_M"] != c13["BLOCK_M"] else (s13, b13)
    act = torch.empty(n, I, dtype=x.dtype, device=x.device)
    y = torch.empty(n, H, dtype=x.dtype, device=x.device)
    return T, k, E, H, I, n, c13, c2, s13, b13, s2, b2, act, y, w.reshape(-1).float().contiguous()


def parts(w13, w2, x, ids, w, iters):
    """Each launch of fused_experts on its own, default tiles, GPU time (graph_time); then the
    gate/up GEMM's ONE_DOT tiles and the down GEMM's 128-row tiles (one align for both GEMMs)."""
    T, k, E, H, I, n, c13, c2, s13, b13, s2, b2, act, y, wf = _launch_setup(w2, x, ids, w)
    rows = [("whole call, default tiles", graph_time(lambda: fused_experts(w13, w2, x, ids, w), iters))]
    for bm in sorted({c13["BLOCK_M"], c2["BLOCK_M"]}):
        rows.append((f"align, {bm}-row blocks", graph_time(lambda: align(ids, E, bm), iters)))
    rows += [(f"gate/up {c13}", graph_time(lambda: _launch(x, w13, act, w, s13, b13, n, E, I, H, k, True, False,
                                                           c13), iters)),
             (f"down {c2}", graph_time(lambda: _launch(act, w2, y, wf, s2, b2, n, E, H, I, 1, False, True, c2),
                                       iters)),
             ("sum", graph_time(lambda: y.view(T, k, H).sum(1), iters))]
    ref = act.clone()
    for c in one_dot_grid():
        try:
            sc, bc = align(ids, E, c["BLOCK_M"])
            t = graph_time(lambda: _launch(x, w13, act, w, sc, bc, n, E, I, H, k, True, False, c), iters)
            err = (act.float() - ref.float()).abs().max().item()
            rows.append((f"gate/up {c} (max diff {err:.4f})", t))
        except Exception as e:  # e.g. out of shared memory for this tile
            rows.append((f"gate/up {c}: {type(e).__name__}", float("nan")))
    s128, b128 = align(ids, E, 128)
    for bn, stages in ((64, 3), (128, 3), (128, 4)):
        c = dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=stages)
        try:
            t = graph_time(lambda: _launch(act, w2, y, wf, s128, b128, n, E, H, I, 1, False, True, c), iters)
            rows.append((f"down {c}", t))
        except Exception as e:
            rows.append((f"down {c}: {type(e).__name__}", float("nan")))
    print(f"\n{T} tokens, each launch alone (GPU time, CUDA-graph replays):\n| launch | ms | gate/up TFLOP/s |\n"
          "|---|---|---|")
    for name, t in rows:
        fl = n * 2 * H * I * 2 / (t * 1e-3) / 1e12 if name.startswith("gate/up") and t == t else None
        print(f"| {name} | {t:.3f} | {'' if fl is None else f'{fl:.0f}'} |")


def _default_rows(rows, w13, w2, x, w, setup, iters):
    """The default tiles' gate/up and down launches timed into rows, over _launch_setup's buffers
    (setup); returns their outputs, the variants' references."""
    T, k, E, H, I, n, c13, c2, s13, b13, s2, b2, act, y, wf = setup
    rows.append((f"gate/up {c13} (default)", graph_time(
        lambda: _launch(x, w13, act, w, s13, b13, n, E, I, H, k, True, False, c13), iters), ""))
    ref13 = act.clone()
    rows.append((f"down {c2} (default)", graph_time(
        lambda: _launch(act, w2, y, wf, s2, b2, n, E, H, I, 1, False, True, c2), iters), ""))
    return ref13, y.clone()


def wide_tiles(w13, w2, x, ids, w, iters):
    """The 2,048-token chunk's GEMMs on tiles 256 columns wide (the down GEMM's N, the widest that
    Hopper's shared memory holds at 128 rows and 64-deep K steps) and other L2 groupings, each launch
    alone (GPU time, CUDA-graph replays) with its largest difference from the default tile's output;
    then both GEMMs with their weight tiles loaded by TMA (engine.moe_kernels.launch_tma; gate/up over
    w13 with gate and up rows interleaved), then the whole call on the fastest down tile. grid()
    leaves these out (its largest tile is 128 x 128 x 64)."""
    setup = _launch_setup(w2, x, ids, w)
    T, k, E, H, I, n, c13, c2, s13, b13, s2, b2, act, y, wf = setup
    rows = [("whole call, default tiles", graph_time(lambda: fused_experts(w13, w2, x, ids, w), iters), "")]
    ref13, ref2 = _default_rows(rows, w13, w2, x, w, setup, iters)
    for group in (1, 16):
        c = dict(c13, GROUP_M=group)
        t = graph_time(lambda: _launch(x, w13, act, w, s13, b13, n, E, I, H, k, True, False, c), iters)
        rows.append((f"gate/up {c}", t, f"{(act.float() - ref13.float()).abs().max().item():.4f}"))
    best = (rows[2][1], c2)
    for bm, bn, stages, group in itertools.product((128, 64), (128, 256), (3, 4), (1, 8)):
        c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=group, num_warps=8, num_stages=stages)
        if c == c2:
            continue
        try:
            sc, bc = align(ids, E, bm)
            t = graph_time(lambda: _launch(act, w2, y, wf, sc, bc, n, E, H, I, 1, False, True, c), iters)
            rows.append((f"down {c}", t, f"{(y.float() - ref2.float()).abs().max().item():.4f}"))
            if bm == c13["BLOCK_M"] and t < best[0]:  # one align for both GEMMs
                best = (t, c)
        except Exception as e:  # out of shared memory for this tile
            rows.append((f"down {c}: {type(e).__name__}", float("nan"), ""))
    rows.append((f"whole call, down on {best[1]}",
                 graph_time(lambda: fused_experts(w13, w2, x, ids, w, (c13, best[1])), iters), ""))
    print(f"\n{T} tokens, wide tiles (GPU time, CUDA-graph replays):\n| launch | ms | max diff from the default |\n"
          "|---|---|---|")
    for name, t, d in rows:
        print(f"| {name} | {t:.3f} | {d} |")


def _tma_call(w13, w2, x, ids, w, c13, c2):
    """fused_experts with both GEMMs through launch_tma (c13 with SPLIT: w13 as it is; else the
    caller passes w13 interleaved)."""
    T, k = ids.shape
    E, H, I = w2.shape
    n = T * k
    def rows(c):  # a block's rows: TWO_M blocks hold two tiles of BLOCK_M
        return c["BLOCK_M"] * (2 if c.get("TWO_M") else 1)
    s, b = align(ids, E, rows(c13))
    act = torch.empty(n, I, dtype=x.dtype, device=x.device)
    launch_tma(x, w13, act, None, s, b, n, k, True, c13)
    if rows(c2) != rows(c13):
        s, b = align(ids, E, rows(c2))
    y = torch.empty(n, H, dtype=x.dtype, device=x.device)
    launch_tma(act, w2, y, w.reshape(-1).float().contiguous(), s, b, n, 1, False, c2)
    return y.view(T, k, H).sum(1)


def _whole_call_row(rows, label, against, t_against, ref, w13, w13i, w2, x, ids, w, c13, c2, iters):
    """The whole call through _tma_call on tiles c13 / c2 (w13 interleaved unless c13 SPLITs),
    timed into rows beside t_against with its difference from ref."""
    wa = w13 if c13.get("SPLIT") else w13i
    got = _tma_call(wa, w2, x, ids, w, c13, c2)
    t = graph_time(lambda: _tma_call(wa, w2, x, ids, w, c13, c2), iters)
    rows.append((f"whole call by TMA, {label} ({t / t_against:.3f}x {against})", t,
                 f"{(got.float() - ref.float()).abs().max().item():.4f}"))


def _variant_row(rows, name, fn, out, ref, iters) -> float:
    """Time fn (graph_time) into rows as `name` with out's largest difference from ref; a variant
    that fails (a Triton without tensor descriptors or flatten, out of shared memory) gets a row
    naming the error. Returns its time (inf when it failed)."""
    try:
        t = graph_time(fn, iters)
    except Exception as e:
        rows.append((f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}", float("nan"), ""))
        return float("inf")
    rows.append((name, t, f"{(out.float() - ref.float()).abs().max().item():.4f}"))
    return t


def tma_tiles(w13, w2, x, ids, w, iters):
    """Both GEMMs with their weight tiles loaded by TMA (engine.moe_kernels.launch_tma), each launch
    alone (GPU time, CUDA-graph replays) with its largest difference from the default fused GEMM's
    output: gate/up over w13 interleaved (one box) or as it is (SPLIT, two boxes and two dots), each
    on a grid of every tile, a persistent grid (one program an SM), and a persistent grid whose tile
    loop Triton flattens (the next tile's loads under this tile's epilogue); then the whole call with
    the fastest of each against fused_experts, and its difference from it."""
    setup = _launch_setup(w2, x, ids, w)
    T, k, E, H, I, n, c13, c2, s13, b13, s2, b2, act, y, wf = setup
    t_default = graph_time(lambda: fused_experts(w13, w2, x, ids, w), iters)
    rows = [("whole call, default tiles", t_default, "")]
    ref13, ref2 = _default_rows(rows, w13, w2, x, w, setup, iters)
    w13i = interleave_gate_up(w13)
    grids = (dict(), dict(PERSISTENT=True), dict(PERSISTENT=True, FLATTEN=True))
    s128, b128 = align(ids, E, 128)
    best13, best2 = (float("inf"), None), (float("inf"), None)
    for split, stages, g in itertools.product((False, True), (3, 4), grids):
        c = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=stages, SPLIT=split, **g)
        t = _variant_row(rows, f"gate/up by TMA {c}", lambda: launch_tma(
            x, w13 if split else w13i, act, None, s128, b128, n, k, True, c), act, ref13, iters)
        best13 = min(best13, (t, c), key=lambda r: r[0])
    _launch(x, w13, act, w, s13, b13, n, E, I, H, k, True, False, c13)  # the default's act again
    for (bn, stages), g in itertools.product(((128, 3), (256, 4)), grids):
        c = dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, num_warps=8, num_stages=stages, **g)
        t = _variant_row(rows, f"down by TMA {c}", lambda: launch_tma(act, w2, y, wf, s128, b128, n, 1, False, c),
                         y, ref2, iters)
        best2 = min(best2, (t, c), key=lambda r: r[0])
    if best13[1] is not None and best2[1] is not None:
        _whole_call_row(rows, "the fastest of each", "the default", t_default, fused_experts(w13, w2, x, ids, w),
                        w13, w13i, w2, x, ids, w, best13[1], best2[1], iters)
    print(f"\n{T} tokens, TMA variants (GPU time, CUDA-graph replays):\n| launch | ms | max diff from the default |\n"
          "|---|---|---|")
    for name, t, d in rows:
        print(f"| {name} | {t:.3f} | {d} |")


def _call_shapes(w2, ids, w):
    """(T, k, E, H, I, pairs, the flat fp32 routing weights, pairs per expert) of one call."""
    T, k = ids.shape
    E, H, I = w2.shape
    return T, k, E, H, I, T * k, w.reshape(-1).float().contiguous(), torch.bincount(ids.reshape(-1), minlength=E)


def _engine_tma_rows(rows, w13, w2, x, ids, w, wf, iters):
    """The engine's TMA call (fused_experts) and its two GEMMs (TMA_GATE_UP / TMA_DOWN) timed into
    rows; returns (the call's time, its output, the 128-row align, act and y buffers, the GEMMs'
    outputs as the variants' references, w13 interleaved)."""
    from engine.moe_kernels import TMA_DOWN, TMA_GATE_UP
    T, k = ids.shape
    E, H, I = w2.shape
    n = T * k
    t_engine = graph_time(lambda: fused_experts(w13, w2, x, ids, w), iters)
    ref = fused_experts(w13, w2, x, ids, w)
    rows.append(("whole call, the engine's choice (TMA, 128-row blocks)", t_engine, ""))
    s128, b128 = align(ids, E, 128)
    act = torch.empty(n, I, dtype=x.dtype, device=x.device)
    y = torch.empty(n, H, dtype=x.dtype, device=x.device)
    rows.append((f"gate/up {TMA_GATE_UP} (engine)", graph_time(
        lambda: launch_tma(x, w13, act, None, s128, b128, n, k, True, TMA_GATE_UP), iters), ""))
    ref13 = act.clone()
    rows.append((f"down {TMA_DOWN} (engine)", graph_time(
        lambda: launch_tma(act, w2, y, wf, s128, b128, n, 1, False, TMA_DOWN), iters), ""))
    return t_engine, ref, s128, b128, act, y, ref13, y.clone(), interleave_gate_up(w13)


def _print_rows(title, rows):
    print(f"\n{title} (GPU time, CUDA-graph replays):\n| launch | ms | max diff from the engine's |\n|---|---|---|")
    for name, t, d in rows:
        print(f"| {name} | {t:.3f} | {d} |")


def _sweep(rows, x, w13, w13i, w2, wf, ids, w, n, k, s, b, act, y, ref13, ref2, ref, t_engine, cfgs13, cfgs2,
           name, iters):
    """Time each gate/up tile of cfgs13 and each down tile of cfgs2 (launch_tma on the align s / b)
    into rows, then the whole call on the fastest of each, and each fastest beside the engine's
    other GEMM (TMA_GATE_UP / TMA_DOWN); `name` labels the whole-call rows."""
    from engine.moe_kernels import TMA_DOWN, TMA_GATE_UP
    best13, best2 = (float("inf"), None), (float("inf"), None)
    for c in cfgs13:
        t = _variant_row(rows, f"gate/up by TMA {c}", lambda: launch_tma(
            x, w13 if c.get("SPLIT") else w13i, act, None, s, b, n, k, True, c), act, ref13, iters)
        best13 = min(best13, (t, c), key=lambda r: r[0])
    s128, b128 = align(ids, w2.shape[0], 128)
    launch_tma(x, w13, act, None, s128, b128, n, k, True, TMA_GATE_UP)  # the engine's act again
    for c in cfgs2:
        t = _variant_row(rows, f"down by TMA {c}", lambda: launch_tma(act, w2, y, wf, s, b, n, 1, False, c),
                         y, ref2, iters)
        best2 = min(best2, (t, c), key=lambda r: r[0])
    for c13, c2, label in ((best13[1], best2[1], f"{name}, the fastest of each"),
                           (best13[1], TMA_DOWN, f"gate/up on the fastest {name} tile, down the engine's"),
                           (TMA_GATE_UP, best2[1], f"gate/up the engine's, down on the fastest {name} tile")):
        if c13 is None or c2 is None:
            continue
        _whole_call_row(rows, label, "the engine's", t_engine, ref, w13, w13i, w2, x, ids, w, c13, c2, iters)


def tma_rows(w13, w2, x, ids, w, iters):
    """The engine's TMA GEMMs (engine.moe_kernels.TMA_GATE_UP / TMA_DOWN, 128-row blocks) against
    64-row blocks: each expert's run is padded to a multiple of BLOCK_M, so at 2,048 tokens of top-8
    of 128 a 128-row block is on average ~1.45x the tiles the rows need (~1.13x at 8,192); 64-row
    blocks pad less but read each expert's weight tiles in more programs (from L2 when they run
    together). Each launch alone (GPU time, CUDA-graph replays), then the whole call on the fastest
    64-row tiles against fused_experts (the engine's choice), with the differences from it."""
    T, k, E, H, I, n, wf, cnt = _call_shapes(w2, ids, w)
    rows = [(f"tiles a GEMM column, {bm}-row blocks: {int(((cnt + bm - 1) // bm).sum())} "
             f"(the rows need {n / bm:.0f})", float("nan"), "") for bm in (128, 64)]
    t_engine, ref, s128, b128, act, y, ref13, ref2, w13i = _engine_tma_rows(rows, w13, w2, x, ids, w, wf, iters)
    s64, b64 = align(ids, E, 64)
    modes = (dict(SPLIT=False, PERSISTENT=True, FLATTEN=True), dict(SPLIT=True, PERSISTENT=True),
             dict(SPLIT=True))
    cfgs13 = [dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=warps, num_stages=stages, **g)
              for g, warps, stages in itertools.product(modes, (4, 8), (4, 5))]
    cfgs2 = [dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=64, num_warps=warps, num_stages=stages, PERSISTENT=True,
                  FLATTEN=True) for bn, warps, stages in itertools.product((256, 128), (4, 8), (4, 5))]
    _sweep(rows, x, w13, w13i, w2, wf, ids, w, n, k, s64, b64, act, y, ref13, ref2, ref, t_engine, cfgs13, cfgs2,
           "64-row blocks", iters)
    _print_rows(f"{T} tokens, TMA GEMMs on 64-row blocks", rows)


def tma_two_m(w13, w2, x, ids, w, iters):
    """The engine's TMA GEMMs (128-row blocks) against TWO_M blocks (launch_tma's TWO_M: 256 rows
    a block, each weight tile loaded once for two 128-row dots, the second skipped when its half
    holds no pairs): an expert with up to 256 pairs streams its weights once, where 128-row blocks
    stream them again for its partly filled last block (run CS: fewer rows of math in 64-row tiles
    did not help; the weight streams did not fall there). Gate/up tiles 64 columns wide (four
    128 x 64 accumulators when SPLIT), down 128. Each launch alone (GPU time, CUDA-graph replays),
    then the whole call on the fastest TWO_M tiles against fused_experts (the engine's choice)."""
    T, k, E, H, I, n, wf, cnt = _call_shapes(w2, ids, w)
    rows = [(f"weight streams a GEMM column: 128-row blocks {int(((cnt + 127) // 128).sum())}, 256-row TWO_M "
             f"blocks {int(((cnt + 255) // 256).sum())} (experts with pairs: {int((cnt > 0).sum())})",
             float("nan"), "")]
    t_engine, ref, s128, b128, act, y, ref13, ref2, w13i = _engine_tma_rows(rows, w13, w2, x, ids, w, wf, iters)
    s256, b256 = align(ids, E, 256)
    grids = (dict(PERSISTENT=True), dict(PERSISTENT=True, FLATTEN=True))
    cfgs13 = [dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=stages, SPLIT=split, TWO_M=True, **g)
              for split, g, stages in itertools.product((False, True), grids, (3, 4))]
    cfgs2 = [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=stages, TWO_M=True, **g)
             for g, stages in itertools.product(grids, (3, 4))]
    _sweep(rows, x, w13, w13i, w2, wf, ids, w, n, k, s256, b256, act, y, ref13, ref2, ref, t_engine, cfgs13, cfgs2,
           "TWO_M blocks", iters)
    _print_rows(f"{T} tokens, TMA GEMMs on TWO_M blocks", rows)


def tma_halves(w13, w2, x, ids, w, iters):
    """The engine's TMA GEMMs against TWO_M with 64-row halves on the engine's own 128-row blocks
    (align with 128): each weight tile loaded once feeds two 64-row dots, and the second is skipped
    when the block's last 64 rows hold no pairs, so an expert's last block with up to 64 pairs does
    half the math (at 2,048 tokens, top-8 of 128, about half the experts hold 129-192 pairs: one
    full block and one that is at most half full). The tiles stay as wide as the engine's (gate/up
    128 columns, down 256): two 64-row accumulators hold what one 128-row one does, where TWO_M's
    256-row blocks (run CV) had to halve the width. Each launch alone (GPU time, CUDA-graph
    replays), then the whole call on the fastest of each against fused_experts."""
    T, k, E, H, I, n, wf, cnt = _call_shapes(w2, ids, w)
    blocks = (cnt + 127) // 128
    last = cnt - 128 * (blocks - 1).clamp(min=0)
    halves = int((128 * (blocks - 1).clamp(min=0) + torch.where(last <= 64, 64, 128) * (cnt > 0)).sum())
    rows = [(f"rows of math a GEMM: 128-row blocks {int(blocks.sum()) * 128}, 64-row halves skipped when empty "
             f"{halves} (pairs {n})", float("nan"), "")]
    t_engine, ref, s128, b128, act, y, ref13, ref2, w13i = _engine_tma_rows(rows, w13, w2, x, ids, w, wf, iters)
    cfgs13 = [dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=stages, SPLIT=split, TWO_M=True,
                   PERSISTENT=True, FLATTEN=flat) for split, flat, stages in itertools.product((True, False),
                                                                                              (False, True), (3, 4))]
    cfgs2 = [dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=64, num_warps=8, num_stages=stages, TWO_M=True, PERSISTENT=True,
                  FLATTEN=flat) for bn, flat, stages in itertools.product((256, 128), (True, False), (3, 4))]
    _sweep(rows, x, w13, w13i, w2, wf, ids, w, n, k, s128, b128, act, y, ref13, ref2, ref, t_engine, cfgs13, cfgs2,
           "64-row halves", iters)
    _print_rows(f"{T} tokens, TMA GEMMs with 64-row halves on 128-row blocks", rows)


def tma_sorted(w13, w2, x, ids, w, iters):
    """The engine's TMA GEMMs against the sorted layout and warp specialisation (launch_tma's
    A_TMA / C_SORTED / WS): gate/up writes one row per slot of the 128-row align (C_SORTED), so the
    down GEMM reads its A tiles as TMA boxes (A_TMA) instead of gathering rows by pointer; gate/up's
    own A rows either gathered by pointer as now or gathered first into the sorted layout
    (sorted_rows, one index_select) and read by TMA; each with and without Triton's warp
    specialisation of the tile loop (producer warps issuing the loads: on Hopper, Triton's
    automatic WS). Each launch alone (GPU time, CUDA-graph replays) with its largest difference from
    the engine's output (sorted rows compared slot by slot), then whole calls built from them."""
    from engine.moe_kernels import TMA_DOWN, TMA_GATE_UP, sorted_rows
    T, k, E, H, I, n, wf, cnt = _call_shapes(w2, ids, w)
    rows = []
    t_engine, ref, s128, b128, act, y, ref13, ref2, _ = _engine_tma_rows(rows, w13, w2, x, ids, w, wf, iters)
    P = s128.numel()
    valid = s128 < n
    pairs = s128[valid].long()
    xs = sorted_rows(x, s128, k)
    rows.append((f"gather x into the sorted layout (sorted_rows: {P} rows for {n} pairs)",
                 graph_time(lambda: sorted_rows(x, s128, k), iters), ""))
    act_s = torch.zeros(P, I, dtype=x.dtype, device=x.device)

    def sorted_diff(out_s, want):
        return f"{(out_s[valid].float() - want[pairs].float()).abs().max().item():.4f}"

    best13 = (float("inf"), None)
    for ws, a_tma in itertools.product((False, True), (False, True)):
        c = dict(TMA_GATE_UP, C_SORTED=True, A_TMA=a_tma, WS=ws)
        a_in = xs if a_tma else x
        name = f"gate/up into the sorted layout, A {'by TMA (x gathered first)' if a_tma else 'by pointer'}" \
               f"{', WS' if ws else ''}"
        try:
            t = graph_time(lambda: launch_tma(a_in, w13, act_s, None, s128, b128, n, k, True, c), iters)
            rows.append((name, t, sorted_diff(act_s, ref13)))
            best13 = min(best13, (t, c), key=lambda r: r[0])
        except Exception as e:
            rows.append((f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}",
                         float("nan"), ""))
    _variant_row(rows, "gate/up, the engine's tiles, WS", lambda: launch_tma(
        x, w13, act, None, s128, b128, n, k, True, dict(TMA_GATE_UP, WS=True)), act, ref13, iters)
    launch_tma(x, w13, act_s, None, s128, b128, n, k, True, dict(TMA_GATE_UP, C_SORTED=True))  # a clean act_s
    best2 = (float("inf"), None)
    for ws in (False, True):
        c = dict(TMA_DOWN, A_TMA=True, WS=ws)
        t = _variant_row(rows, f"down, A by TMA from the sorted layout{', WS' if ws else ''}", lambda: launch_tma(
            act_s, w2, y, wf, s128, b128, n, 1, False, c), y, ref2, iters)
        best2 = min(best2, (t, c), key=lambda r: r[0])
    launch_tma(act, w2, y, wf, s128, b128, n, 1, False, TMA_DOWN)
    _variant_row(rows, "down, the engine's tiles, WS", lambda: launch_tma(
        ref13, w2, y, wf, s128, b128, n, 1, False, dict(TMA_DOWN, WS=True)), y, ref2, iters)

    def call(c13, c2):
        s, b = align(ids, E, 128)
        a_in = sorted_rows(x, s, k) if c13.get("A_TMA") else x
        a_s = torch.empty(P, I, dtype=x.dtype, device=x.device)
        launch_tma(a_in, w13, a_s, None, s, b, n, k, True, c13)
        out = torch.empty(n, H, dtype=x.dtype, device=x.device)
        launch_tma(a_s, w2, out, wf, s, b, n, 1, False, c2)
        return out.view(T, k, H).sum(1)

    combos = [(dict(TMA_GATE_UP, C_SORTED=True), dict(TMA_DOWN, A_TMA=True), "gate/up A by pointer, down A by TMA")]
    if best13[1] is not None and best2[1] is not None:
        combos.append((best13[1], best2[1], f"the fastest of each ({best13[1].get('A_TMA')} / WS "
                       f"{best13[1].get('WS')}, {best2[1].get('WS')})"))
    for c13, c2, label in combos:
        try:
            got = call(c13, c2)
            t = graph_time(lambda: call(c13, c2), iters)
        except Exception as e:
            rows.append((f"whole call, {label}: {type(e).__name__}", float("nan"), ""))
            continue
        rows.append((f"whole call, sorted layout, {label} ({t / t_engine:.3f}x the engine's)", t,
                     f"{(got.float() - ref.float()).abs().max().item():.4f}"))
    from engine.moe_kernels import sum_slots
    rows.append(("the sum over the k slots, torch (y.view(T, k, H).sum(1))", graph_time(
        lambda: y.view(T, k, H).sum(1), iters), ""))
    _variant_row(rows, "the sum over the k slots, Triton sum_slots", lambda: sum_slots(y, T, k),
                 sum_slots(y, T, k), y.view(T, k, H).sum(1), iters)
    _print_rows(f"{T} tokens, TMA GEMMs over the sorted layout, warp specialisation", rows)


def grouped_rows(w13, w2, x, ids, w, iters):
    """The engine's TMA GEMMs against torch._grouped_mm (CUTLASS's grouped GEMM on Hopper): the
    rows sorted by expert and not padded (each expert's run is as long as its pairs, where the
    engine's 128-row blocks pad it: ~1.45x the rows at 2,048 tokens), but the rows gathered
    before the GEMM, SiLU between them, and the routing weights and the sum over the k slots after,
    each a pass over memory. Each part alone (GPU time, CUDA-graph replays), then the whole call
    built from them, with its difference from fused_experts (the engine's choice)."""
    import torch.nn.functional as F
    T, k, E, H, I, n, wf, cnt = _call_shapes(w2, ids, w)
    rows = [(f"rows of math a GEMM: 128-row blocks {int(((cnt + 127) // 128).sum()) * 128}, sorted pairs {n}",
             float("nan"), "")]
    t_engine, ref, s128, b128, act, y, ref13, ref2, _ = _engine_tma_rows(rows, w13, w2, x, ids, w, wf, iters)
    flat = ids.reshape(-1)
    wt = w.to(x.dtype)

    def sort():
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        return order, torch.cumsum(counts, 0, dtype=torch.int32)

    order, offs = sort()
    xs = x[order // k]
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    a = F.silu(h[:, :I]) * h[:, I:]
    ys = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    back = torch.empty_like(ys)
    rows.append(("sort pairs by expert (argsort, counts, offsets)", graph_time(sort, iters), ""))
    rows.append(("gather the sorted rows (x[order // k])", graph_time(lambda: x[order // k], iters), ""))
    _variant_row(rows, "gate/up torch._grouped_mm on the sorted rows (then SiLU below)",
                 lambda: torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs), h, h, iters)
    rows.append(("SiLU(gate) * up (torch)", graph_time(lambda: F.silu(h[:, :I]) * h[:, I:], iters), ""))
    _variant_row(rows, "down torch._grouped_mm on the sorted rows", lambda: torch._grouped_mm(
        a, w2.transpose(1, 2), offs=offs), ys, ys, iters)

    def unsort():
        back[order] = ys
        return torch.bmm(wt.view(T, 1, k), back.view(T, k, H)).view(T, H)

    rows.append(("unsort, weight and sum the k slots (index_put, bmm)", graph_time(unsort, iters), ""))

    def down_unsort(a_sorted, order, offs):  # down on the sorted rows, back to (token, slot), weighted sum
        y = torch._grouped_mm(a_sorted, w2.transpose(1, 2), offs=offs)
        out = torch.empty_like(y)
        out[order] = y
        return torch.bmm(wt.view(T, 1, k), out.view(T, k, H)).view(T, H)

    def call():
        order, offs = sort()
        h = torch._grouped_mm(x[order // k], w13.transpose(1, 2), offs=offs)
        return down_unsort(F.silu(h[:, :I]) * h[:, I:], order, offs)

    def mixed():  # the engine's gate/up (rows gathered, SiLU fused), down on the sorted rows
        from engine.moe_kernels import TMA_GATE_UP
        order, offs = sort()
        s, b = align(ids, E, 128)
        act = torch.empty(n, I, dtype=x.dtype, device=x.device)
        launch_tma(x, w13, act, None, s, b, n, k, True, TMA_GATE_UP)
        return down_unsort(act[order], order, offs)

    for fn, label in ((call, "whole call from the parts above"),
                      (mixed, "whole call, gate/up the engine's, down torch._grouped_mm")):
        got = fn()
        t = graph_time(fn, iters)
        rows.append((f"{label} ({t / t_engine:.3f}x the engine's)", t,
                     f"{(got.float() - ref.float()).abs().max().item():.4f}"))
    _print_rows(f"{T} tokens, torch._grouped_mm on sorted rows", rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048, 8192])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--parts", action="store_true", help="time each launch alone, and ONE_DOT gate/up tiles")
    ap.add_argument("--wide", action="store_true", help="with --sweep: deeper pipelines and L2 groupings too "
                    "(for the 2048-token chunk's call, issue 11's chunked-prefill gap)")
    ap.add_argument("--wide-tiles", action="store_true", help="each GEMM alone on 256-wide tiles and other L2 "
                    "groupings, against the defaults (wide_tiles)")
    ap.add_argument("--tma-rows", action="store_true", help="the engine's TMA GEMMs against 64-row blocks "
                    "(less padding), and the whole call on them (tma_rows)")
    ap.add_argument("--tma-two-m", action="store_true", help="the engine's TMA GEMMs against TWO_M blocks (one "
                    "weight stream for up to 256 rows of an expert), and the whole call on them (tma_two_m)")
    ap.add_argument("--tma-halves", action="store_true", help="the engine's TMA GEMMs against TWO_M with 64-row "
                    "halves on 128-row blocks (an empty second half skipped), and the whole call (tma_halves)")
    ap.add_argument("--grouped", action="store_true", help="the engine's TMA GEMMs against torch._grouped_mm on "
                    "rows sorted by expert, unpadded, and the whole call built on it (grouped_rows)")
    ap.add_argument("--tma-sorted", action="store_true", help="the engine's TMA GEMMs against the sorted layout "
                    "(down's A rows by TMA) and warp specialisation, and whole calls on them (tma_sorted)")
    ap.add_argument("--tma", action="store_true", help="both GEMMs with their weights loaded by TMA, on full and "
                    "persistent grids, and the whole call with the fastest (tma_tiles)")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    E, H, I, k = a.experts, a.hidden, a.inter, a.top_k
    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02
    w2 = torch.randn(E, H, I, device=dev, dtype=dt) * 0.02
    print(f"E={E} H={H} I={I} top-{k}, bf16, {torch.cuda.get_device_name()}")
    print("| tokens | experts touched | floor ms | torch ms | fused ms | fused TFLOP/s | fused / torch | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    best_rows = []
    for T in a.tokens:
        x = torch.randn(T, H, device=dev, dtype=dt)
        ids, w = route(torch.randn(T, E, device=dev), k, True)
        touched = int(torch.unique(ids).numel())
        floor = touched * 3 * H * I * 2 / (a.hbm_tbps * 1e12) * 1e3
        iters = 50 if T <= 512 else 10
        t_torch = timeit(lambda: experts_sorted(w13, w2, x, ids, w, True), iters)
        t_fused = timeit(lambda: fused_experts(w13, w2, x, ids, w), iters)
        diff = (fused_experts(w13, w2, x, ids, w).float() - experts_sorted(w13, w2, x, ids, w, True).float()).abs().max()
        tflops = T * k * 3 * H * I * 2 / (t_fused * 1e-3) / 1e12
        print(f"| {T} | {touched} | {floor:.3f} | {t_torch:.3f} | {t_fused:.3f} | {tflops:.0f} | "
              f"{t_fused / t_torch:.2f}x | {diff.item():.4f} |")
        if a.parts:
            parts(w13, w2, x, ids, w, iters)
        if a.wide_tiles:
            wide_tiles(w13, w2, x, ids, w, iters)
        if a.tma:
            tma_tiles(w13, w2, x, ids, w, iters)
        if a.tma_sorted:
            tma_sorted(w13, w2, x, ids, w, iters)
        if a.tma_rows:
            tma_rows(w13, w2, x, ids, w, iters)
        if a.tma_two_m:
            tma_two_m(w13, w2, x, ids, w, iters)
        if a.tma_halves:
            tma_halves(w13, w2, x, ids, w, iters)
        if a.grouped:
            grouped_rows(w13, w2, x, ids, w, iters)
        if a.sweep:
            d13, d2 = configs(T * k, E)
            res13, res2 = [], []
            for c in grid(a.wide and T * k / E >= 64):
                try:
                    res13.append((timeit(lambda: fused_experts(w13, w2, x, ids, w, (c, d2)), iters), c))
                    res2.append((timeit(lambda: fused_experts(w13, w2, x, ids, w, (d13, c)), iters), c))
                except Exception as e:  # e.g. out of shared memory for this tile
                    print(f"  config {c} failed: {type(e).__name__}")
            best_rows.append((T, min(res13, key=lambda r: r[0]), min(res2, key=lambda r: r[0]), t_fused))
        sys.stdout.flush()
    if best_rows:
        print("\nbest tiles (whole call time with that tile for one GEMM, the default for the other)")
        print("| tokens | default ms | best gate/up | ms | best down | ms |\n|---|---|---|---|---|---|")
        for T, (t13, c13), (t2, c2), t in best_rows:
            print(f"| {T} | {t:.3f} | {c13} | {t13:.3f} | {c2} | {t2:.3f} |")


if __name__ == "__main__":
    main()
