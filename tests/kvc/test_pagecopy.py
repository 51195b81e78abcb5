"""The put path's checksums and slab copies in one native call (kvc.pagecopy) against the per-page path."""
import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import xxhash

from kvc import pagecopy
from kvc.hashing import Namespace, PageSpec
from kvc.record import checksum
from kvc.store import TieredStore, key

from .conftest import NS, SPEC, kvc_config, make_pages

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the native path cannot build")
# odd sizes and xxh3's size classes: 0, 1-3, 4-8, 9-16, 17-128, 129-240, > 240 (stripes, blocks)
SIZES = [0, 1, 3, 5, 8, 9, 16, 17, 127, 128, 129, 240, 241, 1023, 1024, 4097, 65537, 393216 + 7]


@pytest.fixture(scope="module")
def native():
    lib = pagecopy.library()
    if lib is None:
        pytest.skip("the native put path does not build here")
    return lib


@needs_cc
def test_native_builds_where_a_compiler_is():
    assert isinstance(pagecopy.library(), pagecopy.NativeSumCopy)
    assert pagecopy.best() is pagecopy.library()


@needs_cc
def test_native_checksums_and_copies_equal_xxhash_and_the_bytes(native):
    g = torch.Generator().manual_seed(0)
    datas = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in SIZES]
    offsets = [None if i % 3 == 2 else o for i, o in enumerate(np.cumsum([0] + SIZES[:-1]) + 5)]
    total = sum(SIZES) + 10
    slabs = {name: np.full(total, 0xAB, dtype=np.uint8) for name in ("native", "python")}
    got = native(datas, offsets, slabs["native"])
    assert got == [xxhash.xxh3_64_intdigest(d.numpy()) for d in datas]
    assert got == pagecopy.sum_copy_python(datas, offsets, slabs["python"])
    assert np.array_equal(slabs["native"], slabs["python"])  # the same bytes copied, nothing else touched
    for d, off in zip(datas, offsets):
        if off is not None:
            assert np.array_equal(slabs["native"][off:off + d.numel()], d.numpy())
    assert (slabs["native"][:5] == 0xAB).all() and (slabs["native"][-5:] == 0xAB).all()


@needs_cc
def test_started_jobs_equal_the_call_and_run_off_the_calling_thread(native):
    """start / start_pointers: the same checksums and bytes as the blocking call, done() polled;
    every live job is tracked until seen done (wait_all)."""
    g = torch.Generator().manual_seed(1)
    datas = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in SIZES]
    offsets = list(np.cumsum([0] + SIZES[:-1]))
    slab = np.zeros(sum(SIZES), dtype=np.uint8)
    job = native.start(datas, offsets, slab)
    job.wait()
    assert job.result() == [xxhash.xxh3_64_intdigest(d.numpy()) for d in datas]
    assert np.array_equal(slab, np.concatenate([d.numpy() for d in datas]))
    out = np.zeros(sum(SIZES), dtype=np.uint8)
    work = pagecopy.CopyWork(native, [slab.ctypes.data], [out.ctypes.data], [slab.nbytes], keep=(slab, out))
    pending = work.start()
    assert pagecopy.wait_all(10) and pending.done() and pending.result() is None
    assert np.array_equal(out, slab)
    big = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=g)  # long enough to poll
    job = native.start([big], [None], None)
    polls = 0
    while not job.done():
        polls += 1
    assert job.result() == [xxhash.xxh3_64_intdigest(big.numpy())] and polls > 0


def test_drive_runs_work_in_order_and_throws_errors_back_in():
    seen = []

    class Work:
        def __init__(self, v):
            self.v = v

        def run(self):
            if self.v == "bad":
                raise OSError("bad work")
            return self.v * 2

    def steps():
        seen.append((yield Work(1)))
        seen.append((yield None))
        try:
            yield Work("bad")
        except OSError as e:
            seen.append(str(e))
        return "end"
    pauses = []
    assert pagecopy.drive(steps(), lambda: pauses.append(1)) == "end"
    assert seen == [2, None, "bad work"] and len(pauses) == 2

    def unhandled():
        yield Work("bad")
    with pytest.raises(OSError, match="bad work"):
        pagecopy.drive(unhandled())


@needs_cc
def test_native_refuses_a_slot_outside_the_slab_before_copying(native):
    """The bounds check guards a memcpy: it must hold under python -O too (no assert)."""
    slab = np.zeros(100, dtype=np.uint8)
    page = torch.ones(40, dtype=torch.uint8)
    for off in (61, -1):
        with pytest.raises(ValueError, match="outside the slab"):
            native([page], [off], slab)
    assert not slab.any()  # nothing was written


@needs_cc
def test_native_reads_non_contiguous_and_typed_pages_as_their_payload(native):
    x = torch.randn(4, 6, 10).to(torch.bfloat16)
    pages = [x.transpose(0, 2), x[1], x[:, 2:5]]  # a strided view, a contiguous row, a slice
    slab = np.zeros(sum(p.numel() * 2 for p in pages), dtype=np.uint8)
    offs = [0, pages[0].numel() * 2, (pages[0].numel() + pages[1].numel()) * 2]
    assert native(pages, offs, slab) == [checksum(p.contiguous().view(torch.uint8).numpy()) for p in pages]
    assert np.array_equal(slab, np.concatenate([p.contiguous().view(torch.uint8).reshape(-1).numpy() for p in pages]))


def _store(tmp_path, path: str, **over) -> TieredStore:
    sum_copy = pagecopy.library() if path == "native" else pagecopy.sum_copy_python
    if sum_copy is None:
        pytest.skip("the native put path does not build here")
    return TieredStore(kvc_config(tmp_path, **over), sum_copy=sum_copy)


def metric(store, name, **labels):
    v = store.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


@pytest.mark.parametrize("path", ["native", "python"])
def test_put_then_get_is_byte_identical_and_a_flipped_slab_byte_is_a_miss(tmp_path, path):
    spec = PageSpec(num_layers=3, num_kv_heads=2, head_dim=6, page_size=5, dtype="bfloat16")  # odd sizes
    ns = Namespace("test-arch", spec, weights_digest="w0")
    with _store(tmp_path, path, disk_path=None) as s:
        hashes, pages = make_pages(ns, list(range(45)))
        for i in range(0, len(pages), 4):  # calls of 4, as the engine's put thread makes
            assert s.put_pages(ns, pages[i:i + 4], chain_continues=i + 4 < len(pages)).stored == len(pages[i:i + 4])
        for h, p in zip(hashes, pages):  # the stored checksum is xxh3_64 of the page's payload
            assert s.cpu.get(key(ns.root, h)).checksum == xxhash.xxh3_64_intdigest(p.payload())
        got = s.get_pages(ns, hashes)
        assert len(got) == len(pages)
        for g, p in zip(got, pages):
            assert g.data.dtype == p.data.dtype and torch.equal(g.data.view(torch.uint8), p.data.view(torch.uint8))
        s.cpu.view(key(ns.root, hashes[4]))[spec.page_bytes - 1] ^= 0x01
        assert len(s.get_pages(ns, hashes)) == 4
        assert metric(s, "kvc_checksum_failures_total", tier="cpu") == 1
        assert s.lookup(ns, hashes=hashes).num_pages == 4


@pytest.mark.parametrize("path", ["native", "python"])
def test_write_through_records_carry_the_same_checksum(tmp_path, path):
    with _store(tmp_path, path, disk_write="through") as s:
        hashes, pages = make_pages(NS, list(range(24)))
        assert s.put_pages(NS, pages).stored == len(pages)
        s.flush()
        s.cpu.view(key(NS.root, hashes[0]))[0] ^= 0xFF  # a bad cpu copy is a miss and is dropped,
        assert s.get_pages(NS, hashes) == []
        got = s.get_pages(NS, hashes)  # then the disk record serves (its checksum verified on read)
        assert len(got) == len(pages) and all(torch.equal(g.data, p.data) for g, p in zip(got, pages))


def test_the_copy_runs_outside_the_lock_and_entries_are_published_after_their_bytes(tmp_path):
    """The copy runs with every slot reserved, no entry published and the store lock free (a load
    never waits for a put to get the GIL back): neither a lookup nor the tier's index sees the
    pages of the call until their bytes are in place."""
    seen = []

    def spy(datas, offsets, slab):
        free = threading.Thread(target=lambda: seen.append(s._lock.acquire(blocking=False) and s._lock.release() is None))
        free.start()
        free.join()
        seen.append((s.lookup(NS, hashes=hashes).num_pages, sum(key(NS.root, h) in s.cpu.entries for h in hashes),
                     s.cpu.used))
        return (pagecopy.library() or pagecopy.sum_copy_python)(datas, offsets, slab)

    with TieredStore(kvc_config(tmp_path, disk_path=None), sum_copy=spy) as s:
        hashes, pages = make_pages(NS, list(range(16)))
        assert s.put_pages(NS, pages).stored == 4
        assert seen == [True, (0, 0, 4 * SPEC.page_bytes)]  # lock free; reserved (counted as used), not visible
        assert s.lookup(NS, hashes=hashes).num_pages == 4
        assert [torch.equal(g.data, p.data) for g, p in zip(s.get_pages(NS, hashes), pages)] == [True] * 4


def test_pages_stored_by_another_put_during_the_copy_are_duplicates(tmp_path):
    """Two puts of the same pages side by side (the cache service's handlers): the one that
    publishes second counts duplicates and gives its reserved slots back."""
    inner = []

    def racing(datas, offsets, slab):
        if not inner:  # the first call's copy: another put of the same pages runs to its end meanwhile
            inner.append(None)
            inner.append(s.put_pages(NS, pages))
        return pagecopy.sum_copy_python(datas, offsets, slab)

    with TieredStore(kvc_config(tmp_path, disk_path=None), sum_copy=racing) as s:
        hashes, pages = make_pages(NS, list(range(16)))
        res = s.put_pages(NS, pages)
        assert inner[1].stored == 4 and (res.stored, res.duplicate, res.rejected) == (0, 4, 0)
        assert s.cpu.pages == 4 and s.cpu.used == 4 * SPEC.page_bytes
        assert [torch.equal(g.data, p.data) for g, p in zip(s.get_pages(NS, hashes), pages)] == [True] * 4


@pytest.mark.parametrize("path", ["native", "python"])
def test_a_page_whose_parent_of_the_call_landed_nowhere_is_rejected(tmp_path, path):
    """As the per-page put did: with no room (every slot pinned, no disk) the call's first page is
    refused, and its child hangs from nothing this namespace holds."""
    page = SPEC.page_bytes
    with _store(tmp_path, path, cpu_memory_size_GB=4 * page / (1 << 30), disk_path=None,
                pin_budget_fraction=1.0) as s:
        ha, pa = make_pages(NS, list(range(16)))
        s.put_pages(NS, pa)
        s.pin(NS, ha)
        hb, pb = make_pages(NS, list(range(100, 108)))
        res = s.put_pages(NS, pb)
        assert (res.stored, res.rejected) == (0, 2)
        assert res.reasons == (f"no room for page {hb[0].hex()}",
                               f"parent of page {hb[1].hex()} is not a page of this namespace")
        assert s.cpu.used == 4 * page and s.cpu.pages == 4  # the refused reservations were given back


@pytest.mark.parametrize("path", ["native", "python"])
def test_a_page_twice_in_one_call_is_stored_once(tmp_path, path):
    with _store(tmp_path, path, disk_path=None) as s:
        hashes, pages = make_pages(NS, list(range(8)))
        res = s.put_pages(NS, [pages[0], pages[0], pages[1]])
        assert (res.stored, res.duplicate, res.rejected) == (2, 1, 0)
        assert s.cpu.used == 2 * SPEC.page_bytes and len(s.get_pages(NS, hashes)) == 2


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_a_failed_build_falls_back_to_the_per_page_path_with_one_log_line(tmp_path, monkeypatch, caplog, cc):
    monkeypatch.setenv("KVC_NATIVE_CC", cc)
    monkeypatch.setenv("KVC_NATIVE_DIR", str(tmp_path / "native"))
    monkeypatch.setattr(pagecopy, "_libs", {})
    with caplog.at_level(logging.WARNING, logger="kvc.pagecopy"):
        assert pagecopy.library() is None and pagecopy.best() is pagecopy.sum_copy_python
        with TieredStore(kvc_config(tmp_path, disk_path=None)) as s:
            hashes, pages = make_pages(NS, list(range(12)))
            assert s.put_pages(NS, pages).stored == 3
            assert all(torch.equal(g.data, p.data) for g, p in zip(s.get_pages(NS, hashes), pages))
    lines = [r.getMessage() for r in caplog.records if "native put path unavailable" in r.getMessage()]
    assert len(lines) == 1 and "page by page" in lines[0], caplog.text
    assert not (tmp_path / "native").exists() or list((tmp_path / "native").iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("path", ["native", "per-page"])
@pytest.mark.parametrize("readers", [0, 3])
def test_batch_reads_and_verifies_equal_the_pages_and_stop_at_a_flipped_byte(tmp_path, monkeypatch, path, readers):
    """The cpu tier's batch read (get_pages on the CPU) and in-place verify (the CUDA get) run one
    native call per reader thread; the per-page path is what runs without a compiler. Both give
    the stored bytes, and a flipped byte in page 9 of 20 ends the run there."""
    if path == "native" and pagecopy.library() is None:
        pytest.skip("the native put path does not build here")
    if path == "per-page":
        monkeypatch.setattr(pagecopy, "library", lambda cc=None: None)
    with TieredStore(kvc_config(tmp_path, disk_path=None)) as s:
        if s.cpu._readers is not None:
            s.cpu._readers.shutdown()
        s.cpu._readers = ThreadPoolExecutor(readers) if readers else None  # 3: parts of 7, 7 and 6 pages
        hashes, pages = make_pages(NS, list(range(4 * 20)))
        assert s.put_pages(NS, pages).stored == 20
        entries = [s.cpu.get(key(NS.root, h)) for h in hashes]
        assert s.cpu.verify_entries(entries) == [True] * 20
        got = s.get_pages(NS, hashes)
        assert len(got) == 20 and all(torch.equal(g.data, p.data) for g, p in zip(got, pages))
        s.cpu.view(key(NS.root, hashes[9]))[3] ^= 0x5A
        assert s.cpu.verify_entries(entries) == [True] * 9 + [False] + [True] * 10
        got = s.get_pages(NS, hashes)
        assert len(got) == 9 and all(torch.equal(g.data, p.data) for g, p in zip(got, pages))


@needs_cc
def test_native_plain_copies_equal_the_bytes(native):
    g = torch.Generator().manual_seed(1)
    srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in SIZES]
    dsts = [torch.zeros(n, dtype=torch.uint8) for n in SIZES]
    native.copy([t.data_ptr() for t in srcs], [t.data_ptr() for t in dsts], [t.numel() for t in srcs])
    assert all(torch.equal(a, b) for a, b in zip(srcs, dsts))
