"""A layer's projections before attention on the GPU, Qwen3-30B-A3B shapes (hidden 2048, 32 q heads,
4 kv heads, head_dim 128, bf16): q, k and v as three GEMMs then the q/k norm + RoPE kernel (before
Attention.fuse_qkv), against one GEMM over the fused weight then the same kernel copying v out
(engine.layers' path since), at several heads a program of that kernel. GPU ms a call, from CUDA
graph replays (engine.prefill_graphs replays these steps), and the largest difference from the
three-GEMM path's q, k and v.

    python benchmarks/bench_qkv.py                     # tokens 1 32 2048 8192 32768
    python benchmarks/bench_qkv.py --tokens 2048
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_moe import graph_time  # noqa: E402
from engine.attention.triton_rope import qk_norm_rope  # noqa: E402
from engine.layers import Rope  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 2048, 8192, 32768])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 4], metavar=("HQ", "HKV"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_qkv needs CUDA")
    dev, dt = torch.device("cuda"), torch.bfloat16
    (Hq, Hkv), D, H = a.heads, a.head_dim, a.hidden
    g = torch.Generator(device=dev).manual_seed(0)
    wq, wk, wv = (torch.randn(n * D, H, device=dev, dtype=dt, generator=g) * 0.02 for n in (Hq, Hkv, Hkv))
    fused = torch.cat([wq, wk, wv])
    qw, kw = (torch.rand(D, device=dev, dtype=dt, generator=g) + 0.5 for _ in range(2))
    rope = Rope(D, 1e6).to(dev)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; hidden {H}, heads {Hq}/{Hkv}, "
          f"head_dim {D}, bf16; GPU ms a call (CUDA-graph replays of {a.iters})")
    hbs = (1, 2, 4, 8, 16)
    print("| tokens | three GEMMs + norm/RoPE (1 head a program) | of it the GEMMs | fused GEMM | "
          + " | ".join(f"fused GEMM + norm/RoPE/v copy, {hb} heads a program" for hb in hbs)
          + " | fused, best / three | max abs diff |")
    print("|---|---|---|---|" + "---|" * len(hbs) + "---|---|")
    for T in a.tokens:
        x = torch.randn(T, H, device=dev, dtype=dt, generator=g)
        cos, sin = rope.cos_sin(torch.arange(T, device=dev) % 40000, dt)
        bufs = tuple(torch.empty(T, n, D, device=dev, dtype=dt) for n in (Hq, Hkv, Hkv))

        def gemms():
            return (torch.mm(x, wq.t()).view(T, Hq, D), torch.mm(x, wk.t()).view(T, Hkv, D),
                    torch.mm(x, wv.t(), out=bufs[2].view(T, -1)))

        def three():
            q, k, _ = gemms()
            qk_norm_rope(q, k, qw, kw, 1e-6, cos, sin, bufs[:2], heads_per_program=1)

        def fused_gemm():
            return torch.mm(x, fused.t()).split((Hq * D, Hkv * D, Hkv * D), dim=1)

        def one(hb):
            def fn():
                q, k, v = fused_gemm()
                qk_norm_rope(q.view(T, Hq, D), k.view(T, Hkv, D), qw, kw, 1e-6, cos, sin, bufs,
                             v=v.view(T, Hkv, D), heads_per_program=hb)
            return fn

        three()
        want = tuple(b.clone() for b in bufs)
        t3, tg, tf = (graph_time(f, a.iters) for f in (three, gemms, fused_gemm))
        times, diff = [], 0.0
        for hb in hbs:
            for b in bufs:
                b.fill_(float("nan"))
            one(hb)()
            diff = max([diff] + [(b.float() - w.float()).abs().max().item() for b, w in zip(bufs, want)])
            times.append(graph_time(one(hb), a.iters))
        print(f"| {T:,} | {t3:.4f} | {tg:.4f} | {tf:.4f} | " + " | ".join(f"{t:.4f}" for t in times)
              + f" | {min(times) / t3:.2f}x | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
