"""One MoE layer's experts on the GPU: the torch path (sort, gather, torch._grouped_mm, scatter) against
the fused Triton kernels (engine.moe_kernels), Qwen3-30B-A3B expert shapes, by tokens per call.

Prints ms per call, the achieved TFLOP/s, and the weight-read floor (bytes of the experts touched /
--hbm-tbps). --sweep also times a grid of tile sizes per row count and prints the best (how the
defaults in engine.moe_kernels.configs were chosen).

    python benchmarks/bench_moe.py                    # H200
    python benchmarks/bench_moe.py --sweep
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.moe import experts_sorted, route  # noqa: E402
from engine.moe_kernels import configs, fused_experts  # noqa: E402


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048, 8192])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--wide", action="store_true", help="with --sweep: deeper pipelines and L2 groupings too "
                    "(for the 2048-token chunk's call, issue 11's chunked-prefill gap)")
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
