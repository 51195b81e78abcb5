"""A cpu-tier hit while another prompt's puts demote pages to disk (issue 10; CPU, store level).

Runs BT and BU timed a 32K cpu hit right after a cold 32K prompt at 117-165 ms (27-35 ms before the
cpu tier was full in that benchmark): the cold prompt's puts found the tier full and demoted a batch
down to the low watermark (~1,000 pages of 384 KiB for a 4 GB tier), building every demoted page's
record under the store's lock, and the hit's load waited for that lock. Since then a put demotes
kvc.store.DEMOTE_CHUNK pages per hold of the lock and pauses between holds while a load runs (as an
engine's put thread does). This probe fills a cpu tier of --cpu-gb with Qwen3-30B-A3B-shaped pages
(12 layers, 384 KiB), then puts --pages new pages in offers of 128 on a thread (with a pause that
waits while a get runs, as the engine's host tier does) while the main thread reads a 512-page
prefix from the cpu tier every 10 ms. Printed per variant, in one run: the get's time alone and
beside the puts, and the longest hold of the lock by one demotion.

    python benchmarks/probe_busy_hit.py [--cpu-gb 1] [--pages 2048]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_put_chain import pages_of  # noqa: E402
from kvc import store as store_mod  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import Namespace  # noqa: E402
from kvc.record import PageSpec  # noqa: E402
from kvc.store import TieredStore  # noqa: E402


def run(chunk: int, gb: float, n_new: int, seed: int) -> tuple[list[float], list[float], list[tuple[int, float]]]:
    spec = PageSpec(12, 4, 128, 16, "bfloat16")
    ns = Namespace("qwen3_moe", spec, "bench")
    data = torch.randn(16, *spec.shape).to(torch.bfloat16)
    per = int(gb * (1 << 30) / spec.page_bytes)
    prefix = pages_of(ns, 512, random.Random(seed), data)
    fill = pages_of(ns, per, random.Random(seed + 1), data)
    new = pages_of(ns, n_new, random.Random(seed + 2), data)
    store_mod.DEMOTE_CHUNK = chunk
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None).replace(cpu_memory_size_GB=gb, disk_path=tmp,
                                        disk_size_GB=(per + 2 * n_new) * spec.page_bytes * 1.5 / 1e9).kvc
        with TieredStore(cfg) as s:
            for o in range(0, len(fill), 128):
                s.put_pages(ns, fill[o:o + 128])
            s.put_pages(ns, prefix)  # the newest: the puts below evict older pages
            s.flush()
            holds = []
            real = s._demote

            def timed(victims):
                t = time.perf_counter()
                real(victims)
                holds.append((len(victims), time.perf_counter() - t))
            s._demote = timed
            hashes = [p.hash for p in prefix]
            getting = threading.Event()
            idle = threading.Condition()

            def get() -> float:
                getting.set()
                t = time.perf_counter()
                got = s.get_pages(ns, hashes)
                dt = time.perf_counter() - t
                with idle:
                    getting.clear()
                    idle.notify_all()
                assert len(got) == len(hashes), f"the prefix was evicted ({len(got)} of {len(hashes)} pages)"
                return dt

            def pause():  # the engine's put thread waits while a load is in flight
                with idle:
                    idle.wait_for(lambda: not getting.is_set())
            alone = [get() for _ in range(3)]
            done = threading.Event()

            def put():
                for o in range(0, len(new), 128):
                    s.put_pages(ns, new[o:o + 128], pause=pause)
                done.set()
            th = threading.Thread(target=put)
            th.start()
            busy = []
            while not done.is_set():
                busy.append(get())
                time.sleep(0.01)
            th.join()
            s.flush()
    return alone, busy, holds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-gb", type=float, default=1.0)
    ap.add_argument("--pages", type=int, default=2048)
    a = ap.parse_args()
    default = store_mod.DEMOTE_CHUNK
    print(f"{a.pages} new pages of 384 KiB put in offers of 128 into a full {a.cpu_gb} GB cpu tier + disk, "
          "a 512-page get from the cpu tier every 10 ms beside them")
    print("| demotion per hold of the store lock | get alone ms (median) | get beside the puts ms (median / max) "
          "| gets | longest demotion hold ms | pages demoted |")
    print("|---|---|---|---|---|---|")
    for label, chunk in ((f"{default} pages (DEMOTE_CHUNK, the default)", default),
                         ("the whole batch (before)", 1 << 30)):
        alone, busy, holds = run(chunk, a.cpu_gb, a.pages, 0)
        print(f"| {label} | {statistics.median(alone) * 1e3:.1f} | {statistics.median(busy) * 1e3:.1f} / "
              f"{max(busy) * 1e3:.1f} | {len(busy)} | {max((t for _, t in holds), default=0) * 1e3:.1f} | "
              f"{sum(n for n, _ in holds)} |")
    store_mod.DEMOTE_CHUNK = default


if __name__ == "__main__":
    main()
