"""kvc.pinned: uploads through per-thread page-locked rings equal their sources, reuse their
buffers after warm-up, and never overwrite a slot whose copy has not run yet."""
from __future__ import annotations

import threading

import pytest
import torch

from kvc.pinned import PinnedUploader

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_upload_to_the_cpu_is_the_source_itself():
    up = PinnedUploader()
    src = torch.arange(10)
    out = up.upload(src, "cpu")
    assert torch.equal(out, src) and up.allocations == 0


@pytest.mark.gpu
@cuda
def test_uploads_equal_their_sources_and_reuse_their_buffers():
    up = PinnedUploader(slots=4)
    for n in (5, 1000, 0, 3):
        src = torch.arange(n, dtype=torch.long)
        assert torch.equal(up.upload(src, "cuda").cpu(), src)
    for _ in range(4):  # every slot holds 777 int32 once
        up.upload(torch.zeros(777, dtype=torch.int32), "cuda")
    warm = up.allocations
    for i in range(50):  # no page-locked allocation after warm-up
        src = torch.full((777,), i, dtype=torch.int32)
        assert torch.equal(up.upload(src, "cuda").cpu(), src)
    assert up.allocations == warm <= 4
    big = torch.arange(1 << 16, dtype=torch.long)  # 512 KiB: the slot grows
    assert torch.equal(up.upload(big, "cuda").cpu(), big) and up.allocations == warm + 1


@pytest.mark.gpu
@cuda
def test_a_slot_is_not_overwritten_before_its_copy_ran():
    """Uploads queued behind a long kernel: more uploads than slots, each slot's source changed
    only after its earlier copy ran (else an earlier result would hold a later value)."""
    up = PinnedUploader(slots=2)
    torch.cuda._sleep(200_000_000)  # the stream is busy for a while; the copies queue behind it
    outs = [up.upload(torch.full((4096,), i, dtype=torch.long), "cuda") for i in range(6)]
    torch.cuda.synchronize()
    assert [int(o[0]) for o in outs] == list(range(6))
    assert all(bool((o == o[0]).all()) for o in outs)


@pytest.mark.gpu
@cuda
def test_each_thread_has_its_own_ring():
    up = PinnedUploader(slots=2)
    errors = []

    def work(k):
        try:
            for i in range(20):
                src = torch.full((300,), k * 100 + i, dtype=torch.long)
                assert torch.equal(up.upload(src, "cuda").cpu(), src)
        except AssertionError as e:
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and up.allocations == 3 * 2


def test_download_from_the_cpu_is_a_copy():
    up = PinnedUploader()
    src = torch.arange(6)
    out = up.download(src)
    src.zero_()
    assert out.tolist() == list(range(6))


@pytest.mark.gpu
@cuda
def test_downloads_equal_their_sources_and_outlive_the_slot():
    up = PinnedUploader(slots=2)
    srcs = [torch.full((1000,), i, device="cuda", dtype=torch.int64) for i in range(5)]
    outs = [up.download(s) for s in srcs]  # more downloads than slots: each result is its own copy
    assert [o.device.type for o in outs] == ["cpu"] * 5
    assert [int(o[0]) for o in outs] == list(range(5)) and all(bool((o == o[0]).all()) for o in outs)
    flags = torch.tensor([False, False, True], device="cuda")
    assert up.download(flags).tolist() == [False, False, True]
