"""CPU-offloaded MoE experts: tokens/s by placement strategy and device-expert ratio, and overlap.

A stack of --layers random MoE layers with Qwen3-30B-A3B expert shapes (hidden 2048,
moe_intermediate 768, 128 experts, top-8) and routing skewed as real traffic is: each layer's
router logits get a bias of log(Zipf prior) over a per-layer random ranking of its experts. Only
the MoE part runs (router + experts + residual), so the numbers isolate the expert split.
A calibration pass through the recorder writes the `.pt` that `frequency` then reads (record ->
restart with frequency, as an operator would). Columns follow KTransformers' table
(research/engine.md 2.7); `dynamic` is uniform + experts.dynamic_update with the threshold at the
prefill size (prefill runs layerwise on the device and re-picks; decode then uses the new pick).

Overlap ratio = hybrid layer time / max(CPU part alone, device part alone), on the first layer.
The 0% check compares the 0% layer with its CPU experts alone (same pairs, same worker thread).

    python benchmarks/bench_offload.py --quick                 # CPU smoke run, small shapes
    python benchmarks/bench_offload.py --device cuda           # H200: bf16, 6 layers, ~3-5 min
    python benchmarks/bench_offload.py --cpu-layer --device cuda   # per-layer CPU experts vs floor, ~1-2 min
    python benchmarks/bench_offload.py --cpu-steps --device cuda   # the same inside back-to-back decode steps
    python benchmarks/bench_offload.py --e2e --device cuda         # 8K cold + 64-token delta TTFT, 12 layers
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvc.config import load_config  # noqa: E402
from engine.moe import MoEBlock, route  # noqa: E402
from engine.offload import apply_experts, cpu_experts, device_experts, load_counts  # noqa: E402
from engine.offload import native  # noqa: E402
from engine.offload.grouped import ExpertThreads, grouped_cpu_experts, prepare  # noqa: E402
from engine.offload.runtime import amx  # noqa: E402

FULL = dict(hidden=2048, inter=768, experts=128, top_k=8, layers=6, decode=32, prefill=2048)
QUICK = dict(hidden=256, inter=128, experts=32, top_k=4, layers=2, decode=8, prefill=256)
STRATEGIES = ("random", "uniform", "front-loading", "frequency", "dynamic")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(s, dtype, device, zipf, seed=0):
    """MoE blocks with random experts and a Zipf-biased router per layer."""
    g = torch.Generator(device=device).manual_seed(seed)
    H, I, E = s["hidden"], s["inter"], s["experts"]
    blocks = {}
    prior = torch.arange(1, E + 1, dtype=torch.float64) ** -zipf
    for i in range(s["layers"]):
        b = MoEBlock(H, I, E, s["top_k"], True).to(device=device, dtype=dtype)
        b.gate = nn.Linear(H, E, bias=True, device=device, dtype=dtype)
        with torch.no_grad():
            b.gate.weight.copy_(torch.randn(E, H, generator=g, device=device) / H ** 0.5)
            rank = torch.randperm(E, generator=torch.Generator().manual_seed(seed * 100 + i))
            b.gate.bias.copy_(prior[rank].log().to(device))
            b.experts.w13.copy_(torch.randn(E, 2 * I, H, generator=g, device=device) * 0.02)
            b.experts.w2.copy_(torch.randn(E, H, I, generator=g, device=device) * 0.02)
        b.requires_grad_(False)
        blocks[i] = b
    return blocks


def forward(blocks, x):
    for i in sorted(blocks):
        x = x + blocks[i](x)
    return x


def inputs(T, H, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(T, H, generator=g, device=device).to(dtype)


def experts_cfg(**kw):
    return dataclasses.replace(load_config().experts, **kw)


def hot_share(path, layers, E):
    """Share of routed pairs that go to the hottest half of each layer's experts (the skew)."""
    c = load_counts(path, layers, E)
    top = c.sort(dim=1, descending=True).values[:, :E // 2].sum()
    return float(top / c.sum())


def calibrate(blocks, s, dtype, device, out_dir):
    rt = apply_experts(blocks, s["layers"], experts_cfg(record_expert_stats=str(out_dir)), device,
                       CollectorRegistry())
    for seed in range(4):
        forward(blocks, inputs(s["prefill"], s["hidden"], dtype, device, 1000 + seed))
    rt.close()  # writes the file; the next apply_experts replaces the recording backends
    return rt.recorder.path


def run_config(blocks, s, dtype, device, strategy, ratio, stats, a):
    kw = dict(gpu_experts_ratio=ratio, cpu_expert_dtype=a.cpu_dtype)
    if strategy == "dynamic":
        kw.update(placement_strategy="uniform", dynamic_update=True, gpu_prefill_token_threshold=s["prefill"])
    else:
        kw.update(placement_strategy=strategy, init_expert_location=str(stats) if strategy == "frequency" else None)
    rt = apply_experts(blocks, s["layers"], experts_cfg(**kw), device, CollectorRegistry())
    xp = inputs(s["prefill"], s["hidden"], dtype, device, 1)
    xd = inputs(s["decode"], s["hidden"], dtype, device, 2)
    t_pre = timed(lambda: forward(blocks, xp), device, a.iters_prefill)
    t_dec = timed(lambda: forward(blocks, xd), device, a.iters_decode, warmup=2)
    return rt, s["prefill"] / t_pre, s["decode"] / t_dec


def overlap(blocks, rt, s, dtype, device, T, a):
    """(hybrid, its CPU job, cpu part alone, device part alone): median seconds, first layer, T tokens.

    The three are timed in turn inside one loop so that drift in the CPU's speed hits all three.
    """
    i = min(blocks)
    b, be = blocks[i], rt.backends[i]
    x = inputs(T, s["hidden"], dtype, device, 3)
    with torch.inference_mode():
        ids, w = route(b.gate(x), b.top_k, b.renormalize)
        slots = be.logical_to_slot[ids]
        hx, hids, hw = x.cpu(), ids.masked_fill(slots >= 0, -1).cpu(), w.cpu()
    out = torch.empty(T, s["hidden"])

    def cpu_once():
        with torch.inference_mode():
            t = time.perf_counter()
            if be.ctx.grouped_cpu:  # the kernel the worker's job runs (native, or torch's grouped kernels)
                grouped_cpu_experts(be.cpu, hx, hids, hw, out, be.ctx.worker.experts)
            else:
                cpu_experts(be.cpu.w13, be.cpu.w2, hx, hids, hw, out)
            return time.perf_counter() - t

    def dev_once():
        if be.num_slots:
            device_experts(be.slot13, be.slot2, x, slots, w, be.ctx.grouped)

    hist = be.ctx.metrics.cpu_seconds

    def job_sum():
        return next(m.value for m in hist.collect()[0].samples if m.name.endswith("_sum"))

    times = []
    with torch.inference_mode():
        for n in range(2 * a.iters_decode + 2):
            before = job_sum()
            row = (timed(lambda: be.forward(x, ids, w), device, 1, warmup=0), job_sum() - before,
                   be.ctx.worker.submit(cpu_once).result(),  # same thread and thread count as the real job
                   timed(dev_once, device, 1, warmup=0) if be.num_slots else 0.0)
            if n >= 2:
                times.append(row)
    return tuple(statistics.median(r[j] for r in times) for j in range(4))


def table(title, rows, ratios, strategies):
    print(f"\n{title}")
    print("| GPU expert ratio | " + " | ".join(strategies) + " |")
    print("|---|" + "---|" * len(strategies))
    for r in ratios:
        print(f"| {r}% | " + " | ".join(f"{rows[(st, r)]:.1f}" for st in strategies) + " |")


def cpu_threads(device):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1) if device.type == "cuda" else torch.get_num_threads()


def read_bandwidth(gib, threads):
    """Host read bandwidth, bytes/s: torch.sum over `gib` GiB of fp32 with `threads` threads, best of 3."""
    t0 = torch.get_num_threads()
    torch.set_num_threads(threads)
    big = torch.ones(int(gib * 2 ** 30) // 4)
    big.sum()
    best = min(timed(big.sum, torch.device("cpu"), 1, warmup=0) for _ in range(3))
    torch.set_num_threads(t0)
    return big.nbytes / best


def _cpu_setup(a, s):
    """What --cpu-layer and --cpu-steps share: the thread count (set for torch too), the expert
    thread pool, the host read bandwidth, the generator, half of the experts' weights (the CPU's:
    50% GPU experts, logical ids E/2.. renumbered 0..E/2-1) and the Zipf routing prior."""
    H, I, E = s["hidden"], s["inter"], s["experts"]
    Ec = E // 2
    P = a.threads or cpu_threads(torch.device(a.device))
    torch.set_num_threads(P)
    pool = ExpertThreads(P)
    bw = read_bandwidth(a.bw_gib, P)
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(Ec, 2 * I, H, generator=g) * 0.02, torch.randn(Ec, H, I, generator=g) * 0.02
    prior = torch.arange(1, E + 1, dtype=torch.float64) ** -a.zipf
    return P, pool, bw, g, w13, w2, prior


def prepared(spec: str, w13: torch.Tensor, w2: torch.Tensor):
    """(fmt, kernel, activation dtype, weights) for a --formats entry dtype[:kernel]; weights None
    (said) when the native kernel did not build."""
    fmt, _, kern = spec.partition(":")
    src = torch.float32 if fmt == "float32" else torch.bfloat16
    t0 = time.perf_counter()
    if kern.startswith("native"):
        wt = dataclasses.replace(prepare(w13.to(src), w2.to(src), fmt, kernel=kern), max_rows=float("inf"))
        if wt.kernel != "native":
            print(f"# {spec}: the native kernel did not build (log above); skipped", flush=True)
            return fmt, kern, src, None
    else:
        try:
            wt = prepare(w13.to(src), w2.to(src), fmt, kern or "int_mm", kernel="torch")
        except ValueError as e:  # a kernel this CPU cannot run correctly (oneDNN int8 without VNNI)
            print(f"# {spec}: skipped: {e}", flush=True)
            return fmt, kern, src, None
    print(f"# {spec}: prepared in {time.perf_counter() - t0:.1f} s", flush=True)
    return fmt, kern, src, wt


def cpu_layer(a, s):
    """Per-layer CPU expert time against the floor (touched bytes / read bandwidth), old loop vs grouped.

    One MoE layer, half its experts on the CPU (ids E/2.. after a Zipf-ranked router). Before each
    timed call a --flush-gib buffer is summed (untimed) so the call finds its weights in DRAM, not cache,
    then --settle-ms pass so the sum's OpenMP threads stop spinning on the cores the call uses.
    --formats: dtype[:kernel], dtype bfloat16 / float32 / int8; kernel: the torch kernels by default
    (int8: int_mm, or onednn), `native` (the C kernel at every size: no hand-off to torch at prefill)
    or `native_wo` (int8 weight-only native).
    """
    H, I, E, k = s["hidden"], s["inter"], s["experts"], s["top_k"]
    P, pool, bw, g, w13, w2, prior = _cpu_setup(a, s)
    Ec = w13.shape[0]
    flush = torch.ones(int(a.flush_gib * 2 ** 30) // 4)
    bias = prior[torch.randperm(E, generator=g)].log().float()
    print(f"# cpu-layer: {P} threads, read bandwidth {bw / 1e9:.1f} GB/s ({a.bw_gib} GiB torch.sum), "
          f"{Ec} of {E} experts on the CPU, hidden {H}, moe_intermediate {I}, top-{k}, cache flushed with "
          f"{a.flush_gib} GiB, torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"amx {amx()}", flush=True)
    calls = {}
    for T in [int(t) for t in a.cpu_tokens.split(",")]:  # the same routing for every dtype
        ids, w = route(torch.randn(T, E, generator=g) + bias, k, True)
        calls[T] = (torch.randn(T, H, generator=g), torch.where(ids >= E - Ec, ids - (E - Ec), -1), w)
    print("| tokens | cpu dtype | path | kernel | experts touched | pairs per expert | MB touched | floor ms | ms | x floor "
          "| vs loop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in a.formats.split(","):
        fmt, kern, src, wt = prepared(spec, w13, w2)
        if wt is None:
            continue
        for T, (x, ids, w) in calls.items():
            x = x.to(src)
            touched = int(torch.unique(ids[ids >= 0]).numel())
            floor = touched * wt.expert_bytes / bw
            out = torch.empty(T, H)
            name = "native" if wt.kernel == "native" else "grouped"
            paths = {name: lambda: grouped_cpu_experts(wt, x, ids, w, out, pool)}
            if fmt != "int8" and name == "grouped" and not a.no_loop:  # the per-expert loop has no int8
                paths = {"loop": lambda: cpu_experts(wt.w13, wt.w2, x, ids, w, out), **paths}
            res = {}
            iters = a.iters_decode * 3 if T <= s["decode"] else a.iters_prefill + 1
            with torch.inference_mode():
                for name, fn in paths.items():
                    fn()
                    ts = []
                    for _ in range(iters):
                        flush.sum()
                        time.sleep(a.settle_ms / 1e3)  # torch's OpenMP threads stop spinning, as in the engine
                        t0 = time.perf_counter()
                        fn()
                        ts.append(time.perf_counter() - t0)
                    res[name] = statistics.median(ts)
            for name, t in res.items():
                up = f"{res['loop'] / t:.2f}x" if "loop" in res and name != "loop" else ""
                kname = "mm loop" if name == "loop" else kern if name == "native" else wt.kernel
                print(f"| {T} | {fmt} | {name} | {kname} | {touched} | {int((ids >= 0).sum()) / touched:.1f} | "
                      f"{touched * wt.expert_bytes / 1e6:.0f} | {floor * 1e3:.2f} | {t * 1e3:.2f} | {t / floor:.2f} "
                      f"| {up} |", flush=True)
        del wt
    pool.close()

def _spin(seconds: float) -> None:
    """Busy-wait (the engine's thread is busy, not asleep, between its CPU expert calls)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _layer_copy(wt):
    """The same prepared weights in fresh memory (one decoder layer's own experts)."""
    fields = ("w13", "w2", "s13", "s2", "rs13", "rs2")
    return dataclasses.replace(wt, **{f: getattr(wt, f).clone() for f in fields if getattr(wt, f) is not None})


def cpu_steps(a, s):
    """Per-layer CPU expert time inside decode steps run as the engine runs them, against the floor.

    A step is --step-layers layer calls back to back, each after a --gap-us busy pause (the layer's
    GPU part: attention, router, device experts and the hidden state's trip to the host; ~0.13 ms a
    layer for the whole 12-layer device step of run X's graphs), and steps follow each other after
    --step-gap-ms (sampling, scheduling). Every layer has its own copy of the weights (half of 128
    experts on the CPU each: --step-layers x 604 MB in bf16, far more than the L3) and every step a
    fresh routing, so each call reads its experts from DRAM, while the kernel's thread pool is as warm
    as the engine keeps it (its threads spin ~1 ms after a call). The floor of a layer: the bytes of
    the experts it touches / the host read bandwidth measured in the same run; the table gives the
    mean per layer over --iters-decode x 3 timed steps (after one untimed), and the first layer of a
    step apart (its pool may have gone to sleep during the step gap).
    """
    H, I, E, k = s["hidden"], s["inter"], s["experts"], s["top_k"]
    P, pool, bw, _, w13, w2, prior = _cpu_setup(a, s)
    Ec, L = w13.shape[0], a.step_layers
    steps = a.iters_decode * 3 + 1
    print(f"# cpu-steps: {P} threads, read bandwidth {bw / 1e9:.1f} GB/s ({a.bw_gib} GiB torch.sum), {L} layers "
          f"of {Ec} of {E} CPU experts each, gap {a.gap_us:.0f} us between layers and {a.step_gap_ms} ms between "
          f"steps, {steps - 1} timed steps, torch {torch.__version__}, amx {amx()}", flush=True)
    print("| tokens | cpu dtype | kernel | experts touched a layer | MB a layer | floor ms a layer | ms a layer "
          "| x floor | first layer of a step, x floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    phase_notes = []  # the native kernel's time per phase (setup, x, gu, q, down) and outside it
    per_layer = {}  # (dtype, tokens) -> mean seconds a layer
    variants = [v.partition("=") for v in a.native_variants.split(";") if v.strip()]
    runs = [(spec, "", "") for spec in a.formats.split(",")]
    runs += [(spec, name, flags) for name, _, flags in variants for spec in (a.variant_formats or a.formats).split(",")
             if spec.partition(":")[2].startswith("native")]
    for spec, vname, vflags in runs:
        if vname:  # the same weights on a build of the kernel with other compile-time settings
            lib = native.library(flags=tuple(vflags.split()))
            if lib is None:
                print(f"# variant {vname} ({vflags}): did not build; skipped", flush=True)
                continue
            pool.use_native(lib)
            print(f"# variant {vname}: {vflags}", flush=True)
        fmt, kern, src, wt = prepared(spec, w13, w2)
        if wt is None:
            continue
        if vname:
            kern = f"{kern or wt.kernel} {vname}"
        t0 = time.perf_counter()
        layers = [wt] + [_layer_copy(wt) for _ in range(L - 1)]
        print(f"# {spec}: {L - 1} more layers copied in {time.perf_counter() - t0:.1f} s", flush=True)
        for T in [int(t) for t in a.cpu_tokens.split(",")]:
            gr = torch.Generator().manual_seed(T)
            calls = []  # [step][layer] (x, cpu ids, weights, touched)
            for _ in range(steps):
                row = []
                for _ in range(L):
                    bias = prior[torch.randperm(E, generator=gr)].log().float()
                    ids, w = route(torch.randn(T, E, generator=gr) + bias, k, True)
                    cid = torch.where(ids >= E - Ec, ids - (E - Ec), -1)
                    row.append((torch.randn(T, H, generator=gr).to(src), cid, w, int(torch.unique(cid[cid >= 0]).numel())))
                calls.append(row)
            out = torch.empty(T, H)
            times, firsts, floors, first_floors = [], [], [], []
            with torch.inference_mode():
                for i, row in enumerate(calls):
                    if i == 1 and wt.kernel == "native":  # the kernel's phase times from the timed steps on
                        pool.native().phases()
                    _spin(a.step_gap_ms / 1e3)
                    for j, (x, cid, w, touched) in enumerate(row):
                        _spin(a.gap_us / 1e6)
                        t0 = time.perf_counter()
                        grouped_cpu_experts(layers[j], x, cid, w, out, pool)
                        dt = time.perf_counter() - t0
                        if i:  # the first step is a warm-up
                            fl = touched * wt.expert_bytes / bw
                            times.append(dt), floors.append(fl)
                            if j == 0:
                                firsts.append(dt), first_floors.append(fl)
            mean_t, mean_f = sum(times) / len(times), sum(floors) / len(floors)
            touched = sum(r[3] for row in calls[1:] for r in row) / len(times)
            print(f"| {T} | {fmt} | {kern or wt.kernel} | {touched:.1f} | {touched * wt.expert_bytes / 1e6:.0f} | "
                  f"{mean_f * 1e3:.2f} | {mean_t * 1e3:.2f} | {mean_t / mean_f:.2f} | "
                  f"{sum(firsts) / sum(first_floors):.2f} |", flush=True)
            per_layer.setdefault((fmt, T), mean_t)  # the default build's, for the int8 / bf16 line
            if wt.kernel == "native":
                ph = pool.native().phases()
                n = max(ph.pop("calls"), 1)
                inside = sum(ph.values()) / n
                phase_notes.append(f"# {T} token(s), {fmt}{' ' + vname if vname else ''}: us a call: " + ", ".join(
                    f"{k} {v / n * 1e6:.1f}" for k, v in ph.items()) +
                    f"; outside the kernel (Python, ctypes) {(mean_t - inside) * 1e6:.1f}")
        del wt, layers
    print("\n".join(phase_notes))
    for T in [int(t) for t in a.cpu_tokens.split(",")]:
        if ("int8", T) in per_layer and ("bfloat16", T) in per_layer:
            print(f"# int8 faster than bf16 at {T} token(s): {per_layer['bfloat16', T] / per_layer['int8', T]:.2f}x")
    pool.close()


def e2e(a):
    """TTFT through engine.LLM: an 8K cold prefill, then a 64-token delta on that cached prefix.

    A random checkpoint with Qwen3-30B-A3B shapes (--layers, default 12) is written once; each row
    loads it with experts.gpu_experts_ratio --e2e-ratio, CPU experts in a dtype and on a path (the
    old per-expert loop, grouped torch kernels, or the native kernel).
    """
    from engine import LLM, SamplingParams
    from engine.tiny import make_tiny_model
    layers = a.layers or 12
    rows = [r.split(":") for r in a.e2e_rows.split(",")]  # dtype:path
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    print(f"# e2e: qwen3-30b-a3b-shapes, {layers} layers, gpu_experts_ratio {a.e2e_ratio}, device {a.device}, "
          f"prefill {a.e2e_prefill} + delta 64, torch {torch.__version__}, amx {amx()}")
    print("| cpu dtype | path | cold prefill TTFT s | 64-token delta TTFT s |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        if a.model_dir and (Path(a.model_dir) / "config.json").is_file():
            path = Path(a.model_dir)
        else:
            path = make_tiny_model(a.model_dir or tmp, "qwen3_moe", preset="qwen3-30b-a3b-shapes", dtype="bfloat16",
                                   std=0.02, num_hidden_layers=layers,
                                   device="cuda" if a.device.startswith("cuda") else "cpu")
        print(f"# checkpoint written in {time.perf_counter() - t:.0f} s", flush=True)
        g = torch.Generator().manual_seed(0)
        for n, (fmt, cpu_path) in enumerate(rows):
            llm = LLM(str(path), device=a.device, dtype="bfloat16", gpu_only=True, gpu_experts_ratio=a.e2e_ratio,
                      cpu_expert_dtype=fmt, cpu_expert_kernel="auto" if cpu_path == "native" else "torch")
            llm.engine.experts.context.grouped_cpu = cpu_path != "loop"
            vocab = llm.engine.model.args.vocab_size
            llm.generate(torch.randint(0, vocab, (256,), generator=g).tolist(), one)  # warm-up
            prefix = torch.randint(0, vocab, (a.e2e_prefill,), generator=g).tolist()
            sync(torch.device(a.device))
            t0 = time.perf_counter()
            llm.generate(prefix, one)
            cold = time.perf_counter() - t0
            deltas = []
            for _ in range(3):
                t0 = time.perf_counter()
                llm.generate(prefix + torch.randint(0, vocab, (64,), generator=g).tolist(), one)
                deltas.append(time.perf_counter() - t0)
            llm.close()
            print(f"| {fmt} | {cpu_path} | {cold:.2f} | {statistics.median(deltas):.3f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small shapes for a CPU smoke run")
    p.add_argument("--layers", type=int)
    p.add_argument("--decode-batch", type=int, help="tokens per decode step (concurrent requests)")
    p.add_argument("--prefill-tokens", type=int, help="tokens per prefill chunk")
    p.add_argument("--ratios", default="0,10,30,50,80,100", help="device expert ratios in percent")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--cpu-dtype", default="auto", choices=("auto", "float32", "bfloat16", "int8"))
    p.add_argument("--cpu-layer", action="store_true", help="only the per-layer CPU expert table (old loop vs grouped)")
    p.add_argument("--cpu-steps", action="store_true",
                   help="only the per-layer CPU expert table inside back-to-back decode steps (the engine's case)")
    p.add_argument("--step-layers", type=int, default=12, help="--cpu-steps: layers per step, each with its own weights")
    p.add_argument("--gap-us", type=float, default=130.0, help="--cpu-steps: busy pause before each layer call")
    p.add_argument("--step-gap-ms", type=float, default=1.0, help="--cpu-steps: busy pause between steps")
    p.add_argument("--variant-formats", default="", help="--native-variants: the formats to run them on "
                   "(default: --formats)")
    p.add_argument("--native-variants", default="",
                   help="--cpu-steps: 'name=cc flags;...': the native --formats again on builds with these flags "
                        "(experts.c's compile-time settings, e.g. -DDOWN_TASKS=4), rows marked with the name")
    p.add_argument("--cpu-tokens", default="1,8,32,2048", help="--cpu-layer: tokens per call")
    p.add_argument("--formats", default="bfloat16,bfloat16:native,int8,int8:onednn,int8:native",
                   help="--cpu-layer: dtype[:kernel],... (kernel: int_mm, onednn, native, native_wo)")
    p.add_argument("--no-loop", action="store_true", help="--cpu-layer: skip the old per-expert loop rows")
    p.add_argument("--settle-ms", type=float, default=10.0,
                   help="--cpu-layer: pause after the flush, so the flush's OpenMP threads are idle (0: none)")
    p.add_argument("--flush-gib", type=float, default=1.0, help="--cpu-layer: GiB read before each timed call")
    p.add_argument("--bw-gib", type=float, default=4.0, help="--cpu-layer: GiB summed for the read bandwidth")
    p.add_argument("--e2e", action="store_true", help="only the end-to-end TTFT rows through engine.LLM")
    p.add_argument("--model-dir", default=None, help="--e2e: write the checkpoint here, or reuse the one there")
    p.add_argument("--e2e-ratio", type=float, default=0.25, help="--e2e: experts.gpu_experts_ratio")
    p.add_argument("--e2e-prefill", type=int, default=8192, help="--e2e: cold prompt tokens")
    p.add_argument("--e2e-rows", default="auto:loop,auto:grouped,auto:native,int8:grouped,int8:native",
                   help="--e2e: dtype:path,... (path: loop, grouped (torch kernels) or native)")
    p.add_argument("--threads", type=int, help="--cpu-layer: CPU threads (default: the engine's worker count)")
    p.add_argument("--dtype", help="model dtype (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--zipf", type=float, default=0.4,
                   help="exponent of the per-expert routing prior (0.4: the hottest half of 128 experts gets ~77%%)")
    p.add_argument("--rounds", type=int, default=3, help="passes over the strategies per ratio (median)")
    p.add_argument("--iters-decode", type=int, default=4, help="timed decode steps per pass (median)")
    p.add_argument("--iters-prefill", type=int, default=1, help="timed prefill chunks per pass (median)")
    a = p.parse_args()
    device = torch.device(a.device)
    s = dict(QUICK if a.quick else FULL)
    for key, v in (("layers", a.layers), ("decode", a.decode_batch), ("prefill", a.prefill_tokens)):
        if v is not None:
            s[key] = v
    if a.cpu_layer:
        return cpu_layer(a, s)
    if a.cpu_steps:
        return cpu_steps(a, s)
    if a.e2e:
        return e2e(a)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ratios = [int(r) for r in a.ratios.split(",")]
    strategies = a.strategies.split(",")
    t0 = time.perf_counter()
    print(f"# bench_offload: device {device}, {dtype}, cpu experts {a.cpu_dtype}, {s}, zipf {a.zipf}, "
          f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    blocks = build(s, dtype, device, a.zipf)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.inference_mode():
            stats = calibrate(blocks, s, dtype, device, tmp)
        print(f"# routing skew: the hottest half of each layer's experts gets "
              f"{hot_share(stats, s['layers'], s['experts']):.0%} of the pairs (calibration, recorder .pt)")
        pre, dec, ov = {}, {}, {}
        for r in ratios:  # strategies in turn, several rounds: drift in the host's CPU speed hits all alike
            for rnd in range(a.rounds):
                for st in strategies:
                    rt, p_, d_ = run_config(blocks, s, dtype, device, st, r / 100, stats, a)
                    pre.setdefault((st, r), []).append(p_)
                    dec.setdefault((st, r), []).append(d_)
                    if rnd == 0 and (st == "uniform" and r in (0, 50) or st == "frequency" and r == 50):
                        for name, T in (("decode", s["decode"]), ("prefill", s["prefill"])):
                            ov[(st, r, name)] = overlap(blocks, rt, s, dtype, device, T, a)
                    rt.close()
            for st in strategies:
                pre[(st, r)] = statistics.median(pre[(st, r)])
                dec[(st, r)] = statistics.median(dec[(st, r)])
                print(f"#   {st:>13} {r:3d}%: prefill {pre[(st, r)]:9.1f} tok/s, decode {dec[(st, r)]:8.1f} tok/s"
                      f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    table(f"Decode tokens/s ({s['decode']} tokens per step, {s['layers']} MoE layers)", dec, ratios, strategies)
    table(f"Prefill tokens/s ({s['prefill']}-token chunk, {s['layers']} MoE layers)", pre, ratios, strategies)
    print("\nOverlap (first layer; ms): ratio = hybrid / max(cpu part alone, device part alone); "
          "'cpu job' is the worker's compute inside the hybrid call")
    print("| case | hybrid | cpu job | cpu alone | device alone | ratio |")
    print("|---|---|---|---|---|---|")
    for (st, r, name), (h, j, c, d) in ov.items():
        print(f"| {st} {r}% {name} | {h * 1e3:.2f} | {j * 1e3:.2f} | {c * 1e3:.2f} | {d * 1e3:.2f} "
              f"| {h / max(c, d):.2f} |")
    if "uniform" in strategies and "frequency" in strategies and 50 in ratios:
        for name, rows in (("decode", dec), ("prefill", pre)):
            print(f"# frequency vs uniform at 50% ({name}): {rows[('frequency', 50)] / rows[('uniform', 50)] - 1:+.0%}")
    print(f"# total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
