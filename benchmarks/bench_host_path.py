"""The engine thread's host work for a long cached prompt: where a device hit's time goes outside
the model (issue 11's device-hit TTFT, issue 10's per-request cost).

A device-pool hit of L cached tokens + `--new` new ones does per-request work that grows with L
on the engine thread before the step's kernels start: the prompt's id check (add_request), its
page hashes, the prefix match in the pool, the block table's upload, and at the end the blocks'
release. This script times each of those functions (wall time, summed per request) for hits of
8K and 32K cached tokens and for the new tokens alone, over --repeat requests after one untimed
request a column (a graph bucket's capture and other first-use costs), with this thread's pinned
upload ring allocated beforehand (before the twenty-seventh session the CUDA prepare rows could
include page-locked allocations of slots first used there), and prints a table. The chats column
sends --chats conversations round-robin over the cached prefix, each turn its last prompt plus
--new tokens (an agent's system prompt under several users' chats): each hit is the prefix plus
that conversation's earlier turns, and the last row says how many started from a remembered hit.
The model's own time is listed too: on CPU it is the reference attention over the prefix (not the
point here); on CUDA it is the host time to queue the kernels.

    python benchmarks/bench_host_path.py                       # CPU, a 1-layer tiny model
    python benchmarks/bench_host_path.py --device cuda --preset qwen3-30b-a3b-shapes --layers 12

A last table times the tokenizer on a text of the longest prompt's length and the longest pause it
causes a thread running beside it (the server tokenizes on a worker thread; see server/api.py).
"""
from __future__ import annotations

import argparse
import collections
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import prompts  # noqa: E402
from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.llm import _make_store  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402
from kvc import pinned  # noqa: E402
from kvc.config import load_config  # noqa: E402

# (label, object path on the engine, method, counted in the host total): host functions a request
# passes through; the admission total contains the three rows above it
PHASES = [
    ("add_request (id check, packing)", "", "add_request", True),
    ("page hashes", "kv", "update_hashes", False),
    ("pool match", "prefix_cache.blocks", "match_prefix", False),
    ("pool touch", "prefix_cache.blocks", "touch", False),
    ("admission total (hashes, match, touch)", "prefix_cache", "_match", True),
    ("step inputs + block tables (prepare)", "runner", "prepare", True),
    ("model forward (host)", "model", "forward", False),
    ("release blocks", "prefix_cache", "free", True),
    ("register pages (commit)", "prefix_cache", "commit", True),
    ("  of which offers to the host tiers", "prefix_cache", "_offer", False),
    ("host-tier lookup (in admission)", "prefix_cache.host", "lookup", False),
    ("host-tier lookup_from a device hit (in admission)", "prefix_cache.host", "lookup_from", False),
    ("host-tier load start (in admission)", "prefix_cache.host", "load", False),
    ("loads polled and registered", "prefix_cache", "poll", True),
]

def instrument(eng) -> dict[str, float]:
    times: dict[str, float] = collections.defaultdict(float)
    for label, where, name, _ in PHASES:
        obj = functools.reduce(getattr, where.split("."), eng) if where else eng
        if obj is not None:  # None: no host tiers
            time_calls(obj, name, label, times)
    return times


def time_calls(obj, name: str, label: str, times: dict[str, float], counts: dict[str, int] | None = None) -> None:
    """Wrap obj.name (an instance attribute: `del obj.name` undoes it) so every call adds its wall
    time to times[label] and, given counts, 1 to counts[label]."""
    fn = getattr(obj, name)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            times[label] += time.perf_counter() - t
            if counts is not None:
                counts[label] += 1
    setattr(obj, name, timed)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="e.g. qwen3-30b-a3b-shapes (default: the tiny model)")
    ap.add_argument("--model-dir", default=None, help="an existing checkpoint to use instead (e.g. the 12-layer "
                    "Qwen3-30B-A3B-shapes one the other GPU benchmarks write)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--cached", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--chats", type=int, default=6,
                    help="conversations in the chats column: round-robin over the cached prefix, each turn "
                         "--new tokens more than its last (0: no such column)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tiers", choices=["none", "cpu", "cpu+disk"], default="none",
                    help="host tiers (none: gpu_only); with tiers a cpu-hit column is added (the device "
                         "pool emptied before each request, the prefix loaded from the cpu tier)")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    dtype = "bfloat16" if cuda else "float32"
    longest = max(a.cached) + a.new
    d = a.model_dir
    if d is None or not (Path(d) / "config.json").exists():
        d = d or tempfile.mkdtemp()
        make_tiny_model(d, "qwen3_moe", preset=a.preset, num_hidden_layers=a.layers, dtype=dtype, std=0.02,
                        max_position_embeddings=max(65536, 2 * longest))
    if not cuda:
        torch.set_num_threads(1)
    tiers = {"gpu_only": True} if a.tiers == "none" else {
        "gpu_only": False, "cpu_memory_size_GB": 4,
        "disk_path": tempfile.mkdtemp(prefix="kvc-host-path-") if a.tiers == "cpu+disk" else None}
    cfg = load_config().replace(path=d, dtype=dtype, device=a.device, page_size=16, chunk_size=2048,
                                num_device_blocks=2 * (longest // 16 + 64), max_num_batched_tokens=longest,
                                **tiers)
    store = _make_store(cfg)  # the host tiers, as LLM builds them (None: gpu_only)
    eng = LLMEngine(cfg, cache=store)
    times = instrument(eng)
    vocab = eng.args.vocab_size
    n = 0

    def run(p) -> tuple[float, int]:
        nonlocal n
        n += 1
        t = time.perf_counter()
        eng.add_request(f"r{n}", p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        cached = 0
        while eng.has_unfinished():
            for o in eng.step():
                cached = o.num_cached_tokens if o.finished else cached
        eng.flush_commits()  # the request's page bookkeeping is part of its host work here
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, cached

    if cuda:  # every slot of this thread's pinned ring allocated now, not inside a timed prepare
        for _ in range(pinned.SLOTS):
            pinned.upload(torch.zeros(8), a.device)
        torch.cuda.synchronize()
    print(f"device {a.device}, {eng.args.num_layers} layers, hidden {eng.args.hidden_size}, page 16, host tiers "
          f"{a.tiers}; {a.repeat} requests a column after one untimed; ms per request (wall time of each "
          f"function, summed)")
    pc = eng.prefix_cache
    cols = []
    for L in a.cached:
        base = prompts(1, L, vocab, 7)[0]
        run(base)  # now in the device pool (and offered to the host tiers)
        if pc.host is not None:
            pc.flush()  # its puts done: the rows below do not share the host with them
        kinds = [("device", f"{L} device hit + {a.new}"), ("alone", f"{a.new} alone")]
        if pc.host is not None:
            kinds.insert(1, ("cpu", f"{L} cpu hit + {a.new}"))
        if a.chats:
            kinds.insert(1, ("chats", f"{L} hit, {a.chats} chats"))
        turns: dict[int, list[int]] = {}  # chats: conversation -> its turns so far, after the prefix
        for kind, label in kinds:
            total = 0.0
            allocs = pinned.UPLOADER.allocations
            for r in range(-1, a.repeat):  # r = -1: untimed (a graph bucket's capture, first-use costs)
                if r == 0:
                    times.clear()
                    total = 0.0
                    memo_hits = pc.memo_hits
                suffix, other = prompts(2, a.new, vocab, 1000 + r)
                if kind == "cpu":
                    pc.flush()
                    pc.reset_device_cache()
                if kind == "chats":  # conversation r % chats, its next turn: its last prompt + new tokens
                    c = r % a.chats
                    said = turns.get(c, [])
                    turns[c] = said + prompts(1, a.new, vocab, 5000 + 97 * c + len(said))[0]
                    suffix = turns[c]
                dt, got = run(other if kind == "alone" else base + suffix)
                if kind != "alone":
                    assert got >= L, f"expected a {kind} hit of {L} tokens, got {got}"
                total += dt
            cols.append((label, total / a.repeat, dict(times), pc.memo_hits - memo_hits))
            if pinned.UPLOADER.allocations != allocs:
                print(f"# {label}: {pinned.UPLOADER.allocations - allocs} page-locked allocations during the column")
        if pc.host is not None:
            pc.flush()
        pc.reset_device_cache()
    print("| phase | " + " | ".join(c[0] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for label, _, _, _ in PHASES:
        print(f"| {label} | " + " | ".join(f"{c[2].get(label, 0.0) / a.repeat * 1e3:.3f}" for c in cols) + " |")
    counted = {label for label, _, _, yes in PHASES if yes}
    host = [sum(v for k, v in c[2].items() if k in counted) / a.repeat * 1e3 for c in cols]
    print("| host work outside the model | " + " | ".join(f"{h:.3f}" for h in host) + " |")
    print("| request wall time (TTFT) | " + " | ".join(f"{c[1] * 1e3:.2f}" for c in cols) + " |")
    print("| hits that started from a memo (of the column's requests) | "
          + " | ".join(f"{c[3]} / {a.repeat}" for c in cols) + " |")
    if eng.tokenizer is not None:
        tokenizer_stall(eng.tokenizer, max(a.cached))


def tokenizer_stall(tok, tokens: int) -> None:
    """How long a text of ~`tokens` tokens takes to tokenize, and how long another thread (the
    engine's, when the server tokenized there) is stopped meanwhile: tokenizers' encode holds the
    GIL for the whole call, encode_batch lets go of it."""
    import random
    import threading
    rng = random.Random(0)
    words = ["the", "cache", "prefix", "tokens", "model", "page", "hash", "tier", "disk", "memory"]
    text = " ".join(rng.choice(words) for _ in range(tokens // 6 + 1))
    n = len(tok.encode(text))
    raw = tok._tok
    print(f"\ntokenizing a {len(text):,}-character text ({n:,} tokens) on a worker thread, 3 times; "
          "the longest pause of a thread that runs beside it:")
    print("| call | ms per text | longest pause of the other thread (ms) |\n|---|---|---|")
    for name, fn in (("encode (holds the GIL)", lambda: raw.encode(text, add_special_tokens=False)),
                     ("encode_batch (Tokenizer.encode)", lambda: tok.encode(text))):
        done, took = threading.Event(), []

        def work():
            t = time.perf_counter()
            for _ in range(3):
                fn()
            took.append((time.perf_counter() - t) / 3)
            done.set()
        worst, last = 0.0, time.perf_counter()
        th = threading.Thread(target=work)
        th.start()
        while not done.is_set():
            sum(range(200))  # a thread with work of its own, as the engine's is
            now = time.perf_counter()
            worst, last = max(worst, now - last), now
        th.join()
        print(f"| {name} | {took[0] * 1e3:.1f} | {worst * 1e3:.1f} |")


if __name__ == "__main__":
    main()
