#!/usr/bin/env python
"""bench_put_cost: where the host tiers' cost to no-reuse throughput comes from (issue 10).

The workload of bench_gpu_reuse's throughput rows: --prompts unique --length-token prompts x 16
new tokens in one LLM.generate call, timed on the second batch (steady state), (prompt + output
tokens) / s. Each configuration is a new LLM on the same checkpoint, in one process:

  off            prefix_caching: false (the baseline)
  cpu            host tiers: a 4 GB cpu tier, no disk
  cpu+disk       4 GB cpu + disk (write-back): bench_gpu_reuse's "host tiers on"
  cpu+disk, no puts   the same, every offer dropped at the engine (HostTier.room answers no): what
                      the engine's side costs without any put work (lookups, registration)

For each it prints the CPU seconds every thread of the process used during the timed batch
(/proc/self/task/*/stat; Python threads by name), which says which threads compete with the
engine's thread for the host (and the GIL).

    python benchmarks/bench_put_cost.py --model-dir /tmp/kvc-q30b-12l     # H200: ~3 min
    python benchmarks/bench_put_cost.py --quick --device cpu              # a smoke run of the script

The first table also counts the cyclic GC's collections during the timed batch (each stops every
Python thread).
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import LLM, SamplingParams  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) per thread, keyed by name (Python name where there is one)."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # the thread ended meanwhile
        name = names.get(int(tid), comm)
        name = "engine (main)" if int(tid) == threading.main_thread().native_id else name.split("_")[0]
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


class GcTimes:
    """Cyclic-GC collections in a window (gc.callbacks): count, total and longest per generation.
    A collection stops every Python thread, the engine's included."""

    def __init__(self):
        self.by_gen: dict[int, list] = {}  # generation -> [count, total s, longest s]
        self._t0: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            dt = time.perf_counter() - self._t0
            r = self.by_gen.setdefault(info["generation"], [0, 0.0, 0.0])
            r[0] += 1
            r[1] += dt
            r[2] = max(r[2], dt)
            self._t0 = None

    def summary(self) -> str:
        return ", ".join(f"gen{g}: {c} in {t * 1e3:.1f} ms (longest {m * 1e3:.2f})"
                         for g, (c, t, m) in sorted(self.by_gen.items())) or "none"


def run(llm: LLM, rng: random.Random, n: int, length: int, vocab: int) -> tuple[float, dict[str, float], str]:
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = lambda: [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]  # noqa: E731
    llm.generate(prompts(), params)  # warm-up: kernels, allocator, tiers filling
    batch = prompts()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    before = thread_cpu()
    gct = GcTimes()
    gc.callbacks.append(gct)
    t0 = time.perf_counter()
    try:
        outs = llm.generate(batch, params)
    finally:
        dt = time.perf_counter() - t0
        gc.callbacks.remove(gct)
    after = thread_cpu()
    used = {k: after[k] - before.get(k, 0.0) for k in after}
    return sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs) / dt, used, gct.summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=None, help="default 48 (8 with --quick)")
    ap.add_argument("--length", type=int, default=None, help="default 2048 (512 with --quick)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny model, 8 prompts of 512: a smoke run")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_put_cost needs CUDA (--device cpu --quick is a smoke run of the script)")
    n, length, layers = (8, 512, 2) if a.quick else (48, 2048, a.layers)
    n, length = a.prompts or n, a.length or length
    model_dir = Path(a.model_dir or f"{tempfile.gettempdir()}/kvc-bench-{'tiny' if a.quick else 'q30b-shapes'}-{layers}l")
    if not (model_dir / "config.json").is_file():
        if a.quick:
            make_tiny_model(model_dir, "qwen3_moe", num_hidden_layers=layers, dtype="bfloat16",
                            max_position_embeddings=40960)
        else:
            make_tiny_model(model_dir, "qwen3_moe", preset="qwen3-30b-a3b-shapes", num_hidden_layers=layers,
                            dtype="bfloat16", std=0.02, device="cuda")
    vocab = 256 if a.quick else 150_000
    work = Path(tempfile.mkdtemp(prefix="kvc-put-cost-"))
    base = dict(dtype="bfloat16", device=a.device, page_size=16, chunk_size=2048)
    configs = [("off", dict(base, prefix_caching=False), False),
               ("cpu", dict(base, cpu_memory_size_GB=4, disk_path=None), False),
               ("cpu+disk", dict(base, cpu_memory_size_GB=4, disk_path=str(work / "a"), disk_size_GB=16), False),
               ("cpu+disk, no puts", dict(base, cpu_memory_size_GB=4, disk_path=str(work / "b"), disk_size_GB=16), True)]
    rng = random.Random(0)
    rows, threads = [], []
    for name, kw, no_puts in configs:
        llm = LLM(str(model_dir), **kw)
        host = llm.engine.prefix_cache.host
        if no_puts:
            host.room = lambda n, on_cuda: False  # every offer dropped before its gather
        tput, used, gcs = run(llm, rng, n, length, vocab)
        dropped = host.dropped_puts if host is not None else 0
        llm.close()
        del llm, host
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows.append((name, tput, dropped, gcs))
        top = sorted(used.items(), key=lambda kv: -kv[1])[:6]
        threads.append((name, ", ".join(f"{k} {v:.2f}" for k, v in top if v >= 0.01)))
        print(f"# {name}: {tput / 1e3:.1f}K tok/s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    off = rows[0][1]
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu (smoke run)"
    print(f"\n# {dev}, {layers} layers of {'tiny' if a.quick else 'Qwen3-30B-A3B'} shapes, bf16, page 16, chunk 2048; "
          f"{n} prompts x {length} tokens + 16 new, second batch timed")
    print("| configuration | tok/s | vs off | dropped put pages (both batches) | GC collections in the timed batch |")
    print("| --- | --- | --- | --- | --- |")
    for name, tput, dropped, gcs in rows:
        print(f"| {name} | {tput / 1e3:.1f}K | {tput / off:.2f}x | {dropped} | {gcs} |")
    print("\n| configuration | CPU seconds per thread during the timed batch (top 6) |")
    print("| --- | --- |")
    for name, t in threads:
        print(f"| {name} | {t} |")


if __name__ == "__main__":
    main()
