"""The Python around each attention launch of a step with prefill pieces, on CPU.

kernel_attention runs once a layer outside the prefill CUDA graphs, and a hit's 64-token step is
launch-bound (runs AX-AZ in RESULTS.md), so host time there counts. Until the twelfth session it
and prefill_backend fetched the kernel functions with seven `from .x import y` statements a call;
they now take engine.attention's cached modules. This script times, per call: those seven imports,
the cached fetch, and prefill_backend for a short piece (the device hit's: 64 new tokens).

    python benchmarks/probe_dispatch.py [--calls 100000]
"""
from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine.attention as attention  # noqa: E402


def seven_imports():  # kernel_attention's five and prefill_backend's two, as they were
    from engine.attention.cudnn_prefill import cudnn_piece, cudnn_prefill  # noqa: F401
    from engine.attention.flash_prefill import flash_prefill, flash_usable  # noqa: F401
    from engine.attention.triton_cache import store_kv  # noqa: F401
    from engine.attention.triton_decode import decode_attention  # noqa: F401
    from engine.attention.triton_prefill import prefill_attention  # noqa: F401
    from engine.attention.cudnn_prefill import CUDNN_MAX_PIECES, cudnn_usable  # noqa: F401
    from engine.attention.flash_prefill import FLASH_MIN_Q  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100_000)
    a = ap.parse_args()
    attention._kernels()  # the modules imported once, as the engine's first step does
    q = torch.zeros(64, 32, 128)
    rows = [("seven `from .x import y` statements (kernel_attention + prefill_backend, before)", seven_imports),
            ("engine.attention._kernels() (now, once in each)", attention._kernels),
            ("prefill_backend(q, 64) (now)", lambda: attention.prefill_backend(q, 64))]
    print(f"# {a.calls:,} calls each, best of 5; us a call")
    print("| what | us |\n|---|---|")
    for label, fn in rows:
        us = min(timeit.repeat(fn, number=a.calls, repeat=5)) / a.calls * 1e6
        print(f"| {label} | {us:.2f} |")


if __name__ == "__main__":
    main()
