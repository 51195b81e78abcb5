"""Which lines of the put path wait for the GIL beside a thread that always wants it.

Drives the engine's put thread (HostTier.offer of 128-page tensors, put_pages calls of PUT_BATCH)
into a cpu tier (with --disk: and a write-through disk tier, so the disk writer thread shows too)
while the main thread spins in Python. Every thread of the put path is traced line by line; a gap
of more than half the switch interval between two trace events of one thread means that thread
handed the GIL over during the line and waited to get it back (a line running that long with the
GIL held would have let the spinner in only at the interval, which the gap also shows, but then on
random lines). Prints, per (thread, file, line), how many such waits a page costs. A release is
lost only when the spinner gets a CPU while it lasts, so on a loaded 2-core VM the counts vary up
to 20x from run to run (tracing also slows the Python parts ~10x): the lines are the result, the
counts a lower bound.

    python benchmarks/probe_gil_waits.py [--pages 256] [--disk] [--path native|python]
"""
from __future__ import annotations

import argparse
import collections
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
from engine.host_tier import HostTier  # noqa: E402
from kvc import pagecopy  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import Namespace  # noqa: E402
from kvc.record import PageSpec  # noqa: E402
from kvc.store import TieredStore  # noqa: E402


class Waits:
    """A trace function per thread that counts long gaps between its events, by the line before."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._last: dict[int, tuple[float, tuple]] = {}

    def trace(self, frame, event, arg):
        now = time.perf_counter()
        tid = threading.get_ident()
        last = self._last.get(tid)
        if last is not None and now - last[0] > sys.getswitchinterval() / 2:
            self.counts[last[1]] += 1
        where = (threading.current_thread().name, Path(frame.f_code.co_filename).name, frame.f_lineno)
        self._last[tid] = (time.perf_counter(), where)
        return self.trace


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--disk", action="store_true", help="add a write-through disk tier (its writer thread is traced too)")
    ap.add_argument("--path", choices=["native", "python"], default="native")
    a = ap.parse_args()
    spec = PageSpec(12, 4, 128, 16, "bfloat16")
    ns = Namespace("qwen3_moe", spec, "bench")
    data = torch.randn(16, *spec.shape).to(torch.bfloat16)
    pages = pages_of(ns, a.pages, random.Random(0), data)
    offers = []
    for o in range(0, a.pages, 128):
        chunk = pages[o:o + 128]
        offers.append(([p.hash for p in chunk], [p.parent for p in chunk], [p.tokens for p in chunk],
                       torch.stack([p.data for p in chunk])))
    sum_copy = pagecopy.library() if a.path == "native" else pagecopy.sum_copy_python
    if sum_copy is None:
        sys.exit("the native put path does not build here (see the log line above)")
    with tempfile.TemporaryDirectory() as tmp:
        over = dict(cpu_memory_size_GB=a.pages * spec.page_bytes * 1.3 / 1e9 + 0.1, disk_path=None)
        if a.disk:
            over.update(disk_path=tmp, disk_write="through", disk_size_GB=a.pages * spec.page_bytes * 2 / 1e9 + 0.1)
        cfg = load_config(None).replace(**over).kvc
        waits = Waits()
        threading.settrace(waits.trace)  # every thread started from here on: the store's and the host tier's
        with TieredStore(cfg, sum_copy=sum_copy) as store:
            host = HostTier(store, max_pending_puts=len(offers) + 1)

            def drive():
                for hashes, parents, tokens, d in offers:
                    assert host.offer(ns, hashes, parents, tokens, d)
                host.flush()
                store.flush()
            th = threading.Thread(target=drive, name="driver")
            th.start()
            while th.is_alive():  # the spinner: always wants the GIL
                pass
            threading.settrace(None)
            host.close()
    print(f"{a.pages} pages, {a.path} put path{', write-through disk' if a.disk else ''}, switch interval "
          f"{sys.getswitchinterval() * 1e3:.0f} ms; GIL waits per page by the line that handed it over:")
    print("| thread | file:line | waits per page |")
    print("|---|---|---|")
    for (thread, file, line), n in waits.counts.most_common(12):
        if n / a.pages >= 0.005:
            print(f"| {thread} | {file}:{line} | {n / a.pages:.2f} |")


if __name__ == "__main__":
    main()
