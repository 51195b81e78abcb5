"""get_pages into a CUDA buffer (slab -> device, verified on the device or on threads). Skipped without CUDA."""
import pytest
import torch

from kvc import store as store_mod
from kvc.store import TieredStore

from .conftest import NS, kvc_config, make_pages

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("on_device", [True, False])
def test_get_into_cuda_equals_pages_and_stops_at_a_corrupt_one(tmp_path, on_device):
    """Verified on the device after the copy (kvc.gpu_checksum) or on the host threads: either way a
    page whose slab bytes changed ends the hit there and leaves the tier."""
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=4 / 1024)) as s:
        s.verify_on_device = on_device
        hashes, pages = make_pages(NS, list(range(64)))
        s.put_pages(NS, pages)
        out = torch.zeros((16, *NS.spec.shape), device="cuda")
        got = s.get_pages(NS, hashes, out=out)
        assert len(got) == 16 and got[3].data.device.type == "cuda"
        assert all(torch.equal(out[i].cpu(), pages[i].data) for i in range(16))
        s.cpu.view(NS.root + hashes[9])[5] ^= 0x40
        out.zero_()
        got = s.get_pages(NS, hashes, out=out)
        assert len(got) == 9 and torch.equal(out[8].cpu(), pages[8].data)
        assert s.lookup(NS, hashes=hashes).num_pages == 9


def test_get_into_cuda_from_disk_alone(tmp_path):
    """A store without a cpu tier (cpu_memory_size_GB: 0) serves a CUDA get from disk (it raised
    AttributeError on the H200: the empty cpu tier had no checksum method)."""
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=0)) as s:
        hashes, pages = make_pages(NS, list(range(64)))
        s.put_pages(NS, pages)
        s.flush()
        out = torch.zeros((16, *NS.spec.shape), device="cuda")
        got = s.get_pages(NS, hashes, out=out)
        assert len(got) == 16 and all(torch.equal(out[i].cpu(), pages[i].data) for i in range(16))


def test_device_checksums_equal_xxhash_at_real_page_sizes():
    """The kernel at a 12-layer Qwen3-30B-A3B page (384 KiB), a DeepSeek-like odd size, and strided
    rows, against the xxhash package; a flipped bit changes exactly its page's sum."""
    import numpy as np
    import xxhash

    from kvc import gpu_checksum
    g = torch.Generator().manual_seed(0)
    for nbytes in (393216, 12 * 576 * 2 * 16 + 8, 1096):
        rows = torch.randint(0, 256, (5, nbytes), dtype=torch.uint8, generator=g)
        want = [xxhash.xxh3_64_intdigest(r.numpy().tobytes()) for r in rows]
        dev = rows.cuda()
        assert gpu_checksum.supported(dev)
        got = gpu_checksum.xxh3_64_rows(dev).cpu().numpy().view(np.uint64).tolist()
        assert got == want, nbytes
        dev[3, nbytes // 2] ^= 1
        again = gpu_checksum.xxh3_64_rows(dev).cpu().numpy().view(np.uint64).tolist()
        assert [a != b for a, b in zip(again, want)] == [False, False, False, True, False]
    wide = torch.randint(0, 256, (4, 4096), dtype=torch.uint8, generator=g)
    half = wide.cuda()[:, :2048]
    got = gpu_checksum.xxh3_64_rows(half).cpu().numpy().view(np.uint64).tolist()
    assert got == [xxhash.xxh3_64_intdigest(r[:2048].numpy().tobytes()) for r in wide]
    assert gpu_checksum.warm(393216, torch.device("cuda"))
    assert gpu_checksum.warm(393216, torch.device("cuda"), segments=12)  # a layered get's launches too
    assert gpu_checksum.warm(393216, torch.device("cuda"), segments=12, parts=2)  # ... into pool blocks


@pytest.mark.parametrize("on_device", [True, False])
def test_get_into_cuda_lands_parts_on_their_stream(tmp_path, on_device):
    """get_into a CUDA buffer: landed(lo, hi) covers the rows in order, and a copy queued in the
    callback on its current stream (the engine's scatter) sees the landed bytes; a corrupt page
    ends the count there while later rows may still have been handed to landed."""
    from kvc import store as store_mod
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=64 / 1024)) as s:
        s.verify_on_device = on_device
        hashes, pages = make_pages(NS, list(range(4 * 300)))  # 300 pages: several parts
        s.put_pages(NS, pages)
        n = len(hashes)
        out = torch.zeros((n, *NS.spec.shape), device="cuda")
        dst = torch.zeros_like(out)
        parts = []

        def landed(lo, hi):
            parts.append((lo, hi))
            dst[lo:hi].copy_(out[lo:hi], non_blocking=True)  # on the stream the rows land on
        assert s.get_into(NS, hashes, out, landed) == n
        torch.cuda.synchronize()
        assert parts[0][0] == 0 and parts[-1][1] == n and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        if on_device:
            assert len(parts) == min(store_mod.VERIFY_PARTS, -(-n // store_mod.MIN_VERIFY_PART))
        assert all(torch.equal(dst[i].cpu(), pages[i].data) for i in range(n))
        s.cpu.view(NS.root + hashes[250])[1] ^= 0x02
        assert s.get_into(NS, hashes, out.zero_(), landed) == 250
        assert s.lookup(NS, hashes=hashes).num_pages == 250


def test_a_failing_checksum_kernel_falls_back_to_the_host_and_a_failing_callback_does_not(tmp_path, monkeypatch):
    """The kernel's own failure turns device verifying off (logged once) and the get still verifies
    on the host threads; a caller's landed callback that raises propagates and changes nothing."""
    from kvc import gpu_checksum
    monkeypatch.setattr(gpu_checksum, "_broken", None)
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=4 / 1024)) as s:
        hashes, pages = make_pages(NS, list(range(64)))
        s.put_pages(NS, pages)
        out = torch.zeros((16, *NS.spec.shape), device="cuda")

        def boom(lo, hi):
            raise KeyError("callback")
        with pytest.raises(KeyError, match="callback"):
            s.get_into(NS, hashes, out, boom)
        assert gpu_checksum._broken is None
        real = gpu_checksum.xxh3_64_rows

        def broken_kernel(*a, **k):
            raise RuntimeError("no kernel here")
        monkeypatch.setattr(gpu_checksum, "xxh3_64_rows", broken_kernel)
        s.cpu.view(NS.root + hashes[5])[2] ^= 0x08
        assert s.get_into(NS, hashes, out.zero_()) == 5  # verified on the host: stops at the bad page
        assert "no kernel here" in gpu_checksum._broken
        assert all(torch.equal(out[i].cpu(), pages[i].data) for i in range(5))
        monkeypatch.setattr(gpu_checksum, "xxh3_64_rows", real)


def test_copy2d_moves_a_strided_host_region_to_the_device():
    """kvc.cudacopy: rows of `width` bytes, src_pitch apart in pinned memory, land dst_pitch apart on
    the device, on the given stream; bytes outside the rows are untouched; a width wider than a
    pitch is refused before the driver sees it."""
    from kvc import cudacopy
    assert cudacopy.available()
    g = torch.Generator().manual_seed(1)
    src = torch.randint(0, 256, (6, 100), dtype=torch.uint8, generator=g).pin_memory()
    dst = torch.zeros((5, 40), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # after the zero fills (run DM: a copy ran before one)
    cudacopy.copy2d(dst.data_ptr(), 40, src.data_ptr() + 100 + 20, 100, 32, 5, stream)
    stream.synchronize()
    assert torch.equal(dst[:, :32].cpu(), src[1:6, 20:52]) and not dst[:, 32:].any()
    with pytest.raises(ValueError, match="pitch"):
        cudacopy.copy2d(dst.data_ptr(), 40, src.data_ptr(), 100, 41, 5, stream)
    many = torch.zeros((5, 40), dtype=torch.uint8, device="cuda")  # copy2d_many: several regions, in order
    stream.wait_stream(torch.cuda.current_stream())
    cudacopy.copy2d_many([(many.data_ptr(), 40, src.data_ptr() + 100 + 20, 100, 32, 2),
                          (many.data_ptr() + 80, 40, src.data_ptr() + 300 + 20, 100, 32, 3)], stream)
    stream.synchronize()
    assert torch.equal(many.cpu(), dst.cpu())
    with pytest.raises(ValueError, match="pitch"):
        cudacopy.copy2d_many([(many.data_ptr(), 40, src.data_ptr(), 100, 41, 5)], stream)


@pytest.mark.parametrize("copy,parts", [("kernel", True), ("dma", True), ("dma", False)])
@pytest.mark.parametrize("on_device", [True, False])
def test_get_layers_into_lands_layer_by_layer_and_stops_at_a_corrupt_page(tmp_path, monkeypatch, on_device, copy,
                                                                         parts):
    """The layer-by-layer get (an engine's cpu-tier load on CUDA): out [L, n, ...] holds every
    page's layers (slab runs that are not adjacent included), layer_landed(layer, run) comes once
    per layer in order with a stream where that layer's bytes are visible, and a corrupt page ends
    the count there (verified on the device over the layer-major rows, in two parts or after the
    last layer, or on the host threads; the corrupt byte in a layer of the first part). Both ways
    of moving a layer: the GPU kernel reading the pinned slab, and strided DMA."""
    from kvc.hashing import Namespace, PageSpec
    spec = PageSpec(num_layers=3, num_kv_heads=4, head_dim=32, page_size=4, dtype="float32")  # 4 KiB a layer
    ns = Namespace("test-arch", spec, weights_digest="w0")
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=16 / 1024)) as s:
        s.verify_on_device = on_device
        s.layer_copy = copy
        s.checksum_parts = parts
        monkeypatch.setattr(store_mod, "CHECKSUM_PARTS_MIN_BYTES", 0)  # these test pages are small
        hashes, pages = make_pages(ns, list(range(4 * 40)))
        s.put_pages(ns, pages[:20])
        _, other = make_pages(ns, list(range(1000, 1000 + 4 * 5)), seed=1)
        s.put_pages(ns, other)  # the next pages' slab slots are not adjacent to page 19's
        s.put_pages(ns, pages[20:])
        n = len(hashes)
        out = torch.zeros((3, n, *spec.shape[1:]), device="cuda")
        dst = torch.zeros_like(out)
        seen = []

        def landed(layer, run):
            seen.append((layer, run))
            dst[layer, :run].copy_(out[layer, :run], non_blocking=True)  # queued where the layer landed
        assert s.get_layers_into(ns, hashes, out, landed) == n
        torch.cuda.synchronize()
        assert seen == [(layer, n) for layer in range(3)]
        assert torch.equal(dst.cpu(), torch.stack([p.data for p in pages]).transpose(0, 1))
        s.cpu.view(ns.root + hashes[17])[9] ^= 0x10
        assert s.get_layers_into(ns, hashes, out.zero_(), landed) == 17
        assert s.lookup(ns, hashes=hashes).num_pages == 17
        seen.clear()
        assert s.get_layers_into(ns, hashes, out.zero_(), landed) == 17  # the run ends at the dropped page
        assert seen == [(layer, 17) for layer in range(3)]
        s.cpu.view(ns.root + hashes[12])[3 * 4096 - 5] ^= 0x01  # the last layer (the second part)
        assert s.get_layers_into(ns, hashes, out.zero_(), landed) == 12
        with pytest.raises(ValueError, match="contiguous CUDA"):
            s.get_layers_into(ns, hashes, torch.zeros((n, 3, *spec.shape[1:]), device="cuda"), landed)
        assert s.layer_copy_off is None  # the kernel launched on the mapped slab (not a silent DMA)


@pytest.mark.parametrize("parts", [True, False])
def test_a_layered_get_in_groups_of_layers_equals_one_by_layer(tmp_path, monkeypatch, parts):
    """layer_group=2 over 5 layers: one callback a group, for its last layer (1, 3, 4), each after
    every layer up to it landed; the bytes, the count and a corrupt page's end of the run as by
    layer; with the checksums in two parts the first covers the groups before the last."""
    from kvc.hashing import Namespace, PageSpec
    spec = PageSpec(num_layers=5, num_kv_heads=4, head_dim=32, page_size=4, dtype="float32")  # 4 KiB a layer
    ns = Namespace("test-arch", spec, weights_digest="w0")
    monkeypatch.setattr(store_mod, "CHECKSUM_PARTS_MIN_BYTES", 0)
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=16 / 1024)) as s:
        s.checksum_parts = parts
        hashes, pages = make_pages(ns, list(range(4 * 30)))
        s.put_pages(ns, pages)
        n = len(hashes)
        want = torch.stack([p.data for p in pages]).transpose(0, 1)
        out = torch.zeros((5, n, *spec.shape[1:]), device="cuda")
        dst = torch.zeros_like(out)
        seen, copied = [], [0]

        def landed(layer, run):
            seen.append((layer, run))
            dst[copied[0]:layer + 1, :run].copy_(out[copied[0]:layer + 1, :run], non_blocking=True)
            copied[0] = layer + 1
        assert s.get_layers_into(ns, hashes, out, landed, layer_group=2) == n
        torch.cuda.synchronize()
        assert seen == [(1, n), (3, n), (4, n)] and torch.equal(dst.cpu(), want)
        s.cpu.view(ns.root + hashes[9])[2 * 4096 + 7] ^= 0x04  # layer 2: a group in the first part
        assert s.get_layers_into(ns, hashes, out.zero_(), lambda layer, run: None, layer_group=2) == 9
        seen.clear()
        copied[0] = 0
        assert s.get_layers_into(ns, hashes, out.zero_(), landed, layer_group=9) == 9  # one group
        torch.cuda.synchronize()
        assert seen == [(4, 9)] and torch.equal(dst[:, :9].cpu(), want[:, :9])


def test_gather_rows_reads_pinned_host_memory_in_place():
    """kvc.hostcopy on CUDA: rows scattered over a pinned host buffer land in order on the device,
    from the offsets (plus the shared `add`), widths that are not a multiple of a tile included,
    with fewer programs than tiles; from a device source too."""
    from kvc import hostcopy
    g = torch.Generator().manual_seed(2)
    src = torch.randint(-2**62, 2**62, (50_000,), dtype=torch.int64, generator=g).pin_memory()
    for width, n, ctas in ((1000, 37, 8), (4096, 300, 96), (3, 5, 1)):
        offs = torch.randint(0, 50_000 - width - 16, (n,), generator=g)
        dst = torch.zeros((n, width), dtype=torch.int64, device="cuda")
        hostcopy.gather_rows(dst, src, offs.cuda(), 16, ctas=ctas)
        want = torch.stack([src[o + 16:o + 16 + width] for o in offs.tolist()])
        assert torch.equal(dst.cpu(), want), (width, n, ctas)
        dst.zero_()
        hostcopy.gather_rows(dst, src.cuda(), offs.cuda(), 16)
        assert torch.equal(dst.cpu(), want)


def test_a_layer_copy_kernel_that_fails_falls_back_to_dma(tmp_path, monkeypatch):
    """A kernel that cannot launch here (a driver that does not map the slab) turns the kernel off,
    says why, and the get still lands every layer by DMA."""
    from kvc import hostcopy
    from kvc.hashing import Namespace, PageSpec
    spec = PageSpec(num_layers=2, num_kv_heads=2, head_dim=32, page_size=4, dtype="float32")
    ns = Namespace("test-arch", spec, weights_digest="w0")

    def broken(*a, **k):
        raise ValueError("Pointer argument cannot be accessed from Triton (cpu tensor?)")
    monkeypatch.setattr(hostcopy, "gather_rows", broken)
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=16 / 1024)) as s:
        s.layer_copy = "kernel"
        hashes, pages = make_pages(ns, list(range(4 * 9)))
        s.put_pages(ns, pages)
        out = torch.zeros((2, 9, *spec.shape[1:]), device="cuda")
        assert s.get_layers_into(ns, hashes, out, lambda layer, run: None) == 9
        torch.cuda.synchronize()
        assert "cannot be accessed" in s.layer_copy_off
        assert torch.equal(out.cpu(), torch.stack([p.data for p in pages]).transpose(0, 1))


def test_a_started_layered_get_keeps_its_pages_until_another_thread_finishes_it(tmp_path):
    """start_layers_into queues everything and returns (an engine's thread); finish_layers, on
    another thread, gives the count. In between, puts that need room evict other pages, not the
    ones whose slab slots the copies still read; after it they are evictable again."""
    import threading
    from kvc.hashing import Namespace, PageSpec
    spec = PageSpec(num_layers=3, num_kv_heads=4, head_dim=32, page_size=4, dtype="float32")  # 12 KiB a page
    ns = Namespace("test-arch", spec, weights_digest="w0")
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=16 / 1024)) as s:
        hashes, pages = make_pages(ns, list(range(4 * 40)))
        s.put_pages(ns, pages)
        out = torch.zeros((3, 40, *spec.shape[1:]), device="cuda")
        got = s.start_layers_into(ns, hashes, out, lambda layer, run: None)
        assert got is not None and got.run == 40
        for k in range(4):  # 2,000 more pages (24 MiB) through a 16 MiB cpu tier
            _, more = make_pages(ns, list(range(10_000 + k * 2000, 10_000 + (k + 1) * 2000)), seed=k + 2)
            s.put_pages(ns, more)
        assert all(s.cpu.get(ns.root + h) is not None for h in hashes)
        result = []
        t = threading.Thread(target=lambda: result.append(s.finish_layers(got)))
        t.start()
        t.join(30)
        assert result == [40]
        assert torch.equal(out.cpu(), torch.stack([p.data for p in pages]).transpose(0, 1))
        assert not s._reading
        for k in range(4):
            _, more = make_pages(ns, list(range(30_000 + k * 2000, 30_000 + (k + 1) * 2000)), seed=k + 9)
            s.put_pages(ns, more)
        assert any(s.cpu.get(ns.root + h) is None for h in hashes)  # evictable again


def test_start_layers_into_does_not_wait_for_a_held_store(tmp_path):
    """block=False (the engine's thread): None while another thread holds the store's lock."""
    import threading
    from kvc.hashing import Namespace, PageSpec
    spec = PageSpec(num_layers=2, num_kv_heads=2, head_dim=32, page_size=4, dtype="float32")
    ns = Namespace("test-arch", spec, weights_digest="w0")
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=16 / 1024)) as s:
        hashes, pages = make_pages(ns, list(range(4 * 5)))
        s.put_pages(ns, pages)
        out = torch.zeros((2, 5, *spec.shape[1:]), device="cuda")
        held, release = threading.Event(), threading.Event()

        def hold():
            with s._lock:
                held.set()
                release.wait(30)
        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        assert held.wait(10)
        assert s.start_layers_into(ns, hashes, out, lambda layer, run: None, block=False) is None
        release.set()
        holder.join(10)
        assert s.finish_layers(s.start_layers_into(ns, hashes, out, lambda layer, run: None, block=False)) == 5
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), torch.stack([p.data for p in pages]).transpose(0, 1))


@pytest.mark.parametrize("on_device,parts,group", [(True, True, 1), (True, False, 2), (False, True, 1), (True, True, 9)])
def test_a_layered_get_straight_into_pool_blocks_equals_the_pages(tmp_path, monkeypatch, on_device, parts, group):
    """blocks=: every page's layers land in its own block of a device pool [L, 2, blocks, ...]
    (blocks in runs that break where the slab's slots or the ids do), other blocks untouched; the
    callbacks as with a staging buffer; a corrupt page (a V part of the first checksum part, or of
    the last) ends the count there; a bad pool or block list is refused before anything is queued."""
    from kvc.hashing import Namespace, PageSpec
    spec = PageSpec(num_layers=5, num_kv_heads=4, head_dim=32, page_size=4, dtype="float32")  # 2 KiB a part
    ns = Namespace("test-arch", spec, weights_digest="w0")
    monkeypatch.setattr(store_mod, "CHECKSUM_PARTS_MIN_BYTES", 0)
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=16 / 1024)) as s:
        s.verify_on_device = on_device
        s.checksum_parts = parts
        hashes, pages = make_pages(ns, list(range(4 * 30)))
        s.put_pages(ns, pages[:12])
        _, other = make_pages(ns, list(range(1000, 1000 + 4 * 3)), seed=1)
        s.put_pages(ns, other)  # page 12's slot is not adjacent to page 11's
        s.put_pages(ns, pages[12:])
        n = len(hashes)
        blocks = list(range(40, 60)) + [3, 4, 5, 90, 91, 92, 93, 7, 8, 9]
        pool = torch.full((5, 2, 100, 4, 4, 32), -1.0, device="cuda")
        seen = []
        assert s.get_layers_into(ns, hashes, pool, lambda layer, run: seen.append((layer, run)),
                                 layer_group=group, blocks=blocks) == n
        torch.cuda.synchronize()
        want = [(min(4, lo + group - 1), n) for lo in range(0, 5, group)]
        assert seen == want
        for p, b in zip(pages, blocks):
            assert torch.equal(pool[:, :, b].cpu(), p.data), b
        rest = [b for b in range(100) if b not in blocks]
        assert bool((pool[:, :, rest] == -1).all())
        s.cpu.view(ns.root + hashes[21])[2 * 4096 + 2048 + 7] ^= 0x04  # layer 2's V part
        assert s.get_layers_into(ns, hashes, pool, lambda layer, run: None, layer_group=group, blocks=blocks) == 21
        s.cpu.view(ns.root + hashes[14])[5 * 4096 - 3] ^= 0x01  # the last layer's V part
        assert s.get_layers_into(ns, hashes, pool, lambda layer, run: None, layer_group=group, blocks=blocks) == 14
        with pytest.raises(ValueError, match="distinct"):
            s.get_layers_into(ns, hashes, pool, lambda layer, run: None, blocks=blocks[:-1] + [100])
        with pytest.raises(ValueError, match="distinct"):
            s.get_layers_into(ns, hashes, pool, lambda layer, run: None, blocks=blocks[:-1] + [3])
        with pytest.raises(ValueError, match="pool"):
            s.get_layers_into(ns, hashes, pool.transpose(0, 1), lambda layer, run: None, blocks=blocks)


def test_a_large_get_into_pool_blocks_hashes_its_first_part_with_the_right_blocks(tmp_path, monkeypatch):
    """A get into pool blocks large enough that its first checksum part runs while the last layers
    still copy (256 MiB here): that part reads the pages' blocks through an index that must have
    landed before it. Run DR's bench uploaded the index after the copies, and a first part that
    read the memory before it (here filled with a wrong block id) failed every page."""
    from kvc.hashing import Namespace, PageSpec
    spec = PageSpec(num_layers=5, num_kv_heads=8, head_dim=128, page_size=16, dtype="float32")  # 64 KiB a part
    ns = Namespace("test-arch", spec, weights_digest="w0")
    monkeypatch.setattr(store_mod, "CHECKSUM_PARTS_MIN_BYTES", 0)
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=0.3)) as s:
        hashes, pages = make_pages(ns, list(range(16 * 400)))
        s.put_pages(ns, pages)
        n = len(hashes)
        blocks = list(range(100, 100 + n))
        pool = torch.zeros((5, 2, 600, 16, 8, 128), device="cuda")
        for _ in range(3):
            junk = torch.full((n,), 599, dtype=torch.int64, device="cuda")  # the index's memory, reused
            del junk
            assert s.get_layers_into(ns, hashes, pool, lambda layer, run: None, blocks=blocks) == n
        torch.cuda.synchronize()
        assert all(torch.equal(pool[:, :, b].cpu(), p.data) for b, p in zip(blocks[::37], pages[::37]))
