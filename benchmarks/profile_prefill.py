"""Where a long prefill's and a decode step's GPU time goes: kernel tables from torch.profiler.

For each case (kvc chunked, kvc one chunk, transformers; decode at 1 and 32 requests with CUDA
graphs) it prints the wall time of one profiled run, the GPU busy time (the union of kernel
intervals), the idle share, and the kernels grouped by name with their total time and count.
Issue 11's prefill and decode gaps are attributed from these tables.

    python benchmarks/profile_prefill.py --model-dir /tmp/kvc-q30b-12l --prompt-len 8192 32768
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import HF, cuda_engine, prompts  # noqa: E402


def short(name: str) -> str:
    """A kernel name without templates and arguments, so instances group together."""
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    return name[:70]


def kernel_table(fn, label: str, top: int) -> None:
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        with torch.profiler.record_function("profiled_call"):
            fn()
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    path = tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    os.unlink(path)
    kern = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kern)
    busy, end = 0.0, -1.0
    for s, e in spans:
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    first, last = (spans[0][0], max(e for _, e in spans)) if spans else (0, 0)
    call = [e for e in events if e.get("name") == "profiled_call" and "dur" in e and e.get("cat") != "gpu_user_annotation"]
    t0 = min((e["ts"] for e in call), default=first)
    by = collections.defaultdict(lambda: [0.0, 0])
    for e in kern:
        k = by[short(e["name"])]
        k[0] += e["dur"]
        k[1] += 1
    total = sum(v[0] for v in by.values())
    print(f"\n## {label}: wall {wall * 1e3:.1f} ms (profiled), GPU span {(last - first) / 1e3:.1f} ms, "
          f"busy {busy / 1e3:.1f} ms ({busy / max(last - first, 1) * 100:.0f}% of the span), "
          f"{len(kern)} kernels; first kernel at +{(first - t0) / 1e3:.2f} ms from the call's start, "
          f"last kernel ends at +{(last - t0) / 1e3:.2f} ms")
    print("| kernel | ms | share | count |\n|---|---|---|---|")
    for name, (dur, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {name} | {dur / 1e3:.2f} | {dur / max(total, 1) * 100:.1f}% | {n} |")
    # The GPU's idle stretches inside the span, longest first, with the kernels on either side: the
    # host work a step waits for shows here.
    ordered = sorted(kern, key=lambda e: e["ts"])
    gaps, end, prev = [], -1.0, None
    for e in ordered:
        if prev is not None and e["ts"] > end:
            gaps.append((e["ts"] - end, end, short(prev["name"]), short(e["name"])))
        if e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], e
    gaps.sort(reverse=True)
    if gaps:
        print(f"idle inside the span: {sum(g[0] for g in gaps) / 1e3:.2f} ms in {len(gaps)} gaps; longest:")
        for g, at, before, after in gaps[:6]:
            print(f"  {g / 1e3:.3f} ms at +{(at - t0) / 1e3:.2f} ms: after {before} -> before {after}")


def experts_table(cases: dict, ours) -> None:
    """Distinct experts each MoE layer routes a run's tokens to (eager, the router's choices read
    back): the MoE kernel streams each chosen expert's weights once, so two runs of as many tokens
    differ in MoE time by how many experts they touch, whatever the cache did."""
    from engine import moe_kernels
    real = moe_kernels.fused_route
    seen: list[int] = []

    def counting(logits, top_k, renormalize):
        ids, w = real(logits, top_k, renormalize)
        seen.append(int(ids.unique().numel()))
        return ids, w
    saved = ours.eng.runner.prefill_graphs
    ours.mode(prefill_graphs=False)
    moe_kernels.fused_route = counting
    try:
        print("\n| run (eager, router choices read back) | MoE layers | distinct experts a layer, mean | min | max |")
        print("|---|---|---|---|---|")
        for label, fn in cases.items():
            seen.clear()
            fn()
            if seen:
                print(f"| {label} | {len(seen)} | {sum(seen) / len(seen):.1f} | {min(seen)} | {max(seen)} |")
    finally:
        moe_kernels.fused_route = real
        ours.eng.runner.prefill_graphs = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--decode", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--decode-prompt-len", type=int, default=32,
                    help="each decoding request's own prompt; past 32 tokens the prompts are computed "
                         "once and the profiled call is their device hits then the 16 steps")
    ap.add_argument("--cases", default="prefill,decode,hf",
                    help="prefill (chunked and one chunk), hit (device-pool hit of the longest prompt "
                         "+ --hit-new tokens, and those tokens alone), decode, hf (transformers)")
    ap.add_argument("--hit-new", type=int, default=64)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    cases = set(a.cases.split(","))
    path, ours = cuda_engine(a.model_dir, a.layers, a.chunk, max(a.prompt_len) + a.hit_new, max(a.decode or [1]),
                             a.decode_prompt_len)
    if "hit" in cases:
        ours.mode(chunk=a.chunk)
        L = max(a.prompt_len)
        base = prompts(1, L, ours.vocab, 7)[0]
        ours._run([base], 1)  # now in the device pool
        for r in range(3):
            suffix, other = prompts(2, a.hit_new, ours.vocab, 1000 + r)

            def hit(p=base + suffix):
                _, _, got = ours._run([p], 1)
                assert got >= L, f"expected a device hit of {L} tokens, got {got}"

            def alone(p=other):
                ours._run([p], 1)
            if r < 2:
                hit(), alone()  # warm-up: graphs, plans
            else:
                kernel_table(hit, f"kvc device hit, {L} cached + {a.hit_new} new", a.top)
                kernel_table(alone, f"kvc {a.hit_new} new tokens alone", a.top)
                # fresh tokens: the runs above left theirs in the pool
                suffix, other = prompts(2, a.hit_new, ours.vocab, 2000)
                experts_table({"device hit": lambda p=base + suffix: ours._run([p], 1),
                               "other tokens alone": lambda p=other: ours._run([p], 1),
                               "the same new tokens alone": lambda p=suffix: ours._run([p], 1)}, ours)
        ours.eng.prefix_cache.reset_device_cache()
    for L in a.prompt_len if "prefill" in cases else []:
        for chunk, label in ((a.chunk, f"kvc {L} tokens, chunk {a.chunk}"), (L, f"kvc {L} tokens, one chunk")):
            ours.mode(chunk=chunk)
            run = ours.prefill(L, seed=L)
            run(), run()  # warm-up (autotune, allocator)
            kernel_table(run, label, a.top)
    ours.mode(chunk=a.chunk)
    for c in a.decode if "decode" in cases else []:
        n = a.decode_prompt_len
        ps = prompts(c, n, ours.vocab, 5)
        ours._run(ps, 8)  # warm-up; a long prompt stays in the device pool for the profiled call's hits
        if n <= 32:
            ours.eng.prefix_cache.reset_device_cache()

        def dec(ps=ps, ours=ours, n=n):
            ours._run(ps, 17)
            if n <= 32:
                ours.eng.prefix_cache.reset_device_cache()
        what = (f"after a {n}-token prefill" if n <= 32 else
                f"after device hits of {n}-token prompts (each request its own; the hits' last tokens computed)")
        kernel_table(dec, f"kvc decode, {c} requests x 16 steps {what} (graphs)", a.top)
    del ours
    torch.cuda.empty_cache()
    if not a.no_hf and "hf" in cases:
        hf = HF(str(path), argparse.Namespace(dtype="bfloat16", device="cuda"))
        for L in a.prompt_len:
            run = hf.prefill(L, seed=L)
            run(), run()
            kernel_table(run, f"transformers {L} tokens", a.top)


if __name__ == "__main__":
    main()
