#!/usr/bin/env python
"""bench_gpu_reuse: what prefix reuse costs and saves on a GPU, through engine.LLM (issue 10).

Checkpoint: make_tiny_model(preset="qwen3-30b-a3b-shapes", num_hidden_layers=--layers) (random
weights, Qwen3-30B-A3B shapes), bf16, page 16, chunk 2048; written once under --model-dir.
Every TTFT is the wall time from add_request(prefix + 64 fresh tokens, max_tokens=1) until a step
hands the token out (the engine's page bookkeeping comes after it, untimed), median of --repeats,
each with a new 64-token delta:

  cold    a prefix that no tier holds (this run also stores it)
  device  the same LLM right after: the prefix is in the device pool
  cpu     device pool emptied (reset_device_cache): the prefix comes from the cpu tier
  disk    a new LLM on the same disk_path (the first one wrote its cpu tier back on close), warmed
          up with an unrelated prompt of each length, then the OS page cache dropped (as root:
          sync; echo 3 > /proc/sys/vm/drop_caches)
Floors: delta = TTFT of the 64 tokens alone (cold, same LLM); cpu floor = page bytes / pinned
H2D measured here + delta; disk floor = page bytes / sequential read of a file on the disk_path's
device with the page cache dropped + delta. Peer: transformers' cold prefill (one forward) of the
same prompts on the same checkpoint.
No-reuse throughput: 48 unique 2K-token prompts x 16 new tokens in one generate call, an untimed
batch first, then the median of --tput-reps timed batches (steady state), (prompt + output tokens) / s, for prefix_caching off / device pool
only (gpu_only) / host tiers on (4 GB cpu + disk); off is measured first and again last, and the
ratios are to the mean of the two. Each row also prints its steps a batch and where their time
went. These rows drift by several percent between rows, so a paired row (--tput-pairs, default 6;
--paired-only runs it alone) keeps off and host tiers on both resident and times their batches in
adjacent pairs (off after the host tiers' puts and disk writes have drained, host tiers after one
batch of their own): the median of the pairs' ratios, each pair's batches with the engine thread's
host phases, and the CUDA allocator's counters over each LLM's timed batches.
CPU experts: gpu_experts_ratio 0.25, 8K prefix: cold vs disk hit (a new LLM, page cache dropped).

    python benchmarks/bench_gpu_reuse.py            # every row, <= 6 min on one H200
    python benchmarks/bench_gpu_reuse.py --quick    # 2 layers, 2K prefix, small batches: a smoke run
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gc
import itertools
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_host_path import time_calls  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402
from kvc import store as store_mod  # noqa: E402

GB = 1e9
ONE = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
_TTFT_IDS = itertools.count()
VOCAB = 150_000


def size(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def drop_page_cache() -> bool:
    """Drop the OS page cache (root only); False when it could not."""
    if os.geteuid() != 0:
        return False
    r = subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, capture_output=True)
    return r.returncode == 0


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def held() -> str:
    """Device memory this process still holds (between sections: what closed LLMs did not give back;
    run GN found 62.9 GB held before the paired rows on an 80 GB card)."""
    return f", {torch.cuda.memory_allocated() / GB:.1f} GB allocated" if torch.cuda.is_available() else ""


def ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    """(seconds from add_request until a step hands the token out, prompt tokens reused from a
    cache). The engine registers and offers the step's pages after that (at the next call into
    it, as a server's engine loop does once the token is on its way): done here, untimed, so every
    row starts from the same state."""
    eng = llm.engine
    rid = f"ttft-{next(_TTFT_IDS)}"
    t0 = time.perf_counter()
    eng.add_request(rid, prompt, ONE)
    out = None
    while out is None:
        out = next((o for o in eng.step() if o.request_id == rid and o.outputs[0].token_ids), None)
    dt = time.perf_counter() - t0
    while eng.has_unfinished():
        eng.step()
    eng.flush_commits()
    return dt, out.num_cached_tokens


def spread(times: list) -> str:
    """The samples' min / quartiles / max in ms (a median hides a bimodal row)."""
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return f"{min(times) * 1e3:.1f} / {q[0] * 1e3:.1f} / {q[2] * 1e3:.1f} / {max(times) * 1e3:.1f} ms (min / q1 / q3 / max)"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pinned_h2d_bw(nbytes: int) -> float:
    if not torch.cuda.is_available():
        return float("inf")  # --device cpu (a smoke run): no transfer
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del src, dst
    return nbytes / min(times[1:])


def seq_read_bw(directory: Path, nbytes: int) -> tuple[float, bool]:
    """Sequential read of a fresh file on `directory`'s device, page cache dropped if we can."""
    path = directory / "seqread.bin"
    block = os.urandom(8 << 20)
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dropped = drop_page_cache()
    buf = bytearray(8 << 20)
    t0 = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while (n := f.readinto(buf)):
            total += n
    dt = time.perf_counter() - t0
    path.unlink()
    return total / dt, dropped


def transformers_prefill(model_dir: Path, prompts: dict[int, list[int]], device: str,
                         dtype: torch.dtype) -> dict[int, float]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)  # no accelerate needed
    model.eval()
    out = {}
    with torch.no_grad():
        model(torch.tensor([prompts[min(prompts)][:256]], device=device), use_cache=False, logits_to_keep=1)
        for n, ids in prompts.items():
            x = torch.tensor([ids], device=device)
            times = []
            for _ in range(2):
                sync()
                t0 = time.perf_counter()
                model(x, use_cache=False, logits_to_keep=1)
                sync()
                times.append(time.perf_counter() - t0)
            out[n] = min(times)
    del model
    free_gpu()
    return out


STEP_NOTES: list[str] = []  # one line per throughput row: its steps and where their time went


def batch_rate(outs, seconds: float) -> float:
    """(prompt + generated tokens) / s of one generate call's outputs."""
    return sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs) / seconds


def throughput(llm: LLM, rng: random.Random, n: int, length: int, profile: bool = False, reps: int = 3,
               label: str = "") -> float:
    """Tokens/s (prompt + generated) of a batch of n fresh prompts, median of `reps` batches after
    one untimed batch (warm-up; it fills the host tiers). Appends to STEP_NOTES the timed batches'
    engine steps: how many, their mean wall time, of it the runner's (prepare, launches and the
    wait for the sampled tokens), and the batch time outside every step (add_request, outputs):
    a host tier that costs throughput shows as more steps, longer steps or time between them."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm.generate([rand_ids(rng, length) for _ in range(n)], params)
    eng = llm.engine
    times, counts, total = collections.defaultdict(float), collections.Counter(), 0.0
    time_calls(eng, "step", "step", times, counts)
    time_calls(eng.runner, "step", "runner", times, counts)
    rates = []
    for r in range(reps):
        batch = [rand_ids(rng, length) for _ in range(n)]
        sync()
        samplers = []
        if profile and r == 0:  # the engine's thread, and the put thread it contends with for the GIL
            samplers.append(StackSampler(threading.get_ident(), "engine thread (host tiers on, steady batch)"))
            samplers += [StackSampler(t.ident, "put thread") for t in threading.enumerate() if t.name == "kvc-put"]
        t0 = time.perf_counter()
        outs = llm.generate(batch, params)
        dt = time.perf_counter() - t0
        total += dt
        for sampler in samplers:
            print(sampler.report(), flush=True)
        rates.append(batch_rate(outs, dt))
    del eng.step, eng.runner.step  # the instance attributes: the class's methods again
    if counts["step"]:
        STEP_NOTES.append(f"# {label or 'throughput'}: {counts['step'] / reps:.0f} steps a batch, "
                          f"{times['step'] / counts['step'] * 1e3:.2f} ms a step (runner "
                          f"{times['runner'] / max(counts['runner'], 1) * 1e3:.2f} ms), outside steps "
                          f"{(total - times['step']) / reps * 1e3:.1f} ms a batch of {total / reps * 1e3:.0f} ms")
    return statistics.median(rates)


def _stderr(xs: list[float]) -> float:
    """The standard error of the mean of xs (0 for fewer than two): how far a run's pairs leave
    the ratio uncertain (six pairs that spread 0.80-1.02 leave it +-0.03 or so)."""
    return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0


ALLOC_KEYS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def alloc_stats() -> dict[str, int]:
    """The CUDA caching allocator's counters that can stall a launching thread (cudaMalloc, cudaFree
    and its device sync, retries after freeing the cache); zeros without CUDA."""
    if not torch.cuda.is_available():
        return dict.fromkeys(ALLOC_KEYS, 0)
    st = torch.cuda.memory_stats()
    return {k: int(st.get(k, 0)) for k in ALLOC_KEYS}


SCHED_ZERO = (0.0, 0.0, 0, 0, 0.0, 0.0, 0)  # thread_sched's counters of a thread /proc does not show
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_sched(tid: int) -> tuple:
    """Linux's counters of one thread (native id): (seconds on a CPU, seconds runnable but waiting
    for a CPU, voluntary switches, involuntary switches, user seconds, system seconds, minor page
    faults). A thread that waits for the GIL or a lock sleeps: a voluntary switch, no CPU time;
    CUDA's synchronizations spin: CPU time. User / system come in clock ticks (10 ms). Zeros where
    /proc lacks them."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            run_ns, wait_ns = (int(x) for x in f.read().split()[:2])
        with open(f"/proc/self/task/{tid}/status") as f:
            st = dict(line.split(":", 1) for line in f if "ctxt_switches" in line)
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        minflt, utime, stime = int(fields[7]), int(fields[11]), int(fields[12])
        return (run_ns / 1e9, wait_ns / 1e9, int(st["voluntary_ctxt_switches"]),
                int(st["nonvoluntary_ctxt_switches"]), utime / _TICK, stime / _TICK, minflt)
    except (OSError, ValueError, KeyError, IndexError):
        return SCHED_ZERO


def tlb_shootdowns() -> int:
    """The machine's TLB shootdown interrupts so far (/proc/interrupts' TLB row, all CPUs; 0 where
    absent). Each munmap / madvise / mprotect of memory that threads of this process have touched
    on other CPUs interrupts those CPUs and waits for them."""
    try:
        with open("/proc/interrupts") as f:
            for line in f:
                if line.lstrip().startswith("TLB:"):
                    return sum(int(x) for x in line.split()[1:] if x.isdigit())
    except OSError:
        pass
    return 0


def sched_snapshot() -> dict[str, tuple]:
    """thread_sched of this (the engine's) thread and of every kvc-* thread, by name (threads of
    one name summed), and the machine's TLB shootdowns."""
    out: dict[str, tuple] = {"engine": thread_sched(threading.get_native_id()), "tlb": (tlb_shootdowns(),)}
    for t in threading.enumerate():
        if t.name.startswith("kvc-") and t.native_id is not None:
            prev = out.get(t.name, SCHED_ZERO)
            out[t.name] = tuple(a + b for a, b in zip(prev, thread_sched(t.native_id)))
    return out


def sched_delta(before: dict, after: dict) -> dict[str, tuple]:
    return {k: tuple(a - b for a, b in zip(v, before.get(k, (0,) * len(v)))) for k, v in after.items()}


def step_table(off: LLM, on: LLM, ratios: list[float]) -> str:
    """Each pair's timed batches side by side, the engine thread's host phases of each (ms): batch
    wall time, steps, time inside steps, of it in the runner's launch (prepare, the launches, the
    sampling's queueing) and in prepare alone, and the batch's time outside steps. A slow batch
    whose steps took longer on the host shows in launch / prepare; one that waited between steps
    (outputs, add_request, the host tiers' commit) in the outside column. Then the scheduler's
    counters over the batch (thread_sched): the engine thread's CPU time, its time runnable but
    off a CPU, its voluntary / involuntary switches, and the CPU time of the host tiers' threads
    (put, disk writer), the engine's user / system split and minor faults, and the machine's TLB
    shootdowns. The engine's thread spins in CUDA's synchronizations, so its CPU time is about its
    wall time when it never sleeps; time it slept (the GIL, a lock) is wall minus CPU, with
    voluntary switches; system time and shootdowns say whether the kernel took its time."""
    rows = ["| pair | ratio | batch | wall | steps | in steps | launch | prepare | outside steps | engine cpu "
            "| engine user / sys | engine runnable | vol / invol switches | engine minor faults | put cpu "
            "| disk writer cpu | TLB shootdowns |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, (r, a, b) in enumerate(zip(ratios, off.__dict__.get("bench_batches", []),
                                      on.__dict__.get("bench_batches", []))):
        for label, (wall, steps, in_steps, launch, prep, sched) in (("off", a), ("on", b)):
            eng = sched.get("engine", SCHED_ZERO)
            put = sched.get("kvc-put", SCHED_ZERO)[0]
            writer = sched.get("kvc-disk-writer", SCHED_ZERO)[0]
            rows.append(f"| {i + 1} | {r:.3f} | {label} | {wall * 1e3:.1f} | {steps} | {in_steps * 1e3:.1f} | "
                        f"{launch * 1e3:.1f} | {prep * 1e3:.1f} | {(wall - in_steps) * 1e3:.1f} | "
                        f"{eng[0] * 1e3:.1f} | {eng[4] * 1e3:.0f} / {eng[5] * 1e3:.0f} | {eng[1] * 1e3:.1f} | "
                        f"{eng[2]} / {eng[3]} | {eng[6]} | {put * 1e3:.1f} | {writer * 1e3:.1f} | "
                        f"{sched.get('tlb', (0,))[0]} |")
    return "# the engine thread's host phases of each timed batch (ms):\n" + "\n".join(rows)


def drain(llm: LLM) -> None:
    """Wait until llm's offered pages are in its host tiers and its in-process store's disk writer
    has committed what they sent down. Before run CY the paired rows drained the puts only: the
    disk writer's write-back of the host-tier LLM's earlier batches then ran beside the "off"
    batch (CX's sampler: at every sample of it), which slowed "off" too and flattered the ratio."""
    llm.engine.prefix_cache.flush()
    host = llm.engine.prefix_cache.host
    store_flush = getattr(getattr(host, "cache", None), "flush", None)
    if store_flush is not None:
        store_flush()


def paired_throughput(a: LLM, bs: list[LLM], rng: random.Random, n: int, length: int, pairs: int,
                      timeline: list | None = None) -> list[list[float]]:
    """Each b's tokens/s over a's, one ratio per pair of adjacent timed batches, every LLM resident
    (the GPU's step time drifts by several percent between rows run one after another, more than
    the few percent these rows compare). Each pair: every b's offered pages and disk writes drained
    (untimed, `drain`), a's batch timed; then for each b an untimed batch of b and b's batch timed,
    its puts and disk writes drained after (nothing of one b runs beside another's batch). So a is
    timed clean, and each b in its steady state: its timed batch meets the puts its batch before
    left behind, as a serving engine's next batch does. (Runs AX/AY alternated single batches a b,
    b a, ...: b's trailing puts then ran beside the next batch of either LLM, and the ratios split
    by order, 0.87-0.94x in one order, 1.00-1.13x in the other.) timeline: a list that gets one
    more pair's gpu_timeline rows (a and the first b)."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for llm in (a, *bs):
        llm.generate([rand_ids(rng, length) for _ in range(n)], params)

    def timed(llm: LLM) -> float:
        batch = [rand_ids(rng, length) for _ in range(n)]
        sync()
        before = alloc_stats()
        eng = llm.engine
        times, counts = collections.defaultdict(float), collections.Counter()
        time_calls(eng, "step", "step", times, counts)  # the engine thread's host phases of this batch
        time_calls(eng.runner, "prepare", "prepare", times, counts)
        time_calls(eng.runner, "launch", "launch", times, counts)
        s0 = sched_snapshot()
        t0 = time.perf_counter()
        try:
            outs = llm.generate(batch, params)
            wall = time.perf_counter() - t0
            sched = sched_delta(s0, sched_snapshot())
        finally:
            del eng.step, eng.runner.prepare, eng.runner.launch  # the class's methods again
        after = alloc_stats()
        stats = llm.__dict__.setdefault("bench_alloc", collections.Counter())
        stats.update({k: after[k] - before[k] for k in after})
        llm.__dict__.setdefault("bench_batches", []).append(
            (wall, counts["step"], times["step"], times["launch"], times["prepare"], sched))
        return batch_rate(outs, wall)
    ratios: list[list[float]] = [[] for _ in bs]
    for _ in range(pairs):
        for b in bs:
            drain(b)  # nothing of b's left to run beside a's batch
        sync()
        rate_a = timed(a)
        for b, out in zip(bs, ratios):
            b.generate([rand_ids(rng, length) for _ in range(n)], params)  # b's steady state: puts in flight
            out.append(timed(b) / rate_a)
            drain(b)
    if timeline is not None:  # one more pair, each batch under torch.profiler: where the GPU's time goes
        b = bs[0]
        drain(b)
        sync()
        gaps_a, gaps_b = [], []
        timeline.append(("off", gpu_timeline(a, [rand_ids(rng, length) for _ in range(n)], params, gaps_a), gaps_a))
        b.generate([rand_ids(rng, length) for _ in range(n)], params)
        timeline.append(("host tiers on", gpu_timeline(b, [rand_ids(rng, length) for _ in range(n)], params, gaps_b),
                         gaps_b))
    return ratios


def gpu_timeline(llm: LLM, batch: list[list[int]], params: SamplingParams,
                 gaps_out: list | None = None) -> dict[str, float]:
    """One batch under torch.profiler (CUPTI): its wall time, and on the GPU the engine's stream
    (the one with the most kernel time) busy / idle within the batch, idle gaps over 0.1 ms, kernel
    time on every other stream (put gathers, load checksums), and device-to-host copy time (puts).
    Tells a put path that slows the GPU's own kernels (busy grows) from one that keeps the engine's
    thread from feeding it (idle grows). The profiler's own launch overhead is in both batches.
    gaps_out: gets idle_gaps' rows (each idle gap over 0.1 ms of the engine's stream, attributed),
    then the StackSampler of the calling thread (the engine's, in LLM.generate) over the batch, its
    `in_gaps` the samples that fell inside the launched-late gaps (samples_in_gaps)."""
    import json
    path = tempfile.mktemp(suffix=".json")
    sync()
    sampler = StackSampler(threading.get_ident(), timed=True) if gaps_out is not None else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate(batch, params)
        sync()
        wall = time.perf_counter() - t0
    if sampler is not None:
        sampler.stop()  # the batch only, not the trace's processing below
        gaps_out.append(sampler)
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)
    events = [e for e in trace["traceEvents"] if "dur" in e and "ts" in e]
    os.unlink(path)
    kernels = [e for e in events if e.get("cat") == "kernel"]
    per_stream = collections.Counter()
    for e in kernels:
        per_stream[e.get("args", {}).get("stream")] += e["dur"]
    main = per_stream.most_common(1)[0][0] if per_stream else None
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels if e.get("args", {}).get("stream") == main)
    busy, gaps, big_gaps, end = 0.0, 0.0, 0, None
    for s0, s1 in spans:
        if end is not None and s0 > end:
            gaps += s0 - end
            big_gaps += s0 - end > 100
        if end is None or s1 > end:
            busy += s1 - max(s0, end if end is not None else s0)
            end = s1
    d2h = sum(e["dur"] for e in events if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", ""))
    if gaps_out is not None:
        found = idle_gaps(events, main)
        gaps_out[:0] = found  # then the sampler, last
        if sampler is not None:
            sampler.in_gaps = (samples_in_gaps(sampler, found, trace.get("baseTimeNanoseconds"), spans) +
                               other_calls_in_gaps(events, found, main))
    return {"wall ms": wall * 1e3, "engine stream busy ms": busy / 1e3, "engine stream idle ms": gaps / 1e3,
            "idle gaps > 0.1 ms": big_gaps, "kernels on other streams ms": (sum(per_stream.values()) - per_stream[main]) / 1e3,
            "kernels on the engine stream": len(spans), "DtoH copies ms": d2h / 1e3}


def other_calls_in_gaps(events: list[dict], gaps: list[tuple], stream) -> str:
    """CUDA runtime calls of threads other than the engine's (the one that launches the stream's
    kernels) that overlap the launched-late gaps, by name: a call another thread is inside while
    the engine's thread is late (a synchronize, a host allocation, a free) may hold a lock of the
    driver that the engine's next launch waits for."""
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    by_corr = {e.get("args", {}).get("correlation"): e for e in runtime}
    tids = collections.Counter(by_corr[k["args"]["correlation"]].get("tid") for k in events
                               if k.get("cat") == "kernel" and k.get("args", {}).get("stream") == stream
                               and k.get("args", {}).get("correlation") in by_corr)
    if not tids:
        return ""
    engine_tid = tids.most_common(1)[0][0]
    late = sorted((g[5], g[6]) for g in gaps if g[3].startswith("launched late"))
    starts = [g[0] for g in late]
    calls: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in runtime:
        if e.get("tid") == engine_tid:
            continue
        e0, e1 = e["ts"], e["ts"] + e["dur"]
        i = bisect.bisect_right(starts, e1) - 1
        over = 0.0
        while i >= 0 and late[i][1] > e0:
            over += min(e1, late[i][1]) - max(e0, late[i][0])
            i -= 1
        if over > 0:
            calls[e.get("name", "?")][0] += 1
            calls[e.get("name", "?")][1] += over
    total = sum(b - a for a, b in late)
    if not calls:
        return f"\n# other threads' CUDA runtime calls inside the launched-late gaps ({total / 1e3:,.1f} ms): none"
    rows = sorted(calls.items(), key=lambda kv: -kv[1][1])[:8]
    return (f"\n# other threads' CUDA runtime calls inside the launched-late gaps ({total / 1e3:,.1f} ms), by time "
            f"inside them:\n" + "\n".join(f"#   {n:6d} calls {t / 1e3:8.1f} ms  {_short(name)}"
                                           for name, (n, t) in rows))


SHORT = 48  # characters of a kernel or runtime call's name in the gap tables


def _short(name: str) -> str:
    """A kernel's name without its return type, namespaces and template or call arguments."""
    for junk in ("void ", "(anonymous namespace)::"):
        name = name.replace(junk, "")
    name = name.split("<")[0].split("(")[0].rsplit("::", 1)[-1] or name
    return name if len(name) <= SHORT else name[:SHORT - 3] + "..."


def idle_gaps(events: list[dict], stream) -> list[tuple]:
    """The engine stream's idle gaps over 0.1 ms in a profiled batch, each as (gap us, kernel before,
    kernel after, why, the host's share in us, start, end (trace us)): "launched late" when the kernel after the gap was
    launched (its cudaLaunchKernel, by correlation id) after the kernel before it ended, so the
    GPU waited for the host, and then the longest CUDA runtime call of the launching thread inside
    the gap names what the host was doing if it was a call (a synchronize, a copy), else "python";
    "queued" when it was launched before the gap (the GPU waited on something else: an event of
    another stream, a copy)."""
    launches = {e.get("args", {}).get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    runtime_by_tid = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "cuda_runtime":
            runtime_by_tid[e.get("tid")].append(e)
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and e.get("args", {}).get("stream") == stream),
                     key=lambda e: e["ts"])
    out, end, before = [], None, None
    for k in kernels:
        if end is not None and k["ts"] - end > 100:
            gap = k["ts"] - end
            launch = launches.get(k.get("args", {}).get("correlation"))
            if launch is not None and launch["ts"] > end:
                late = launch["ts"] - end
                inside = [r for r in runtime_by_tid[launch.get("tid")]
                          if r["ts"] < launch["ts"] and r["ts"] + r["dur"] > end and r is not launch]
                longest = max(inside, key=lambda r: min(r["ts"] + r["dur"], launch["ts"]) - max(r["ts"], end),
                              default=None)
                share = 0.0 if longest is None else min(longest["ts"] + longest["dur"], launch["ts"]) - max(longest["ts"], end)
                why = "launched late: " + (_short(longest["name"]) if longest is not None and share > 0.5 * late
                                           else "python")
                out.append((gap, _short(before["name"]), _short(k["name"]), why, share, end, k["ts"]))
            else:
                out.append((gap, _short(before["name"]), _short(k["name"]), "queued", 0.0, end, k["ts"]))
        if end is None or k["ts"] + k["dur"] > end:
            end, before = k["ts"] + k["dur"], k
    return out


def samples_in_gaps(sampler: "StackSampler", gaps: list, base_ns, spans: list) -> str:
    """The engine thread's stacks sampled inside the "launched late" gaps (the host was late there):
    the sampler's wall-clock samples mapped onto the trace's clock (its baseTimeNanoseconds)."""
    if not base_ns or not sampler.timed or not spans:
        return "# (no baseTimeNanoseconds in the trace, no samples or no kernels: samples not placed in the gaps)"
    at = [((t * 1e9 - base_ns) / 1e3, key) for t, key in sampler.timed]  # trace microseconds
    first, last = spans[0][0], spans[-1][1]
    inside = sum(first <= ts <= last for ts, _ in at)
    late = sorted((g[5], g[6]) for g in gaps if g[3].startswith("launched late"))
    counts, n, j = collections.Counter(), 0, 0
    for ts, key in sorted(at):
        while j < len(late) and late[j][1] < ts:
            j += 1
        if j < len(late) and late[j][0] <= ts:
            counts[key] += 1
            n += 1
    return (f"# engine thread samples inside the launched-late gaps: {n} of {len(at)} samples "
            f"({inside} inside the batch's kernels' span: the clocks line up if that is most of them)\n" +
            "\n".join(f"#   {c:4d}  {k}" for k, c in counts.most_common(15)) + others_in_gaps(sampler, late, base_ns))


def others_in_gaps(sampler: "StackSampler", late: list, base_ns) -> str:
    """Where the host tiers' threads were at the samples inside the launched-late gaps against all
    the batch's samples: a place a thread sits far more often while the engine's thread is late
    than otherwise is what keeps it from the GIL (or the store's lock)."""
    if not sampler.others:
        return ""
    inside, overall = collections.Counter(), collections.Counter()
    n_in = 0
    j = 0
    for t, stacks in sorted(sampler.others, key=lambda r: r[0]):
        ts = (t * 1e9 - base_ns) / 1e3
        while j < len(late) and late[j][1] < ts:
            j += 1
        gap = j < len(late) and late[j][0] <= ts
        n_in += gap
        for name, where in stacks.items():
            name = name.rsplit("_", 1)[0]  # pool threads: kvc-load_0 -> kvc-load
            overall[(name, where)] += 1
            if gap:
                inside[(name, where)] += 1
    if not n_in:
        return "\n# host tiers' threads: no sample inside the gaps"
    n_all = len(sampler.others)
    rows = sorted(inside.items(), key=lambda kv: -(kv[1] / n_in - overall[kv[0]] / n_all))[:12]
    return (f"\n# host tiers' threads at the {n_in} samples inside the gaps (share of those samples) against all "
            f"{n_all} samples of the batch, the largest excess first:\n" +
            "\n".join(f"#   {c / n_in:6.1%} vs {overall[k] / n_all:6.1%}  {k[0]}: {k[1]}" for k, c in rows))


def gap_table(label: str, gaps: list[tuple], top: int = 10) -> str:
    """idle_gaps' rows summed by (why, kernel after), the largest totals first."""
    by = collections.defaultdict(lambda: [0, 0.0])
    for gap, _before, after, why, *_ in gaps:
        by[(why, after)][0] += 1
        by[(why, after)][1] += gap
    rows = sorted(by.items(), key=lambda kv: -kv[1][1])[:top]
    total = sum(g[0] for g in gaps)
    return (f"\n# {label}: {len(gaps)} idle gaps over 0.1 ms, {total / 1e3:,.1f} ms; by cause and the kernel after "
            f"the gap (top {top})\n| why | kernel after the gap | gaps | ms |\n|---|---|---|---|\n" +
            "\n".join(f"| {why} | {after} | {c} | {t / 1e3:,.1f} |" for (why, after), (c, t) in rows))


def other_gate(gate: str | None) -> str:
    """The put gate a variant compares with `gate`: "engine" (the default) and "gpu-queued" (the put
    thread's default before it) against each other; "gpu-wait" against "gpu-queued"."""
    return {"engine": "gpu-queued", "gpu-queued": "engine"}.get(gate, "gpu-queued")


def paired_row(model_dir, base: dict, tiers: dict, work: Path, rng: random.Random, n: int, length: int,
               pairs: int, notes: list[str], profile: bool = False,
               variants: bool = False, sync_variants: bool = False,
               gate_variants: bool = False, host_variants: bool = False,
               buffer_variants: tuple[float, ...] = ()) -> list[tuple[str, str, str, str]]:
    """The paired throughput row: off and host tiers on (cpu + disk) both resident (their device pools
    sized for the batch, not from free memory), adjacent timed batches (paired_throughput); profile:
    one more pair under torch.profiler (gpu_timeline) into the notes; variants: in the same pairs,
    host tiers on with the put path as before run BE (no pause before publishing) and with the cpu
    tier only (no disk writer); sync_variants: in the same pairs, off and host tiers on with
    scheduler.async_scheduling off (each step read back before the next is scheduled); host_variants:
    in the same pairs, prefix caching off with the engine's host path as before 5856a61 (a prefill
    piece's ids, positions and slots as Python lists, cuDNN pieces padded by F.pad copies with their
    views made every layer): what those host costs take from a batch bound by its host;
    buffer_variants: in the same pairs, host tiers on with kvc.put_buffer_GB at each of these sizes
    (a smaller pinned put ring drops more offers: fewer pages stored, less put work beside the engine)."""
    blocks = 2 * n * (length + 16) // 16 + 64
    llm_off = LLM(str(model_dir), **dict(base, prefix_caching=False, num_device_blocks=blocks))
    kinds = [("paired", "host tiers on (4 GB cpu + disk)", True),
             ("paired-nopause", "host tiers on, no pause before publishing (the put path before run BE)", True),
             ("paired-cpu", "host tiers on, cpu tier only (no disk writer)", False)][:3 if variants else 1]
    ons, labels = [], []
    for tag, label, disk in kinds:
        pair_kw = dict(tiers, disk_path=str(work / f"pages-{tag}") if disk else None)
        if disk:
            shutil.rmtree(pair_kw["disk_path"], ignore_errors=True)
        ons.append(LLM(str(model_dir), **dict(pair_kw, num_device_blocks=blocks)))
        labels.append(label)
    if variants:
        ons[1].engine.prefix_cache.host.pause_puts = False
    if sync_variants:
        for label, kw in (("prefix_caching off, synchronous scheduling", dict(base, prefix_caching=False)),
                          ("host tiers on, synchronous scheduling", dict(tiers, disk_path=str(work / "pages-sync")))):
            shutil.rmtree(work / "pages-sync", ignore_errors=True)
            ons.append(LLM(str(model_dir), **dict(kw, num_device_blocks=blocks, async_scheduling=False)))
            labels.append(label)
    if host_variants:
        ons.append(LLM(str(model_dir), **dict(base, prefix_caching=False, num_device_blocks=blocks)))
        runner = ons[-1].engine.runner
        runner.vector_min = 1 << 30
        if runner.prefill_graphs is not None:
            runner.prefill_graphs.spare_rows = 0
        labels.append("prefix caching off, host path before 5856a61 (per-token lists, F.pad, views a layer)")
    for gb in buffer_variants:
        tag = f"pages-buffer-{gb:g}"
        shutil.rmtree(work / tag, ignore_errors=True)
        ons.append(LLM(str(model_dir), **dict(tiers, disk_path=str(work / tag), num_device_blocks=blocks,
                                              put_buffer_GB=gb)))
        labels.append(f"host tiers on, put_buffer_GB {gb:g}")
    if gate_variants:  # the other put gate (HostTier.put_gate): "engine" <-> "gpu-queued", "gpu-wait" -> "gpu-queued"
        shutil.rmtree(work / "pages-gate", ignore_errors=True)
        ons.append(LLM(str(model_dir), **dict(tiers, disk_path=str(work / "pages-gate"), num_device_blocks=blocks)))
        host = ons[-1].engine.prefix_cache.host
        host.put_gate = other_gate(host.put_gate)
        labels.append(f"host tiers on, put gate {host.put_gate} (the other gate)")
    notes.append(f"# paired rows: the off LLM schedules {'a' if llm_off.engine.async_scheduling else ''}synchronously")
    timeline = [] if profile else None
    ratios = paired_throughput(llm_off, ons, rng, n, length, pairs, timeline)
    notes.append(f"# CUDA allocator over the off LLM's timed batches: {dict(llm_off.__dict__.get('bench_alloc', {}))}")
    rows = []
    for label, llm, rs in zip(labels, ons, ratios):
        host = llm.engine.prefix_cache.host
        puts = (f"; dropped put pages {host.dropped_puts}, failed puts {host.failed_puts}; put gate {host.put_gate}, "
                f"pieces of put work on the engine's thread {host.engine_put_pieces} (starved, past the GPU: "
                f"{host.engine_forced_pieces}), on the put thread {host.thread_put_pieces}") if host is not None else ""
        notes.append(f"# paired rows, {label}: pair ratios {', '.join(f'{r:.3f}' for r in rs)}{puts}")
        notes.append(f"# CUDA allocator over its timed batches: {dict(llm.__dict__.get('bench_alloc', {}))}")
        notes.append(step_table(llm_off, llm, rs))
        rows.append((f"no-reuse throughput, {label} / off, paired: {pairs} pairs of adjacent batches (off after "
                     f"the puts and disk writes drained, host tiers after a batch of their own), all LLMs resident",
                     f"{statistics.median(rs):.3f}x", "", f"median of the pair ratios; min {min(rs):.3f}x, "
                     f"max {max(rs):.3f}x; mean {statistics.fmean(rs):.3f}x +- {_stderr(rs):.3f} (standard error)"))
    if timeline:
        keys = list(timeline[0][1])
        notes.append("\n# one more pair under torch.profiler: the GPU's timeline of each batch\n| batch | " +
                     " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for label, row, _gaps in timeline:
            notes.append(f"| {label} | " + " | ".join(f"{row[k]:,.1f}" if isinstance(row[k], float) else f"{row[k]:,}"
                                                     for k in keys) + " |")
        for label, _row, gaps in timeline:  # gaps: idle_gaps' rows, then the engine thread's sampler
            sampler = gaps[-1]
            notes.append(gap_table(label, gaps[:-1]) + "\n" + sampler.report(12) + "\n" +
                         getattr(sampler, "in_gaps", ""))
    for llm in (llm_off, *ons):
        llm.close()
    del llm_off, ons, llm
    free_gpu()
    return rows


class StackSampler:
    """Where the engine's thread is, every millisecond: the innermost frames of kvc's own code
    (engine/, kvc/) and the call they are in, counted. A profile without a profiler's overhead
    on the thread it samples."""

    def __init__(self, ident: int, label: str = "engine thread", interval: float = 1e-3, timed: bool = False):
        self.ident, self.label, self.interval, self.counts, self.n = ident, label, interval, {}, 0
        self.timed: list[tuple[float, str]] | None = [] if timed else None  # (time.time(), stack) per sample
        # timed: also the host tiers' threads (kvc-put, kvc-disk-writer, ...) at each sample: where
        # they were while the engine's thread was late (samples_in_gaps)
        self.others: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = top = sys._current_frames().get(self.ident)
            where, leaf = None, None
            while frame is not None:
                code = frame.f_code
                if leaf is None:
                    leaf = f"{Path(code.co_filename).name}:{code.co_name}"
                if "/engine/" in code.co_filename or "/kvc/" in code.co_filename:
                    where = f"{Path(code.co_filename).parent.name}/{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}"
                    break
                frame = frame.f_back
            key = f"{where} <- in {leaf}"
            self.counts[key] = self.counts.get(key, 0) + 1
            self.n += 1
            if self.timed is not None:
                now = time.time()
                self.timed.append((now, self._stack(top)))
                names = {t.ident: t.name for t in threading.enumerate() if t.name.startswith("kvc-")}
                self.others.append((now, {names[i]: self._stack(f) for i, f in sys._current_frames().items()
                                          if i in names}))

    @staticmethod
    def _stack(frame, depth: int = 3) -> str:
        """The innermost `depth` frames of engine/ and kvc/ code, innermost first, and the call they are in."""
        parts, leaf = [], None
        while frame is not None and len(parts) < depth:
            code = frame.f_code
            if leaf is None:
                leaf = f"{Path(code.co_filename).name}:{code.co_name}"
            if "/engine/" in code.co_filename or "/kvc/" in code.co_filename:
                parts.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
            frame = frame.f_back
        return " < ".join(parts) + f" (in {leaf})"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, top: int = 15) -> str:
        self.stop()
        rows = sorted(self.counts.items(), key=lambda kv: -kv[1])[:top]
        return f"# {self.label} samples, top:\n" + "\n".join(
            f"#   {c / max(self.n, 1):6.1%}  {k}" for k, c in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, 2K prefix, small batches")
    ap.add_argument("--layers", type=int, default=None, help="hidden layers of the checkpoint (12)")
    ap.add_argument("--lengths", default=None, help="prefix lengths in tokens, comma-separated (8192,32768)")
    ap.add_argument("--repeats", type=int, default=None, help="TTFT samples per row (3)")
    ap.add_argument("--hit-variants", default="", help="comma-separated: the cpu-hit variants timed beside the "
                    "default, whole-page, busy and synchronous rows (default every one: other-gate, "
                    "busy-other-gate, loader, per-layer, sums-after, staged, lag-2, lag-all, kernel / dma)")
    ap.add_argument("--tput-prompts", type=int, default=None, help="prompts per throughput batch (48)")
    ap.add_argument("--tput-len", type=int, default=2048, help="tokens per throughput prompt")
    ap.add_argument("--tput-reps", type=int, default=3, help="timed throughput batches per row (median)")
    ap.add_argument("--tput-pairs", type=int, default=6, help="pairs of adjacent timed batches, off vs host tiers on "
                    "with both LLMs resident (0: no paired row)")
    ap.add_argument("--paired-only", action="store_true", help="only the paired throughput row")
    ap.add_argument("--sync-variants", action="store_true", help="the paired row also times off and host "
                    "tiers on with scheduler.async_scheduling off, in the same pairs")
    ap.add_argument("--host-variants", action="store_true", help="the paired row also times prefix caching "
                    "off with the host path before 5856a61 (per-token lists in prepare, cuDNN padding copies), in "
                    "the same pairs")
    ap.add_argument("--gate-variants", action="store_true", help="the paired row also times host tiers on "
                    "with the other put gate (HostTier.put_gate), in the same pairs")
    ap.add_argument("--buffer-variants", default="", help="comma-separated GB: the paired row also times host "
                    "tiers on with kvc.put_buffer_GB at each size, in the same pairs")
    ap.add_argument("--put-variants", action="store_true", help="the paired row also times host tiers on with the "
                    "put path before run BE (no pause before publishing) and with the cpu tier only, in the "
                    "same pairs")
    ap.add_argument("--model-dir", default=None, help="where the checkpoint is written (reused)")
    ap.add_argument("--work-dir", default=None, help="disk_path parent (default: a temp dir)")
    ap.add_argument("--profile", action="store_true", help="sample where the engine's thread and the put "
                    "thread are during the host-tiers throughput batch; with --paired-only, one more pair of "
                    "batches under torch.profiler: the GPU's busy and idle time in each")
    ap.add_argument("--skip", default="", help="comma-separated: transformers,throughput,tput-variants,cpu-experts,disk")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run of the script "
                    "with the small tiny-qwen3-moe model")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in seconds for the whole run (Python's default 0.005)")
    a = ap.parse_args()
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
        print(f"# GIL switch interval {sys.getswitchinterval() * 1e3:g} ms")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_reuse needs CUDA (--device cpu is a smoke run of the script only)")
    smoke = a.device == "cpu"
    layers = a.layers or (2 if a.quick else 12)
    lengths = [int(x) for x in (a.lengths or ("2048" if a.quick else "8192,32768")).split(",")]
    repeats = a.repeats or (2 if a.quick else 3)
    n_tput = a.tput_prompts or (8 if a.quick else 48)
    tput_len = 1024 if a.quick and a.tput_len == 2048 else a.tput_len
    skip = set(filter(None, a.skip.split(",")))
    model_dir = Path(a.model_dir or f"{tempfile.gettempdir()}/kvc-bench-{'tiny' if smoke else 'q30b-shapes'}-{layers}l")
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="kvc-gpu-reuse-"))
    disk_path = work / "pages"
    shutil.rmtree(disk_path, ignore_errors=True)
    t_start = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        t0 = time.perf_counter()
        if smoke:
            make_tiny_model(model_dir, "qwen3_moe", num_hidden_layers=layers, dtype="bfloat16",
                            max_position_embeddings=40960)
        else:
            make_tiny_model(model_dir, "qwen3_moe", preset="qwen3-30b-a3b-shapes", num_hidden_layers=layers,
                            dtype="bfloat16", std=0.02, device="cpu" if smoke else "cuda")
        print(f"# wrote the checkpoint in {time.perf_counter() - t0:.0f} s: {model_dir}", flush=True)
    global VOCAB
    VOCAB = 256 if smoke else VOCAB
    base = dict(dtype="bfloat16", device=a.device, page_size=16, chunk_size=2048)
    tiers = dict(base, cpu_memory_size_GB=4, disk_path=str(disk_path), disk_size_GB=16)
    rng = random.Random(0)
    if a.paired_only:  # the paired throughput row alone (~1 min on the H200 once the checkpoint is written)
        notes = []
        paired = paired_row(model_dir, base, tiers, work, rng, n_tput, tput_len, a.tput_pairs or 6, notes,
                            profile=a.profile and a.device == "cuda", variants=a.put_variants,
                            sync_variants=a.sync_variants, gate_variants=a.gate_variants,
                            host_variants=a.host_variants,
                            buffer_variants=tuple(float(g) for g in a.buffer_variants.split(",") if g))
        print("\n".join(notes))
        print(f"# total {time.perf_counter() - t_start:.0f} s\n")
        print("| what | measured | floor / peer | note |\n| --- | --- | --- | --- |")
        for row in paired:
            print("| " + " | ".join(row) + " |")
        return
    prefixes = {n: rand_ids(rng, n) for n in lengths}
    rows: list[tuple[str, str, str, str]] = []  # what, measured, floor/peer, note
    notes = [f"# {torch.cuda.get_device_name() if not smoke else 'cpu (smoke run)'}, {layers} layers of {'tiny-qwen3-moe' if smoke else 'Qwen3-30B-A3B'} shapes, bf16, page 16, "
             f"chunk 2048, TTFT median of {repeats}"]

    hf = {}
    if "transformers" not in skip:
        hf = transformers_prefill(model_dir, {n: p + rand_ids(rng, 64) for n, p in prefixes.items()},
                                  a.device, torch.bfloat16)
        print(f"# transformers done at {time.perf_counter() - t_start:.0f} s", flush=True)

    # --- cold / device / cpu, then throughput with host tiers on, in one LLM -------------------
    llm = LLM(str(model_dir), **tiers)
    eng = llm.engine
    page_bytes = eng.kv.spec.page_bytes
    ttft(llm, rand_ids(rng, 2048))  # warm-up (kernels, allocator) and a prefill-rate sample
    delta = statistics.median(ttft(llm, rand_ids(rng, 64))[0] for _ in range(repeats))
    h2d = pinned_h2d_bw(max(page_bytes * (max(lengths) // 16), 1 << 26))
    rows.append(("delta alone (64 tokens, cold)", ms(delta), "", ""))
    for n, prefix in prefixes.items():
        # the first prompt of a length pays one-time costs (kernel compiles for its shapes, allocator
        # growth): warm up with an unrelated prompt of that length, then cold = median of fresh
        # prefixes, the last of which is the one the hit rows reuse
        ttft(llm, rand_ids(rng, n + 64))
        cold = statistics.median([ttft(llm, rand_ids(rng, n) + rand_ids(rng, 64))[0] for _ in range(repeats - 1)]
                                 + [ttft(llm, prefix + rand_ids(rng, 64))[0]])
        devs, devs_sync = [], []  # async scheduling (the default) and synchronous, interleaved
        default_async = eng.async_scheduling
        for _ in range(repeats):
            devs.append(ttft(llm, prefix + rand_ids(rng, 64)))
            eng.async_scheduling = False
            try:
                devs_sync.append(ttft(llm, prefix + rand_ids(rng, 64))[0])
            finally:
                eng.async_scheduling = default_async
        dev = statistics.median(t for t, _ in devs)
        # the cpu hit with the engine's defaults and two variants side by side, interleaved (run BK's
        # rows measured one after the other got faster in order: 11.6 / 9.8 / 8.5 ms at 8K), each
        # after the queued puts and the store's disk writes are done
        host = eng.prefix_cache.host
        store = host.cache
        default_copy = getattr(store, "layer_copy", None)
        pc = eng.prefix_cache

        def busy():  # another cold prompt of this length just ran: its puts and disk writes are running
            ttft(llm, rand_ids(rng, n))
            pc.reset_device_cache()
        default_gate = getattr(host, "put_gate", None)

        other_put_gate = other_gate(default_gate)

        def busy_other_gate():  # the same, the puts under the other gate (HostTier.put_gate)
            host.put_gate = other_put_gate
            busy()
        variants = {"default": lambda: None, "whole": lambda: setattr(host, "layer_loads", False), "busy": busy,
                    "sync": lambda e=eng: setattr(e, "async_scheduling", False)}
        if default_gate is not None:
            variants["busy-other-gate"] = busy_other_gate
            variants["other-gate"] = lambda: setattr(host, "put_gate", other_put_gate)
        if hasattr(host, "queue_here"):  # a layered load queued on the loader thread (the path before)
            variants["loader"] = lambda: setattr(host, "queue_here", False)
        default_group = getattr(host, "layer_group_bytes", 0)
        if default_group:  # every layer landing on its own (the path before): a scatter and an event each
            variants["per-layer"] = lambda: setattr(host, "layer_group_bytes", 0)
        if getattr(store, "checksum_parts", False):  # every layer's checksums after the last copy (the path before)
            variants["sums-after"] = lambda: setattr(store, "checksum_parts", False)
        if hasattr(eng.kv, "layer_lag"):  # a step's layer i waits for the load's layer i + k (k=0: its own)
            variants["lag-2"] = lambda kv=eng.kv: setattr(kv, "layer_lag", 2)
            variants["lag-all"] = lambda kv=eng.kv: setattr(kv, "layer_lag", 1 << 20)
        default_direct = getattr(host, "direct_loads", False)
        if default_direct:  # through the staging buffer and a scatter a group (the path before)
            variants["staged"] = lambda: setattr(host, "direct_loads", False)
        if default_copy is not None:  # the other way of moving a layer (kvc.hostcopy's kernel or strided DMA)
            other = "kernel" if default_copy == "dma" else "dma"
            variants[other] = lambda: setattr(store, "layer_copy", other)
        if a.hit_variants:  # only these beside the default (the row and its A/B, more samples in the time)
            keep = set(a.hit_variants.split(",")) | {"default", "whole", "busy", "sync"}
            variants = {k: v for k, v in variants.items() if k in keep}
        cpus, timed, reused = [], {k: [] for k in variants}, {}
        order = list(variants.items())
        for rep in range(repeats):
            # each repetition starts one variant later: in a fixed order, rows that run the same path
            # read up to 0.5 ms (8K, run DO) and 1.3 ms (DM) apart, as much as the effects timed
            for name, setup in order[rep % len(order):] + order[:rep % len(order)]:
                eng.prefix_cache.flush()
                if hasattr(store, "flush"):
                    store.flush()
                eng.prefix_cache.reset_device_cache()
                setup()
                try:
                    t, got = ttft(llm, prefix + rand_ids(rng, 64))
                finally:
                    eng.async_scheduling = default_async
                    if default_gate is not None:
                        host.put_gate = default_gate
                    host.layer_loads = True
                    if hasattr(host, "queue_here"):
                        host.queue_here = True
                    if default_copy is not None:
                        store.layer_copy = default_copy
                    if "sums-after" in variants:
                        store.checksum_parts = True
                    if default_group:
                        host.layer_group_bytes = default_group
                    if default_direct:
                        host.direct_loads = True
                    if hasattr(eng.kv, "layer_lag"):
                        eng.kv.layer_lag = 0
                timed[name].append(t)
                reused[name] = got
                if name == "default":
                    cpus.append((t, got))
        cpu = [t for t, _ in cpus]
        whole = timed["whole"]
        other_rows = [(k, v) for k, v in timed.items()
                      if k not in ("default", "whole", "busy", "busy-other-gate", "other-gate", "loader", "sync",
                                   "sums-after", "per-layer", "staged", "lag-2", "lag-all")]
        bytes_ = (n // 16) * page_bytes
        peer = f"transformers {ms(hf[n])}" if n in hf else ""
        rows.append((f"{size(n)} TTFT cold", ms(cold), peer, ""))
        rows.append((f"{size(n)} TTFT device hit", ms(dev), f"{ms(delta)} (delta)",
                     f"{dev / delta:.2f}x floor; {devs[-1][1]} tokens reused"))
        rows.append((f"{size(n)} TTFT device hit, synchronous scheduling", ms(statistics.median(devs_sync)),
                     f"{ms(delta)} (delta)", f"{statistics.median(devs_sync) / delta:.2f}x floor; interleaved with the row above"))
        cfloor = bytes_ / h2d + delta
        rows.append((f"{size(n)} TTFT cpu hit", ms(statistics.median(cpu)), ms(cfloor),
                     f"{statistics.median(cpu) / cfloor:.2f}x floor; samples {spread(cpu)}; {cpus[-1][1]} tokens loaded; "
                     f"{bytes_ / GB:.2f} GB at H2D {h2d / GB:.1f} GB/s; layered loads so far {host.layered_loads} "
                     f"({getattr(host, 'direct_layer_loads', 0)} straight into the pool); "
                     f"layer copy {getattr(store, 'layer_copy', '-')} (off: {getattr(store, 'layer_copy_off', None)})"))

        def hit_row(label: str, times: list, note: str = "") -> None:  # a cpu-hit variant's row
            med = statistics.median(times)
            rows.append((f"{size(n)} TTFT cpu hit, {label}", ms(med), ms(cfloor),
                         f"{med / cfloor:.2f}x floor; samples {spread(times)}" + (f"; {note}" if note else "")))
        hit_row("whole-page loads", whole)
        hit_row(f"right after another cold {size(n)} prompt", timed["busy"],
                f"that prompt's puts and disk writes still running (the other rows wait for them); "
                f"last {reused['busy']} tokens reused")
        if timed.get("busy-other-gate"):
            hit_row(f"right after another cold {size(n)} prompt, put gate {other_put_gate}", timed["busy-other-gate"],
                    f"that prompt's puts under the other gate; last {reused['busy-other-gate']} tokens reused")
        if timed.get("other-gate"):
            hit_row(f"put gate {other_put_gate}", timed["other-gate"], "interleaved with the default gate's row")
        hit_row("synchronous scheduling", timed["sync"])
        if timed.get("loader"):
            hit_row("layers queued on the loader thread", timed["loader"])
        if timed.get("per-layer"):
            group = host._layer_group(eng.kv.namespace(""), n // 16) if hasattr(host, "_layer_group") else 1
            hit_row("each layer landing on its own (no layer groups)", timed["per-layer"],
                    f"the default lands {group} layers a group")
        if timed.get("sums-after"):
            hit_row("every layer's checksums after the last copy", timed["sums-after"],
                    f"the default hashes all but the last layer as they land from "
                    f"{store_mod.CHECKSUM_PARTS_MIN_BYTES / GB:.2f} GB")
        if timed.get("lag-2"):
            hit_row("a step's layer i waiting for the load's layer i + 2", timed["lag-2"])
        if timed.get("lag-all"):
            hit_row("a step's layers waiting for the load's last layer", timed["lag-all"])
        if timed.get("staged"):
            hit_row("through a staging buffer and a scatter (not straight into the pool)", timed["staged"])
        for k, v in other_rows:
            hit_row(f"layers copied {'by strided DMA' if k == 'dma' else 'by the kernel reading the slab'}", v)
    rates = eng.planner.tier_rates()
    notes.append(f"# measured: prefill {eng.planner.prefill_rate() or 0:.0f} tok/s; load "
                 + ", ".join(f"{t} {bw / GB:.1f} GB/s" for t, bw in rates.items()))
    tput = {}
    if "throughput" not in skip:
        tput["host tiers on (4 GB cpu + disk)"] = throughput(llm, rng, n_tput, tput_len, profile=a.profile,
                                                             reps=a.tput_reps, label="host tiers on (4 GB cpu + disk)")
        host = eng.prefix_cache.host
        notes.append(f"# host tiers on: dropped put pages {host.dropped_puts} (all batches), failed puts {host.failed_puts}")
        del host
    pool = weakref.ref(eng.kv.pool.kv)
    llm.close()
    # the hit section's closures and variant tables hold the engine (its lambdas take eng and
    # eng.kv as defaults, busy() the LLM): every name that reaches it goes, or the LLM stays
    # resident (runs GN / GO: 62.9 GB on an H100, 121.4 GB on an H200, and the paired rows after it
    # ran out of device memory)
    llm = eng = host = store = pc = variants = order = busy = busy_other_gate = None
    free_gpu()
    if pool() is not None:
        notes.append("# the first LLM's pool is still referenced after close (by this script): the rows after it "
                     "ran beside it")
    print(f"# first LLM done at {time.perf_counter() - t_start:.0f} s{held()}", flush=True)

    # --- disk hits: a new LLM on the same disk_path, page cache dropped --------------------------
    if "disk" not in skip:
        seq, seq_dropped = seq_read_bw(work, 2 << 30)
        llm = LLM(str(model_dir), **tiers)
        ttft(llm, rand_ids(rng, 2048))  # warm-up and a prefill-rate sample
        for n in prefixes:  # as for cold: the first prompt of a length in a process pays one-time costs
            ttft(llm, rand_ids(rng, n + 64))
        llm.engine.prefix_cache.flush()
        dropped = drop_page_cache()
        for n, prefix in prefixes.items():
            d, cached = ttft(llm, prefix + rand_ids(rng, 64))
            # a prompt no tier holds, in the same LLM right after: the disk hit's cold in this process
            # (the first LLM's cold rows are another process state; the planner's first look at the
            # unmeasured disk tier also sends a probe, beside the hit's recompute)
            same = ttft(llm, rand_ids(rng, n) + rand_ids(rng, 64))[0]
            bytes_ = (n // 16) * page_bytes
            dfloor = bytes_ / seq + delta
            rows.append((f"{size(n)} TTFT disk hit", ms(d), ms(dfloor),
                         f"{d / dfloor:.2f}x floor; {cached} tokens loaded; seq read {seq / GB:.2f} GB/s; "
                         f"{d / same:.2f}x a cold prompt in the same LLM right after ({ms(same)})"))
        notes.append(f"# disk: page cache dropped before the disk hits: {dropped}; before the sequential "
                     f"read: {seq_dropped}" + ("" if dropped else " (not root: numbers include the page cache)"))
        llm.close()
        del llm
        free_gpu()
        print(f"# disk rows done at {time.perf_counter() - t_start:.0f} s{held()}", flush=True)

    # --- no-reuse throughput: off / device pool only ---------------------------------------------
    if "throughput" not in skip:
        for name, kw in (("prefix_caching off", dict(base, prefix_caching=False)),
                         ("device pool only (gpu_only)", dict(base, gpu_only=True))):
            llm = LLM(str(model_dir), **kw)
            tput[name] = throughput(llm, rng, n_tput, tput_len, reps=a.tput_reps, label=name)
            llm.close()
            del llm
            free_gpu()
        names = ["prefix_caching off", "device pool only (gpu_only)", "host tiers on (4 GB cpu + disk)"]
        if "tput-variants" not in skip:  # where the host tiers' cost comes from
            cpu_only = dict(base, cpu_memory_size_GB=4, disk_path=None)
            for name, kw, switch in (("host tiers, cpu tier only (4 GB, no disk)", cpu_only, None),
                                     # a put buffer smaller than one offer: every offer is dropped before
                                     # its gather; what is left is the host tiers' other work (lookups)
                                     ("host tiers, cpu tier only, every offer dropped (put_buffer_GB 1e-4)",
                                      dict(cpu_only, put_buffer_GB=1e-4), None),
                                     ("host tiers, cpu tier only, GIL switch interval 0.5 ms", cpu_only, 5e-4)):
                if kw.get("disk_path"):  # its own, empty disk tier: the CPU-experts row reads disk_path
                    kw["disk_path"] = str(work / "pages-variant")
                    shutil.rmtree(kw["disk_path"], ignore_errors=True)
                llm = LLM(str(model_dir), **kw)
                before = sys.getswitchinterval()
                if switch is not None:  # does the engine thread wait for the put thread's GIL (5 ms default)?
                    sys.setswitchinterval(switch)
                try:
                    tput[name] = throughput(llm, rng, n_tput, tput_len, reps=a.tput_reps, label=name)
                finally:
                    sys.setswitchinterval(before)
                host = llm.engine.prefix_cache.host
                notes.append(f"# {name}: dropped put pages {host.dropped_puts}, failed puts {host.failed_puts}")
                llm.close()
                del llm, host
                free_gpu()
                names.append(name)
        if a.tput_pairs:
            # two LLMs resident at once (~19 GB each at these shapes): on an 80 GB card run GN died
            # here of CUDA out of memory and took the rows above with it; now a note and a row say so
            if a.device == "cuda":
                notes.append(f"# before the paired rows{held()} by this process, "
                             f"{torch.cuda.mem_get_info()[0] / GB:.1f} GB free on the device")
            try:
                paired = paired_row(model_dir, base, tiers, work, rng, n_tput, tput_len, a.tput_pairs, notes,
                                    variants=a.put_variants)
            except torch.OutOfMemoryError as e:
                paired = [("no-reuse throughput, paired", "not run", "",
                           f"CUDA out of memory making its resident LLMs: {str(e).splitlines()[0]}")]
                notes.append(f"# paired rows not run: {e}")
            free_gpu()
        # off once more, last: one timed batch per row swings between machines (run M's first off
        # row was 0.74x of run L's), so the ratios use the mean of both off rows and both are shown
        llm = LLM(str(model_dir), **dict(base, prefix_caching=False))
        tput["prefix_caching off (again, last)"] = throughput(llm, rng, n_tput, tput_len, reps=a.tput_reps,
                                                              label="prefix_caching off (again, last)")
        llm.close()
        del llm
        free_gpu()
        names.insert(1, "prefix_caching off (again, last)")
        off = (tput["prefix_caching off"] + tput["prefix_caching off (again, last)"]) / 2
        for name in names:
            rows.append((f"no-reuse throughput, {name}", f"{tput[name] / 1e3:.1f}K tok/s", "",
                         f"{tput[name] / off:.2f}x off (mean of both off rows)"))
        if a.tput_pairs:
            rows += paired
        print(f"# throughput done at {time.perf_counter() - t_start:.0f} s{held()}", flush=True)

    # --- CPU experts: cold vs disk hit --------------------------------------------------------------
    if "cpu-experts" not in skip:
        n = min(lengths)
        llm = LLM(str(model_dir), **tiers, gpu_experts_ratio=0.25)
        cold = ttft(llm, rand_ids(rng, n) + rand_ids(rng, 64))[0]  # also a prefill-rate sample
        drop_page_cache()
        d, cached = ttft(llm, prefixes[n] + rand_ids(rng, 64))
        rows.append((f"CPU experts (gpu_experts_ratio 0.25), {size(n)} TTFT cold", ms(cold), "", ""))
        rows.append((f"CPU experts (gpu_experts_ratio 0.25), {size(n)} TTFT disk hit", ms(d), "",
                     f"{cold / d:.1f}x faster than cold; {cached} tokens loaded"))
        llm.close()
        del llm
        free_gpu()

    print("\n".join(notes + STEP_NOTES))
    print(f"# total {time.perf_counter() - t_start:.0f} s\n")
    print("| what | measured | floor / peer | note |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if a.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
