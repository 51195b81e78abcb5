"""Other clients' puts beside a disk hit (store level, CPU): does a get hold the store's lock while
it reads the disk?

A store with no cpu tier (pages go straight to the disk tier, LMDB under --dir) holds --pages
Qwen3-30B-A3B-shaped pages (12 layers, 384 KiB). With --cpu-pages N the store has a cpu tier of N
pages, filled by another chain after the read chain went down to disk: each get then promotes its
pages into a full tier (demotions), and the puts beside it demote too. The main thread reads them back in gets of
--run pages, over and over, while a second thread puts fresh pages in offers of 16 every
--put-every-ms (an engine's offers) and times each put. Printed: the get's time, and the puts' latency (median, longest) beside the gets and alone.
With the disk read under the store's lock a put waits for the whole read of a run; without it, for
a page's promotion at most. `--drop-caches` (root) drops the OS page cache before each get, so the
reads come from the device.

    python benchmarks/probe_disk_lock.py [--pages 512] [--run 256] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import random
import statistics
import subprocess
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


def puts(s: TieredStore, ns: Namespace, rng: random.Random, data: torch.Tensor, stop: threading.Event,
         lat: list[float], every: float) -> None:
    while not stop.wait(every):
        ps = pages_of(ns, 16, rng, data)
        t0 = time.perf_counter()
        s.put_pages(ns, ps)
        lat.append(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=512)
    ap.add_argument("--run", type=int, default=256, help="pages a get reads")
    ap.add_argument("--gets", type=int, default=8)
    ap.add_argument("--put-every-ms", type=float, default=20.0)
    ap.add_argument("--cpu-pages", type=int, default=0, help="a cpu tier of this many pages, full (0: none)")
    ap.add_argument("--dir", default=None, help="where the disk tier lives (default: a temp dir)")
    ap.add_argument("--drop-caches", action="store_true", help="drop the OS page cache before each get (root)")
    a = ap.parse_args()
    spec = PageSpec(12, 4, 128, 16, "bfloat16")
    ns = Namespace("qwen3_moe", spec, "probe")
    work = Path(tempfile.mkdtemp(prefix="kvc-disk-lock-", dir=a.dir))
    cfg = load_config(None, disk_path=str(work / "pages"), cpu_memory_size_GB=a.cpu_pages * spec.page_bytes / 2**30,
                      disk_size_GB=8.0).kvc  # room for the whole run's puts: nothing is evicted
    rng = random.Random(0)
    data = torch.randn(8, *spec.shape).to(torch.bfloat16)
    with TieredStore(cfg) as s:
        chain = pages_of(ns, a.pages, rng, data)
        for i in range(0, a.pages, 64):
            s.put_pages(ns, chain[i:i + 64])
        if a.cpu_pages:  # the read chain down to disk, the cpu tier full of another chain
            filler = pages_of(ns, 2 * a.cpu_pages, random.Random(3), data)
            for i in range(0, len(filler), 64):
                s.put_pages(ns, filler[i:i + 64])
        s.flush()
        located = s.lookup(ns, hashes=[p.hash for p in chain]).located
        print(f"# the read chain: {located.count('disk')} pages on disk, {located.count('cpu')} in the cpu tier")
        hashes = [p.hash for p in chain]
        alone: list[float] = []
        stop = threading.Event()
        t = threading.Thread(target=puts, args=(s, ns, random.Random(1), data, stop, alone, a.put_every_ms / 1e3))
        t.start()
        time.sleep(2.0)
        stop.set()
        t.join()
        beside: list[float] = []
        stop = threading.Event()
        t = threading.Thread(target=puts, args=(s, ns, random.Random(2), data, stop, beside, a.put_every_ms / 1e3))
        gets = []
        t.start()
        try:
            for g in range(a.gets):
                lo = (g % 2) * (a.pages - a.run)  # the two ends in turn: with a cpu tier smaller than
                # both, each get reads the disk again (its pages were demoted by the other's)
                if a.drop_caches:
                    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)
                t0 = time.perf_counter()
                got = s.get_pages(ns, hashes[lo:lo + a.run])
                gets.append(time.perf_counter() - t0)
                if len(got) != a.run:
                    print(f"# get {g}: {len(got)} of {a.run} pages (the puts evicted some)")
        finally:
            stop.set()
            t.join()
    ms = lambda xs, f: f"{f(xs) * 1e3:.1f}" if xs else "-"  # noqa: E731
    print(f"# {a.pages} pages of {spec.page_bytes // 1024} KiB on disk, cpu tier {a.cpu_pages} pages, gets of "
          f"{a.run}, puts of 16 pages every {a.put_every_ms:g} ms on a thread")
    print("| what | count | median ms | longest ms |\n|---|---|---|---|")
    print(f"| get of {a.run} pages from disk (puts beside it) | {len(gets)} | {ms(gets, statistics.median)} | {ms(gets, max)} |")
    print(f"| put of 16 pages, alone | {len(alone)} | {ms(alone, statistics.median)} | {ms(alone, max)} |")
    print(f"| put of 16 pages, beside the gets | {len(beside)} | {ms(beside, statistics.median)} | {ms(beside, max)} |")


if __name__ == "__main__":
    main()
