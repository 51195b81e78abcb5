"""get_pages into a CUDA buffer (slab -> device, verified on threads). Skipped without CUDA."""
import pytest
import torch

from kvc.store import TieredStore

from .conftest import NS, kvc_config, make_pages

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_get_into_cuda_equals_pages_and_stops_at_a_corrupt_one(tmp_path):
    with TieredStore(kvc_config(tmp_path, cpu_memory_size_GB=4 / 1024)) as s:
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
