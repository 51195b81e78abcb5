"""Where a put's time goes, phase by phase (issue 10's throughput gap): TieredStore.put_pages as the
engine's put thread calls it (unique 2K-token prompts, offers of 128 pages in calls of 32, 12-layer
Qwen3-30B-A3B pages of 384 KiB by default, a cpu tier only), each phase timed per page:

  checks and the rest     page checks, token packing, chain-hash verification (in put_pages itself)
  _plan_puts              decisions and slot reservations under the store lock (Python, GIL)
  _sum_copy               every checksum and slab copy in one native call (no GIL)
  _publish_puts           entries published, pages sent down (Python, GIL)
  _touch_chains           the LRU walk over the chain (Python, GIL)
  _evict_disk             write-back bookkeeping (Python, GIL)
  _make_room              demotions ahead of the plan when the cpu tier is full (Python, GIL)
  _update_gauges          the tiers' used / pages gauges after each call (Python, GIL)

    python benchmarks/probe_put_phases.py [--pages 4096] [--layers 12] [--repeat 6]

--repeat N runs the whole put N times and prints each phase's least time over the runs, and the
put's GIL-holding time (put_pages minus the native checksum-and-copy) of the least run: the 2-core
VM's other load moves single runs by 30% or more.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host_path import time_calls  # noqa: E402
from kvc.config import KvcConfig  # noqa: E402
from kvc.hashing import Namespace, PageSpec, page_hashes  # noqa: E402
from kvc.record import Page  # noqa: E402
from kvc.store import TieredStore  # noqa: E402

PHASES = ("_plan_puts", "_sum_copy", "_publish_puts", "_touch_chains", "_evict_disk", "_make_room", "_update_gauges")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--cpu-gb", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    spec = PageSpec(num_layers=a.layers, num_kv_heads=4, head_dim=128, page_size=16, dtype="bfloat16")
    ns = Namespace("probe-put", spec, weights_digest="probe")
    per_prompt = 128
    n = a.pages // per_prompt * per_prompt
    toks = np.random.default_rng(0).integers(0, 150_000, n * 16, dtype=np.uint32)
    data = torch.zeros((per_prompt, *spec.shape), dtype=torch.bfloat16)
    runs = [run(ns, spec, toks, data, n, per_prompt, a.cpu_gb) for _ in range(a.repeat)]
    print(f"# {n} pages of {spec.page_bytes / 2**10:.0f} KiB, cpu tier {a.cpu_gb} GB ({runs[0][2]} held at the end); "
          f"least of {a.repeat} run(s) per row")
    print("| phase | us per page |\n|---|---|")
    for name in PHASES:
        print(f"| {name} | {min(r[0][name] for r in runs) / n * 1e6:.1f} |")
    print(f"| checks and the rest of put_pages | {min(r[1] - sum(r[0].values()) for r in runs) / n * 1e6:.1f} |")
    print(f"| put_pages total | {min(r[1] for r in runs) / n * 1e6:.1f} |")
    print(f"| GIL-holding (put_pages minus _sum_copy) | {min(r[1] - r[0]['_sum_copy'] for r in runs) / n * 1e6:.1f} |")


def run(ns, spec, toks, data, n: int, per_prompt: int, cpu_gb: float):
    """One pass of n pages through a fresh store: (seconds per phase, put_pages seconds, pages held)."""
    spent: dict[str, float] = collections.defaultdict(float)
    total = 0.0
    with TieredStore(KvcConfig(cpu_memory_size_GB=cpu_gb, disk_path=None)) as s:
        for name in PHASES:
            time_calls(s, name, name, spent)
        for p in range(n // per_prompt):
            tk = toks[p * per_prompt * 16:(p + 1) * per_prompt * 16]
            hs = page_hashes(ns.root, tk, 16)
            rows = list(tk.reshape(per_prompt, 16))  # row views of the prompt's ids, as the engine offers them
            pages, parent = [], ns.root
            for i in range(per_prompt):
                pages.append(Page(hs[i], parent, rows[i], data[i]))
                parent = hs[i]
            t = time.perf_counter()
            for lo in range(0, per_prompt, 32):
                s.put_pages(ns, pages[lo:lo + 32], chain_continues=lo + 32 < per_prompt)
            total += time.perf_counter() - t
        return spent, total, len(s.cpu.entries)

if __name__ == "__main__":
    main()
