"""The host-tier lookup of a long prompt held in the cpu tier (a cpu hit's admission), on CPU.

A 32K-token cpu hit asks the store about its 2,048 pages before its load starts (run AW's H200
host: 1.5 ms of the ~5 ms before the first copy). This script puts a prompt in the cpu tier of an
in-process engine (tiny model, CPU), then times `HostTier.lookup` for it, and the search for the
first missing page of a column of 2,048 entries two ways: `list.index(None)` (compares with ==,
the dataclass __eq__ of each Entry) and kvc.store._first_none (identity, in C); and the pages'
tier keys three ways (the two map forms the lookup and the loads used, and kvc.store.keys_of).

    python benchmarks/probe_lookup.py [--tokens 32768] [--reps 300]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import LLM, SamplingParams  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402
from kvc.store import _first_none, keys_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=300)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="kvc-probe-lookup-")
    make_tiny_model(d, num_hidden_layers=1, max_position_embeddings=a.tokens + 4096)
    llm = LLM(d, device="cpu", page_size=16, chunk_size=2048, cpu_memory_size_GB=1, disk_path=None)
    eng = llm.engine
    rng = random.Random(0)
    prompt = [rng.randrange(10, 250) for _ in range(a.tokens)]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate([prompt + [5] * 64], one)  # its pages go to the cpu tier
    eng.prefix_cache.flush()
    eng.add_request("probe", prompt + [7] * 64, one)
    req = eng.requests["probe"]
    eng.kv.update_hashes(req)
    ns, host = eng.kv.namespace(""), eng.prefix_cache.host
    cap = (req.num_tokens - 1) // 16
    raw, hashes = req.ids_bytes(0, cap * 16), req.hashes[:cap]
    located = host.lookup(ns, raw, hashes).located
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        host.lookup(ns, raw, hashes)
        times.append(time.perf_counter() - t)
    col = [host.cache.cpu.get(ns.root + h) for h in hashes]
    n = len(col)

    def by_index():
        try:
            return col.index(None, 0, n)
        except ValueError:
            return n
    root = ns.root
    per = {name: min(timeit.repeat(fn, number=100, repeat=5)) / 100 for name, fn in
           ((f"first missing of {n} entries, list.index(None)", by_index),
            (f"first missing of {n} entries, _first_none (identity)", lambda: _first_none(col, n)),
            (f"keys of {n} pages, list(map(root.__add__, map(bytes, hashes)))",
             lambda: list(map(root.__add__, map(bytes, hashes)))),
            (f"keys of {n} pages, list(map(root.__add__, hashes))", lambda: list(map(root.__add__, hashes))),
            (f"keys of {n} pages, keys_of (a list comprehension)", lambda: keys_of(root, hashes)))}
    print(f"# {a.tokens} tokens, {len(hashes)} pages, {len(located)} located in the cpu tier; {a.reps} lookups")
    print("| what | ms |\n|---|---|")
    print(f"| HostTier.lookup, median | {statistics.median(times) * 1e3:.3f} |")
    print(f"| HostTier.lookup, min | {min(times) * 1e3:.3f} |")
    for name, s in per.items():
        print(f"| {name} | {s * 1e3:.3f} |")
    llm.close()


if __name__ == "__main__":
    main()
