"""Where the cluster tier's get time goes (bench_cluster's get case, 96 pages of 1.5 MiB).

Starts a local Redis Cluster (3+3), puts the pages through a cluster-only TieredStore, then for
--reps rounds times: the tier's pipelined GETs with every check (ClusterTier.get), the same GETs
without the payload checksum (check_payload=False), the store's fetch with the payload summed as it
is copied into a caller's buffer (TieredStore._cluster_fetch with out), and the whole
get_pages(out=...). Then get_pages(out=...) with the one-pass native sum-and-copy and with the
Python path (pagecopy.library() -> None: xxhash's checksum, then numpy's copy), alone and beside a
thread spinning in Python (an engine's launch-bound thread wants the GIL the same way); the GET
replies read by respread's native reader (the tier's default) against redis-py's parser (each node's
replies through its connection, the tier's path for TLS, hiredis or no compiler), alone and beside
the spinner; and, on redis-py's parser, the tier's client reopened with receives of 64 KiB
(redis-py's default), 1 MiB and cluster_tier.SOCKET_READ_BYTES.

    python benchmarks/probe_cluster_get.py --reps 5
    python benchmarks/probe_cluster_get.py --sections readers --switch-interval 0.0005
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import SHAPES, client, cluster_store, local_cluster, make_pages, settle  # noqa: E402
from kvc import cluster_tier, pagecopy, respread  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import Namespace  # noqa: E402
from kvc.store import TieredStore  # noqa: E402


BESIDE = (None, "thread", "process")  # alone; a thread spinning in Python; a process spinning (CPU, no GIL)
HEAD = "alone ms (median) | beside a spinning thread ms (median) | beside a spinning process ms (median)"


@contextlib.contextmanager
def spinning(on: str | None):
    """While inside: "thread", a thread spinning in Python (it wants the GIL all the time);
    "process", another process spinning (it takes a core, not the GIL: on the 2-core VM what a
    thread costs beyond that is the GIL's share); None, nothing."""
    stop = threading.Event()

    def spin() -> None:  # a plain loop: until 2026-12-06 a list comprehension over iter(stop.is_set,
        while not stop.is_set():  # True), whose list grew by ~30M items a second for the whole section
            pass
    th = threading.Thread(target=spin, daemon=True)
    proc = None
    if on == "thread":
        th.start()
    elif on == "process":
        proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        stop.set()
        if on == "thread":
            th.join()
        if proc is not None:
            proc.kill()
            proc.wait()


def get_ms(store, ns, hashes, out) -> float:
    t = time.perf_counter()
    assert len(store.get_pages(ns, hashes, out=out)) == len(hashes)
    return (time.perf_counter() - t) * 1e3


def med(ms: list[float]) -> float:
    return sorted(ms)[len(ms) // 2]


def alternate(store, ns, hashes, out, reps: int, module, variants: dict, title: str) -> None:
    """get_pages(out) with module.library replaced by each of variants (name -> library()), alone
    and beside a spinning thread, the variants alternating rep by rep; a table of ms a get (medians)."""
    real = module.library
    rows: dict = {}
    try:
        for beside in BESIDE:
            with spinning(beside):
                for _ in range(reps):
                    for name, lib in variants.items():
                        module.library = lib
                        rows.setdefault((name, beside), []).append(get_ms(store, ns, hashes, out))
    finally:
        module.library = real
    print(f"\n| {title} | {HEAD} |\n|---|---|---|---|")
    for name in variants:
        print(f"| {name} | " + " | ".join(f"{med(rows[(name, b)]):.0f}" for b in BESIDE) + " |")


def paths(store, ns, hashes, out, reps: int) -> None:
    """get_pages(out) on the native one-pass path and on the Python path (checksum, then copy)."""
    if pagecopy.library() is None:
        print("(no native library here: the path comparison is skipped)")
        return
    alternate(store, ns, hashes, out, reps, pagecopy, {"native one pass": pagecopy.library,
                                                       "Python: checksum, then copy": lambda cc=None: None},
              "get_pages(out) path")


def readers(store, ns, hashes, out, reps: int) -> None:
    """get_pages(out) with the replies read by respread (one native call a node) and by redis-py's
    parser (respread.read_parsed, a node's replies one by one)."""
    if respread.library() is None:
        print("(no native reply reader here: the comparison is skipped)")
        return
    alternate(store, ns, hashes, out, reps, respread,
              {"respread, one native read a node (the tier's)": respread.library,
               "redis-py's parser, per node (TLS, no compiler)": lambda cc=None: None}, "GET replies read by")


def read_sizes(store, ns, hashes, out, reps: int) -> None:
    """get_pages(out) on redis-py's parser with the tier's client reopened at each receive size,
    alone and beside a spinning thread; ms a get (median of reps)."""
    default = cluster_tier.SOCKET_READ_BYTES
    real = respread.library
    respread.library = lambda cc=None: None
    print(f"\n| receive size (redis-py's parser) | {HEAD} |\n|---|---|---|---|")
    try:
        for size in (64 << 10, 1 << 20, default):
            cluster_tier.SOCKET_READ_BYTES = size
            store.cluster._client.close()
            store.cluster._client = None  # the next call opens a client with this size
            cells = []
            for beside in BESIDE:
                with spinning(beside):
                    cells.append(med([get_ms(store, ns, hashes, out) for _ in range(reps)]))
            tier = " (the tier's)" if size == default else ""
            print(f"| {size >> 10} KiB{tier} | " + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)
    finally:
        cluster_tier.SOCKET_READ_BYTES = default
        respread.library = real


def gil_lines(store, ns, hashes, out, reps: int) -> None:
    """get_pages(out) traced line by line beside a spinning thread (probe_gil_waits.Waits): a gap of
    over half the switch interval between two events of the get's thread is a GIL hand-over the get
    waited out; the lines before such gaps, by count a get (tracing slows the Python ~10x, so the
    counts are a lower bound; the lines are the result)."""
    from probe_gil_waits import Waits
    waits = Waits()
    with spinning("thread"):
        sys.settrace(waits.trace)
        try:
            for _ in range(reps):
                get_ms(store, ns, hashes, out)
        finally:
            sys.settrace(None)
    print("\n| line before a GIL wait (get_pages beside a spinning thread) | waits a get |\n|---|---|")
    for (_, file, line), n in waits.counts.most_common(12):
        print(f"| {file}:{line} | {n / reps:.1f} |")


def parts(store, ns, hashes, out, reps: int) -> None:
    """The rounds' four calls alone and beside a spinner (the calls alternating rep by rep): which
    part of a get the busy thread stretches."""
    ops = {"GETs + checksums (ClusterTier.get)": lambda: store.cluster.get(ns, hashes),
           "GETs, no checksum": lambda: store.cluster.get(ns, hashes, check_payload=False),
           "GETs + one-pass sum-and-copy (_cluster_fetch)": lambda: store._cluster_fetch(ns, hashes, out),
           "get_pages(out)": lambda: store.get_pages(ns, hashes, out=out),
           "get_into(out) (an engine's load: no Page objects)": lambda: [None] * store.get_into(ns, hashes, out)}
    rows: dict = {}
    for beside in BESIDE:
        with spinning(beside):
            for _ in range(reps):
                for name, op in ops.items():
                    t = time.perf_counter()
                    assert len(op()) == len(hashes)
                    rows.setdefault((name, beside), []).append((time.perf_counter() - t) * 1e3)
    print(f"\n| part of a get | {HEAD} |\n|---|---|---|---|")
    for name in ops:
        print(f"| {name} | " + " | ".join(f"{med(rows[(name, b)]):.0f}" for b in BESIDE) + " |")


def promotions(url, ns, hashes, out, reps: int, cpu_gb: float) -> None:
    """get_pages(out) by a store with a cpu tier of cpu_gb, made anew for each get (so every get
    promotes all its pages from the cluster; its client connected and its slab faulted in first), promotions in one native copy a run (the store's
    default) against a numpy copy a page (store.BATCH_PROMOTIONS False), alternating, alone and
    beside a spinner; ms a get (medians)."""
    from kvc import store as store_mod
    rows: dict = {}
    variants = {"one native copy a run (the store's)": True, "a numpy copy a page (before)": False}
    try:
        for beside in BESIDE:
            with spinning(beside):
                for _ in range(reps):
                    for name, on in variants.items():
                        store_mod.BATCH_PROMOTIONS = on
                        s = TieredStore(load_config(None, cpu_memory_size_GB=cpu_gb, disk_path=None, cluster_url=url,
                                                    cluster_timeout_s=5.0).kvc)
                        try:  # a store in service: its cluster client connected, its slab's pages faulted in
                            s.lookup(ns, hashes=hashes[:1])
                            s.cpu.slab_np.fill(0)
                            rows.setdefault((name, beside), []).append(get_ms(s, ns, hashes, out))
                            assert s.lookup(ns, hashes=hashes).located == ["cpu"] * len(hashes)
                        finally:
                            s.close()
    finally:
        store_mod.BATCH_PROMOTIONS = True
    print(f"\n| promotions into a {cpu_gb:g} GB cpu tier | {HEAD} |\n|---|---|---|---|")
    for name in variants:
        print(f"| {name} | " + " | ".join(f"{med(rows[(name, b)]):.0f}" for b in BESIDE) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=96)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu-gb", type=float, default=0.5, help="the promote section's cpu tier")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for the run (Python's default 0.005 s): what the spinning "
                         "thread costs a get scales with it where the get waits for the GIL after each release")
    ap.add_argument("--sections", default="rounds,paths,readers,sizes",
                    help="comma-separated: rounds (the tier's parts), parts (those alone and beside a spinner), "
                         "promote (a store with a cpu tier: its promotions batched or not), "
                         "paths, readers, sizes, gil (the lines before the get's waits for the GIL beside a "
                         "spinning thread)")
    a = ap.parse_args()
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
    sections = set(a.sections.split(","))
    print(f"# switch interval {sys.getswitchinterval() * 1e3:g} ms")
    spec = SHAPES["30B-A3B-MoE"]
    print(f"# native checksum-and-copy: {'built' if pagecopy.library() is not None else 'not built (Python path)'}; "
          f"native reply reader: {'built' if respread.library() is not None else 'not built (redis-py reads)'}")
    print("| rep | GETs + checksums ms | GETs, no checksum ms | GETs + one-pass sum-and-copy ms | get_pages(out) ms |")
    print("|---|---|---|---|---|")
    with local_cluster("probe_cluster_get") as procs:
        store, raw = cluster_store(procs.url), client(procs.url)
        ns = Namespace("probe-get", spec)
        _, hashes, pages = make_pages(ns, a.pages, 0)
        assert store.put_pages(ns, pages).stored == a.pages
        store.flush()
        settle(raw)
        out = torch.zeros((a.pages, *spec.shape), dtype=torch.bfloat16)
        for rep in range(a.reps if "rounds" in sections else 0):
            ms = []
            for op in (lambda: store.cluster.get(ns, hashes),
                       lambda: store.cluster.get(ns, hashes, check_payload=False),
                       lambda: store._cluster_fetch(ns, hashes, out),
                       lambda: store.get_pages(ns, hashes, out=out)):
                t = time.perf_counter()
                got = op()
                ms.append((time.perf_counter() - t) * 1e3)
                assert len(got) == a.pages
            print(f"| {rep} | " + " | ".join(f"{m:.0f}" for m in ms) + " |", flush=True)
        if "parts" in sections:
            parts(store, ns, hashes, out, a.reps)
        if "promote" in sections:
            promotions(procs.url, ns, hashes, out, a.reps, a.cpu_gb)
        store.get_pages(ns, hashes, out=out)
        assert all(torch.equal(out[i], p.data) for i, p in enumerate(pages))
        if "paths" in sections:
            paths(store, ns, hashes, out, a.reps)
        if "readers" in sections:
            readers(store, ns, hashes, out, a.reps)
        if "sizes" in sections:
            read_sizes(store, ns, hashes, out, a.reps)
        if "gil" in sections:
            gil_lines(store, ns, hashes, out, a.reps)
        store.close()
        raw.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
