#!/usr/bin/env python
"""probe_gc: what one full cyclic-GC collection costs in an engine process, frozen or not.

A full (generation 2) collection traverses every object the collector tracks; CPython starts
one when enough objects have survived into the old generation, i.e. at some step of some
request. This builds an LLMEngine on a random tiny checkpoint (torch and the engine loaded, as in
`kvc serve`), fills a cpu tier with --pages pages, and times gc.collect(2) with the engine's
startup objects frozen (what LLMEngine does) and after gc.unfreeze() (what it did before).

    python benchmarks/probe_gc.py                 # ~20 s on a 2-core VM
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.llm_engine import LLMEngine  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import page_hashes  # noqa: E402
from kvc.record import Page  # noqa: E402
from kvc.store import TieredStore  # noqa: E402


def full_collection_ms(reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        gc.collect(2)
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=32768, help="pages put into the cpu tier")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / "m", "qwen3_moe")
        store = TieredStore(load_config().replace(cpu_memory_size_GB=1, disk_path=None).kvc)
        eng = LLMEngine(load_config().replace(path=str(path), device="cpu", dtype="float32", page_size=16,
                                              gpu_only=False), cache=store)
        frozen_at_start = gc.get_freeze_count()
        ns = eng.kv.namespace("")
        data = torch.zeros(64, *ns.spec.shape, dtype=torch.float32)
        rng = random.Random(0)
        for start in range(0, a.pages, 2048):  # prompts of 2048 pages, put in calls of 64
            n = min(2048, a.pages - start)
            toks = [rng.randrange(256) for _ in range(n * 16)]
            hs = page_hashes(ns.root, toks, 16)
            parents = [ns.root] + hs[:-1]
            pages = [Page(hs[i], parents[i], np.array(toks[i * 16:(i + 1) * 16], dtype=np.uint32), data[i % 64])
                     for i in range(n)]
            for i in range(0, n, 64):
                store.put_pages(ns, pages[i:i + 64])
        frozen_ms = full_collection_ms()
        tracked_frozen = len(gc.get_objects())
        gc.unfreeze()
        unfrozen_ms = full_collection_ms()
        tracked_all = len(gc.get_objects())
        print(f"# torch {torch.__version__}, Python {sys.version.split()[0]}; {len(store.cpu.entries)} pages in the "
              f"cpu tier; {frozen_at_start} objects frozen by LLMEngine at start")
        print("| collector state | tracked objects (outside the frozen set) | one full collection |")
        print("| --- | --- | --- |")
        print(f"| startup objects frozen (LLMEngine now) | {tracked_frozen} | {frozen_ms:.1f} ms |")
        print(f"| nothing frozen (before) | {tracked_all} | {unfrozen_ms:.1f} ms |")
        eng.close()
        store.close()


if __name__ == "__main__":
    main()
