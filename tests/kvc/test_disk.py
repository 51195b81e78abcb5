"""Disk tier: warm restart, corruption, truncation, a second process, churn, a full disk."""
import os
import subprocess
import sys
import textwrap

import lmdb
import pytest
import torch

from kvc.disk_tier import DiskPathLocked
from kvc.store import TieredStore

from .conftest import NS, SPEC, kvc_config, make_pages


def metric(store, name, **labels):
    v = store.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_warm_restart_serves_previous_pages(tmp_path):
    cfg = kvc_config(tmp_path)
    ha, pa = make_pages(NS, list(range(40)))
    with TieredStore(cfg) as s:
        s.put_pages(NS, pa)  # write-back: still only in cpu; close() writes them to disk
    with TieredStore(cfg) as s:
        r = s.lookup(NS, tokens=list(range(40)))
        assert r.located == ["disk"] * 10
        got = s.get_pages(NS, ha)
        assert all(torch.equal(a.data, b.data) for a, b in zip(got, pa))


def test_flipped_byte_on_disk_is_a_miss_never_wrong_bytes(tmp_path):
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=0)
    ha, pa = make_pages(NS, list(range(12)))
    with TieredStore(cfg) as s:
        s.put_pages(NS, pa)
    env = lmdb.open(os.path.join(cfg.disk_path, "lmdb"), max_dbs=2)
    data = env.open_db(b"data")
    with env.begin(write=True, db=data) as txn:
        rec = bytearray(txn.get(NS.root + ha[1]))
        rec[-3] ^= 0x01
        txn.put(NS.root + ha[1], bytes(rec))
    env.close()
    with TieredStore(cfg) as s:
        got = s.get_pages(NS, ha)
        assert len(got) == 1 and torch.equal(got[0].data, pa[0].data)
        assert metric(s, "kvc_checksum_failures_total", tier="disk") == 1
        assert s.lookup(NS, hashes=ha).num_pages == 1


def test_truncated_file_is_moved_aside_and_tier_starts_cold(tmp_path, caplog):
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=0)
    _, pa = make_pages(NS, list(range(400)))
    with TieredStore(cfg) as s:
        s.put_pages(NS, pa)
    path = os.path.join(cfg.disk_path, "lmdb", "data.mdb")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 3)
    with TieredStore(cfg) as s:
        assert s.disk.pages == 0
        assert metric(s, "kvc_quarantines_total", reason="startup_check") == 1
        assert s.put_pages(NS, pa[:2]).stored == 2  # the fresh tier works
    assert any(n.startswith("lmdb.corrupt-") for n in os.listdir(cfg.disk_path))
    assert "moved it aside" in caplog.text


def test_garbage_file_is_moved_aside(tmp_path):
    cfg = kvc_config(tmp_path)
    os.makedirs(os.path.join(cfg.disk_path, "lmdb"))
    with open(os.path.join(cfg.disk_path, "lmdb", "data.mdb"), "wb") as f:
        f.write(os.urandom(64 << 10))
    with TieredStore(cfg) as s:
        assert s.disk.pages == 0
        assert metric(s, "kvc_quarantines_total", reason="startup_check") == 1


def test_second_process_on_same_disk_path_is_refused(tmp_path):
    cfg = kvc_config(tmp_path)
    with TieredStore(cfg):
        code = textwrap.dedent(f"""
            from kvc.config import load_config
            from kvc.store import TieredStore
            from kvc.disk_tier import DiskPathLocked
            try:
                TieredStore(load_config(None, disk_path={cfg.disk_path!r}).kvc)
            except DiskPathLocked as e:
                print("REFUSED", e)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "REFUSED" in out.stdout and f"pid {os.getpid()}" in out.stdout, out.stderr
        with pytest.raises(DiskPathLocked, match="in use by another kvc process"):
            TieredStore(cfg)


def test_disk_file_stays_within_budget_under_churn(tmp_path):
    budget = 2 << 20  # 2 MiB; pages of 256 B payload (~1 LMDB page each)
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=0, disk_size_GB=budget / (1 << 30))
    written = 0
    with TieredStore(cfg) as s:
        i = 0
        while written < 10 * budget:
            toks = list(range(i * 64, i * 64 + 64))
            _, pages = make_pages(NS, toks, seed=i)
            s.put_pages(NS, pages)
            written += len(pages) * (SPEC.page_bytes + 200)
            i += 1
            if i % 50 == 0:
                s.flush()
        s.flush()
        assert s.disk.used <= budget
        assert s.disk.file_bytes() <= budget * 1.10
        assert metric(s, "kvc_evictions_total", tier="disk", reason="capacity") > 0
        # the newest pages are still served
        assert s.lookup(NS, tokens=toks).num_pages == 16


def test_full_disk_degrades_disk_tier_and_cpu_keeps_serving(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        # the budget says 64 MiB but the filesystem has 1 MiB: writes must fail cleanly
        cfg = kvc_config(tmp_path, disk_path=str(mnt / "pages"), disk_size_GB=64 / 1024,
                         cpu_memory_size_GB=64 / 1024, disk_write="through")
        with TieredStore(cfg) as s:
            first = None
            for i in range(200):
                toks = list(range(i * 4096, i * 4096 + 4096))
                hashes, pages = make_pages(NS, toks, seed=i)
                first = first or (toks, hashes, pages)
                s.put_pages(NS, pages)
                s.flush()
                if s.disk.degraded:
                    break
            assert s.disk.degraded
            assert metric(s, "kvc_disk_errors_total", op="commit", kind="enospc") >= 1
            toks, hashes, pages = first
            got = s.get_pages(NS, hashes)  # the cpu tier keeps serving
            assert len(got) == len(pages) and torch.equal(got[-1].data, pages[-1].data)
            assert s.put_pages(NS, make_pages(NS, list(range(10**6, 10**6 + 16)))[1]).stored == 4
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
