"""Where a short DeepSeek prefill step's time goes: host (Python) against GPU.

bench_deepseek's TTFT table (run FQ, H200, 8 layers of V2-Lite shapes) gave 64 tokens with nothing
cached 13-20 ms, nearly all of it the first step's host time, while the same step's GPU work should be
a few ms. This probe builds the engine as bench_deepseek does (device pool only, chunk --chunk),
warms it up, then (--compare-eager: first on an engine whose prefill steps are eager, the same
prompts) for --n fresh --tokens-token prompts: the TTFT and each step's host ms; the GPU
span of the prompt's step (CUDA events around runner.logits: the forward, as graphs or eager, and
the lm_head; idle gaps included); the kernel table of one request (busy against span); a cProfile of those requests
(the --top functions by own time and by cumulative time); and torch.profiler's CPU-side ops by
count and host time, with the synchronising calls (cudaStreamSynchronize, cudaMemcpy*, ...) named.

    python benchmarks/probe_deepseek_step.py                      # CUDA, V2-Lite shapes, 8 layers
    python benchmarks/probe_deepseek_step.py --cached 32768       # each step a device hit after 32K
    python benchmarks/probe_deepseek_step.py --quick              # CPU, tiny shapes (a smoke run)
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deepseek import QUICK, close, engine, rand_prompts, sync, ttft  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--cached", type=int, default=0,
                    help="a shared prefix of this many tokens before each prompt, prefilled once and kept in "
                         "the device pool (each timed step a device hit); 0: nothing cached")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--mla-tile", default=None,
                    help="MxNxWxS: the MLA kernel's launch for prefill pieces (rows a program, keys a tile, warps, "
                         "stages; engine.attention.triton_mla.PIECE_*); default the engine's")
    ap.add_argument("--compare-eager", action="store_true",
                    help="first the same prompts on an engine with model.prefill_graph_tokens 0")
    a = ap.parse_args()
    if a.mla_tile:
        from engine.attention import triton_mla
        (triton_mla.PIECE_BLOCK_M, triton_mla.PIECE_BLOCK_N, triton_mla.PIECE_WARPS,
         triton_mla.PIECE_STAGES) = (int(v) for v in a.mla_tile.split("x"))
    dev = torch.device("cpu" if a.quick or not torch.cuda.is_available() else "cuda")
    dtype = "float32" if dev.type == "cpu" else "bfloat16"
    # the pool holds the prefix too (sized from ttft_len)
    ns = argparse.Namespace(ttft_len=[a.cached + a.tokens], kt_len=0, prefill_len=[a.tokens], delta=a.tokens,
                            concurrency=[1], decode_prompt_len=32, decode_tokens=8, dtype=dtype, device=dev,
                            chunk=a.chunk)
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(QUICK, num_hidden_layers=3) if a.quick else dict(preset="deepseek-v2-lite-shapes",
                                                                  num_hidden_layers=a.layers)
        path = make_tiny_model(Path(tmp) / "model", "deepseek_v2", dtype=dtype, std=0.02, device=str(dev), **kw)
        eng = engine(path, ns)
        name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
        print(f"# DeepSeek-V2 {'tiny' if a.quick else 'V2-Lite'} shapes, {len(eng.model.model.layers)} layers, "
              f"{dtype}, {name}, torch {torch.__version__}; {a.tokens}-token prompts, "
              f"{f'after {a.cached} cached tokens (device hits)' if a.cached else 'nothing cached'}, chunk {a.chunk}"
              f"{f', MLA pieces tile {a.mla_tile}' if a.mla_tile else ''}")
        V = eng.args.vocab_size
        prefix = rand_prompts(1, a.cached, V, 99)[0] if a.cached else []
        ps = [prefix + p for p in rand_prompts(3 * a.n + 4, a.tokens, V, 5)]

        def reset(e) -> None:  # nothing cached: each prompt cold; else the prefix stays in the pool
            if not a.cached:
                e.prefix_cache.reset_device_cache()
        for p in ps[:4]:  # warm-up: compiles, autotune, allocator (and the prefix, prefilled once)
            ttft(eng, p)
            reset(eng)

        if a.compare_eager:  # the same prompts on an engine whose prefill steps are eager, first
            plain = engine(path, ns, prefill_graph_tokens=0)
            for p in ps[:4]:
                ttft(plain, p)
                reset(plain)
            eager = []
            for p in ps[4:4 + a.n]:
                eager.append(ttft(plain, p)[0])
                reset(plain)
            print(f"\nprefill steps eager (model.prefill_graph_tokens 0), TTFT ms: "
                  f"{' / '.join(f'{t * 1e3:.2f}' for t in eager)} (median {statistics.median(eager) * 1e3:.2f})")
            close(plain)

        # (1) TTFT and host ms a step; the GPU span of runner.logits (CUDA events)
        gpu_ms = []
        fwd = eng.runner.logits
        if dev.type == "cuda":
            def timed_forward(*args, **kw):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = fwd(*args, **kw)
                e.record()
                gpu_ms.append((s, e))
                return out
            eng.runner.logits = timed_forward
        rows = []
        for p in ps[4:4 + a.n]:
            t, cached = ttft(eng, p)
            reset(eng)
            assert cached >= a.cached // 16 * 16 - 16, f"expected a device hit of the prefix, {cached} cached"
            rows.append((t, eng._last))
        sync(dev)
        if dev.type == "cuda":
            eng.runner.logits = fwd
        med = statistics.median
        print("\n| TTFT ms | add_request ms | steps | first step host ms | later steps host ms |\n"
              "|---|---|---|---|---|")
        for t, d in rows:
            print(f"| {t * 1e3:.2f} | {d['add'] * 1e3:.2f} | {len(d['steps'])} | {d['steps'][0] * 1e3:.2f} "
                  f"| {sum(d['steps'][1:]) * 1e3:.2f} |")
        if gpu_ms:
            g = [s.elapsed_time(e) for s, e in gpu_ms]
            pg = eng.runner.prefill_graphs
            print(f"\nrunner.logits GPU span ms (CUDA events), {len(g)} calls: median {med(g):.2f}, "
                  f"min {min(g):.2f}, max {max(g):.2f}; prefill graph replays so far: "
                  f"{pg.replays if pg is not None else 'no prefill graphs'}")

        if dev.type == "cuda":  # the GPU's kernels for one request (profile_prefill's table)
            from profile_prefill import kernel_table

            def one(p=ps[-1]):
                ttft(eng, p)
                reset(eng)
            kernel_table(one, f"one {a.tokens}-token request", a.top)

        # (2) cProfile of n requests
        prof = cProfile.Profile()
        prof.enable()
        for p in ps[4 + a.n:4 + 2 * a.n]:
            ttft(eng, p)
            reset(eng)
        prof.disable()
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(a.top)
            text = buf.getvalue()
            start = text.find("   ncalls")
            print(f"\n### cProfile, {a.n} requests, by {key}\n```\n{text[start:].rstrip()}\n```")

        # (3) torch.profiler: CPU-side ops, the synchronising calls
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as tp:
            for p in ps[4 + 2 * a.n:4 + 3 * a.n]:
                ttft(eng, p)
                reset(eng)
        ka = tp.key_averages()
        print(f"\n### torch.profiler, {a.n} requests: ops by host time (self)\n| op | calls | self host ms | "
              f"host ms a request |\n|---|---|---|---|")
        for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:a.top]:
            print(f"| {e.key[:70]} | {e.count} | {e.self_cpu_time_total / 1e3:.2f} | "
                  f"{e.self_cpu_time_total / 1e3 / a.n:.3f} |")
        syncs = [e for e in ka if any(s in e.key for s in ("Synchronize", "Memcpy", "item", "_local_scalar_dense",
                                                            "nonzero", "EventSynchronize"))]
        print("\n| synchronising or copying call | calls a request | host ms a request |\n|---|---|---|")
        for e in sorted(syncs, key=lambda e: -e.cpu_time_total):
            print(f"| {e.key[:70]} | {e.count / a.n:g} | {e.cpu_time_total / 1e3 / a.n:.3f} |")
        close(eng)


if __name__ == "__main__":
    main()
