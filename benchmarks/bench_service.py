"""The gRPC cache service against Redis over loopback, side by side in one run.

    python benchmarks/bench_service.py [--pages 128] [--reps 3] [--lookups 300]

Starts `kvc cache-server` (shared memory on) and a `redis-server` (installed with apt-get when
missing) on free 127.0.0.1 ports, moves the same pages through RemoteCache (gRPC stream, and
/dev/shm) and through redis-py (pipelined SET / MGET of the payload bytes), and times Lookup of a
32K-token prompt whose pages are all cached. Prints a Markdown table (rates of the quickest rep,
the CPU seconds a GB of client and server together over all reps, and the server's minor page
faults a GB); results: RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvc.client import RemoteCache  # noqa: E402
from kvc.hashing import Namespace, PageSpec, page_hashes  # noqa: E402
from kvc.record import Page, torch_dtype  # noqa: E402

# One 16-token page of a Llama-3-8B-shaped model: 32 layers x K,V x 16 x 8 heads x 128 x bf16 = 2 MiB.
PAGE_SPEC = PageSpec(num_layers=32, num_kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16")
# Lookup: a 32K-token prompt in 16-token pages of a small model (2048 pages, all cached).
LOOKUP_SPEC = PageSpec(num_layers=1, num_kv_heads=1, head_dim=8, page_size=16, dtype="float16")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_pages(ns: Namespace, n: int, seed: int) -> tuple[list[int], list[Page]]:
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 150_000, size=n * ns.spec.page_size).tolist()
    hashes = page_hashes(ns.root, toks, ns.spec.page_size)
    data = torch.randn((n, *ns.spec.shape), generator=torch.Generator().manual_seed(seed)).to(torch_dtype(ns.spec.dtype))
    P = ns.spec.page_size
    parents = [ns.root] + hashes[:-1]
    return toks, [Page(h, p, np.asarray(toks[i * P:(i + 1) * P], dtype=np.uint32), data[i])
                  for i, (h, p) in enumerate(zip(hashes, parents))]


def start_cache_server(tmp: Path, repo: Path = REPO, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """`kvc cache-server` from checkout `repo` (its code first on PYTHONPATH), with `env` added."""
    port = free_port()
    cfg = {"kvc": {"cpu_memory_size_GB": 3, "disk_path": str(tmp / "pages"), "disk_size_GB": 1},
           "server": {"grpc_port": port, "metrics_port": free_port(), "shared_memory": True}}
    (tmp / "cache.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "cache-server", "--config", str(tmp / "cache.yaml")],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {}),
                                 "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))})
    if "serving" not in proc.stdout.readline():
        raise SystemExit(f"cache-server from {repo} did not start")
    return proc, port


def start_redis(tmp: Path) -> tuple[subprocess.Popen, int]:
    if shutil.which("redis-server") is None:
        print("installing redis-server (apt-get install -y redis-server) ...", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "redis-server"], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp), "--proto-max-bulk-len", "1gb"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    r = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            r.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minor_faults(pid: int) -> int:
    """The minor page faults a process has taken (Linux /proc): a buffer the C library gave back
    to the OS and took again costs one a 4 KiB page it writes."""
    return int(_stat(pid)[7])


class Remote:
    """The pages through RemoteCache; clear() empties its namespace, put() / get() move them all."""

    def __init__(self, url: str, shm: bool, n: int, pid: int):
        self.name = "kvc gRPC + /dev/shm" if shm else "kvc gRPC stream"
        self.ns = Namespace("bench", PAGE_SPEC, cache_salt="shm" if shm else "stream")
        self.c = RemoteCache(url, timeout=30.0, shared_memory=shm)
        self.n, self.pid = n, pid
        _, self.pages = make_pages(self.ns, n, seed=1)
        self.hashes = [p.hash for p in self.pages]

    def clear(self) -> None:
        self.c.delete(self.ns)

    def put(self) -> None:
        r = self.c.put_pages(self.ns, self.pages)
        assert r.stored == self.n, r

    def get(self) -> None:
        got = self.c.get_pages(self.ns, self.hashes)
        assert len(got) == len(self.hashes)

    def close(self) -> None:
        got = self.c.get_pages(self.ns, self.hashes[:2])
        assert torch.equal(got[1].data, self.pages[1].data)
        self.c.delete(self.ns)
        self.c.close()


class Redis:
    """The pages through redis-py (pipelined SET, MGET of 16), the reference."""

    def __init__(self, port: int, pages, pid: int):
        import redis
        self.name = "Redis 7 (redis-py, pipelined)"
        self.r = redis.Redis(host="127.0.0.1", port=port)
        self.pages, self.keys, self.pid = pages, [p.hash for p in pages], pid

    def clear(self) -> None:
        self.r.flushall()

    def put(self) -> None:
        pipe = self.r.pipeline(transaction=False)
        for p in self.pages:
            pipe.set(p.hash, p.payload().tobytes())
        pipe.execute()

    def get(self) -> None:
        out = []
        for k in range(0, len(self.keys), 16):
            for v in self.r.mget(self.keys[k:k + 16]):
                out.append(torch.frombuffer(bytearray(v), dtype=torch.bfloat16).view(PAGE_SPEC.shape))
        assert len(out) == len(self.keys)

    def close(self) -> None:
        self.r.flushall()
        self.r.close()


def timed(fn, pid: int) -> tuple[float, float, int]:
    """(seconds, CPU seconds of this process and server `pid` together, the server's minor page
    faults) of one fn()."""
    c0, s0, f0 = time.process_time(), cpu_seconds(pid), minor_faults(pid)
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    return t, time.process_time() - c0 + cpu_seconds(pid) - s0, minor_faults(pid) - f0


def run_paths(paths: list, reps: int) -> dict[str, dict[str, list[tuple[float, float, int]]]]:
    """Every path's puts, then every path's gets, rep after rep (after one rep kept apart): the paths
    side by side in time, so a rep's ratio between two paths is taken under the same load of the
    machine. {name: {"put": [(s, cpu s, server faults)] per timed rep, "get": ..., "first put": [the first rep's],
    "first get": ...}}."""
    out = {p.name: {"put": [], "get": [], "first put": [], "first get": []} for p in paths}
    for rep in range(reps + 1):  # rep 0 apart: every path's first put and get are 2-5x its later ones
        for p in paths:
            p.clear()
            out[p.name]["put" if rep else "first put"].append(timed(p.put, p.pid))
        for p in paths:
            out[p.name]["get" if rep else "first get"].append(timed(p.get, p.pid))
    return out


def bench_lookup(url: str, redis_port: int, n: int) -> tuple[list[float], list[float]]:
    import redis
    ns = Namespace("bench-lookup", LOOKUP_SPEC)
    toks, pages = make_pages(ns, 2048, seed=3)
    c = RemoteCache(url, timeout=30.0)
    c.put_pages(ns, pages)
    lat = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        res = c.lookup(ns, tokens=toks)
        if i >= 20:
            lat.append(time.perf_counter() - t0)
        assert res.num_pages == 2048
    r = redis.Redis(host="127.0.0.1", port=redis_port)
    r.mset({p.hash: b"1" for p in pages})
    rlat = []
    for i in range(n + 20):  # the same question asked of Redis: hash the prompt, EXISTS per page
        t0 = time.perf_counter()
        hashes = page_hashes(ns.root, toks, 16)
        pipe = r.pipeline(transaction=False)
        for h in hashes:
            pipe.exists(h)
        hit = pipe.execute()
        if i >= 20:
            rlat.append(time.perf_counter() - t0)
        assert all(hit)
    c.close()
    r.close()
    return lat, rlat


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lookups", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cache, cport = start_cache_server(tmp)
        redis_proc, rport = start_redis(tmp)
        try:
            url = f"grpc://127.0.0.1:{cport}"
            _, pages = make_pages(Namespace("bench", PAGE_SPEC, cache_salt="stream"), args.pages, seed=1)
            mib = args.pages * PAGE_SPEC.page_bytes / 2**20
            paths = [Remote(url, False, args.pages, cache.pid), Remote(url, True, args.pages, cache.pid),
                     Redis(rport, pages, redis_proc.pid)]
            results = run_paths(paths, args.reps)
            for p in paths:
                p.close()
            lat, rlat = bench_lookup(url, rport, args.lookups)
        finally:
            cache.terminate()
            redis_proc.terminate()
            cache.wait(30)
            redis_proc.wait(30)
    gb = args.pages * PAGE_SPEC.page_bytes / 1e9
    print(f"\n{args.pages} pages of {PAGE_SPEC.page_bytes / 2**20:.0f} MiB ({mib:.0f} MiB), {args.reps} reps, "
          "the paths interleaved rep by rep (rates: the quickest rep; x Redis: the median of each rep's "
          "ratio):\n")
    print("| path | PutPages GB/s | GetPages GB/s | put x Redis | get x Redis | put: CPU s per GB, client + "
          "server | get: CPU s per GB, client + server | server's minor faults per GB, put / get |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    ref = results[paths[-1].name]
    for name, r in results.items():
        rate = {k: gb / min(x[0] for x in r[k]) for k in ("put", "get")}
        cpu = {k: sum(x[1] for x in r[k]) / (len(r[k]) * gb) for k in ("put", "get")}
        faults = {k: sum(x[2] for x in r[k]) / (len(r[k]) * gb) for k in ("put", "get")}
        ratio = {k: statistics.median(y[0] / x[0] for x, y in zip(r[k], ref[k])) for k in ("put", "get")}
        print(f"| {name} | {rate['put']:.2f} | {rate['get']:.2f} | {ratio['put']:.2f}x | {ratio['get']:.2f}x | "
              f"{cpu['put']:.2f} | {cpu['get']:.2f} | {faults['put']:,.0f} / {faults['get']:,.0f} |")
    print("\nSeconds a rep (the untimed first one, then the timed ones):\n")
    print("| path | put | get |\n| --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r['first ' + k][0][0]:.3f}; " + ", ".join(f"{x[0]:.3f}" for x in r[k])
                                         for k in ("put", "get")) + " |")
    print(f"\nLookup of a 32K-token prompt (2048 pages, all hits), {args.lookups} calls:\n")
    print("| path | p50 ms | p99 ms |\n| --- | --- | --- |")
    print(f"| kvc Lookup (tokens) | {pct(lat, .5):.2f} | {pct(lat, .99):.2f} |")
    print(f"| Redis: hash + pipelined EXISTS x 2048 | {pct(rlat, .5):.2f} | {pct(rlat, .99):.2f} |")
    print(f"\nmean kvc Lookup {statistics.mean(lat) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
