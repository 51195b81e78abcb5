"""The engine thread's host work per step in the no-reuse throughput workload, on the CPU.

A one-layer tiny model (hidden 64) makes the model's own compute small, so what a step costs here
is mostly the engine's Python: outputs, scheduling and admission, prepare, page registration and
offers. The workload is bench_gpu_reuse's throughput row (n fresh prompts of `length` tokens, 16
new tokens each, page 16, chunk 2048, 2048 tokens a step). With async scheduling on a GPU this host
work is what must fit under each step's GPU time; where it does not, the GPU idles (run BQ: 27-30%
of a batch). Prints ms a step with caching off and with host tiers on, and cProfile's top functions
of one batch (own time, engine/ and kvc/ code and the calls they make).

    python benchmarks/probe_engine_host.py [--prompts 48] [--length 2048] [--top 25]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402


def batch(llm: LLM, rng: random.Random, n: int, length: int, vocab: int, prof: cProfile.Profile | None = None):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]
    eng = llm.engine
    steps = 0
    real = eng.step

    def counted():
        nonlocal steps
        steps += 1
        return real()
    eng.step = counted
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    llm.generate(prompts, params)
    if prof is not None:
        prof.disable()
    dt = time.perf_counter() - t0
    del eng.step
    if eng.prefix_cache.host is not None:
        eng.prefix_cache.flush()
    return dt, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kvc-host-probe-"))
    model = make_tiny_model(work / "model", "qwen3_moe", num_hidden_layers=1, max_position_embeddings=8192)
    base = dict(dtype="float32", device="cpu", page_size=16, chunk_size=2048)
    kinds = {"prefix_caching off": dict(base, prefix_caching=False),
             "host tiers on (cpu + disk)": dict(base, cpu_memory_size_GB=2, disk_path=str(work / "pages"),
                                                disk_size_GB=4)}
    rng = random.Random(0)
    print(f"# {a.prompts} prompts x {a.length} tokens, 16 new each; one-layer tiny model on the CPU\n")
    print("| engine | batch ms | steps | ms a step |\n|---|---|---|---|")
    profiles = {}
    for name, kw in kinds.items():
        llm = LLM(str(model), **kw)
        batch(llm, rng, a.prompts, a.length, 272)  # warm-up
        dt, steps = batch(llm, rng, a.prompts, a.length, 272)
        print(f"| {name} | {dt * 1e3:,.0f} | {steps} | {dt / steps * 1e3:.2f} |", flush=True)
        prof = cProfile.Profile()
        batch(llm, rng, a.prompts, a.length, 272, prof)
        profiles[name] = prof
        llm.close()
    for name, prof in profiles.items():
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out)
        st.sort_stats("tottime").print_stats(a.top)
        print(f"\n## {name}: top {a.top} by own time (one batch, profiled)\n")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:8000])


if __name__ == "__main__":
    main()
