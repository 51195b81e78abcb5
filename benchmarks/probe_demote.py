"""How long the cpu tier's demotions to disk hold the GIL (issue 10: throughput with host tiers).

A full cpu tier makes room for a put by demoting pages to the disk tier (write-back, the default),
a batch at a time: from the high watermark down to the low one (0.95 -> 0.85 of the tier), ~1,000
pages of 384 KiB for a 4 GB tier. Each demoted page's record (header + payload) is built before it
is queued for the disk writer. This probe fills a cpu tier of --cpu-gb with Qwen3-30B-A3B-shaped
pages (12 layers, 384 KiB) and keeps putting (calls of 32 pages, as the engine's put thread does)
until --pages were put, beside a thread that spins in Python (an engine's launch-bound thread
always wants the GIL). Printed: the put cost per page, the spinner's longest pause (the longest
the put path held the GIL) and its rate relative to spinning alone, for the whole run and the
demotions' share of it.

    python benchmarks/probe_demote.py [--cpu-gb 0.25] [--pages 2048]
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-gb", type=float, default=0.25)
    ap.add_argument("--pages", type=int, default=2048)
    ap.add_argument("--call", type=int, default=32)
    ap.add_argument("--no-disk", action="store_true", help="no disk tier: evicted pages are dropped (the baseline)")
    a = ap.parse_args()
    spec = PageSpec(12, 4, 128, 16, "bfloat16")
    ns = Namespace("qwen3_moe", spec, "bench")
    data = torch.randn(16, *spec.shape).to(torch.bfloat16)
    pages = pages_of(ns, a.pages, random.Random(0), data)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None).replace(cpu_memory_size_GB=a.cpu_gb, disk_path=None if a.no_disk else tmp,
                                        disk_size_GB=a.pages * spec.page_bytes * 2 / 1e9).kvc
        with TieredStore(cfg) as s:
            demote_time = [0.0]
            real = s._demote

            def timed(victims):
                t = time.perf_counter()
                try:
                    return real(victims)
                finally:
                    demote_time[0] += time.perf_counter() - t
            s._demote = timed
            done = threading.Event()

            def put():
                for o in range(0, len(pages), 128):
                    offer = pages[o:o + 128]
                    for i in range(0, len(offer), a.call):
                        s.put_pages(ns, offer[i:i + a.call], chain_continues=i + a.call < len(offer))
                done.set()
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < 0.5:
                n += 1
            base = n / 0.5
            th = threading.Thread(target=put)
            worst, n = 0.0, 0
            t0 = last = time.perf_counter()
            th.start()
            while not done.is_set():
                n += 1
                now = time.perf_counter()
                worst, last = max(worst, now - last), now
            wall = time.perf_counter() - t0
            th.join()
            s.flush()
            demoted = int(s.metrics.evictions.labels(tier="cpu", reason="capacity")._value.get())
            print(f"{a.pages} pages of {spec.page_bytes >> 10} KiB into a {a.cpu_gb} GB cpu tier "
                  f"{'(no disk)' if a.no_disk else '+ disk (write-back)'}, put_pages calls of {a.call}, "
                  f"switch interval {sys.getswitchinterval() * 1e3:.0f} ms")
            print("| put us/page | pages demoted | demotions' time | spinner's longest pause "
                  "| spinner's rate vs alone |")
            print("|---|---|---|---|---|")
            print(f"| {wall / a.pages * 1e6:.0f} | {demoted} | {demote_time[0] * 1e3:.0f} ms | "
                  f"{worst * 1e3:.1f} ms | {n / wall / base:.2f} |")


if __name__ == "__main__":
    main()
