"""Disk tier: warm restart, corruption, truncation, a second process, churn, a full disk."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import pytest
import torch

from kvc import disk_tier
from kvc.disk_tier import DiskPathLocked
from kvc.hashing import Namespace, PageSpec
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


def test_map_the_process_cannot_map_leaves_the_tier_in_place_and_the_lock_free(tmp_path):
    """A disk_size_GB whose map is more than the process may map (ulimit -v): the start fails with
    an error naming kvc.disk_size_GB and leaves the tier's files where they are (before: moved
    aside as corrupt, then an lmdb.MemoryError traceback), and a retry in the same process with a
    budget that fits opens them warm (before: DiskPathLocked naming its own pid)."""
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=0)
    st = os.statvfs(tmp_path)
    if st.f_bavail * st.f_frsize < 2 << 30:
        pytest.skip("needs 2 GB free: a map the filesystem cannot hold is capped to it before the open")
    code = textwrap.dedent(f"""
        import os, resource
        from kvc.config import load_config
        from kvc.store import TieredStore
        from tests.kvc.conftest import NS, make_pages
        cfg = load_config(None, disk_path={cfg.disk_path!r}, cpu_memory_size_GB=0, disk_size_GB=16 / 1024).kvc
        with TieredStore(cfg) as s:
            s.put_pages(NS, make_pages(NS, list(range(40)))[1])
        vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + (256 << 20), hard))  # a 1.1 GB map cannot fit
        try:
            TieredStore(load_config(None, disk_path=cfg.disk_path, cpu_memory_size_GB=0, disk_size_GB=1).kvc)
        except Exception as e:
            print("REFUSED", type(e).__name__, e)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        print("FILES", sorted(os.listdir(cfg.disk_path)))
        try:
            with TieredStore(cfg) as s:
                print("RETRY", s.lookup(NS, tokens=list(range(40))).located)
        except Exception as e:
            print("RETRY", type(e).__name__, e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines.get("REFUSED", "").startswith("DiskPathUnusable "), out.stdout + out.stderr
    assert "kvc.disk_size_GB=1 needs a 1.1 GB memory map" in lines["REFUSED"]
    assert "left as they are" in lines["REFUSED"]
    assert lines["FILES"] == "['kvc.lock', 'lmdb']"  # nothing moved aside
    assert lines["RETRY"] == str(["disk"] * 10), out.stdout + out.stderr


def test_budget_beyond_the_address_space_is_cut_to_the_filesystem_before_the_map(tmp_path):
    """disk_size_GB of a petabyte, more than a process's address space: the map is cut to the
    filesystem's room before LMDB maps it, so the tier starts, capped, with its pages (before:
    ENOMEM from the full map, the healthy files moved aside as corrupt, then a traceback)."""
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=0)
    hashes, pa = make_pages(NS, list(range(40)))
    with TieredStore(cfg) as s:
        s.put_pages(NS, pa)
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=0, disk_size_GB=1 << 20)) as s:
        assert s.disk.capacity < s.disk.configured and s.disk.map_size <= s.disk.file_bytes() + s.disk.free_bytes()
        assert metric(s, "kvc_quarantines_total", reason="startup_check") == 0
        assert s.lookup(NS, hashes=hashes).located == ["disk"] * 10


def test_lmdb_error_other_than_corruption_leaves_the_files_and_a_retry_opens_them(tmp_path):
    """An environment LMDB cannot open for a reason that is not its files' (here its lock file is a
    folder; no permission or a read-only filesystem read the same): the start fails naming
    kvc.disk_path, nothing is moved aside, and once that is fixed a retry in the same process
    opens the pages warm (before: moved aside as corrupt and started cold)."""
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=0)
    hashes, pa = make_pages(NS, list(range(40)))
    with TieredStore(cfg) as s:
        s.put_pages(NS, pa)
    lock = os.path.join(cfg.disk_path, "lmdb", "lock.mdb")
    os.remove(lock)
    os.mkdir(lock)
    with pytest.raises(disk_tier.DiskPathUnusable, match="Is a directory.*kvc.disk_path.*left as they are"):
        TieredStore(cfg)
    assert sorted(os.listdir(cfg.disk_path)) == ["kvc.lock", "lmdb"]
    os.rmdir(lock)
    with TieredStore(cfg) as s:
        assert metric(s, "kvc_quarantines_total", reason="startup_check") == 0
        got = s.get_pages(NS, hashes)
        assert len(got) == 10 and all(torch.equal(a.data, b.data) for a, b in zip(got, pa))


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


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 4 MiB (root only; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path, leave: int) -> None:
    """Take the filesystem's free space but `leave` bytes with a file of zeros (another process)."""
    st = os.statvfs(path)
    with open(os.path.join(path, "filler"), "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


# 8 KiB pages: LMDB keeps each in overflow pages, as it does real pages
BIG = Namespace("test-arch", PageSpec(num_layers=2, num_kv_heads=2, head_dim=64, page_size=4, dtype="float32"),
                weights_digest="w0")


def test_full_disk_degrades_disk_tier_and_cpu_keeps_serving(tmp_path, small_fs):
    # the tier fits the filesystem at start; then another process takes the free space
    cfg = kvc_config(tmp_path, disk_path=str(small_fs / "pages"), disk_size_GB=1 / 1024,
                     cpu_memory_size_GB=64 / 1024, disk_write="through")
    with TieredStore(cfg) as s:
        _fill(small_fs, 0)
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


def wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_degraded_gauge_clears_when_the_retry_window_ends(tmp_path, small_fs, monkeypatch):
    """kvc_degraded{component="disk"} is 1 while the tier is bypassed after a failed commit and 0
    once the retry window is over (before, it stayed 1 for good: KvcTierDegraded fired on a tier
    that had recovered)."""
    monkeypatch.setattr(disk_tier, "DEGRADED_RETRY_S", 1.0)
    cfg = kvc_config(tmp_path, disk_path=str(small_fs / "pages"), disk_size_GB=1 / 1024, cpu_memory_size_GB=0)
    with TieredStore(cfg) as s:
        _fill(small_fs, 0)  # another process takes the space
        for j in range(20):
            s.put_pages(BIG, make_pages(BIG, list(range(j * 64, j * 64 + 64)), seed=j)[1])
            s.flush()
            if metric(s, "kvc_degraded", component="disk") == 1:
                break
        assert metric(s, "kvc_degraded", component="disk") == 1
        os.unlink(small_fs / "filler")  # and gives it back
        assert wait_for(lambda: metric(s, "kvc_degraded", component="disk") == 0, 3)  # the window ends
        toks = list(range(10**6, 10**6 + 64))
        s.put_pages(BIG, make_pages(BIG, toks, seed=99)[1])
        s.flush()
        assert s.lookup(BIG, tokens=toks).located == ["disk"] * 16
        assert metric(s, "kvc_degraded", component="disk") == 0


def test_disk_budget_larger_than_the_filesystem_is_capped_at_start(tmp_path, small_fs):
    """disk_size_GB of 64 MiB on a 4 MiB filesystem: capped at start, the tier evicts inside the
    filesystem and keeps writing new pages (before: it filled the filesystem, where LMDB cannot
    even commit deletes, and stayed degraded)."""
    fits = kvc_config(tmp_path, disk_path=str(small_fs / "fits"), disk_size_GB=2 / 1024, cpu_memory_size_GB=0)
    with TieredStore(fits) as s:  # a budget whose map (1.1x + 1 MiB) fits is left as configured
        assert s.disk.capacity == 2 << 20
    cfg = kvc_config(tmp_path, disk_path=str(small_fs / "pages"), disk_size_GB=64 / 1024, cpu_memory_size_GB=0)
    with TieredStore(cfg) as s:
        assert 2 << 20 < s.disk.capacity < 4 << 20  # the largest whose map fits the room
        assert metric(s, "kvc_tier_capacity_bytes", tier="disk") == s.disk.capacity
        for j in range(60):  # ~3x what the filesystem holds
            toks = list(range(j * 64, j * 64 + 64))
            hashes, pages = make_pages(BIG, toks, seed=j)
            s.put_pages(BIG, pages)
            s.flush()
        assert metric(s, "kvc_disk_errors_total", op="commit", kind="enospc") == 0
        assert metric(s, "kvc_disk_errors_total", op="commit", kind="eio") == 0
        assert not s.disk.degraded
        assert metric(s, "kvc_evictions_total", tier="disk", reason="capacity") > 0
        assert s.lookup(BIG, tokens=toks).located == ["disk"] * 16  # the newest pages are on disk
        # the file's gauges: the map inside the filesystem, the file inside its map
        assert metric(s, "kvc_lmdb_map_size_bytes") <= 4 << 20
        assert 0 < metric(s, "kvc_lmdb_used_bytes") <= metric(s, "kvc_lmdb_map_size_bytes")
        assert metric(s, "kvc_lmdb_used_bytes") <= s.disk.file_bytes()
        assert 0 < metric(s, "kvc_disk_filesystem_free_bytes") <= 4 << 20
        got = s.get_pages(BIG, hashes)
        assert all(torch.equal(a.data, b.data) for a, b in zip(got, pages))


def test_budget_capped_at_start_grows_into_space_freed_later(tmp_path, small_fs, monkeypatch):
    """Another process holds most of a 4 MiB filesystem at start, so the budget is capped; once it
    deletes its file the tier takes the room (map, then budget) at a later commit, without a
    restart. Before, the cap held until the next start."""
    monkeypatch.setattr(disk_tier, "REFIT_EVERY_S", 0.0, raising=False)
    _fill(small_fs, 2 << 20)
    cfg = kvc_config(tmp_path, disk_path=str(small_fs / "pages"), disk_size_GB=64 / 1024, cpu_memory_size_GB=0)
    with TieredStore(cfg) as s:
        capped, map0 = s.disk.capacity, s.disk.map_size
        assert capped < 1 << 20
        os.remove(small_fs / "filler")
        for j in range(40):  # ~2x what the filesystem holds: the tier evicts inside its new budget
            toks = list(range(j * 64, j * 64 + 64))
            hashes, pages = make_pages(BIG, toks, seed=j)
            s.put_pages(BIG, pages)
            s.flush()
        assert s.disk.map_size > map0 and 2 << 20 < s.disk.capacity < 4 << 20
        assert metric(s, "kvc_tier_capacity_bytes", tier="disk") == s.disk.capacity
        assert metric(s, "kvc_lmdb_map_size_bytes") == s.disk.map_size <= 4 << 20
        assert metric(s, "kvc_disk_errors_total", op="commit", kind="enospc") == 0
        assert not s.disk.degraded
        assert s.disk.used > capped  # holds more than the start's cap allowed
        got = s.get_pages(BIG, hashes)
        assert all(torch.equal(a.data, b.data) for a, b in zip(got, pages))


def test_map_grows_only_while_no_read_transaction_is_open(tmp_path, small_fs, monkeypatch):
    """LMDB's map may change only while no transaction of the process is open: the refit waits
    for the readers' transactions to end (and readers wait for it)."""
    import threading

    monkeypatch.setattr(disk_tier, "REFIT_EVERY_S", 0.0)
    _fill(small_fs, 2 << 20)
    cfg = kvc_config(tmp_path, disk_path=str(small_fs / "pages"), disk_size_GB=64 / 1024, cpu_memory_size_GB=0)
    with TieredStore(cfg) as s:
        map0 = s.disk.map_size
        os.remove(small_fs / "filler")
        with s.disk._lock:
            s.disk._txns += 1  # a reader inside a transaction
        grew = threading.Thread(target=s.disk._refit)
        grew.start()
        grew.join(0.3)
        assert grew.is_alive() and s.disk.map_size == map0
        with s.disk._lock:
            s.disk._txns -= 1
            s.disk._no_txns.notify_all()
        grew.join(10)
        assert not grew.is_alive() and s.disk.map_size > map0


def test_close_writes_back_a_cpu_tier_larger_than_the_disk_tier_keeping_the_newest(tmp_path, small_fs):
    """Write-back at close of a cpu tier that holds more than the disk tier (here capped to its
    4 MiB filesystem), after churn filled both: evictions run as the pages go down. Before, they
    ran after the last one: the file overran its map and the newest pages, written last, were
    the ones dropped."""
    cfg = kvc_config(tmp_path, disk_path=str(small_fs / "pages"), disk_size_GB=1,
                     cpu_memory_size_GB=3 / 1024)
    with TieredStore(cfg) as s:
        for j in range(100):  # 1,600 pages of 8 KiB: the disk tier full, the cpu tier too
            toks = list(range(j * 64, j * 64 + 64))
            hashes, pages = make_pages(BIG, toks, seed=j)
            s.put_pages(BIG, pages)
        assert s.lookup(BIG, tokens=toks).located == ["cpu"] * 16
    assert metric(s, "kvc_disk_errors_total", op="commit", kind="map_full") == 0
    with TieredStore(cfg) as s:
        assert s.lookup(BIG, tokens=toks).located == ["disk"] * 16
        got = s.get_pages(BIG, hashes)
        assert all(torch.equal(a.data, b.data) for a, b in zip(got, pages))


def test_failed_commit_still_removes_the_pages_batched_with_it(tmp_path, small_fs):
    """Removals queued in the same batch as puts that fail (a full disk) are committed on their
    own: the index has dropped those pages, so leaving them in the file leaked its space."""
    import threading

    from kvc.metrics import KvcMetrics
    tier = disk_tier.DiskTier(str(small_fs / "pages"), 2 << 20, KvcMetrics())
    try:
        hashes, pages = make_pages(BIG, list(range(40)))
        for h, p in zip(hashes, pages):
            tier.put(h, p.data.numpy().tobytes(), BIG.root, p.parent, b"")
        tier.flush()
        _fill(small_fs, 96 << 10)  # room for the removals' pages, not for 512 KiB of puts
        waiting, release = threading.Event(), threading.Event()

        def gate():
            waiting.set()
            release.wait()
        tier.write_gate = gate  # the writer waits inside a first small put's commit, while the
        tier.put(b"x" * 32, b"x" * 64, BIG.root, BIG.root, b"")  # removal and a large put queue
        assert waiting.wait(10)  # behind it: the writer takes those two as one batch
        gone = [h for h, _ in tier.remove(hashes[:5])]
        tier.put(b"n" * 32, os.urandom(512 << 10), BIG.root, BIG.root, b"")
        release.set()
        tier.flush()
        assert metric_of(tier, "kvc_disk_errors_total", op="commit", kind="enospc") >= 1
        assert tier.get(b"n" * 32) is None and len(gone) == 5
        with tier.env.begin() as txn:
            assert all(txn.get(h, db=tier._data) is None for h in gone)
            assert all(txn.get(h, db=tier._data) is not None for h in hashes[5:])
    finally:
        tier.write_gate = None
        tier.close()


def test_full_map_lowers_the_budget_and_writes_go_on(tmp_path):
    """LMDB's file at its map size while the pages are under budget (fragmentation under churn):
    MAP_FULL lowers the budget a tenth (once an episode, down to half), so evictions make room,
    and the removals of a failed batch are committed apart, so later pages are written (before:
    the budget stayed, and commit after commit failed)."""
    cfg = kvc_config(tmp_path, disk_size_GB=2 / 1024, cpu_memory_size_GB=0)
    with TieredStore(cfg) as s:
        budget = s.disk.capacity
        s.disk.env.set_mapsize(budget)  # a map no larger than the budget: the file fills it
        for j in range(200):
            toks = list(range(j * 64, j * 64 + 64))
            hashes, pages = make_pages(BIG, toks, seed=j)
            s.put_pages(BIG, pages)
            s.flush()
        fails = metric(s, "kvc_disk_errors_total", op="commit", kind="map_full")
        assert 1 <= fails <= 100  # of ~800 commits; the budget kept, they failed from the first on
        assert budget // 2 <= s.disk.capacity < budget
        assert metric(s, "kvc_tier_capacity_bytes", tier="disk") == s.disk.capacity
        assert s.lookup(BIG, tokens=toks).located == ["disk"] * 16
        got = s.get_pages(BIG, hashes)
        assert all(torch.equal(a.data, b.data) for a, b in zip(got, pages))


def test_lowered_budget_rises_back_once_map_full_stays_away(tmp_path, monkeypatch):
    """A budget MAP_FULL lowered rises back a twentieth of the start's a step, each step after
    RAISE_AFTER_S without MAP_FULL, up to the start's budget (before: it stayed lowered until the
    next start); a MAP_FULL soon after a raise doubles the wait."""
    monkeypatch.setattr(disk_tier, "RAISE_AFTER_S", 0.05)
    cfg = kvc_config(tmp_path, disk_size_GB=2 / 1024, cpu_memory_size_GB=0)
    with TieredStore(cfg) as s:
        budget = s.disk.capacity
        s.disk.env.set_mapsize(budget)  # a map no larger than the budget: the file fills it
        j = 0
        while s.disk.capacity == budget and j < 200:
            s.put_pages(BIG, make_pages(BIG, list(range(j * 64, j * 64 + 64)), seed=j)[1])
            s.flush()
            j += 1
        lowered = s.disk.capacity
        assert lowered < budget, "churn never filled the map"
        s.disk.env.set_mapsize(4 * s.disk.map_size)  # the writer idle (flushed): room in the file again
        fails = metric(s, "kvc_disk_errors_total", op="commit", kind="map_full")
        seen = {lowered}
        for k in range(j, j + 200):
            if s.disk.capacity == budget:
                break
            time.sleep(0.06)
            s.put_pages(BIG, make_pages(BIG, list(range(k * 64, k * 64 + 64)), seed=k)[1])
            s.flush()
            seen.add(s.disk.capacity)
        assert s.disk.capacity == budget and len(seen) >= 2, sorted(seen)
        assert all(b - a <= budget // 20 for a, b in zip(sorted(seen), sorted(seen)[1:]))  # in steps
        assert metric(s, "kvc_tier_capacity_bytes", tier="disk") == budget
        assert metric(s, "kvc_disk_errors_total", op="commit", kind="map_full") == fails  # no MAP_FULL on the way
        s.disk._raised_at = time.monotonic()  # a MAP_FULL right after a raise: the next raise waits twice as long
        s.disk._shrink()
        assert s.disk._raise_after == 0.1 and s.disk.capacity < budget


def metric_of(tier, name, **labels):
    v = tier.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def _disk_store(tmp_path, n_pages, **over):
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=0, **over)
    hashes, pages = make_pages(NS, list(range(n_pages * SPEC.page_size)))
    with TieredStore(cfg) as s:
        s.put_pages(NS, pages)
    return cfg, hashes, pages


def _get_all(cfg, hashes, out=None):
    with TieredStore(cfg) as s:
        got = s.get_pages(NS, hashes, out=out)
        return [p.data.clone() for p in got], metric(s, "kvc_checksum_failures_total", tier="disk"), s.disk.pages


def test_disk_pages_land_in_a_strided_out(tmp_path):
    """get_pages(out=...) where out's pages are contiguous but not adjacent (every other row of a
    larger tensor), disk pages after cpu ones: every page lands in out itself, the rows between untouched."""
    _, hashes, pages = _disk_store(tmp_path, 12)
    big = torch.full((24, *SPEC.shape), 7, dtype=pages[0].data.dtype)
    with TieredStore(kvc_config(tmp_path)) as s:  # the same disk, a cpu tier in front
        assert len(s.get_pages(NS, hashes[:3])) == 3  # promoted: a cpu run of 3, then 9 disk pages
        assert s.lookup(NS, tokens=list(range(12 * SPEC.page_size))).located == ["cpu"] * 3 + ["disk"] * 9
        got = s.get_pages(NS, hashes, out=big[::2])
    assert len(got) == 12
    for i, p in enumerate(pages):
        assert torch.equal(big[2 * i], p.data) and got[i].data.data_ptr() == big[2 * i].data_ptr(), i
    assert (big[1::2] == 7).all()


def test_out_with_gaps_inside_its_pages_is_refused(tmp_path):
    """A CPU out whose pages are not each contiguous (here a transposed view) would be read through
    byte views that are copies: refused with an error that says so, nothing read."""
    _, hashes, pages = _disk_store(tmp_path, 4)
    shape = SPEC.shape
    odd = torch.zeros((4, *shape[:-2], shape[-1], shape[-2]), dtype=pages[0].data.dtype).transpose(-1, -2)
    assert tuple(odd.shape[1:]) == shape and not odd[0].is_contiguous()
    with TieredStore(kvc_config(tmp_path)) as s:
        with pytest.raises(ValueError, match="pages must each be contiguous"):
            s.get_pages(NS, hashes, out=odd)
        with pytest.raises(ValueError, match="pages must each be contiguous"):
            s.get_into(NS, hashes, odd)
        assert (odd == 0).all()


@pytest.mark.parametrize("task_pages", [1, 3, 64])
def test_parallel_disk_read_equals_serial_read(tmp_path, monkeypatch, task_pages):
    cfg, hashes, pages = _disk_store(tmp_path, 40)
    monkeypatch.setattr(disk_tier, "PARALLEL_MIN_BYTES", 1 << 62)
    serial, _, _ = _get_all(cfg, hashes)
    monkeypatch.setattr(disk_tier, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(disk_tier, "READ_TASK_BYTES", task_pages * SPEC.page_bytes)
    out = torch.full((len(hashes), *SPEC.shape), float("nan"))
    parallel, fails, _ = _get_all(cfg, hashes, out=out)
    assert len(serial) == len(parallel) == 40 and fails == 0
    assert all(torch.equal(a, b) and torch.equal(a, p.data) for a, b, p in zip(serial, parallel, pages))


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("damage", ["payload", "other_page", "format_version"])
def test_bad_page_in_the_middle_of_a_read_task_ends_the_hit_there(tmp_path, monkeypatch, parallel, damage):
    cfg, hashes, pages = _disk_store(tmp_path, 30)
    env = lmdb.open(os.path.join(cfg.disk_path, "lmdb"), max_dbs=2)
    data = env.open_db(b"data")
    with env.begin(write=True, db=data) as txn:
        if damage == "payload":
            rec = bytearray(txn.get(NS.root + hashes[13]))
            rec[-5] ^= 0x40
        elif damage == "format_version":  # a record of a format this version does not read
            rec = bytearray(txn.get(NS.root + hashes[13]))
            rec[4:6] = (99).to_bytes(2, "little")
        else:  # a valid record, but of another page
            rec = txn.get(NS.root + hashes[20])
        txn.put(NS.root + hashes[13], bytes(rec))
    env.close()
    monkeypatch.setattr(disk_tier, "PARALLEL_MIN_BYTES", 0 if parallel else 1 << 62)
    monkeypatch.setattr(disk_tier, "READ_TASK_BYTES", 4 * SPEC.page_bytes)  # page 13 is mid-task (12-15)
    got, fails, left = _get_all(cfg, hashes)
    assert len(got) == 13 and all(torch.equal(a, p.data) for a, p in zip(got, pages))
    assert fails == 1 and left == 29  # counted and dropped; the pages after it stay
    with TieredStore(cfg) as s:
        assert s.lookup(NS, hashes=hashes).num_pages == 13


def test_cpu_and_disk_pages_interleaved_in_one_get(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_tier, "PARALLEL_MIN_BYTES", 0)
    cfg = kvc_config(tmp_path, disk_write="through")
    hashes, pages = make_pages(NS, list(range(16 * SPEC.page_size)))
    with TieredStore(cfg) as s:
        s.put_pages(NS, pages)
        s.flush()
        for i in (2, 3, 4, 9, 10, 15):  # these are then on disk only
            s.cpu.remove(NS.root + hashes[i])
        got = s.get_pages(NS, hashes)
        assert len(got) == 16 and all(torch.equal(a.data, p.data) for a, p in zip(got, pages))
        assert s.lookup(NS, hashes=hashes).located == ["cpu"] * 16  # disk hits were promoted


def _flip_last_byte(cfg, h: bytes) -> None:
    """Damage page h's stored record on disk (its payload's last byte), behind the tier's back."""
    env = lmdb.open(os.path.join(cfg.disk_path, "lmdb"), max_dbs=2)
    with env.begin(write=True, db=env.open_db(b"data")) as txn:
        rec = bytearray(txn.get(NS.root + h))
        rec[-1] ^= 0x01
        txn.put(NS.root + h, bytes(rec))
    env.close()


def test_disk_hits_up_to_a_bad_page_are_promoted_deepest_oldest(tmp_path, monkeypatch):
    cfg, hashes, pages = _disk_store(tmp_path, 30)
    _flip_last_byte(cfg, hashes[13])
    monkeypatch.setattr(disk_tier, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(disk_tier, "READ_TASK_BYTES", 4 * SPEC.page_bytes)
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=1 / 1024)) as s:
        got = s.get_pages(NS, hashes)
        assert len(got) == 13 and all(torch.equal(a.data, p.data) for a, p in zip(got, pages))
        assert list(s.cpu.entries) == [NS.root + h for h in hashes[:13][::-1]]  # promoted; the deepest page is evicted first
        assert all(s.cpu.verify_entries([s.cpu.get(NS.root + h) for h in hashes[:13]]))
        assert metric(s, "kvc_checksum_failures_total", tier="disk") == 1


def test_no_reader_task_writes_into_out_after_get_returns(tmp_path, monkeypatch):
    import threading
    import time
    cfg, hashes, pages = _disk_store(tmp_path, 30)
    _flip_last_byte(cfg, hashes[13])
    monkeypatch.setattr(disk_tier, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(disk_tier, "READ_TASK_BYTES", 8 * SPEC.page_bytes)  # tasks 0-7, 8-15, 16-23, 24-29
    real, entered = disk_tier._copy_verified, threading.Event()

    def slow(h, rec, dst, root):
        if h == NS.root + hashes[16]:  # a later task, already past its start when page 13 fails
            entered.set()
            time.sleep(0.3)
        elif h == NS.root + hashes[13]:
            entered.wait(5)
        return real(h, rec, dst, root)
    monkeypatch.setattr(disk_tier, "_copy_verified", slow)
    out = torch.full((30, *SPEC.shape), float("nan"))
    with TieredStore(cfg) as s:
        assert s.disk.reader_threads >= 4
        assert len(s.get_pages(NS, hashes, out=out)) == 13
        after = out.clone()
        time.sleep(0.5)
        assert torch.equal(out.view(torch.uint8), after.view(torch.uint8))



def test_write_gate_holds_commits_until_it_opens(tmp_path):
    """An engine's GPU-slack wait, handed in as the writer's gate, holds LMDB commits back; the
    pages commit once the gate opens (a new process then finds them on disk)."""
    import threading
    opened = threading.Event()
    calls = []

    def gate():
        calls.append(1)
        opened.wait(10)
    hs, pages = make_pages(NS, list(range(40)))
    with TieredStore(kvc_config(tmp_path, disk_write="through")) as s:
        s.set_write_gate(gate)
        s.put_pages(NS, pages)
        s.disk.flush(timeout=0.3)
        assert s.disk._committed == 0 and calls  # the writer waits in the gate
        assert all(torch.equal(a.data, b.data) for a, b in zip(s.get_pages(NS, hs), pages))
        opened.set()
        assert s.sync(timeout=10)
    with TieredStore(kvc_config(tmp_path)) as s:
        assert s.lookup(NS, tokens=list(range(40))).located == ["disk"] * 10


def test_disk_backlog_is_bounded_and_refusals_counted(tmp_path):
    """A writer held back by its gate does not let queued records grow without limit: past
    max_backlog_bytes the disk tier refuses pages (counted) and takes them again once written."""
    import threading
    from kvc.store import key
    opened = threading.Event()
    hs, pages = make_pages(NS, list(range(80)))
    with TieredStore(kvc_config(tmp_path, disk_write="through")) as s:
        s.set_write_gate(lambda: opened.wait(10))
        s.put_pages(NS, pages[:1])
        rec = s.disk.backlog_bytes  # one queued record
        assert rec > SPEC.page_bytes
        s.disk.max_backlog_bytes = 5 * rec + rec // 2  # room for five
        s.put_pages(NS, pages[1:10])
        assert metric(s, "kvc_store_pages_total", tier="disk", result="backlog_full") == 5
        assert s.disk.backlog_bytes == 5 * rec
        opened.set()
        s.disk.flush()
        assert s.disk.backlog_bytes == 0
        s.put_pages(NS, pages[10:14])
        s.disk.flush()
        assert metric(s, "kvc_store_pages_total", tier="disk", result="backlog_full") == 5
        assert sum(1 for h in hs[:14] if s.disk.get(key(NS.root, h)) is not None) == 9


def test_a_read_that_began_before_a_commit_still_finds_the_committed_pages(tmp_path):
    """A disk read serves queued pages from `pending` and the rest from one LMDB read transaction.
    The writer commits, then takes its pages out of `pending`: a read whose transaction began
    before that commit (at an earlier page) and that looks at `pending` after it must not call the
    pages missing (a get then stopped at the first of them; seen as a flaky namespace test under load).
    Here the commit is made to land exactly between the read transaction's start and the next
    page's `pending` check."""
    import threading
    import time
    ha, pa = make_pages(NS, list(range(12)))
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=0)) as s:
        disk = s.disk
        assert s.put_pages(NS, pa[:1]).stored == 1
        disk.flush()  # page 0 is in LMDB, not pending
        gate = threading.Event()
        disk.write_gate = gate.wait  # the writer holds pages 1-2 in `pending` until the gate opens
        assert s.put_pages(NS, pa[1:3]).stored == 2
        assert len(disk.pending) == 2

        class Env:  # the tier's LMDB environment; the first read transaction lets the writer commit
            def __init__(self, env):
                self._env, self.reads = env, 0

            def begin(self, *a, **k):
                txn = self._env.begin(*a, **k)
                if not k.get("write") and self.reads == 0:
                    self.reads += 1
                    gate.set()
                    t = time.monotonic()
                    while disk.pending and time.monotonic() - t < 10:
                        time.sleep(0.001)
                    assert not disk.pending, "the writer did not commit"
                return txn

            def __getattr__(self, name):
                return getattr(self._env, name)
        real, disk.env = disk.env, Env(disk.env)
        try:
            got = s.get_pages(NS, ha[:3])
        finally:
            disk.env = real
            disk.write_gate = None
        assert len(got) == 3 and all(torch.equal(a.data, b.data) for a, b in zip(got, pa))
