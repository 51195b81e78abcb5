"""How the put path and a busy Python thread share the GIL (the engine's thread is one: launch-bound).

Puts Qwen3-30B-A3B-shaped pages (12 layers, 384 KiB) into a cpu tier the way the engine's put thread
does (offers of 128 pages in put_pages calls of 4), once alone and once beside a thread that spins
in Python (always wants the GIL, as a launch-bound engine thread does). Prints the put cost per page
in both cases and the spinning thread's rate relative to spinning alone.

    python benchmarks/probe_gil_put.py
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_put_chain import pages_of  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import Namespace  # noqa: E402
from kvc.record import PageSpec  # noqa: E402
from kvc.store import TieredStore  # noqa: E402


def put_all(store, ns, pages) -> float:
    t = time.perf_counter()
    for o in range(0, len(pages), 128):
        offer = pages[o:o + 128]
        for i in range(0, len(offer), 4):
            store.put_pages(ns, offer[i:i + 4], chain_continues=i + 4 < len(offer))
    return (time.perf_counter() - t) / len(pages) * 1e6


def spin_rate(secs: float) -> float:
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < secs:
        n += 1
    return n / secs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=1024)
    a = ap.parse_args()
    spec = PageSpec(12, 4, 128, 16, "bfloat16")
    ns = Namespace("qwen3_moe", spec, "bench")
    data = torch.randn(16, *spec.shape).to(torch.bfloat16)
    pages = pages_of(ns, a.pages, random.Random(0), data)
    gb = a.pages * spec.page_bytes * 1.3 / 1e9 + 0.1
    cfg = load_config(None).replace(cpu_memory_size_GB=gb, disk_path=None).kvc
    with TieredStore(cfg) as s:
        put_all(s, ns, pages)  # touch the slab once: first-touch page faults are not the point here
    with TieredStore(cfg) as s:
        alone = put_all(s, ns, pages)
    base = spin_rate(1.0)
    with TieredStore(cfg) as s:
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("us", put_all(s, ns, pages)))
        t0, n = time.perf_counter(), 0
        th.start()
        while th.is_alive():
            n += 1
        rate = n / (time.perf_counter() - t0)
        th.join()
    print(f"| pages | put us/page alone | put us/page beside a spinning thread | spinning thread's rate vs alone |")
    print(f"|---|---|---|---|")
    print(f"| {a.pages} | {alone:.0f} | {out['us']:.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
