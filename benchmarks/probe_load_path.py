"""Where a cpu-tier hit's load time goes, on CUDA (issue 10, item 3).

Stores a prompt's pages (12-layer Qwen3-30B-A3B shapes by default: 384 KiB a page) in a cpu tier
only, then times, median of --reps, for 8K and 32K tokens:

  pinned H2D, one copy     the floor's transfer: the same bytes from one pinned buffer in one copy
  get, device verify       TieredStore.get_pages(out=<cuda staging>): the engine's load path (H2D
                           from the pinned slab in parts, each part's page checksums computed on
                           the device beside the next part's copy: kvc.gpu_checksum)
  get, host verify         the same with store.verify_on_device False: the reader threads hash
                           the slab while the copy engine reads it (the path before the kernel)
  device sums              kvc.gpu_checksum.xxh3_64_rows over the pages already on the device,
                           for 1 KiB blocks per program step G = 1 / 2 / 4 / 8 (2 is the default)
  strided H2D, by layer    the same bytes as one strided copy per layer (kvc.cudacopy: rows of a
                           layer's bytes, a page apart) into a layer-major buffer
  ... slab runs            the strided copies get by layer issues, alone: one per layer and run of
                           adjacent slab slots (a run ends where the cpu tier's extent does; the
                           count is printed), no checksums
  ... beside gemm / hbm    the slab runs' copies (GPU time, events) while another stream runs
                           bf16 matmuls or memory-bound adds (does a step beside a load slow it?)
  kernel by layer          the same layers moved by kvc.hostcopy (one kernel a layer, the GPU
                           reading the pinned slab in place), with its cap on programs 32 / 96 / 264
  next launch after        host time of one small kernel launched right after every layer's copy
                           is queued (DMA / kernel): run BI saw it block until the copies drained
  get by layer             TieredStore.get_layers_into: the engine's layer-by-layer load (each layer
                           moved by strided DMA, then the device checksums over the layer-major rows);
                           ", kernel": each layer moved by kvc.hostcopy (store.layer_copy "kernel")
  host sums                the cpu tier's verify_entries of every page, no copy
  lookup                   TieredStore.lookup of the prompt's tokens (hashing included)

    python benchmarks/probe_load_path.py        # needs CUDA
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvc import cudacopy, gpu_checksum, hostcopy  # noqa: E402
from kvc.config import KvcConfig  # noqa: E402
from kvc.hashing import Namespace, PageSpec, page_hashes  # noqa: E402
from kvc.record import Page, torch_dtype  # noqa: E402
from kvc.store import TieredStore  # noqa: E402

GB = 1e9


def timed(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def beside(copies, work: str, reps: int) -> float:
    """GPU seconds of `copies` (queued on the current stream) while another stream runs `work`
    ("gemm": bf16 8192^3 matmuls, compute-bound; "hbm": adds over a 2 GiB tensor, memory-bound
    like a 64-token step's MoE) for longer than the copies take: run BM's engine saw its strided
    copies at 47 GB/s beside a step's kernels against 53.5 GB/s alone."""
    other = torch.cuda.Stream()
    if work == "gemm":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        op = lambda: a @ a  # noqa: E731
    else:
        a = torch.zeros(1 << 30, device="cuda", dtype=torch.bfloat16)
        op = lambda: a.add_(1)  # noqa: E731
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        with torch.cuda.stream(other):
            for _ in range(40):  # ~40-60 ms of work: longer than a 32K load's copies
                op()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        copies()
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    spec = PageSpec(num_layers=a.layers, num_kv_heads=a.kv_heads, head_dim=a.head_dim, page_size=a.page,
                    dtype="bfloat16")
    ns = Namespace("probe-load", spec, weights_digest="probe")
    longest = max(a.lengths)
    n_max = longest // a.page
    cfg = KvcConfig(cpu_memory_size_GB=n_max * spec.page_bytes * 1.25 / 2**30 + 0.25, disk_path=None)
    toks = np.random.default_rng(0).integers(0, 150_000, longest, dtype=np.uint32)
    hashes = page_hashes(ns.root, toks, a.page)
    g = torch.Generator().manual_seed(0)
    print(f"# page {spec.page_bytes / 2**10:.0f} KiB, {torch.cuda.get_device_name()}")
    print("| tokens | bytes | pinned H2D, one copy | strided H2D, by layer | ... slab runs | slab runs beside gemm / hbm work "
          "| kernel by layer 32 / 96 / 264 "
          "| next launch after DMA / kernel | get, device verify | get by layer (DMA) | get by layer, kernel | get, host verify "
          "| device sums G1 / G2 / G4 / G8 | host sums | lookup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with TieredStore(cfg) as s:
        parent = ns.root
        for lo in range(0, n_max, 64):
            batch = []
            for i in range(lo, min(n_max, lo + 64)):
                data = torch.empty(spec.page_bytes // 8, dtype=torch.int64).random_(generator=g)
                batch.append(Page(hashes[i], parent, toks[i * a.page:(i + 1) * a.page],
                                  data.view(torch_dtype(spec.dtype)).reshape(spec.shape)))
                parent = hashes[i]
            assert s.put_pages(ns, batch).stored == len(batch), "the cpu tier refused pages"
        for L in a.lengths:
            n = L // a.page
            nbytes = n * spec.page_bytes
            out = torch.empty((n, *spec.shape), dtype=torch_dtype(spec.dtype), device="cuda")
            src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            flat = out.view(torch.uint8).reshape(-1)
            h2d = timed(lambda: flat.copy_(src, non_blocking=True), a.reps)
            Ls, seg = spec.shape[0], spec.page_bytes // spec.shape[0]
            stream = torch.cuda.current_stream()

            def strided():
                for layer in range(Ls):
                    cudacopy.copy2d(flat.data_ptr() + layer * n * seg, seg, src.data_ptr() + layer * seg,
                                    spec.page_bytes, seg, n, stream)
            by_layer = timed(strided, a.reps)
            lm = out.view(-1).view(Ls, n, *spec.shape[1:])
            held = [s.cpu.entries[ns.root + bytes(h)] for h in hashes[:n]]
            runs = s._slab_runs(held, spec.page_bytes, 0, n)
            base = s.cpu.slab.data_ptr()

            def slab_runs():
                for layer in range(Ls):
                    for i, j in runs:
                        cudacopy.copy2d(flat.data_ptr() + (layer * n + i) * seg, seg,
                                        base + held[i].slot + layer * seg, spec.page_bytes, seg, j - i, stream)
            by_runs = timed(slab_runs, a.reps)
            by_runs_busy = [beside(slab_runs, w, a.reps) for w in ("gemm", "hbm")]

            offs = torch.tensor([e.slot // 8 for e in held], dtype=torch.int64, device="cuda")
            words = s.cpu.slab[:s.cpu.slab.numel() // 8 * 8].view(torch.int64)
            lm64 = flat.view(torch.int64).view(Ls, n, seg // 8)

            def kernel(ctas):
                for layer in range(Ls):
                    hostcopy.gather_rows(lm64[layer], words, offs, layer * seg // 8, ctas=ctas)
            by_kernel = [timed(lambda c=c: kernel(c), a.reps) for c in (32, 96, 264)]
            tiny = torch.zeros(1, device="cuda")

            def next_launch(queue):  # host seconds of one small launch right after the copies are queued
                torch.cuda.synchronize()
                queue()
                t0 = time.perf_counter()
                tiny.add_(1)
                t = time.perf_counter() - t0
                torch.cuda.synchronize()
                return t
            blocked = [statistics.median(next_launch(q) for _ in range(a.reps)) for q in (slab_runs, lambda: kernel(96))]

            def get_layers():
                assert s.get_layers_into(ns, hashes[:n], lm, lambda layer, run: None) == n
            default = s.layer_copy
            got = {}
            for how in ("dma", "kernel"):
                s.layer_copy = how
                try:
                    got[how] = timed(get_layers, a.reps)
                finally:
                    s.layer_copy = default
            assert s.layer_copy_off is None, s.layer_copy_off

            def get():
                got = s.get_pages(ns, hashes[:n], out=out)
                assert len(got) == n, f"{len(got)} of {n} pages"
            full = timed(get, a.reps)
            s.verify_on_device = False
            try:
                host = timed(get, a.reps)
            finally:
                s.verify_on_device = True
            rows = out.view(torch.uint8).reshape(n, -1)
            sums = [timed(lambda: gpu_checksum.xxh3_64_rows(rows, block_group=G), a.reps) for G in (1, 2, 4, 8)]
            check = timed(lambda: s.cpu.verify_entries(held), a.reps)
            look = timed(lambda: s.lookup(ns, tokens=toks[:L].tolist()), a.reps)

            def row(t):
                return f"{t * 1e3:.1f} ms ({nbytes / t / GB:.1f} GB/s)"
            print(f"| {L} | {nbytes / GB:.2f} GB | {row(h2d)} | {row(by_layer)} | {row(by_runs)}, {len(runs)} runs x {Ls} "
                  f"| {' / '.join(row(t) for t in by_runs_busy)} | {' / '.join(row(t) for t in by_kernel)} | {blocked[0] * 1e3:.2f} / {blocked[1] * 1e3:.2f} ms "
                  f"| {row(full)} | {row(got['dma'])} | {row(got['kernel'])} | {row(host)} | "
                  f"{' / '.join(f'{t * 1e3:.2f}' for t in sums)} ms | {row(check)} | {look * 1e3:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
