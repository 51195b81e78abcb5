import numpy as np
import pytest
import torch

from kvc.config import load_config
from kvc.hashing import Namespace, PageSpec, page_hashes
from kvc.record import Page

SPEC = PageSpec(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, dtype="float32")
NS = Namespace("test-arch", SPEC, weights_digest="w0")


def make_pages(ns: Namespace, tokens, seed: int = 0) -> tuple[list[bytes], list[Page]]:
    """Full pages of `tokens` with deterministic random KV."""
    g = torch.Generator().manual_seed(seed)
    P = ns.spec.page_size
    hashes = page_hashes(ns.root, tokens, P)
    pages, parent = [], ns.root
    for i, h in enumerate(hashes):
        data = torch.randn(ns.spec.shape, generator=g).to(getattr(torch, ns.spec.dtype))
        pages.append(Page(h, parent, np.asarray(tokens[i * P:(i + 1) * P], dtype=np.uint32), data))
        parent = h
    return hashes, pages


def kvc_config(tmp_path, **over):
    base = dict(disk_path=str(tmp_path / "pages"), cpu_memory_size_GB=1 / 1024, disk_size_GB=16 / 1024)
    base.update(over)
    return load_config(None, **base).kvc


@pytest.fixture
def ns():
    return NS
