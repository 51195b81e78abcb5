#!/usr/bin/env python
"""bench_prefix_reuse: prefix reuse measured over HTTP against real `kvc serve` processes (issue 5).

Everything runs on 127.0.0.1 against `python -m server.cli serve --config <tmp yaml>` processes that
this script starts and always stops (also on Ctrl-C or an exception). The model is a random
Qwen3-MoE written with `make_tiny_model` into a temp dir ("small": hidden 256, 4 layers, 8 heads /
2 KV heads, head_dim 32, 16 experts top-2), float32 on CPU. Its tokenizer is byte-level, so a
prompt of N ASCII characters is N tokens; the tables report the server's usage.prompt_tokens.

(a) TTFT cold vs warm, shared system prompt of 1K/4K/8K tokens + a fresh 64-token delta per
    request (/v1/completions, stream, max_tokens 1, temperature 0; TTFT = send -> first SSE chunk
    with a choice; median of --repeats):
      cold    a system prompt no tier holds
      device  the same server right after: the prefix is in the device pool
      cpu     device pool sized a little above one 8K request; unrelated prompts (more pages than
              the pool) push the prefix out of it, so it comes from the cpu tier
      disk    SIGTERM (the cpu tier is written back to disk), restart on the same disk_path
    Each hit is checked against usage.cached_tokens and the /metrics counters
    kvc_lookup_hit_tokens_total{tier=...}. The floor is the delta-only prefill (TTFT of a 64-token
    prompt alone, cold, same server) + prefix page bytes / tier get bandwidth, measured in this
    process with a kvc.store.TieredStore holding pages of the same PageSpec (get_pages(out=staging),
    median; disk: cpu_memory_size_GB 0, after flush()). For device hits the transfer term is 0.
    Informational column: x (floor + the delta's attention over the prefix, timed in this process).
(b) Traces via /v1/chat/completions, cache on vs off (off: `kvc: {prefix_caching: false}`):
      agent   sessions sharing a system prompt, 8 turns each, each turn appends the previous
              answer and a new user message (sessions interleaved)
      rag     4 documents x 4 questions, interleaved
    hit rate = sum cached_tokens / sum prompt_tokens, TTFT p50/p99, prefill tokens computed.
(c) No reuse: 8 pairs of rounds (on/off, ABBA order), each 12 unique ~1K-token prompts, 3 concurrent,
    max_tokens 16 (ignore_eos): tokens/s on vs off (median of the paired ratios) and the server's CPU
    time per token; the cost of having the cache on.

Targets (8K prefix): warm TTFT <= cold/10 for device and cpu hits, and <= 1.5x the floor;
no-reuse throughput cost <= 2%.

    python benchmarks/bench_prefix_reuse.py            # full run, ~3-6 minutes on a 2-core VM
    python benchmarks/bench_prefix_reuse.py --quick    # 1K prefix only, small traces: ~1 minute
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.tiny import make_tiny_model  # noqa: E402
from kvc.config import KvcConfig  # noqa: E402
from kvc.hashing import Namespace, PageSpec, page_hashes  # noqa: E402
from kvc.record import Page  # noqa: E402
from kvc.store import TieredStore  # noqa: E402

MODEL_NAME = "bench-qwen3-moe"
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             num_experts=16, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=256,
             max_position_embeddings=16384)
PAGE = 16
CHUNK = 512
DELTA = 64
POOL_TIERED = 600          # device pages for (a): one 8K request (8192 + 64 + 1 tokens = 517 pages) + ~15%
POOL_TRACES = 4096         # device pages for (b)/(c)
TARGET_COLD_FRACTION = 0.10
TARGET_FLOOR_RATIO = 1.5
TARGET_NO_REUSE_COST = 0.02
ALPHABET = "abcdefghijklmnopqrstuvwxyz     ,.ABCDEFGHIJ0123456789"
HTTP_TIMEOUT = httpx.Timeout(180.0, connect=10.0)

YAML = """\
model: {{path: {model}, device: cpu, dtype: float32}}
attn: {{page_size: {page}, chunk_size: {chunk}}}
kvc: {{cpu_memory_size_GB: {cpu_gb}, disk_path: {disk}, disk_size_GB: {disk_gb}, num_device_blocks: {blocks}{extra_kvc}}}
scheduler: {{max_num_seqs: 16, max_num_batched_tokens: {batched}}}
server: {{host: 127.0.0.1, http_port: {port}}}
"""


# -- helpers -------------------------------------------------------------------------------------
def loadavg() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pctl(xs, q):
    """Nearest-rank percentile (p99 of fewer than 100 samples is the maximum)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def ms(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:8.1f}"


class Texts:
    """Random ASCII text: N characters = N tokens for the byte-level tokenizer."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __call__(self, n: int) -> str:
        return "".join(self.rng.choice(ALPHABET) for _ in range(n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Child side of Popen: get SIGTERM if this benchmark dies (Linux), so no server outlives it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Server:
    """One `kvc serve` process with its YAML config and log; stop() sends SIGTERM and waits."""
    all: list["Server"] = []

    def __init__(self, tmp: Path, name: str, model: Path, disk: Path | None, blocks: int, cpu_gb: float = 0.5,
                 extra_kvc: str = "", batched: int = 2 * CHUNK):
        self.name, self.tmp = name, tmp
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cfg = tmp / f"{name}.yaml"
        self.cfg.write_text(YAML.format(model=model, page=PAGE, chunk=CHUNK, cpu_gb=cpu_gb,
                                        disk=disk if disk else "null", disk_gb=1.0 if disk else 0,
                                        blocks=blocks, extra_kvc=extra_kvc, batched=batched, port=self.port))
        self.log = tmp / f"{name}.log"
        self.p = None

    def start(self, timeout: float = 180) -> "Server":
        self.port = self.port if self._port_free() else free_port()
        text = self.cfg.read_text()
        self.cfg.write_text(re.sub(r"http_port: \d+", f"http_port: {self.port}", text))
        self.base = f"http://127.0.0.1:{self.port}"
        self._f = open(self.log, "ab")
        t0 = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(self.cfg)],
                                  cwd=ROOT, stdout=self._f, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=_die_with_parent)
        Server.all.append(self)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name}: kvc serve exited with {self.p.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    self.start_s = time.monotonic() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: {self.base}/health did not come up in {timeout}s:\n{self.tail()}")

    def _port_free(self) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", self.port))
                return True
            except OSError:
                return False

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 90) -> int | None:
        if self.p is None:
            return None
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._f.close()
        if self in Server.all:
            Server.all.remove(self)
        rc, self.p = self.p.returncode, None
        return rc

    @classmethod
    def stop_all(cls):
        for s in list(cls.all):
            try:
                s.stop(timeout=30)
            except Exception as e:  # keep stopping the others
                print(f"  (stopping {s.name}: {e})", file=sys.stderr)

    # -- metrics -----------------------------------------------------------------------------------
    def metrics(self) -> str:
        return httpx.get(self.base + "/metrics", timeout=10).text

    def metric(self, name: str, text: str | None = None, **labels) -> float:
        """Sum of the series of `name` whose labels include `labels`."""
        text = self.metrics() if text is None else text
        total = 0.0
        for m in re.finditer(r"^" + re.escape(name) + r"(?:\{([^}]*)\})? ([0-9.e+-]+|NaN)$", text, re.M):
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def hit_tokens(self) -> dict[str, float]:
        text = self.metrics()
        return {t: self.metric("kvc_lookup_hit_tokens_total", text, tier=t) for t in ("device", "cpu", "disk")}

    def has_device_metric(self) -> bool:
        return 'kvc_lookup_hit_tokens_total{tier="device"}' in self.metrics()

    def wait_quiet(self, timeout: float = 20.0) -> None:
        """Wait until the host tiers stop taking puts (the engine offers pages asynchronously)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            text = self.metrics()
            now = (self.metric("kvc_store_pages_total", text), self.metric("kvc_store_bytes_total", text))
            if now == last:
                return
            last = now
            time.sleep(0.25)


# -- requests ------------------------------------------------------------------------------------
_local = threading.local()


def client() -> httpx.Client:
    c = getattr(_local, "client", None)
    if c is None:
        c = _local.client = httpx.Client(timeout=HTTP_TIMEOUT)
    return c


def _stream(url: str, body: dict, chat: bool) -> dict:
    """POST a streaming request; TTFT = send -> first SSE chunk carrying a token (or the finish)."""
    t0 = time.perf_counter()
    ttft, text, usage, err = None, [], None, None
    with client().stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"POST {url}: HTTP {r.status_code}: {r.text[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                err = obj["error"]
                continue
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices", []):
                piece = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                if ttft is None and (piece or ch.get("finish_reason")):
                    ttft = time.perf_counter() - t0
                if piece:
                    text.append(piece)
    total = time.perf_counter() - t0
    if err is not None:
        raise RuntimeError(f"POST {url}: stream error {err}")
    if usage is None:
        raise RuntimeError(f"POST {url}: no usage in the stream")
    return {"ttft": ttft if ttft is not None else total, "total": total, "text": "".join(text),
            "prompt": usage["prompt_tokens"], "completion": usage["completion_tokens"],
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


def complete_stream(srv: Server, prompt: str, max_tokens: int = 1, salt: str | None = None) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if salt:
        body["cache_salt"] = salt
    return _stream(srv.base + "/v1/completions", body, chat=False)


def chat_stream(srv: Server, messages: list[dict], max_tokens: int, salt: str | None = None) -> dict:
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if salt:
        body["cache_salt"] = salt
    return _stream(srv.base + "/v1/chat/completions", body, chat=True)


def complete(srv: Server, prompt: str, max_tokens: int, salt: str | None = None) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    if salt:
        body["cache_salt"] = salt
    r = client().post(srv.base + "/v1/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/completions: HTTP {r.status_code}: {r.text[:500]}")
    u = r.json()["usage"]
    return {"prompt": u["prompt_tokens"], "completion": u["completion_tokens"],
            "cached": u["prompt_tokens_details"]["cached_tokens"]}


# -- (a) floor: tier bandwidth in this process ---------------------------------------------------
def tier_bandwidth(spec: PageSpec, n_pages: int, tmp: Path, reps: int) -> dict:
    """Median GB/s of TieredStore.get_pages for n_pages pages, cpu tier and disk tier."""
    ns = Namespace("bench-prefix-reuse", spec)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 256, size=n_pages * spec.page_size, dtype=np.int64).astype(np.uint32)
    hashes = page_hashes(ns.root, tokens, spec.page_size)
    data = torch.randn((n_pages, *spec.shape), generator=torch.Generator().manual_seed(3)).to(getattr(torch, spec.dtype))
    pages, parent = [], ns.root
    for i, h in enumerate(hashes):
        pages.append(Page(h, parent, tokens[i * spec.page_size:(i + 1) * spec.page_size], data[i]))
        parent = h
    nbytes = n_pages * spec.page_bytes
    staging = torch.empty((n_pages, *spec.shape), dtype=getattr(torch, spec.dtype))
    out = {}

    def timed(store, use_out):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            got = store.get_pages(ns, hashes, out=staging if use_out else None)
            ts.append(time.perf_counter() - t0)
            assert len(got) == n_pages, f"got {len(got)} of {n_pages} pages"
        return nbytes / median(ts) / 1e9, nbytes / min(ts) / 1e9

    cpu_gb = (nbytes + (64 << 20)) / (1 << 30)
    with TieredStore(KvcConfig(cpu_memory_size_GB=cpu_gb, disk_path=None, disk_size_GB=0)) as store:
        store.put_pages(ns, pages)
        timed(store, True)  # warm the slab and the staging buffer
        out["cpu"], out["cpu_best"] = timed(store, True)
        out["cpu_fresh"], _ = timed(store, False)
    disk = tmp / "bw-disk"
    with TieredStore(KvcConfig(cpu_memory_size_GB=0, disk_path=str(disk), disk_size_GB=max(0.25, 4 * nbytes / (1 << 30)))) as store:
        store.put_pages(ns, pages)
        store.flush()
        t0 = time.perf_counter()
        store.get_pages(ns, hashes, out=staging)
        out["disk_first"] = nbytes / (time.perf_counter() - t0) / 1e9
        out["disk"], out["disk_best"] = timed(store, True)
        out["disk_fresh"], _ = timed(store, False)
    shutil.rmtree(disk, ignore_errors=True)
    return out


def delta_attention(cfg: dict, sizes: list[int], reps: int) -> dict[int, float]:
    """Seconds the engine's paged attention takes for a 64-token delta over n + 64 keys, all layers
    (in this process, engine.layers.paged_attention on synthetic pages): the part of a warm
    request that the floor as defined (a 64-token prompt alone) leaves out."""
    from engine.layers import AttnMetadata, Piece, paged_attention
    Hq, Hkv, D, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(DELTA, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    out = {}
    for n in [0] + sizes:
        total = n + DELTA
        nb = (total + PAGE - 1) // PAGE
        kc, vc = (torch.randn(nb, PAGE, Hkv, D, generator=g) for _ in range(2))
        meta = AttnMetadata(torch.arange(n, total), torch.arange(n, total), [Piece(0, DELTA, total, torch.arange(nb))],
                            None, None, None)
        ts = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            paged_attention(q, k, v, kc, vc, meta, D ** -0.5)
            ts.append(time.perf_counter() - t0)
        out[n] = L * median(ts[1:])
    return {n: out[n] - out[0] for n in sizes}  # beyond the delta's attention over itself


# -- (a) TTFT by tier ----------------------------------------------------------------------------
def part_a(tmp: Path, model: Path, spec: PageSpec, sizes: list[int], reps: int, texts: Texts) -> dict:
    disk = tmp / "pages-a"
    srv = Server(tmp, "a-tiered", model, disk, POOL_TIERED).start()
    print(f"\n(a) server {srv.name}: device pool {POOL_TIERED} pages, cpu 0.5 GB, disk {disk}; "
          f"started in {srv.start_s:.1f}s   [{loadavg()}]", flush=True)
    device_metric = srv.has_device_metric()
    res = {"sizes": sizes, "reps": reps, "cold": {}, "device": {}, "cpu": {}, "disk": {}, "checks": [],
           "device_metric": device_metric}

    def check(tier, n, r, want_cached):
        ok = r["cached"] == want_cached
        if not ok:
            res["checks"].append(f"{tier} {n}: cached_tokens {r['cached']} != {want_cached}")
        return ok

    # warm-up: first forward passes of a fresh process (allocator, thread pools)
    for n in (64, 1024):
        complete_stream(srv, texts(n))
    # the delta-only prefill: a 64-token prompt alone, cold
    res["delta"] = [complete_stream(srv, texts(DELTA))["ttft"] for _ in range(max(3, reps + 2))]
    srv.wait_quiet()
    systems = {n: [texts(n) for _ in range(reps)] for n in sizes}

    # cold, then device: the same system prompt again right after, with a new delta
    h0 = srv.hit_tokens()
    dev_hits = {t: 0.0 for t in h0}
    for n in sizes:
        res["cold"][n], res["device"][n] = [], []
        for s in systems[n]:
            r = complete_stream(srv, s + texts(DELTA))
            check("cold", n, r, 0)
            res["cold"][n].append(r)
            srv.wait_quiet()
            b = srv.hit_tokens()
            r = complete_stream(srv, s + texts(DELTA))
            a = srv.hit_tokens()
            for t in a:
                dev_hits[t] += a[t] - b[t]
            check("device", n, r, n)
            res["device"][n].append(r)
        print(f"  {n:5d}-token prefix: cold {ms(median([x['ttft'] for x in res['cold'][n]]))} ms, "
              f"device hit {ms(median([x['ttft'] for x in res['device'][n]]))} ms", flush=True)
    res["hits_device_phase"] = dev_hits

    # cpu: push the system prompts out of the device pool with unrelated prompts (more pages than
    # the pool holds, LRU), then ask again: the prefix now comes from the cpu tier
    srv.wait_quiet()
    evict_tokens = 2048
    n_evict = POOL_TIERED // (evict_tokens // PAGE) + 1
    t0 = time.perf_counter()
    for _ in range(n_evict):
        complete_stream(srv, texts(evict_tokens))
    res["evict"] = (n_evict, evict_tokens, time.perf_counter() - t0)
    srv.wait_quiet()
    cpu_hits = {t: 0.0 for t in h0}
    for n in sizes:
        res["cpu"][n] = []
        for s in systems[n]:
            b = srv.hit_tokens()
            r = complete_stream(srv, s + texts(DELTA))
            a = srv.hit_tokens()
            for t in a:
                cpu_hits[t] += a[t] - b[t]
            check("cpu", n, r, n)
            res["cpu"][n].append(r)
        srv.wait_quiet()
        print(f"  {n:5d}-token prefix: cpu hit {ms(median([x['ttft'] for x in res['cpu'][n]]))} ms", flush=True)
    res["hits_cpu_phase"] = cpu_hits

    # disk: SIGTERM writes the cpu tier back to disk; a new process on the same disk_path
    t0 = time.perf_counter()
    rc = srv.stop()
    res["stop"] = (rc, time.perf_counter() - t0)
    srv.start()
    print(f"  restarted on the same disk_path (stop rc {rc} in {res['stop'][1]:.1f}s, start {srv.start_s:.1f}s)",
          flush=True)
    complete_stream(srv, texts(64))  # warm-up of the new process (not a hit on anything measured)
    complete_stream(srv, texts(1024))
    srv.wait_quiet()
    disk_hits = {t: 0.0 for t in h0}
    for n in sizes:
        res["disk"][n] = []
        for s in systems[n]:
            b = srv.hit_tokens()
            r = complete_stream(srv, s + texts(DELTA))
            a = srv.hit_tokens()
            for t in a:
                disk_hits[t] += a[t] - b[t]
            check("disk", n, r, n)
            res["disk"][n].append(r)
        srv.wait_quiet()
        print(f"  {n:5d}-token prefix: disk hit {ms(median([x['ttft'] for x in res['disk'][n]]))} ms", flush=True)
    res["hits_disk_phase"] = disk_hits
    res["delta_after_restart"] = [complete_stream(srv, texts(DELTA))["ttft"] for _ in range(3)]
    srv.stop()
    return res


def report_a(res: dict, bw: dict, spec: PageSpec, attn: dict[int, float]) -> list[tuple[str, bool]]:
    sizes, verdicts = res["sizes"], []
    t_delta = median(res["delta"])
    top = max(sizes)
    print(f"\n(a) TTFT by tier of the hit, median of {res['reps']} (fresh 64-token delta each)   [{loadavg()}]")
    print(f"    floor = delta-only prefill {ms(t_delta).strip()} ms (64-token prompt alone, median of "
          f"{len(res['delta'])}) + prefix bytes / tier get bandwidth (cpu {bw['cpu']:.2f} GB/s, "
          f"disk {bw['disk']:.2f} GB/s, this process, get_pages(out=staging) median)")
    head = (f"{'prefix':>6} {'prompt':>6} {'hit from':<8} {'TTFT ms':>8} {'min..max ms':>17} {'cached':>6} "
            f"{'xfer ms':>7} {'floor ms':>8} {'x floor':>7} {'x cold':>7}  {'<=cold/10':>9} {'<=1.5x floor':>12}"
            f" {'x (floor+attn)':>14}")
    print(head)
    print("-" * len(head))
    rows = []
    for n in sizes:
        cold = median([x["ttft"] for x in res["cold"][n]])
        xfer_bytes = n // PAGE * spec.page_bytes
        for tier in ("cold", "device", "cpu", "disk"):
            rs = res[tier][n]
            t = median([x["ttft"] for x in rs])
            lo, hi = min(x["ttft"] for x in rs), max(x["ttft"] for x in rs)
            prompt = rs[0]["prompt"]
            cached = median([x["cached"] for x in rs])
            if tier == "cold":
                xfer = floor = None
            else:
                xfer = 0.0 if tier == "device" else xfer_bytes / (bw[tier] * 1e9)
                floor = t_delta + xfer
            v1 = v2 = "-"
            if tier in ("device", "cpu") and n == top:
                p1 = t <= TARGET_COLD_FRACTION * cold
                p2 = t <= TARGET_FLOOR_RATIO * floor
                v1, v2 = ("PASS" if p1 else "FAIL"), ("PASS" if p2 else "FAIL")
                verdicts += [(f"{n}-token prefix, {tier} hit: warm TTFT <= cold/10", p1),
                             (f"{n}-token prefix, {tier} hit: warm TTFT <= 1.5x floor", p2)]
            print(f"{n:>6} {prompt:>6} {tier:<8} {ms(t)} {ms(lo).strip() + '..' + ms(hi).strip():>17} "
                  f"{cached:>6.0f} {ms(xfer) if xfer is not None else '-':>7} {ms(floor) if floor else '-':>8} "
                  f"{(t / floor) if floor else float('nan'):>7.2f} {t / cold:>7.3f}  {v1:>9} {v2:>12}"
                  f" {(t / (floor + attn[n])) if floor else float('nan'):>14.2f}")
            rows.append((n, prompt, tier, t, cached, xfer, floor, cold))
    res["rows"] = rows
    print("    x (floor+attn): informational; the floor plus the delta's attention over the prefix, measured in "
          "this process (engine.layers.paged_attention, 64 queries over n+64 keys, all layers): "
          + ", ".join(f"{n}: {attn[n] * 1e3:.1f} ms" for n in sizes))
    print(f"\n    prefix page bytes: {spec.page_bytes} B/page ({spec.page_bytes // 1024} KiB); "
          + ", ".join(f"{n} tokens = {n // PAGE} pages = {n // PAGE * spec.page_bytes / (1 << 20):.0f} MiB"
                      for n in sizes))
    print(f"    tier get bandwidth for {top // PAGE} pages (GB/s): cpu median {bw['cpu']:.2f} (best "
          f"{bw['cpu_best']:.2f}, fresh tensors {bw['cpu_fresh']:.2f}); disk median {bw['disk']:.2f} (best "
          f"{bw['disk_best']:.2f}, first read {bw['disk_first']:.2f}, fresh tensors {bw['disk_fresh']:.2f})")
    dm = "" if res["device_metric"] else "  (no tier=\"device\" series on this server)"
    for phase in ("device", "cpu", "disk"):
        h = res[f"hits_{phase}_phase"]
        want = sum(sizes) * res["reps"]
        print(f"    /metrics kvc_lookup_hit_tokens_total increase over the {phase}-hit requests: "
              + ", ".join(f"{t}={v:.0f}" for t, v in h.items()) + f" (prefix tokens asked: {want}){dm}")
    ev = res["evict"]
    print(f"    device eviction before the cpu hits: {ev[0]} unrelated prompts of {ev[1]} tokens "
          f"({ev[0] * ev[1] // PAGE} pages > pool {POOL_TIERED}), {ev[2]:.1f}s; restart: SIGTERM rc "
          f"{res['stop'][0]} in {res['stop'][1]:.1f}s; delta-only after restart {ms(median(res['delta_after_restart'])).strip()} ms")
    if res["checks"]:
        print("    CHECKS FAILED: " + "; ".join(res["checks"]))
    else:
        print("    checks: every cold request had cached_tokens 0, every hit cached_tokens == prefix")
    return verdicts


# -- (b) traces ----------------------------------------------------------------------------------
def agent_trace(texts: Texts, sessions: int, turns: int, system_len: int):
    system = {"role": "system", "content": texts(system_len)}
    users = [[texts(random.Random(s * 100 + t).randint(96, 192)) for t in range(turns)] for s in range(sessions)]
    return system, users


def run_agent(srv: Server, trace, max_tokens: int, salt_each: bool) -> list[dict]:
    system, users = trace
    convs = [[system] for _ in users]
    out = []
    for t in range(len(users[0])):
        for s, conv in enumerate(convs):
            conv.append({"role": "user", "content": users[s][t]})
            r = chat_stream(srv, conv, max_tokens, salt=uuid.uuid4().hex if salt_each else None)
            conv.append({"role": "assistant", "content": r["text"]})
            out.append(r)
    return out


def rag_trace(texts: Texts, docs: int, questions: int, doc_len: int):
    system = {"role": "system", "content": "Answer from the document only. " + texts(96)}
    ds = [texts(doc_len) for _ in range(docs)]
    qs = [[texts(random.Random(1000 + d * 10 + q).randint(32, 64)) for q in range(questions)] for d in range(docs)]
    reqs = []
    for q in range(questions):  # interleaved: d0q0 d1q0 ... d0q1 d1q1 ...
        for d in range(docs):
            reqs.append([system, {"role": "user", "content": f"Document:\n{ds[d]}\n\nQuestion: {qs[d][q]}"}])
    return reqs


def run_rag(srv: Server, reqs, max_tokens: int, salt_each: bool) -> list[dict]:
    return [chat_stream(srv, m, max_tokens, salt=uuid.uuid4().hex if salt_each else None) for m in reqs]


def summarize(rs: list[dict]) -> dict:
    prompt = sum(r["prompt"] for r in rs)
    cached = sum(r["cached"] for r in rs)
    tt = [r["ttft"] for r in rs]
    return {"n": len(rs), "prompt": prompt, "cached": cached, "hit": cached / prompt if prompt else 0.0,
            "computed": prompt - cached, "p50": pctl(tt, 0.5), "p99": pctl(tt, 0.99), "wall": sum(r["total"] for r in rs)}


# -- (c) no reuse --------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_no_reuse(srv: Server, prompts: list[str], conc: int, max_tokens: int, salt_each: bool) -> dict:
    c0 = cpu_seconds(srv.p.pid)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        rs = list(ex.map(lambda p: complete(srv, p, max_tokens, uuid.uuid4().hex if salt_each else None), prompts))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(srv.p.pid) - c0
    tok = sum(r["prompt"] + r["completion"] for r in rs)
    return {"wall": wall, "tokens": tok, "tps": tok / wall, "out_tps": sum(r["completion"] for r in rs) / wall,
            "cpu_per_ktok": cpu / tok * 1e3,
            "cached": sum(r["cached"] for r in rs), "n": len(rs)}


# -- main ----------------------------------------------------------------------------------------
def start_off_server(tmp: Path, model: Path, texts: Texts) -> tuple[Server, bool, str]:
    """The cache-off server; (server, salt_each, label). Falls back when the switch is not honoured."""
    off = Server(tmp, "off", model, None, POOL_TRACES, cpu_gb=0.5, extra_kvc=", prefix_caching: false").start()
    probe = texts(512)
    complete_stream(off, probe)
    time.sleep(0.5)
    again = complete_stream(off, probe)
    if again["cached"] == 0:
        return off, False, "off (kvc.prefix_caching: false)"
    print(f"  NOTE: kvc.prefix_caching: false is NOT honoured by this engine (a repeated 512-token prompt "
          f"reported cached_tokens {again['cached']}); cache-off falls back to gpu_only: true + a unique "
          f"cache_salt per request (no reuse, no host tiers; device-pool hashing still runs)", flush=True)
    off.stop()
    off = Server(tmp, "off-fallback", model, None, POOL_TRACES, cpu_gb=0, extra_kvc=", gpu_only: true").start()
    return off, True, "off* (gpu_only + unique salts; the switch is not honoured)"


def git_state() -> str:
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--", "engine", "kvc", "server"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        dirty = [d.strip() for d in dirty if d.strip()]
        return head + (f"; uncommitted changes in {len(dirty)} engine/kvc/server files" if dirty else "; clean")
    except Exception:
        return "git n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1K prefix only, fewer repeats, small traces (~1 min)")
    ap.add_argument("--repeats", type=int, default=None, help="TTFT repeats per size and tier (default 3; quick 2)")
    ap.add_argument("--sections", default="a,b,c", help="comma list of a, b, c")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, server logs)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    reps = args.repeats or (2 if args.quick else 3)
    sizes = [1024] if args.quick else [1024, 4096, 8192]
    t_start = time.time()

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    tmp = Path(tempfile.mkdtemp(prefix="kvc-bench-prefix-"))
    verdicts: list[tuple[str, bool]] = []
    try:
        model = make_tiny_model(tmp / MODEL_NAME, "qwen3_moe", seed=0, **MODEL)
        cfg = json.loads((model / "config.json").read_text())
        spec = PageSpec(cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"], PAGE, "float32")
        n_params = sum(t.numel() for t in load_file(str(model / "model.safetensors")).values())
        print(f"bench_prefix_reuse  {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()} {os.cpu_count()} cores, "
              f"torch {torch.__version__}, Python {platform.python_version()}   [{loadavg()}]")
        print(f"repo: {git_state()}")
        print(f"model: random Qwen3-MoE, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
              f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads x {cfg['head_dim']}, "
              f"{cfg['num_experts']} experts top-{cfg['num_experts_per_tok']} (moe_intermediate "
              f"{cfg['moe_intermediate_size']}), vocab {cfg['vocab_size']}, {n_params / 1e6:.1f}M params, float32")
        print(f"page: {spec.shape} float32 = {spec.page_bytes} bytes ({spec.page_bytes // 1024} KiB) per "
              f"{PAGE}-token page; chunk {CHUNK}; {'quick' if args.quick else 'full'} run, {reps} repeats")

        if "a" in sections:
            bw = tier_bandwidth(spec, max(sizes) // PAGE, tmp, reps=7 if not args.quick else 3)
            res_a = part_a(tmp, model, spec, sizes, reps, Texts(1))
            attn = delta_attention(cfg, sizes, reps=9 if not args.quick else 5)
            verdicts += report_a(res_a, bw, spec, attn)

        if sections & {"b", "c"}:
            on = Server(tmp, "on", model, tmp / "pages-on", POOL_TRACES).start()
            off, salt_each, off_label = start_off_server(tmp, model, Texts(2))
            print(f"\n(b)/(c) servers: on ({on.base}, device pool {POOL_TRACES} pages, cpu 0.5 GB, disk), "
                  f"{off_label} ({off.base})   [{loadavg()}]", flush=True)
            for s in (on, off):  # warm-up
                complete_stream(s, Texts(99)(1024), salt=uuid.uuid4().hex)

        if "b" in sections:
            tx = Texts(3)
            sessions, turns, sys_len = (1, 4, 1024) if args.quick else (2, 8, 1536)
            docs, qs, doc_len = (2, 2, 1024) if args.quick else (4, 4, 1536)
            agent = agent_trace(tx, sessions, turns, sys_len)
            rag = rag_trace(tx, docs, qs, doc_len)
            traces = {}
            for mode, srv, salt in (("on", on, False), ("off", off, salt_each)):
                t0 = time.perf_counter()
                traces[("agent", mode)] = summarize(run_agent(srv, agent, 24, salt))
                traces[("rag", mode)] = summarize(run_rag(srv, rag, 16, salt))
                print(f"  traces with the cache {mode}: {time.perf_counter() - t0:.1f}s", flush=True)
            print(f"\n(b) traces via /v1/chat/completions (stream; TTFT = first token chunk), sequential   [{loadavg()}]")
            print(f"    agent: {sessions} sessions x {turns} turns, shared {sys_len}-token system prompt, user "
                  f"messages 96-192 tokens, answers max_tokens 24 appended to the conversation")
            print(f"    rag: {docs} documents x {qs} questions ({doc_len}-token documents, 32-64-token questions), "
                  f"interleaved, max_tokens 16")
            head = (f"{'trace':<6} {'cache':<5} {'reqs':>4} {'prompt tok':>10} {'cached tok':>10} {'hit rate':>8} "
                    f"{'prefill computed':>16} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'wall s':>7}")
            print(head)
            print("-" * len(head))
            for name in ("agent", "rag"):
                for mode in ("on", "off"):
                    s = traces[(name, mode)]
                    label = mode if mode == "on" or not salt_each else "off*"
                    print(f"{name:<6} {label:<5} {s['n']:>4} {s['prompt']:>10} {s['cached']:>10} {s['hit']:>8.1%} "
                          f"{s['computed']:>16} {ms(s['p50']):>11} {ms(s['p99']):>11} {s['wall']:>7.1f}")
                a, b = traces[(name, "on")], traces[(name, "off")]
                print(f"{'':<6} {'on/off':<5} {'':>4} {'':>10} {'':>10} {'':>8} "
                      f"{a['computed'] / max(1, b['computed']):>16.2f} {a['p50'] / b['p50']:>11.2f} "
                      f"{a['p99'] / b['p99']:>11.2f} {a['wall'] / b['wall']:>7.2f}")
            off_cached = traces[("agent", "off")]["cached"] + traces[("rag", "off")]["cached"]
            if off_cached:
                print(f"    NOTE: the cache-off server reported {off_cached} cached tokens: the switch is not honoured")

        if "c" in sections:
            tx = Texts(4)
            n_req, conc, pairs = (8, 3, 1) if args.quick else (12, 3, 8)
            runs = {"on": [], "off": []}
            for i in range(pairs):  # pairs in ABBA order, so load drift hits both alike
                order = (("on", on, False), ("off", off, salt_each)) if i % 2 == 0 else \
                        (("off", off, salt_each), ("on", on, False))
                for mode, srv, salt in order:
                    prompts = [tx(random.Random(i * 1000 + j).randint(960, 1088)) for j in range(n_req)]
                    runs[mode].append(run_no_reuse(srv, prompts, conc, 16, salt))
                print(f"  pair {i + 1}: on {runs['on'][-1]['tps']:.0f} tok/s, off {runs['off'][-1]['tps']:.0f} tok/s"
                      f"   [{loadavg()}]", flush=True)
            print(f"\n(c) no reuse: {pairs} pairs of rounds (on/off, ABBA), each {n_req} unique prompts of 960-1088 "
                  f"tokens, {conc} concurrent, max_tokens 16 (ignore_eos), /v1/completions   [{loadavg()}]")
            head = (f"{'cache':<5} {'rounds':>6} {'tok/s median':>12} {'min..max':>11} {'tok/s overall':>13} "
                    f"{'out tok/s':>9} {'server CPU s / 1K tok':>21} {'cached tok':>10}")
            print(head)
            print("-" * len(head))
            for mode in ("off", "on"):
                rs = runs[mode]
                label = mode if mode == "on" or not salt_each else "off*"
                overall = sum(r["tokens"] for r in rs) / sum(r["wall"] for r in rs)
                print(f"{label:<5} {len(rs):>6} {median([r['tps'] for r in rs]):>12.0f} "
                      f"{min(r['tps'] for r in rs):>5.0f}..{max(r['tps'] for r in rs):<5.0f} {overall:>13.0f} "
                      f"{median([r['out_tps'] for r in rs]):>9.1f} {median([r['cpu_per_ktok'] for r in rs]):>21.3f} "
                      f"{sum(r['cached'] for r in rs):>10}")
            ratios = [a["tps"] / b["tps"] for a, b in zip(runs["on"], runs["off"])]
            cost = 1 - median(ratios)
            cost_all = 1 - (sum(r["tokens"] for r in runs["on"]) / sum(r["wall"] for r in runs["on"])) / \
                (sum(r["tokens"] for r in runs["off"]) / sum(r["wall"] for r in runs["off"]))
            cpu_cost = median([a["cpu_per_ktok"] / b["cpu_per_ktok"] for a, b in zip(runs["on"], runs["off"])]) - 1
            verdict = "PASS" if cost <= TARGET_NO_REUSE_COST else "FAIL"
            print(f"    cost of the cache on = 1 - median over pairs of (on tok/s / off tok/s): {cost:.1%} "
                  f"(pairs: {' '.join(f'{1 - r:+.1%}' for r in ratios)}); over all rounds {cost_all:.1%}; "
                  f"server CPU time per token {cpu_cost:+.1%}.  target <= 2%: {verdict}")
            verdicts.append(("no-reuse throughput cost of the cache <= 2%", cost <= TARGET_NO_REUSE_COST))

        if sections & {"b", "c"}:
            on.stop()
            off.stop()

        print(f"\n{sum(p for _, p in verdicts)} of {len(verdicts)} targets met; {time.time() - t_start:.0f} s; {loadavg()}")
        for name, p in verdicts:
            print(f"  {'PASS' if p else 'FAIL'} {name}")
        if args.quick and "a" in sections:
            print("  (quick run: the TTFT targets are evaluated at the 1K prefix; they are defined at 8K)")
        return 0
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e}); stopping servers", file=sys.stderr)
        return 130
    except Exception:
        for s in Server.all:
            print(f"\n--- {s.name} log tail ---\n{s.tail()}", file=sys.stderr)
        raise
    finally:
        Server.stop_all()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
