"""How the put path and a busy Python thread share the GIL (the engine's thread is one: launch-bound).

Puts Qwen3-30B-A3B-shaped pages (12 layers, 384 KiB) into a cpu tier the way the engine's put thread
does (offers of 128 pages in put_pages calls of 4), once alone and once beside a thread that spins
in Python (always wants the GIL, as a launch-bound engine thread does). One row per put path: the
per-page path (torch views, xxhash and numpy copies, each handing the GIL over) and the native batch
(kvc.pagecopy: one C call per put_pages); with --engine also the native batch driven by the engine's
put thread (HostTier.offer of 128-page tensors, as on CUDA after the pinned-ring copy). Prints the
put cost per page alone and beside the spinner, the spinner's rate while the puts run relative to
spinning alone, and the spinner's time lost per page put (a faster put path that holds the GIL for
its whole, shorter, run shows a low rate over a short time: the loss per page is the figure that
compares).

    python benchmarks/probe_gil_put.py [--pages 1024] [--engine] [--calls 4,32] [--disk]
"""
from __future__ import annotations

import argparse
import dataclasses
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
from engine.host_tier import PUT_BATCH, HostTier  # noqa: E402
from kvc import pagecopy  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import Namespace  # noqa: E402
from kvc.record import PageSpec  # noqa: E402
from kvc.store import TieredStore  # noqa: E402


def put_all(store, ns, pages, call: int = 4) -> float:
    t = time.perf_counter()
    for o in range(0, len(pages), 128):
        offer = pages[o:o + 128]
        for i in range(0, len(offer), call):
            store.put_pages(ns, offer[i:i + call], chain_continues=i + call < len(offer))
    store.flush()  # with --disk: until the disk writer has committed every record
    return (time.perf_counter() - t) / len(pages) * 1e6


def put_host_tier(store, ns, pages, data) -> float:
    """The engine's put thread: offers of 128 pages as one [n, *page] tensor (a copy of the pages'
    data, made before the clock starts), put_pages calls of PUT_BATCH on its own thread; until all are in."""
    offers = []
    for o in range(0, len(pages), 128):
        chunk = pages[o:o + 128]
        offers.append(([p.hash for p in chunk], [p.parent for p in chunk], [p.tokens for p in chunk],
                       torch.stack([p.data for p in chunk])))
    host = HostTier(store, max_pending_puts=len(offers) + 1)
    try:
        t = time.perf_counter()
        for hashes, parents, tokens, d in offers:
            assert host.offer(ns, hashes, parents, tokens, d)
        host.flush()
        store.flush()
        return (time.perf_counter() - t) / len(pages) * 1e6
    finally:
        host.close()


def spin_rate(secs: float) -> float:
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < secs:
        n += 1
    return n / secs


def measure(cfg, put, base: float, sum_copy) -> tuple[float, float, float]:
    """(put us/page alone, put us/page beside a spinning thread, the spinner's rate vs alone);
    cfg() gives the config of each fresh store."""
    with TieredStore(cfg(), sum_copy=sum_copy) as s:
        put(s)  # touch the slab once: first-touch page faults are not the point here
    with TieredStore(cfg(), sum_copy=sum_copy) as s:
        alone = put(s)
    with TieredStore(cfg(), sum_copy=sum_copy) as s:
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("us", put(s)))
        t0, n = time.perf_counter(), 0
        th.start()
        while th.is_alive():
            n += 1
        rate = n / (time.perf_counter() - t0)
        th.join()
    return alone, out["us"], rate / base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--engine", action="store_true", help="add a row through the engine's put thread (HostTier)")
    ap.add_argument("--calls", default="4", help="pages per put_pages call, a comma list: native rows for each")
    ap.add_argument("--disk", action="store_true",
                    help="a write-through disk tier too (LMDB in a temp dir); a put lasts until its records are committed")
    a = ap.parse_args()
    spec = PageSpec(12, 4, 128, 16, "bfloat16")
    ns = Namespace("qwen3_moe", spec, "bench")
    data = torch.randn(16, *spec.shape).to(torch.bfloat16)
    pages = pages_of(ns, a.pages, random.Random(0), data)
    gb = a.pages * spec.page_bytes * 1.3 / 1e9 + 0.1
    base_cfg = load_config(None).replace(cpu_memory_size_GB=gb, disk_path=None, disk_write="through",
                                         disk_size_GB=2 * gb).kvc
    tmp = tempfile.TemporaryDirectory()
    cfg = ((lambda: dataclasses.replace(base_cfg, disk_path=tempfile.mkdtemp(dir=tmp.name))) if a.disk
           else (lambda: base_cfg))
    lib = pagecopy.library()
    if lib is None:
        sys.exit("the native put path does not build here (see the log line above)")
    calls = [int(c) for c in a.calls.split(",")]
    rows = [(f"per page (torch views, xxhash, numpy copy), calls of {calls[0]}", pagecopy.sum_copy_python,
             lambda s: put_all(s, ns, pages, calls[0]))]
    rows += [(f"native: one C call per put_pages, calls of {c}", lib, lambda s, c=c: put_all(s, ns, pages, c))
             for c in calls]
    if a.engine:
        rows.append((f"native, through the engine's put thread (calls of {PUT_BATCH})", lib,
                     lambda s: put_host_tier(s, ns, pages, data)))
    base = spin_rate(1.0)
    print(f"{a.pages} pages of {spec.page_bytes >> 10} KiB in offers of 128, "
          f"{'write-through disk, ' if a.disk else ''}switch interval {sys.getswitchinterval() * 1e3:.0f} ms")
    print("| put path | put us/page alone | put us/page beside a spinning thread | spinner's rate vs alone "
          "| spinner's time lost per page (us) |")
    print("|---|---|---|---|---|")
    for name, sum_copy, put in rows:
        alone, beside, rate = measure(cfg, put, base, sum_copy)
        print(f"| {name} | {alone:.0f} | {beside:.0f} | {rate:.2f} | {beside * (1 - rate):.0f} |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
