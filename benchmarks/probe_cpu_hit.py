"""The timeline of one cpu-tier hit on CUDA (issue 10, item 3): where its TTFT goes.

For each --cached length (8K and 32K by default, one LLM): puts a prompt of that many tokens in the
cpu tier (4 GB, no disk), drops it from the device pool, then asks again with --new new tokens
under torch.profiler. The host functions a hit passes
through (admission, host lookup, the loader thread's get, the device checksum, the scatter, the
poll, the step) are timed on whatever thread runs them, and so are the cyclic GC's collections
and the CUDA events' record and synchronize calls; the GPU side (torch.profiler's trace, aligned
on add_request) is grouped into host-to-device copies, device-to-host copies and kernels by name. Every row gives first start and last end in ms
from add_request, the summed duration and the count, so serial gaps show:

    python benchmarks/probe_cpu_hit.py --model-dir /tmp/kvc-q30b-12l      # needs CUDA
"""
from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.llm import LLM  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402
from kvc import gpu_checksum, pinned  # noqa: E402
from bench_gpu_reuse import ttft as first_token  # noqa: E402

# (label, object path from the engine, method): marked with record_function on every call
MARKS = [
    ("add_request", "", "add_request"),
    ("admission (_match)", "prefix_cache", "_match"),
    ("host lookup", "prefix_cache.host", "lookup"),
    ("load start", "prefix_cache.host", "load"),
    ("load start: executor submit", "prefix_cache.host._loader", "submit"),
    ("loader: _load", "prefix_cache.host", "_load"),
    ("loader: staging buffer", "prefix_cache.host", "_staging_for"),
    ("loader: tier run (_get_run)", "prefix_cache.host", "_get_run"),
    ("loader: store get to device", "prefix_cache.host.cache", "_get_to_device"),
    ("loader: copies + checksums queued", "prefix_cache.host.cache", "_copy_and_hash"),
    ("loader: pool scatter", "kv.pool", "scatter"),
    ("loader: layer by layer (_load_layers)", "prefix_cache.host", "_load_layers"),
    ("loader: store get, layer by layer", "prefix_cache.host.cache", "get_layers_into"),
    ("layers queued on the engine's thread (_queue_layers_here)", "prefix_cache.host", "_queue_layers_here"),
    ("store: layers queued (start_layers_into)", "prefix_cache.host.cache", "start_layers_into"),
    ("store: one layer's strided copies (_copy_layer)", "prefix_cache.host.cache", "_copy_layer"),
    ("store: one layer's strided copies into pool blocks", "prefix_cache.host.cache", "_copy_layer_to_blocks"),
    ("store: expected checksums uploaded", "prefix_cache.host.cache", "_expected_sums"),
    ("loader: layered verdict (finish_layers)", "prefix_cache.host.cache", "finish_layers"),
    ("layer group scatters (the thread that queues the load)", "kv.pool", "scatter_layers"),
    ("loader: verdict (waits for copies + checksums)", "prefix_cache.host.cache", "_verdict"),
    ("poll (waits for the load)", "prefix_cache", "poll"),
    ("prepare", "runner", "prepare"),
    ("prepare: upload (runner._upload)", "runner", "_upload"),
    ("model forward (host)", "model", "forward"),
    ("commit", "prefix_cache", "commit"),
    ("commit: loaded pages registered", "prefix_cache", "_register_loaded"),
    ("commit: new pages offered", "prefix_cache", "_offer"),
    ("engine step", "", "step"),
    ("step_waits", "prefix_cache", "step_waits"),
    ("runner: launch (logits)", "runner", "logits"),
    ("settle (waits for the verdict)", "prefix_cache", "settle"),
    # the step's launch, piece by piece (run AW: 7.9 ms to launch an 8K hit's 64-token step)
    ("step: layer waits (kv.layer: the load's layer events)", "kv", "layer"),
]


HOST: list[tuple[str, float, float]] = []  # (label, start, end) perf_counter seconds, any thread


def mark(obj, name: str, label: str) -> None:
    """Time every call (the profiler records annotations of the thread that started it only; the
    loader runs on its own thread), and annotate add_request so both clocks meet there."""
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapped(*a, **k):
        t = time.perf_counter()
        try:
            if label == "add_request":
                with torch.profiler.record_function(label):
                    return fn(*a, **k)
            return fn(*a, **k)
        finally:
            HOST.append((label, t, time.perf_counter()))
    setattr(obj, name, wrapped)


def timed_events():
    """A torch.cuda.Event whose record and synchronize are timed into HOST (the hit's load records
    one on the engine's stream and the loader waits for it: run W left ~2.8 ms around each)."""
    class TimedEvent(torch.cuda.Event):
        def record(self, stream=None):
            t = time.perf_counter()
            try:
                return super().record(stream)
            finally:
                HOST.append(("cuda Event.record", t, time.perf_counter()))

        def synchronize(self):
            t = time.perf_counter()
            try:
                return super().synchronize()
            finally:
                HOST.append(("cuda Event.synchronize", t, time.perf_counter()))
    return TimedEvent


class StackSampler:
    """Where each thread of interest is, every ~0.2 ms of wall time, during one (unprofiled) hit:
    the innermost frame of the project's own code on the engine's thread and on the kvc-load /
    kvc-put threads. A thread blocked in C code with the GIL released still shows the line that
    called it; a gap between samples means some thread held the GIL in C code meanwhile (the
    sampler needs it to run)."""

    def __init__(self, period: float = 2e-4):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self.main = threading.main_thread().ident

    def _where(self, frame) -> str:
        here = None
        while frame is not None:
            f = frame.f_code.co_filename
            if "/site-packages/" not in f and "/lib/python" not in f and "probe_cpu_hit" not in f:
                here = f"{Path(f).parent.name}/{Path(f).name}:{frame.f_lineno} {frame.f_code.co_name}"
                break
            frame = frame.f_back
        return here or "(library code)"

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            names = {th.ident: th.name for th in threading.enumerate()}
            now = {}
            for ident, frame in sys._current_frames().items():
                name = "engine" if ident == self.main else names.get(ident, "")
                if name == "engine" or name.startswith(("kvc-load", "kvc-put")):
                    now[name.split("_")[0]] = self._where(frame)
            self.samples.append((t, now))
            time.sleep(self.period)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self, zero: float) -> None:
        """Spans of consecutive samples at the same place, per thread (ms from zero), and gaps."""
        print("| thread | where (innermost project frame) | from (ms) | to (ms) | samples |\n|---|---|---|---|---|")
        for who in ("engine", "kvc-load", "kvc-put"):
            spans = []
            for t, now in self.samples:
                w = now.get(who)
                if w is None:
                    continue
                if spans and spans[-1][0] == w:
                    spans[-1][2], spans[-1][3] = t, spans[-1][3] + 1
                else:
                    spans.append([w, t, t, 1])
            for w, t0, t1, n in spans:
                if t1 - t0 >= 5e-4:  # spans of half a millisecond or more
                    print(f"| {who} | {w} | {(t0 - zero) * 1e3:.2f} | {(t1 - zero) * 1e3:.2f} | {n} |")
        gaps = [(a[0], b[0]) for a, b in zip(self.samples, self.samples[1:]) if b[0] - a[0] > 1e-3]
        print("sampler gaps over 1 ms (the GIL held in C code): " +
              (", ".join(f"{(a - zero) * 1e3:.2f}-{(b - zero) * 1e3:.2f}" for a, b in gaps) or "none"))


def short(name: str) -> str:
    return re.sub(r"\(.*", "", re.sub(r"<.*", "", name))[:60]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--cached", type=int, nargs="+", default=[8192, 32768], help="prefix lengths, one hit each")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (tiny model)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in seconds for the whole run (Python's default 0.005): a "
                    "thread that hands the GIL over around each CUDA launch waits up to this long to get it "
                    "back while another thread runs Python")
    ap.add_argument("--switch-pairs", type=int, default=0,
                    help="instead of the timelines: this many rounds, each timing a cpu hit (layer by layer "
                    "and whole pages) and a device hit under Python's default switch interval and under "
                    "--switch-interval (default 0.2 ms), alternating in one process; prints the medians")
    ap.add_argument("--graph-pairs", type=int, default=0,
                    help="instead of the timelines: this many rounds of the same hits with a short step's "
                    "attention captured in the prefill graphs and eager between them, alternating")
    a = ap.parse_args()
    if a.switch_pairs:
        a.switch_interval = a.switch_interval or 2e-4
    elif a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
        print(f"# GIL switch interval {sys.getswitchinterval() * 1e3:.2f} ms")
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("needs CUDA (or --device cpu for a smoke run)")
    model_dir = Path(a.model_dir or f"{tempfile.gettempdir()}/kvc-{'q30b' if cuda else 'tiny'}-{a.layers}l")
    if not (model_dir / "config.json").is_file():
        if cuda:
            make_tiny_model(model_dir, "qwen3_moe", preset="qwen3-30b-a3b-shapes", num_hidden_layers=a.layers,
                            dtype="bfloat16", std=0.02, device="cuda")
        else:
            make_tiny_model(model_dir, "qwen3_moe", num_hidden_layers=a.layers, dtype="bfloat16",
                            max_position_embeddings=max(a.cached) + 4096)
    llm = LLM(str(model_dir), dtype="bfloat16", device=a.device, page_size=16, chunk_size=2048,
              cpu_memory_size_GB=4, disk_path=None)
    eng = llm.engine
    rng = random.Random(0)

    vocab = min(100_000, eng.args.vocab_size)

    def ids(n):
        return [rng.randrange(10, vocab) for _ in range(n)]

    def ttft(p):  # as bench_gpu_reuse times it: until a step hands the token out
        return first_token(llm, p)

    def drop():
        eng.prefix_cache.flush()
        eng.prefix_cache.reset_device_cache()

    def alternate(cached_len: int, rounds: int, variants, what: str) -> None:
        """The same hits (cpu hits layer by layer and whole pages, a device hit) under each of the two
        variants (label, apply), alternating in one process: this host's drift between runs is
        larger than the effects looked for (run AX's single samples)."""
        prefix = ids(cached_len)
        ttft(prefix + ids(a.new))  # cold: the prefix goes to the cpu tier
        host = eng.prefix_cache.host
        times = collections.defaultdict(list)
        kinds = ("cpu hit, layer by layer", "cpu hit, whole pages", "device hit")
        for rnd in range(rounds + 1):  # round 0 warms both paths up, untimed
            for label, apply in (variants if rnd % 2 else variants[::-1]):
                apply()
                for kind in kinds:
                    host.layer_loads = kind != "cpu hit, whole pages"
                    if kind != "device hit":
                        drop()
                    t, got = ttft(prefix + ids(a.new))
                    if got < cached_len:
                        print(f"# {kind}: only {got} of {cached_len} tokens reused")
                    if rnd:
                        times[(kind, label)].append(t * 1e3)
        variants[0][1]()
        host.layer_loads = True
        (l0, _), (l1, _) = variants
        print(f"\n# {cached_len} cached + {a.new} new, {rounds} rounds alternating {what}; TTFT ms, median (min-max)")
        print(f"| hit | {l0} | {l1} | ratio |\n|---|---|---|---|")
        for kind in kinds:
            d, f = times[(kind, l0)], times[(kind, l1)]
            md, mf = statistics.median(d), statistics.median(f)
            print(f"| {kind} | {md:.2f} ({min(d):.2f}-{max(d):.2f}) | {mf:.2f} ({min(f):.2f}-{max(f):.2f}) | "
                  f"{mf / md:.2f}x |", flush=True)

    def switch_pairs(cached_len: int) -> None:
        default = sys.getswitchinterval()
        alternate(cached_len, a.switch_pairs, [
            (f"switch interval {default * 1e3:g} ms", lambda: sys.setswitchinterval(default)),
            (f"{a.switch_interval * 1e3:g} ms", lambda: sys.setswitchinterval(a.switch_interval))],
            "the GIL switch interval")

    def graph_pairs(cached_len: int) -> None:
        pg = eng.runner.prefill_graphs
        sizes = pg.attn_sizes

        def inside(on):
            def apply():
                pg.attn_sizes = sizes if on else set()
            return apply
        alternate(cached_len, a.graph_pairs, [("attention in the prefill graphs", inside(True)),
                                              ("attention eager between them", inside(False))],
                  "where a short step's attention runs")

    def one_hit(cached_len: int) -> None:
        prefix = ids(cached_len)
        ttft(prefix + ids(a.new))  # cold: the prefix goes to the cpu tier
        for _ in range(2):  # warm-up hits (first-use costs of the load path)
            drop()
            print(f"# warm-up cpu hit: {ttft(prefix + ids(a.new))[0] * 1e3:.1f} ms", flush=True)
        drop()
        HOST.clear()
        gc_start: dict[int, float] = {}

        def on_gc(phase, info):  # cyclic-GC collections during the request, by generation
            if phase == "start":
                gc_start[info["generation"]] = time.perf_counter()
            else:
                t0 = gc_start.pop(info["generation"], None)
                if t0 is not None:
                    HOST.append((f"GC collection, generation {info['generation']}", t0, time.perf_counter()))
        gc.callbacks.append(on_gc)
        plain_event = torch.cuda.Event
        if cuda:
            torch.cuda.Event = timed_events()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            wall, cached = ttft(prefix + ids(a.new))
        timed = list(HOST)
        gc.callbacks.remove(on_gc)
        torch.cuda.Event = plain_event
        drop()
        HOST.clear()  # the same hit without the profiler (CUPTI), timed by the marks alone
        if cuda:
            torch.cuda.Event = timed_events()
            torch.cuda.set_sync_debug_mode("warn")  # any op that makes the host wait for the GPU
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            plain, _ = ttft(prefix + ids(a.new))
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.Event = plain_event
        unprofiled = list(HOST)
        sync_ops = collections.Counter(f"{Path(w.filename).name}:{w.lineno} {str(w.message).splitlines()[0][:80]}"
                                       for w in syncs if "synchroniz" in str(w.message))
        host = eng.prefix_cache.host
        host.layer_loads = False  # side by side: the same hit loading whole pages
        drop()
        whole, _ = ttft(prefix + ids(a.new))
        host.layer_loads = True
        drop()  # once more, with a stack sampler beside it
        with StackSampler() as sampler:
            t_sampled = time.perf_counter()
            sampled, _ = ttft(prefix + ids(a.new))
        path = tempfile.mktemp(suffix=".json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if "dur" in e and "ts" in e]
        os.unlink(path)
        marks = [e for e in events if e.get("name") == "add_request" and e.get("cat") in ("user_annotation", "cpu_op")]
        zero = min(e["ts"] for e in marks) if marks else min(e["ts"] for e in events)
        HOST[:] = timed  # the profiled request's calls only
        host_zero = min(t for label, t, _ in HOST if label == "add_request")
        rows: dict[str, list] = collections.defaultdict(lambda: [float("inf"), 0.0, 0.0, 0])  # in us from zero
        for label, t0, t1 in HOST:
            r = rows[label]
            s0, s1 = (t0 - host_zero) * 1e6 + zero, (t1 - host_zero) * 1e6 + zero
            r[0], r[1] = min(r[0], s0), max(r[1], s1)
            r[2] += s1 - s0
            r[3] += 1
        gpu: dict[str, list] = collections.defaultdict(lambda: [float("inf"), 0.0, 0.0, 0])
        for e in events:
            cat = e.get("cat")
            if cat == "gpu_memcpy":
                key = "GPU copy " + e["name"]
            elif cat == "kernel":
                key = "GPU kernel " + short(e["name"])
            else:
                continue
            if e["ts"] < zero:
                continue
            r = gpu[key]
            r[0], r[1] = min(r[0], e["ts"]), max(r[1], e["ts"] + e["dur"])
            r[2] += e["dur"]
            r[3] += 1
        print(f"# {torch.cuda.get_device_name() if cuda else 'cpu'}, {a.layers} layers, cpu hit of {cached_len} cached + {a.new} new "
              f"tokens: TTFT {wall * 1e3:.1f} ms profiled ({cached} tokens reused), {plain * 1e3:.1f} ms unprofiled; "
              f"loading whole pages instead of layer by layer {whole * 1e3:.1f} ms (layered loads so far "
              f"{host.layered_loads}{', off: ' + host.layer_loads_off if host.layer_loads_off else ''})")
        print("| what | first start (ms) | last end (ms) | summed (ms) | count |\n|---|---|---|---|---|")
        kernels = sorted(gpu.items(), key=lambda kv: -kv[1][2])
        top = [kv for kv in kernels if not kv[0].startswith("GPU kernel")] + \
            [kv for kv in kernels if kv[0].startswith("GPU kernel")][:12]
        for name, (s, e, d, n) in sorted(list(rows.items()) + top, key=lambda kv: kv[1][0]):
            print(f"| {name} | {(s - zero) / 1e3:.2f} | {(e - zero) / 1e3:.2f} | {d / 1e3:.2f} | {n} |")
        z = min(t for label, t, _ in unprofiled if label == "add_request")
        spans: dict[str, list] = collections.defaultdict(lambda: [float("inf"), 0.0, 0.0, 0])
        for label, t0, t1 in unprofiled:
            r = spans[label]
            r[0], r[1] = min(r[0], t0 - z), max(r[1], t1 - z)
            r[2] += t1 - t0
            r[3] += 1
        print(f"\n# the same hit without the profiler, host marks only: TTFT {plain * 1e3:.1f} ms")
        print("| what | first start (ms) | last end (ms) | summed (ms) | count |\n|---|---|---|---|---|")
        for name, (s0, e0, d, n) in sorted(spans.items(), key=lambda kv: kv[1][0]):
            print(f"| {name} | {s0 * 1e3:.2f} | {e0 * 1e3:.2f} | {d * 1e3:.2f} | {n} |")
        print("\n# synchronizing ops in the unprofiled hit (torch.cuda.set_sync_debug_mode), any thread: " +
              ("; ".join(f"{k} x{n}" for k, n in sync_ops.items()) or "none"))
        print(f"\n# the same hit again with a stack sampler beside it: TTFT {sampled * 1e3:.1f} ms; "
              f"{len(sampler.samples)} samples")
        sampler.report(t_sampled)
        print()

    if a.switch_pairs or a.graph_pairs:  # no marks: the hits as an application sees them
        ttft(ids(2048))
        if a.graph_pairs and (eng.runner.prefill_graphs is None or not eng.runner.prefill_graphs.attn_sizes):
            sys.exit("--graph-pairs: this engine captures no attention in prefill graphs (not CUDA?)")
        for cached_len in a.cached:
            (switch_pairs if a.switch_pairs else graph_pairs)(cached_len)
        llm.close()
        return
    for label, where, name in MARKS:
        obj = functools.reduce(getattr, where.split("."), eng) if where else eng
        mark(obj, name, label)
    mark(gpu_checksum, "xxh3_64_rows", "loader: device checksums")
    # a layer-by-layer load's checksums, launched after its last layer (run BH: 1.75 ms from the last
    # layer to the verdict, while the engine's upload waited)
    mark(gpu_checksum, "xxh3_64_segmented", "loader: device checksums, segmented (launch)")
    mark(pinned.UPLOADER, "upload", "pinned upload (kvc.pinned, any thread)")
    # inside it (any thread): the slot's wait for its last copy, the event record; the rest of an
    # upload is the host copy into the slot and the non-blocking .to(), each of which releases the GIL
    mark(pinned._Ring, "_slot", "pinned upload: slot (waits for the slot's last copy)")
    mark(pinned._Ring, "_record", "pinned upload: event record")
    import engine.runner as runner_module
    mark(runner_module.Launched, "tokens", "samples read back (Launched.tokens: waits for the GPU)")
    mark(eng.prefix_cache, "gpu_wait", "gpu_wait (the engine gate's put work, then the wait)")
    import engine.prefill_graphs as graphs_module
    mark(graphs_module, "kernel_attention", "step: attention launches (kernel_attention, a layer each)")
    if eng.runner.prefill_graphs is not None:
        mark(eng.runner.prefill_graphs, "forward", "step: prefill graphs' forward (replays + attention)")
        mark(torch.cuda.CUDAGraph, "replay", "step: CUDA graph replays (any graph)")
    ttft(ids(2048))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,  # CUPTI's first-use
                                            torch.profiler.ProfilerActivity.CUDA]):  # costs, not in a hit
        ttft(ids(2048))
    for cached_len in a.cached:
        one_hit(cached_len)
    llm.close()


if __name__ == "__main__":
    main()
