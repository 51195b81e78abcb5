"""kill -9 loops over `kvc cache-server`: writers, readers and a durability tracker race a SIGKILL.

One cycle: start the service on the same port and disk_path, run writer threads (chains of
pages, each page's bytes a function of its hash), reader threads (every page read is compared
byte for byte with what was written) and a tracker (Lookup, then Stats: the pages Lookup saw on
the disk tier are durable once Stats answers synced), SIGKILL the service at a random moment,
restart it, and check every page ever written: a served page is byte-exact, a durable page is
served, and an acknowledged page that was not durable yet may be lost (counted).

The cycles alternate `disk_write: through` (kills land in LMDB commits) and `back` with a cpu
tier of a few pages (kills land in cpu-tier write-back). Used by tests/server/test_crash_loops.py
and benchmarks/bench_reliability.py.
"""
from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from kvc.client import RemoteCache
from kvc.hashing import Namespace, PageSpec, page_hashes
from kvc.record import Page

SPEC = PageSpec(num_layers=2, num_kv_heads=2, head_dim=64, page_size=16, dtype="float16")  # 16 KiB pages
CHAIN = 4  # pages per put


def payload_for(h: bytes) -> torch.Tensor:
    """The page bytes written for hash h: anyone can recompute them from the hash alone."""
    seed = int.from_bytes(xxhash.xxh3_64_digest(h), "little")
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 1 << 16, size=SPEC.page_bytes // 2, dtype=np.uint16)
    data = torch.from_numpy(raw.view(np.float16).copy()).reshape(SPEC.shape)
    return data


@dataclass
class Chain:
    ns: Namespace
    hashes: list[bytes]
    cycle: int
    acked: bool = False
    checked: bool = False  # read back after a restart at least once
    durable: int = 0  # leading pages known durable


@dataclass
class CycleResult:
    cycle: int
    mode: str
    kill_after_s: float
    acked_pages: int = 0
    durable_pages: int = 0
    lost_pages: int = 0  # acknowledged, not durable at the kill, not served after it
    reads_checked: int = 0
    wrong_bytes: int = 0
    durable_lost: int = 0  # of the whole run so far: must stay 0
    errors: list[str] = field(default_factory=list)
    timings: tuple = ()  # seconds: joining the clients, restarting, verifying


class Ledger:
    """Every chain written in the run, what is known of it, and the byte check of reads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.chains: list[Chain] = []
        self.wrong_bytes = 0
        self.durable_lost = 0
        self.reads = 0
        self.problems: list[str] = []

    def check_pages(self, chain: Chain, pages: list[Page]) -> int:
        """Compare served pages with what was written; returns how many were served."""
        parent = chain.ns.root
        for i, p in enumerate(pages):
            want = payload_for(chain.hashes[i])
            bad = int((p.data.contiguous().view(torch.uint8) != want.view(torch.uint8)).sum())
            with self.lock:
                self.reads += 1
                if p.hash != chain.hashes[i] or p.parent != parent or bad:
                    self.wrong_bytes += max(bad, 1)
                    self.problems.append(f"page {i} of a chain served wrong (hash ok: {p.hash == chain.hashes[i]}, "
                                         f"parent ok: {p.parent == parent}, {bad} wrong bytes)")
            parent = chain.hashes[i]
        return len(pages)


def make_chain(ns: Namespace, rng: random.Random, cycle: int) -> tuple[Chain, list[Page]]:
    toks = [rng.randrange(1, 150_000) for _ in range(CHAIN * SPEC.page_size)]
    hashes = page_hashes(ns.root, toks, SPEC.page_size)
    pages, parent = [], ns.root
    for i, h in enumerate(hashes):
        pages.append(Page(h, parent, np.asarray(toks[i * SPEC.page_size:(i + 1) * SPEC.page_size], np.uint32),
                          payload_for(h)))
        parent = h
    return Chain(ns, hashes, cycle), pages


def _writer(url, ns, cycle, ledger: Ledger, stop: threading.Event, seed: int):
    rng = random.Random(seed)
    with RemoteCache(url, timeout=2.0) as c:
        while not stop.is_set():
            chain, pages = make_chain(ns, rng, cycle)
            with ledger.lock:
                ledger.chains.append(chain)  # before the put: a page may land without its ack
            r = c.put_pages(ns, pages)
            if r.stored + r.duplicate == len(pages):
                chain.acked = True
            else:
                time.sleep(0.02)


def _reader(url, ledger: Ledger, stop: threading.Event, seed: int):
    rng = random.Random(seed)
    with RemoteCache(url, timeout=2.0) as c:
        while not stop.is_set():
            with ledger.lock:
                chain = rng.choice(ledger.chains) if ledger.chains else None
            if chain is None:
                time.sleep(0.01)
                continue
            ledger.check_pages(chain, c.get_pages(chain.ns, chain.hashes))


def _tracker(url, ns, ledger: Ledger, stop: threading.Event):
    """Lookup, then Stats: the disk run a Lookup saw before a synced Stats is durable."""
    with RemoteCache(url, timeout=5.0) as c:
        while not stop.is_set():
            with ledger.lock:
                todo = [ch for ch in ledger.chains if ch.ns == ns and ch.acked and ch.durable < len(ch.hashes)]
            seen = []
            for ch in todo[-32:]:
                r = c.lookup(ch.ns, hashes=ch.hashes)
                seen.append((ch, r.tiers.get("disk", 0)))
            st = c.stats()
            if st.get("tiers", {}).get("disk", {}).get("synced") is True:
                for ch, n in seen:
                    ch.durable = max(ch.durable, n)
            time.sleep(0.01)


def verify_all(url: str, ledger: Ledger, rng: random.Random, sample_old: int = 32) -> tuple[int, int, int]:
    """After a restart: (acked, durable, lost-unflushed) over the chains of the cycle just killed,
    all read back, and a sample of older chains (wrong bytes and lost durable pages go to the ledger)."""
    acked = durable = lost = 0
    with RemoteCache(url, timeout=10.0) as c:  # reachable first: a miss must mean "not stored"
        deadline = time.monotonic() + 30
        while "disk" not in c.stats().get("tiers", {}) and time.monotonic() < deadline:
            time.sleep(0.2)
    new = [ch for ch in ledger.chains if not ch.checked]
    old = [ch for ch in ledger.chains if ch.checked]
    with RemoteCache(url, timeout=10.0) as c:
        for ch in new + rng.sample(old, min(sample_old, len(old))):
            r = c.lookup(ch.ns, hashes=ch.hashes)
            served = ledger.check_pages(ch, c.get_pages(ch.ns, ch.hashes[:r.num_pages])) if r.num_pages else 0
            if served < ch.durable:
                ledger.durable_lost += ch.durable - served
                ledger.problems.append(f"{ch.durable - served} durable pages lost ({ch.durable} durable, "
                                       f"{served} served)")
            if ch.acked and not ch.checked:
                acked += len(ch.hashes)
                durable += ch.durable
                lost += len(ch.hashes) - served
            ch.checked = True
            ch.durable = served  # served after a restart: read from the disk tier, so durable now
    return acked, durable, lost


def run_cycles(server, cycles: int, seed: int, report=print, keep_cycles: int = 3) -> list[CycleResult]:
    """`server`: a tests.server.conftest.CacheServer (not started). Returns one result per cycle."""
    rng = random.Random(seed)
    ledger = Ledger()
    results = []

    def configure(cycle: int) -> str:
        mode = "through" if cycle % 2 == 0 else "back"
        server.kvc.update(disk_write=mode, cpu_memory_size_GB=0.004 if mode == "through" else 0.001)
        return mode

    mode = configure(0)
    server.start()
    for cycle in range(cycles):
        ns = Namespace("crash-loop", SPEC, weights_digest=f"cycle-{cycle}")
        stop = threading.Event()
        threads = [threading.Thread(target=_writer, args=(server.url, ns, cycle, ledger, stop, rng.randrange(1 << 30)))
                   for _ in range(2)]
        threads += [threading.Thread(target=_reader, args=(server.url, ledger, stop, rng.randrange(1 << 30))),
                    threading.Thread(target=_tracker, args=(server.url, ns, ledger, stop))]
        for t in threads:
            t.start()
        kill_after = rng.uniform(0.2, 1.0)
        time.sleep(kill_after)
        server.stop(signal.SIGKILL)
        stop.set()
        t0 = time.monotonic()
        for t in threads:
            t.join(30)
        res = CycleResult(cycle, mode, kill_after)
        mode = configure(cycle + 1)
        t1 = time.monotonic()
        server.start()
        t2 = time.monotonic()
        before_wrong, before_reads = ledger.wrong_bytes, ledger.reads
        res.acked_pages, res.durable_pages, res.lost_pages = verify_all(server.url, ledger, rng)
        res.timings = (t1 - t0, t2 - t1, time.monotonic() - t2)
        # drop old cycles' namespaces so the disk tier never has to evict a durable page for room
        old = {ch.ns for ch in ledger.chains if ch.cycle <= cycle - keep_cycles}
        if old:
            with RemoteCache(server.url, timeout=10.0) as c:
                for n in old:
                    c.delete(n)
            ledger.chains = [ch for ch in ledger.chains if ch.ns not in old]
        res.wrong_bytes = ledger.wrong_bytes
        res.durable_lost = ledger.durable_lost
        res.reads_checked = ledger.reads
        res.errors = list(ledger.problems)
        report(f"crash-loop seed={seed} cycle={cycle} mode={res.mode} kill_after={kill_after:.2f}s "
               f"acked={res.acked_pages} durable={res.durable_pages} lost_unflushed={res.lost_pages} "
               f"reads_checked={ledger.reads - before_reads} wrong_bytes={ledger.wrong_bytes - before_wrong} "
               f"(join/restart/verify {'/'.join(f'{t:.1f}' for t in res.timings)} s)")
        results.append(res)
        if ledger.problems:
            break
    server.stop()
    return results
