#!/usr/bin/env python
"""bench_tiers: what the cpu and disk tiers move per second, and what a lookup costs (issue 2).

Measured in one run, beside this machine's own references:

  reference   memcpy (torch copy_ and numpy copyto of a large uint8 buffer), xxh3_64 (the page
              checksum), sequential file read (a file written under --dir, read back with large
              reads; warm page cache: this script never drops the OS cache)
  cpu tier    TieredStore with disk off: put_pages, get_pages(out=staging) and get_pages()
  disk tier   TieredStore with cpu_memory_size_GB: 0 (puts go straight to LMDB; flush() before
              the gets, which then come from LMDB through the warm page cache)
  lookup      store.lookup(ns, tokens) of a 32K-token prompt whose pages are all in the cpu tier,
              p50/p99; also with precomputed hashes=
  device      (--device cuda) get_pages(out=pinned staging) + DevicePool.scatter vs a plain
              pinned .to('cuda', non_blocking=True) of the same bytes

for two page shapes: a 7B-class dense model (32 layers, 32 KV heads, head_dim 128, bf16,
16-token pages: 8 MiB/page) and a Qwen3-30B-A3B-class MoE (48 layers, 4 KV heads: 1.5 MiB/page).
GB/s is 1e9 bytes per second of page payload.

    python benchmarks/bench_tiers.py              # full run, ~1 minute on a 2-core VM, < 8 GB
    python benchmarks/bench_tiers.py --quick      # seconds-long smoke run
    python benchmarks/bench_tiers.py --device cuda --sections device   # the GPU part only
    python benchmarks/bench_tiers.py --device cpu --sections device    # its code path on a CPU pool
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvc.backend import LookupResult  # noqa: E402
from kvc.config import KvcConfig  # noqa: E402
from kvc.cpu_tier import Entry  # noqa: E402
from kvc.device_pool import DevicePool  # noqa: E402
from kvc.hashing import Namespace, PageSpec, page_hashes, tokens_bytes  # noqa: E402
from kvc.record import Page, checksum, decode_header  # noqa: E402
from kvc.store import TieredStore, key, keys_of  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
GB = 1e9

SHAPES = {
    "7B-dense": PageSpec(num_layers=32, num_kv_heads=32, head_dim=128, page_size=16, dtype="bfloat16"),
    "30B-A3B-MoE": PageSpec(num_layers=48, num_kv_heads=4, head_dim=128, page_size=16, dtype="bfloat16"),
}
TARGET_CPU_GET = 0.70     # of memcpy
TARGET_DISK_GET = 0.60    # of sequential file read
TARGET_LOOKUP_S = 1e-3    # 32K-token prompt, p50
TARGET_DEVICE = 0.80      # of pinned H2D


# -- helpers ---------------------------------------------------------------------------------
def now() -> float:
    return time.perf_counter()


def fill_random(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Fill a uint8 tensor with random bytes (touches every page of it)."""
    g = torch.Generator().manual_seed(seed)
    n8 = t.numel() // 8
    if n8:
        t[:n8 * 8].view(torch.int64).random_(generator=g)
    if t.numel() % 8:
        t[n8 * 8:].random_(0, 256, generator=g)
    return t


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bytes viewed as bf16 hold NaNs, which torch.equal calls unequal)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[k]


@dataclass
class Row:
    shape: str
    case: str
    value: float          # GB/s, or ms for latency rows
    unit: str = "GB/s"
    ref: float | None = None
    ref_name: str = ""
    target: float | None = None   # ratio to ref (throughput) or max ms (latency)
    note: str = ""

    def ratio(self) -> float | None:
        return self.value / self.ref if self.ref else None

    def verdict(self) -> str:
        if self.target is None:
            return "-"
        if self.unit == "ms":
            return "PASS" if self.value < self.target else "FAIL"
        r = self.ratio()
        return "-" if r is None else ("PASS" if r >= self.target else "FAIL")


def loadavg() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}   [{loadavg()}]")
    head = f"{'shape':<12} {'case':<48} {'value':>10} {'ref':>22} {'ratio':>6} {'target':>7} {'result':>6}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        val = f"{r.value:7.3f} ms" if r.unit == "ms" else f"{r.value:6.2f} GB/s"
        ref = f"{r.ref:6.2f} {r.ref_name}" if r.ref else "-"
        ratio = f"{r.ratio():5.0%}" if r.ratio() is not None else "-"
        if r.target is None:
            tgt = "-"
        elif r.unit == "ms":
            tgt = f"<{r.target:g}ms"
        else:
            tgt = f">={r.target:.0%}"
        print(f"{r.shape:<12} {r.case:<48} {val:>10} {ref:>22} {ratio:>6} {tgt:>7} {r.verdict():>6}  {r.note}")
    sys.stdout.flush()


class PromptPages:
    """A random prompt of n full pages for `ns`: its tokens, chained hashes and Page objects.

    Page payloads are slices of one random source buffer of `n_src` pages (page i uses slice
    i % n_src), so the source can be smaller than what is stored.
    """

    def __init__(self, ns: Namespace, n_pages: int, n_src: int | None = None, seed: int = 0):
        spec = ns.spec
        P = spec.page_size
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(0, 151_000, size=n_pages * P, dtype=np.int64).astype(np.uint32)
        self.hashes = page_hashes(ns.root, self.tokens, P)
        n_src = n_pages if n_src is None else min(n_src, n_pages)
        pb = spec.page_bytes
        self.src = fill_random(torch.empty(n_src * pb, dtype=torch.uint8), seed + 1)
        dt = getattr(torch, spec.dtype)
        self.pages = []
        parent = ns.root
        for i, h in enumerate(self.hashes):
            j = i % n_src
            data = self.src[j * pb:(j + 1) * pb].view(dt).reshape(spec.shape)
            self.pages.append(Page(h, parent, self.tokens[i * P:(i + 1) * P], data))
            parent = h
        self.n = n_pages

    def src_page(self, i: int) -> torch.Tensor:
        return self.pages[i].data


def batches(xs, size):
    for i in range(0, len(xs), size):
        yield xs[i:i + size]


def pages_for(spec: PageSpec, budget_bytes: int, batch: int) -> tuple[int, int]:
    n = max(1, budget_bytes // spec.page_bytes)
    b = min(batch, n)
    return (n // b) * b, b


# -- references ------------------------------------------------------------------------------
def bench_references(nbytes: int, reps: int, tmpdir: str) -> dict[str, float]:
    out = {}
    a = fill_random(torch.empty(nbytes, dtype=torch.uint8), 11)
    b = torch.zeros(nbytes, dtype=torch.uint8)
    b.copy_(a)  # touch
    ts = []
    for _ in range(reps):
        t0 = now()
        b.copy_(a)
        ts.append(now() - t0)
    out["memcpy_torch"] = nbytes / min(ts) / GB
    an, bn = a.numpy(), b.numpy()
    ts = []
    for _ in range(reps):
        t0 = now()
        np.copyto(bn, an)
        ts.append(now() - t0)
    out["memcpy_numpy"] = nbytes / min(ts) / GB
    # xxh3_64 over 8 MiB chunks of a DRAM-resident buffer: the page checksum's speed here.
    chunk = 8 * MiB
    ts = []
    for _ in range(reps):
        t0 = now()
        for off in range(0, nbytes - chunk + 1, chunk):
            xxhash.xxh3_64_intdigest(an[off:off + chunk])
        ts.append(now() - t0)
    out["xxh3_64"] = (nbytes // chunk * chunk) / min(ts) / GB
    del b, bn
    gc.collect()

    # Sequential file read, warm page cache: write the file, then read it back with 8 MiB reads
    # into a preallocated buffer (as a tier read lands in a staging buffer).
    path = os.path.join(tmpdir, "seqread.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        mv = memoryview(an)
        for off in range(0, nbytes, 64 * MiB):
            os.write(fd, mv[off:off + 64 * MiB])
        os.fsync(fd)
    finally:
        os.close(fd)
    del a, an, mv
    gc.collect()
    dst = np.zeros(nbytes, dtype=np.uint8)
    dmv = memoryview(dst)
    rchunk = 8 * MiB
    ts = []
    for _ in range(reps + 1):
        with open(path, "rb", buffering=0) as f:
            t0 = now()
            off = 0
            while off < nbytes:
                n = f.readinto(dmv[off:off + rchunk])
                if not n:
                    break
                off += n
            ts.append(now() - t0)
        assert off == nbytes, f"read {off} of {nbytes} bytes"
    out["seqread_first"] = nbytes / ts[0] / GB
    out["seqread"] = nbytes / min(ts[1:]) / GB
    os.unlink(path)
    del dst, dmv
    gc.collect()
    return out


# -- cpu tier --------------------------------------------------------------------------------
def bench_cpu_tier(name: str, spec: PageSpec, budget: int, batch: int, reps: int, ref: dict) -> tuple[list[Row], list[Row]]:
    ns = Namespace("bench-" + name, spec)
    n, b = pages_for(spec, budget, batch)
    pp = PromptPages(ns, n, seed=1)
    pb = spec.page_bytes
    total = n * pb
    slab_gb = (total + 4 * 64 * MiB) / GiB
    store = TieredStore(KvcConfig(cpu_memory_size_GB=slab_gb, disk_path=None, disk_size_GB=0))
    rows, prof = [], []
    memcpy = max(ref["memcpy_torch"], ref["memcpy_numpy"])
    tag = f"{n} pages x {pb / MiB:g} MiB, batch {b}"

    put_ts = []
    for rep in range(max(2, reps // 2)):
        if rep:
            assert store.delete(ns) == n
        t0 = now()
        for chunk in batches(pp.pages, b):
            r = store.put_pages(ns, chunk)
            assert r.stored == len(chunk), r
        put_ts.append(now() - t0)
    rows.append(Row(name, "cpu put_pages (first touch of the slab)", total / put_ts[0] / GB, ref=memcpy,
                    ref_name="memcpy", note=tag))
    rows.append(Row(name, "cpu put_pages (slab warm)", total / min(put_ts[1:]) / GB, ref=memcpy,
                    ref_name="memcpy"))

    dt = getattr(torch, spec.dtype)
    staging = torch.zeros((b, *spec.shape), dtype=dt)
    get_ts = []
    for _ in range(reps + 1):
        t0 = now()
        for chunk in batches(pp.hashes, b):
            got = store.get_pages(ns, chunk, out=staging)
            assert len(got) == len(chunk)
        get_ts.append(now() - t0)
    # the last batch is in staging: check its bytes against the source
    last = len(pp.hashes) - b
    for k in (0, b - 1):
        assert same_bytes(staging[k], pp.src_page(last + k)), "cpu tier returned wrong bytes"
    rows.append(Row(name, "cpu get_pages(out=staging)", total / min(get_ts[1:]) / GB, ref=memcpy,
                    ref_name="memcpy", target=TARGET_CPU_GET,
                    note=f"median {total / statistics.median(get_ts[1:]) / GB:.2f}"))
    get_ts = []
    for _ in range(reps + 1):
        t0 = now()
        for chunk in batches(pp.hashes, b):
            got = store.get_pages(ns, chunk)
            assert len(got) == len(chunk)
            del got
        get_ts.append(now() - t0)
    rows.append(Row(name, "cpu get_pages() (fresh tensors)", total / min(get_ts[1:]) / GB, ref=memcpy,
                    ref_name="memcpy"))

    # Breakdown of the get path: the checksum and the copy alone, over the same slab slots.
    cpu = store.cpu
    keys = keys_of(ns.root, pp.hashes)  # the tiers key a page by its namespace root and hash
    views = [cpu.view(k) for k in keys]
    flat = staging.view(torch.uint8).reshape(b, -1)
    t_sum, t_cpy, t_both = [], [], []
    for _ in range(min(reps, 3)):
        t0 = now()
        for v in views:
            checksum(v)
        t_sum.append(now() - t0)
        t0 = now()
        for i, v in enumerate(views):
            flat[i % b].copy_(torch.from_numpy(v))
        t_cpy.append(now() - t0)
        t0 = now()
        for i, k in enumerate(keys):
            cpu.read_into(k, flat[i % b])
        t_both.append(now() - t0)
    prof.append(Row(name, "cpu get: xxh3_64 of each slot only", total / min(t_sum) / GB, ref=memcpy, ref_name="memcpy"))
    prof.append(Row(name, "cpu get: copy_ slot -> staging only", total / min(t_cpy) / GB, ref=memcpy, ref_name="memcpy"))
    prof.append(Row(name, "cpu get: CpuTier.read_into (checksum+copy)", total / min(t_both) / GB, ref=memcpy,
                    ref_name="memcpy"))
    store.close()
    del store, pp, staging, views, flat
    gc.collect()
    return rows, prof


# -- disk tier -------------------------------------------------------------------------------
def bench_disk_tier(name: str, spec: PageSpec, budget: int, batch: int, reps: int, ref: dict,
                    tmpdir: str) -> tuple[list[Row], list[Row]]:
    ns = Namespace("bench-" + name, spec)
    n, b = pages_for(spec, budget, batch)
    pp = PromptPages(ns, n, seed=2)
    pb = spec.page_bytes
    total = n * pb
    path = tempfile.mkdtemp(prefix=f"disk-{name}-", dir=tmpdir)
    disk_gb = (total * 1.5 + 256 * MiB) / GiB
    store = TieredStore(KvcConfig(cpu_memory_size_GB=0, disk_path=path, disk_size_GB=disk_gb))
    rows, prof = [], []
    seq = ref["seqread"]
    tag = f"{n} pages x {pb / MiB:g} MiB, batch {b}"
    try:
        t0 = now()
        for chunk in batches(pp.pages, b):
            r = store.put_pages(ns, chunk)
            assert r.stored == len(chunk), r
        t_enq = now() - t0
        store.flush()
        t_put = now() - t0
        assert not store.disk.pending, "flush() returned with writes still queued"
        rows.append(Row(name, "disk put_pages + flush (LMDB commit, fsync)", total / t_put / GB, note=
                        f"{tag}; put_pages returned at {total / t_enq / GB:.2f} GB/s"))

        dt = getattr(torch, spec.dtype)
        staging = torch.zeros((b, *spec.shape), dtype=dt)
        get_ts = []
        for _ in range(reps + 1):
            t0 = now()
            for chunk in batches(pp.hashes, b):
                got = store.get_pages(ns, chunk, out=staging)
                assert len(got) == len(chunk)
            get_ts.append(now() - t0)
        last = len(pp.hashes) - b
        for k in (0, b - 1):
            assert same_bytes(staging[k], pp.src_page(last + k)), "disk tier returned wrong bytes"
        assert store.cpu.pages == 0
        rows.append(Row(name, "disk get_pages(out=staging), 1st read", total / get_ts[0] / GB, ref=seq,
                        ref_name="seqread", note="warm page cache, LMDB map not yet touched"))
        rows.append(Row(name, "disk get_pages(out=staging), warm", total / min(get_ts[1:]) / GB, ref=seq,
                        ref_name="seqread", target=TARGET_DISK_GET,
                        note=f"warm page cache; median {total / statistics.median(get_ts[1:]) / GB:.2f}"))
        get_ts = []
        for _ in range(reps):
            t0 = now()
            for chunk in batches(pp.hashes, b):
                got = store.get_pages(ns, chunk)
                assert len(got) == len(chunk)
                del got
            get_ts.append(now() - t0)
        rows.append(Row(name, "disk get_pages() (fresh tensors), warm", total / min(get_ts) / GB, ref=seq,
                        ref_name="seqread", note="warm page cache"))

        # Breakdown: an LMDB read transaction per page that only touches the buffer, checksum of
        # the payload in the map, and the copy out of the map.
        disk = store.disk
        keys = keys_of(ns.root, pp.hashes)  # the tiers key a page by its namespace root and hash
        flat = staging.view(torch.uint8).reshape(b, -1)
        t_txn, t_sum, t_cpy, t_read = [], [], [], []
        for _ in range(min(reps, 3)):
            t0 = now()
            for k in keys:
                with disk.env.begin(db=disk._data, buffers=True) as txn:
                    decode_header(txn.get(k))
            t_txn.append(now() - t0)
            with disk.env.begin(db=disk._data, buffers=True) as txn:
                bufs = [txn.get(k) for k in keys]
                offs = [decode_header(x).payload_offset for x in bufs]
                t0 = now()
                for x, o in zip(bufs, offs):
                    checksum(memoryview(x)[o:])
                t_sum.append(now() - t0)
                t0 = now()
                for i, (x, o) in enumerate(zip(bufs, offs)):
                    flat[i % b].numpy()[:] = np.frombuffer(x, dtype=np.uint8, offset=o)
                t_cpy.append(now() - t0)
                del bufs
            t0 = now()
            for lo in range(0, n, b):  # staging-sized runs, as get_pages(out=staging) reads them
                hs = keys[lo:lo + b]
                assert len(disk.read_run(hs, [flat[i].numpy() for i in range(len(hs))], ns.root)) == len(hs)
            t_read.append(now() - t0)
        prof.append(Row(name, "disk get: LMDB txn + get + header only", total / min(t_txn) / GB,
                        note=f"{min(t_txn) / n * 1e6:.1f} us/page (payload not read)"))
        prof.append(Row(name, "disk get: xxh3_64 of payload in map only", total / min(t_sum) / GB, ref=seq,
                        ref_name="seqread"))
        prof.append(Row(name, "disk get: copy map -> staging only", total / min(t_cpy) / GB, ref=seq,
                        ref_name="seqread"))
        prof.append(Row(name, "disk get: DiskTier.read_run (all of it)", total / min(t_read) / GB, ref=seq,
                        ref_name="seqread"))
        del staging, flat
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)
    del store, pp
    gc.collect()
    return rows, prof


# -- lookup ----------------------------------------------------------------------------------
def bench_lookup(name: str, spec: PageSpec, n_tokens: int, runs: int, real: bool) -> list[Row]:
    """Lookup of an n_tokens prompt whose pages are all in the cpu tier.

    real: the pages are put through put_pages (the slab holds all of them). Otherwise the cpu
    tier's index gets the entries without payloads ("index-only"): lookup reads nothing but
    the index, and a 32K-token prompt of 8 MiB pages would need a 16 GiB slab.
    """
    ns = Namespace("bench-" + name, spec)
    P = spec.page_size
    n = n_tokens // P
    pb = spec.page_bytes
    if real:
        pp = PromptPages(ns, n, n_src=16, seed=3)
        store = TieredStore(KvcConfig(cpu_memory_size_GB=(n * pb + 4 * 64 * MiB) / GiB, disk_path=None,
                                      disk_size_GB=0))
        for chunk in batches(pp.pages, 64):
            assert store.put_pages(ns, chunk).stored == len(chunk)
        how = f"{n} pages put ({n * pb / GiB:.1f} GiB slab)"
    else:
        rng = np.random.default_rng(3)
        tokens = rng.integers(0, 151_000, size=n * P, dtype=np.int64).astype(np.uint32)
        hashes = page_hashes(ns.root, tokens, P)
        store = TieredStore(KvcConfig(cpu_memory_size_GB=0.0625, disk_path=None, disk_size_GB=0))
        raw = tokens_bytes(tokens)
        parent = ns.root
        for i, h in enumerate(hashes):
            store.cpu.entries[key(ns.root, h)] = Entry(ns.root, parent, raw[i * 4 * P:(i + 1) * 4 * P], spec.dtype,
                                         spec.shape, pb, 0, slot=-1)
            parent = h

        class _PP:
            pass
        pp = _PP()
        pp.tokens, pp.hashes = tokens, hashes
        how = f"{n} pages, index-only (payloads would need {n * pb / GiB:.0f} GiB)"
    tokens_np = pp.tokens
    tokens_list = tokens_np.tolist()
    hashes = list(pp.hashes)

    def run(label, fn, target=True, note=""):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(runs):
            t0 = now()
            r = fn()
            ts.append(now() - t0)
        if isinstance(r, LookupResult):
            assert r.num_pages == n, f"{label}: hit {r.num_pages} of {n} pages"
        p50, p99 = pct(ts, 0.50), pct(ts, 0.99)
        return Row(name, label, p50 * 1e3, unit="ms", target=TARGET_LOOKUP_S * 1e3 if target else None,
                   note=f"p99 {p99 * 1e3:.3f} ms; {note}")

    rows = [
        run("lookup(tokens=list[int])", lambda: store.lookup(ns, tokens_list), note=how),
        run("lookup(tokens=np.uint32 array)", lambda: store.lookup(ns, tokens_np)),
        run("lookup(hashes=precomputed)", lambda: store.lookup(ns, hashes=hashes)),
        run("lookup(tokens=np array, hashes=precomputed)", lambda: store.lookup(ns, tokens_np, hashes=hashes)),
        # components, for the reading: not lookups, no target
        run("  part: tokens_bytes(list[int])", lambda: tokens_bytes(tokens_list), target=False),
        run("  part: page_hashes(root, np tokens)", lambda: page_hashes(ns.root, tokens_np, P), target=False),
    ]
    store.close()
    del store, pp
    gc.collect()
    return rows


# -- device ----------------------------------------------------------------------------------
def bench_device(name: str, spec: PageSpec, n: int, reps: int, device: str) -> list[Row]:
    """Cpu-tier pages into a DevicePool: get_pages(out=pinned staging) + scatter vs pinned H2D."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    ns = Namespace("bench-" + name, spec)
    pb = spec.page_bytes
    total = n * pb
    pp = PromptPages(ns, n, seed=4)
    store = TieredStore(KvcConfig(cpu_memory_size_GB=(total + 4 * 64 * MiB) / GiB, disk_path=None,
                                  disk_size_GB=0))
    slab_pinned = bool(store.cpu.slab.is_pinned()) if cuda else False
    if cuda and not slab_pinned:
        print(f"WARNING: the cpu tier's slab is not pinned although CUDA is available ({name})")
    for chunk in batches(pp.pages, 64):
        assert store.put_pages(ns, chunk).stored == len(chunk)
    dt = getattr(torch, spec.dtype)
    staging = torch.zeros((n, *spec.shape), dtype=dt, pin_memory=cuda)
    pool = DevicePool(spec, 2 * n, device=dev)
    blocks = list(range(1, 2 * n, 2))  # not a contiguous run: the scatter is an index_copy_

    def t_h2d():
        sync()
        t0 = now()
        d = staging.to(dev, non_blocking=True)
        sync()
        t = now() - t0
        del d
        return t

    def t_h2d_pre(buf):
        sync()
        t0 = now()
        buf.copy_(staging, non_blocking=True)
        sync()
        return now() - t0

    def t_get():
        t0 = now()
        got = store.get_pages(ns, pp.hashes, out=staging)
        t = now() - t0
        assert len(got) == n
        return t

    def t_scatter():
        sync()
        t0 = now()
        pool.scatter(blocks, staging)
        sync()
        return now() - t0

    def t_e2e():
        sync()
        t0 = now()
        got = store.get_pages(ns, pp.hashes, out=staging)
        pool.scatter(blocks, staging)
        sync()
        t = now() - t0
        assert len(got) == n
        return t

    def t_direct(buf):
        # the ceiling without a staging copy and without checksums: H2D straight from the
        # (pinned) slab slots, one async copy per page
        slab, entries = store.cpu.slab, store.cpu.entries
        flatbuf = buf.view(torch.uint8).reshape(n, -1)
        sync()
        t0 = now()
        for i, h in enumerate(pp.hashes):
            off = entries[h].slot
            flatbuf[i].copy_(slab[off:off + pb], non_blocking=True)
        sync()
        return now() - t0

    from engine.host_tier import HostTier  # the engine's load path: chunked, read overlapping H2D
    host = HostTier(store)
    blocks2 = list(range(0, 2 * n, 2))

    def t_engine():
        sync()
        t0 = now()
        got = host.load(ns, pp.hashes, pool, blocks2).result()
        sync()
        t = now() - t0
        assert got == n
        return t

    devbuf = torch.empty((n, *spec.shape), dtype=dt, device=dev)
    t_e2e(); t_h2d(); t_h2d_pre(devbuf); t_direct(devbuf); t_engine()  # warm-up
    # correctness: what the pool holds is what was put
    got = pool.gather([blocks[0], blocks[-1]]).cpu()
    assert same_bytes(got[0], pp.src_page(0)) and same_bytes(got[1], pp.src_page(n - 1)), \
        "DevicePool does not hold the pages that were put"
    got = pool.gather([blocks2[0], blocks2[-1]]).cpu()
    assert same_bytes(got[0], pp.src_page(0)) and same_bytes(got[1], pp.src_page(n - 1)), \
        "HostTier.load did not put the right pages in the pool"
    res = {k: [] for k in ("h2d", "h2d_pre", "get", "scatter", "e2e", "direct", "engine")}
    for _ in range(reps):
        res["h2d"].append(t_h2d())
        res["h2d_pre"].append(t_h2d_pre(devbuf))
        res["get"].append(t_get())
        res["scatter"].append(t_scatter())
        res["e2e"].append(t_e2e())
        res["direct"].append(t_direct(devbuf))
        res["engine"].append(t_engine())
    bw = {k: total / min(v) / GB for k, v in res.items()}
    h2d = bw["h2d"]
    tag = f"{n} pages x {pb / MiB:g} MiB on {device}; slab pinned: {slab_pinned}; staging pinned: {staging.is_pinned() if cuda else False}"
    rows = [
        Row(name, "pinned H2D: staging.to(dev, non_blocking)", h2d, note=tag),
        Row(name, "pinned H2D: copy_ into preallocated", bw["h2d_pre"], ref=h2d, ref_name="H2D"),
        Row(name, "cpu-tier read: get_pages(out=pinned staging)", bw["get"], ref=h2d, ref_name="H2D"),
        Row(name, "pure scatter: pool.scatter(blocks, staging)", bw["scatter"], ref=h2d, ref_name="H2D"),
        Row(name, "get_pages(out=staging) + scatter, one batch", bw["e2e"], ref=h2d, ref_name="H2D"),
        Row(name, "engine load: HostTier.load (slab -> device, verify on threads)", bw["engine"], ref=h2d, ref_name="H2D",
            target=TARGET_DEVICE if cuda else None, note="" if cuda else "code-path check only: no target on cpu"),
        Row(name, "ceiling: H2D per page from slab, no checksum", bw["direct"], ref=h2d, ref_name="H2D"),
    ]
    host.close()
    store.close()
    del store, pool, staging, devbuf, pp, host
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


# -- main ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run (small sizes, few reps)")
    ap.add_argument("--device", default=None,
                    help="also run the device part on this torch device ('cuda', 'cuda:1'; 'cpu' checks "
                         "its code path against a CPU pool)")
    ap.add_argument("--sections", default=None,
                    help="comma list of ref,cpu,disk,lookup,device (default: all; device only with --device)")
    ap.add_argument("--dir", default=None, help="where the disk tier and the read-test file go (default: temp dir)")
    ap.add_argument("--gib", type=float, default=None, help="payload GiB per shape for the tier runs (default 1)")
    ap.add_argument("--lookup-runs", type=int, default=None, help="lookups per case (default 200)")
    ap.add_argument("--device-pages", type=int, default=64, help="pages per shape in the device part")
    args = ap.parse_args(argv)

    sections = set((args.sections or "ref,cpu,disk,lookup,device").split(","))
    unknown = sections - {"ref", "cpu", "disk", "lookup", "device"}
    if unknown:
        ap.error(f"unknown sections: {sorted(unknown)}")
    if args.device is None:
        if args.sections and "device" in sections:
            ap.error("the device section needs --device (e.g. --device cuda)")
        sections.discard("device")
    elif torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"bench_tiers: --device {args.device} needs a CUDA GPU, but torch {torch.__version__} "
              f"(built with CUDA {torch.version.cuda}) reports torch.cuda.is_available() == False; "
              f"run it on a GPU machine with a CUDA build of torch, or leave out --device", file=sys.stderr)
        return 2
    if sections & {"cpu", "disk"} and "ref" not in sections:
        sections.add("ref")  # the targets are ratios to this run's references

    quick = args.quick
    gib = args.gib if args.gib is not None else (1 / 16 if quick else 1.0)
    budget = int(gib * GiB)
    reps = 2 if quick else 5
    lookup_runs = args.lookup_runs or (20 if quick else 200)
    ref_bytes = (128 if quick else 1024) * MiB
    base = tempfile.mkdtemp(prefix="bench_tiers-", dir=args.dir)

    print(f"bench_tiers: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numpy {np.__version__}, python {platform.python_version()}; "
          f"{'quick' if quick else 'full'} run; temp dir {base}; {loadavg()}")
    for name, spec in SHAPES.items():
        print(f"  {name}: page {spec.shape} {spec.dtype} = {spec.page_bytes / MiB:g} MiB")
    t_start = now()
    rows, prof = [], []
    ref = {}
    try:
        if "ref" in sections:
            ref = bench_references(ref_bytes, reps, base)
            rrows = [
                Row("machine", f"memcpy: torch copy_ ({ref_bytes // MiB} MiB uint8)", ref["memcpy_torch"]),
                Row("machine", f"memcpy: numpy copyto ({ref_bytes // MiB} MiB)", ref["memcpy_numpy"]),
                Row("machine", "xxh3_64 (8 MiB chunks, one thread)", ref["xxh3_64"]),
                Row("machine", "seq file read, 8 MiB reads, warm page cache", ref["seqread"],
                    note=f"first read after write: {ref['seqread_first']:.2f} GB/s"),
            ]
            print_table("Reference (this machine, this run)", rrows)
            rows += rrows
        if "cpu" in sections:
            for name, spec in SHAPES.items():
                r, p = bench_cpu_tier(name, spec, budget, 64, reps, ref)
                rows += r
                prof += p
        if "disk" in sections:
            for name, spec in SHAPES.items():
                r, p = bench_disk_tier(name, spec, budget, 64, reps, ref, base)
                rows += r
                prof += p
        tier_rows = [r for r in rows if r.shape != "machine"]
        if tier_rows:
            print_table("Tiers through TieredStore (memcpy ref = max(torch, numpy))", tier_rows)
        if prof:
            print_table("Get-path breakdown (same pages, parts alone)", prof)
        if "lookup" in sections:
            lrows = []
            for name, spec in SHAPES.items():
                # a real 32K-token fill needs 3 GiB for the MoE pages; 7B pages would need 16 GiB
                real = not quick and spec.page_bytes * (32768 // spec.page_size) <= 4 * GiB
                lrows += bench_lookup(name, spec, 32768, lookup_runs, real)
            print_table("Lookup of a 32K-token prompt, all pages in the cpu tier (value = p50)", lrows)
            rows += lrows
        if "device" in sections:
            drows = []
            n = min(args.device_pages, 8) if quick else args.device_pages
            for name, spec in SHAPES.items():
                drows += bench_device(name, spec, n, 3 if quick else 10, args.device)
            print_table(f"Device part: cpu tier -> DevicePool on {args.device}", drows)
            rows += drows
    finally:
        shutil.rmtree(base, ignore_errors=True)
    verdicts = [r for r in rows if r.target is not None]
    fails = [r for r in verdicts if r.verdict() == "FAIL"]
    print(f"\n{len(verdicts) - len(fails)} of {len(verdicts)} targets met; {now() - t_start:.0f} s; {loadavg()}")
    for r in fails:
        print(f"  FAIL {r.shape} {r.case}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
