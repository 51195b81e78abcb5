#!/usr/bin/env python
"""bench_put_chain: the store's put cost for one long prompt, as the engine's put thread sends it.

The engine offers a prompt's pages per prefill chunk (--offer pages) and its put thread cuts each
offer into put_pages calls of --call pages (engine.host_tier.PUT_BATCH). Every call that ends a
chain walks the chain's ancestors to keep the LRU order (deepest page oldest), so the cost of that
walk grows with the prompt. Printed: microseconds per page with chain_continues (one walk per
offer, what the engine does) and without it (one walk per call), for each prompt length, into a
cpu tier only (no disk, no eviction) with Qwen3-30B-A3B-shaped pages of --layers layers.

    python benchmarks/bench_put_chain.py                      # 2K, 8K, 32K tokens; ~10 s
    python benchmarks/bench_put_chain.py --layers 1 --disk    # small pages: the bookkeeping alone

The last column is what every device hit of such a prompt with 64 new tokens costs the put
thread (its 4 new pages walk the whole chain), under the GIL.
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.host_tier import PUT_BATCH  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import Namespace, page_hashes  # noqa: E402
from kvc.record import Page, PageSpec  # noqa: E402
from kvc.store import TieredStore  # noqa: E402


def pages_of(ns: Namespace, n: int, rng: random.Random, data: torch.Tensor) -> list[Page]:
    P = ns.spec.page_size
    toks = [rng.randrange(150_000) for _ in range(n * P)]
    hs = page_hashes(ns.root, toks, P)
    parents = [ns.root] + hs[:-1]
    return [Page(hs[i], parents[i], np.array(toks[i * P:(i + 1) * P], dtype=np.uint32), data[i % len(data)])
            for i in range(n)]


def extensions(ns: Namespace, parent: bytes, k: int, n: int, rng: random.Random,
               data: torch.Tensor) -> list[list[Page]]:
    """k different runs of n pages hanging from `parent` (the new tokens of k device hits)."""
    P = ns.spec.page_size
    out = []
    for _ in range(k):
        toks = [rng.randrange(150_000) for _ in range(n * P)]
        hs = page_hashes(parent, toks, P)
        ps = [parent] + hs[:-1]
        out.append([Page(hs[i], ps[i], np.array(toks[i * P:(i + 1) * P], dtype=np.uint32), data[i])
                    for i in range(n)])
    return out


def put_us_per_page(pages: list[Page], ns: Namespace, offer: int, call: int, continues: bool, gb: float,
                    disk: str | None = None, tails: list[list[Page]] = ()) -> tuple[float, float]:
    """(us per page of the whole prompt, median ms of one put of each of `tails` afterwards)."""
    with TieredStore(load_config(None).replace(cpu_memory_size_GB=gb, disk_path=disk).kvc) as s:
        t0 = time.perf_counter()
        for o in range(0, len(pages), offer):
            chunk = pages[o:o + offer]
            for i in range(0, len(chunk), call):
                s.put_pages(ns, chunk[i:i + call], chain_continues=continues and i + call < len(chunk))
        per_page = (time.perf_counter() - t0) / len(pages) * 1e6
        ts = []
        for tail in tails:
            t = time.perf_counter()
            s.put_pages(ns, tail)
            ts.append(time.perf_counter() - t)
        return per_page, (statistics.median(ts) * 1e3 if ts else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,8192,32768", help="prompt lengths in tokens")
    ap.add_argument("--offer", type=int, default=128, help="pages per offer (a 2048-token chunk of 16-token pages)")
    ap.add_argument("--call", type=int, default=PUT_BATCH, help="pages per put_pages call (default: the engine's)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--disk", action="store_true", help="a disk tier too (write-back: the walk touches it)")
    a = ap.parse_args()
    spec = PageSpec(a.layers, 4, 128, 16, "bfloat16")  # Qwen3-30B-A3B's KV heads and head_dim
    ns = Namespace("qwen3_moe", spec, "bench")
    data = torch.randn(16, *spec.shape).to(torch.bfloat16)
    rng = random.Random(0)
    print(f"# {a.layers} layers of Qwen3-30B-A3B pages ({spec.page_bytes / 2**10:.0f} KiB), offers of {a.offer} "
          f"pages in put_pages calls of {a.call}, cpu tier only, torch {torch.__version__}")
    print("| prompt tokens | pages | us/page, one walk per call | us/page, one walk per offer (chain_continues) "
          "| ratio | a 4-page put at the chain's end (ms, median of 9) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n_tok in (int(x) for x in a.lengths.split(",")):
        n = n_tok // spec.page_size
        pages = pages_of(ns, n, rng, data)
        gb = n * spec.page_bytes * 1.3 / 1e9 + 0.1
        disk = tempfile.mkdtemp(prefix="kvc-put-chain-") if a.disk else None
        per_call, _ = put_us_per_page(pages, ns, a.offer, a.call, False, gb, disk)
        if disk:
            shutil.rmtree(disk)
            disk = tempfile.mkdtemp(prefix="kvc-put-chain-")
        per_offer, tail_ms = put_us_per_page(pages, ns, a.offer, a.call, True, gb, disk,
                                             extensions(ns, pages[-1].hash, 9, 4, rng, data))
        if disk:
            shutil.rmtree(disk)
        print(f"| {n_tok} | {n} | {per_call:.0f} | {per_offer:.0f} | {per_call / per_offer:.1f}x | {tail_ms:.2f} |")


if __name__ == "__main__":
    main()
