"""Strided host-to-device copy bandwidth by row width (CUDA): a layered cpu-tier load's two ways.

A 32K-token load of Qwen3-30B-A3B-shaped pages (384 KiB a page, 12 layers of K and V, 16 KiB each)
moves each layer as strided DMA (kvc.cudacopy): into a staging buffer, rows of a whole layer (K and
V, 32 KiB), or straight into the pool's blocks, rows of one part (16 KiB) twice. Run DR read the
second 37.5 GB/s against ~46 for the first: this probe times the copies alone, pinned slab to
device, median of --repeats, each way in one loop so both see the same machine state.

    python benchmarks/probe_copy_rows.py [--pages 2048] [--layers 12] [--part-kib 16] [--runs 13]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from kvc import cudacopy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--part-kib", type=int, default=16)
    ap.add_argument("--runs", type=int, default=13, help="slab runs a layer is copied in (a real load's ~13)")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    n, L, part = a.pages, a.layers, a.part_kib << 10
    seg, page = 2 * part, 2 * part * L
    slab = torch.empty(n * page, dtype=torch.uint8, pin_memory=True)
    slab.random_(0, 256)
    dev = torch.cuda.current_device()
    stream = torch.cuda.Stream(dev)
    staging = torch.empty((L, n, seg), dtype=torch.uint8, device=dev)
    pool = torch.empty((L, 2, n, part), dtype=torch.uint8, device=dev)
    bounds = [round(i * n / a.runs) for i in range(a.runs + 1)]
    runs = [(i, j) for i, j in zip(bounds, bounds[1:]) if j > i]
    src0 = slab.data_ptr()

    def staged() -> None:
        for layer in range(L):
            row0 = staging.data_ptr() + layer * n * seg
            cudacopy.copy2d_many([(row0 + i * seg, seg, src0 + i * page + layer * seg, page, seg, j - i)
                                  for i, j in runs], stream)

    def direct() -> None:
        stride = n * part
        for layer in range(L):
            top = pool.data_ptr() + layer * 2 * stride
            cudacopy.copy2d_many([(top + p * stride + i * part, part, src0 + i * page + layer * seg + p * part, page,
                                   part, j - i) for i, j in runs for p in range(2)], stream)

    def direct_layer_major() -> None:  # the parts' loops the other way: all K rows of a layer, then V
        stride = n * part
        for layer in range(L):
            top = pool.data_ptr() + layer * 2 * stride
            cudacopy.copy2d_many([(top + p * stride + i * part, part, src0 + i * page + layer * seg + p * part, page,
                                   part, j - i) for p in range(2) for i, j in runs], stream)

    def whole() -> None:  # 1D: whole pages, one copy a run (the floor's kind of copy)
        flat = staging.view(-1)
        for i, j in runs:
            flat[i * page:j * page].copy_(slab[i * page:j * page], non_blocking=True)

    ways = {"whole pages (1D)": whole, "layer rows, 32 KiB (staging)": staged,
            "part rows, 16 KiB, K and V each run (pool)": direct, "part rows, 16 KiB, all K then all V (pool)": direct_layer_major}
    times = {k: [] for k in ways}
    with torch.cuda.stream(stream):
        for _ in range(a.repeats):
            for name, fn in ways.items():
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                stream.synchronize()
                t0.record(stream)
                fn()
                t1.record(stream)
                t1.synchronize()
                times[name].append(t0.elapsed_time(t1) / 1e3)
    total = n * page
    print(f"# {torch.cuda.get_device_name()}; {n} pages of {page >> 10} KiB ({total / 1e9:.2f} GB), {len(runs)} slab runs, "
          f"median of {a.repeats}")
    print("| copy | ms | GB/s |\n|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t * 1e3:.2f} | {total / t / 1e9:.1f} |")
    beside(a, staged, stream, total, dev)


def beside(a, staged, stream, total: int, dev) -> None:
    """The staged layer copies (a 32K load's) alone and with other GPU work queued on another stream
    for their whole length: HBM-bound reads (a 1.2 GB weight tensor summed again and again, as the
    step's MoE reads a layer's experts), index_copy scatters of 64 MiB (a layer's), and bf16 matmuls
    (SM-bound, little HBM traffic). Which of them slows the DMA says what a cpu hit's copies wait for."""
    other = torch.cuda.Stream(dev)
    weights = torch.empty(600 << 20, dtype=torch.bfloat16, device=dev).normal_()  # 1.2 GB
    rows = torch.empty((2048, 16384), dtype=torch.uint8, device=dev)  # 32 MiB a scatter side
    pool = torch.empty((4096, 16384), dtype=torch.uint8, device=dev)
    index = torch.randperm(4096, device=dev)[:2048]
    x = torch.randn((8192, 8192), dtype=torch.bfloat16, device=dev)
    loads = {"alone": None,
             "beside HBM reads (1.2 GB sums)": lambda: weights.sum(),
             "beside index_copy scatters (64 MiB moved each)": lambda: pool.index_copy_(0, index, rows),
             "beside bf16 matmuls (8192^3)": lambda: x @ x}
    reps = {}
    for name, fn in loads.items():  # enough of each to outlast the copies (~15 ms alone): 30 ms of it
        if fn is None:
            continue
        fn()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(5):
            fn()
        t1.record()
        t1.synchronize()
        one = t0.elapsed_time(t1) / 5 / 1e3
        reps[name] = max(1, min(2000, int(0.030 / max(one, 1e-6)) + 1))
        print(f"# {name}: {one * 1e3:.3f} ms each, {reps[name]} queued beside each copy")
    times = {k: [] for k in loads}
    for _ in range(a.repeats):
        for name, fn in loads.items():
            torch.cuda.synchronize()
            if fn is not None:
                with torch.cuda.stream(other):
                    for _ in range(reps[name]):
                        fn()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                t0.record(stream)
                staged()
                t1.record(stream)
            t1.synchronize()
            times[name].append(t0.elapsed_time(t1) / 1e3)
    torch.cuda.synchronize()
    print("\n| layer rows, 32 KiB (staging), with | ms | GB/s |\n|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t * 1e3:.2f} | {total / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()
