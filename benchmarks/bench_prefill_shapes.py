"""Cold prefill of prompts whose lengths the engine has not seen before, per prefill kernel.

cuDNN's attention builds an execution plan per new (query, key) shape and PyTorch caches it per
shape; the other benchmarks warm every shape they time, so they cannot show what a first-seen
length costs. Serving sees arbitrary prompt lengths. For each attn.prefill_kernel this prints the
median TTFT of --n prompts of distinct random lengths seen for the first time (A), the same prompts
again (their shapes now cached), then --n more new lengths (B): with a bounded set of shapes (cuDNN's
bucketed pieces), B costs what A again does; with a plan per length it costs what A did first.

    python benchmarks/bench_prefill_shapes.py --model-dir /tmp/kvc-q30b-12l      # H200
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import cuda_engine, prompts  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--n", type=int, default=12, help="distinct prompt lengths per kernel")
    ap.add_argument("--min-len", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=9000)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--kernels", default="cudnn,flash,triton")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    _, ours = cuda_engine(a.model_dir, a.layers, a.chunk, a.max_len)
    ours.mode(chunk=a.chunk)
    ours.prefill(2048, seed=1)()  # compile the Triton kernels on an unrelated length first
    rng = random.Random(0)
    print("| prefill kernel | first-seen lengths A: median TTFT | A again | new lengths B (after A) | "
          "A first / again | B / A again | lengths |")
    print("|---|---|---|---|---|---|---|")
    used: set[int] = {2048}

    def fresh() -> list[int]:
        out = []
        while len(out) < a.n:
            L = rng.randrange(a.min_len, a.max_len)
            if L not in used:  # never seen by any kernel: every length is new to the engine
                used.add(L)
                out.append(L)
        return out

    def median_ttft(lengths: list[int]) -> float:
        times = []
        for L in lengths:
            p = prompts(1, L, ours.vocab, seed=L)[0]
            torch.cuda.synchronize()
            t = time.perf_counter()
            ours._run([p], 1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            ours.eng.prefix_cache.reset_device_cache()
        return statistics.median(times)
    for kernel in a.kernels.split(","):
        ours.mode(prefill=kernel)
        A, B = fresh(), fresh()
        first, again, later = median_ttft(A), median_ttft(A), median_ttft(B)
        print(f"| {kernel} | {first * 1e3:.1f} ms | {again * 1e3:.1f} ms | {later * 1e3:.1f} ms | "
              f"{first / again:.2f}x | {later / again:.2f}x | {min(A + B)}-{max(A + B)} |", flush=True)

if __name__ == "__main__":
    main()
