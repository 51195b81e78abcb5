"""kvc.hostcopy's row gather (a layer-by-layer cpu-tier load's copy on CUDA) under Triton's
interpreter on CPU tensors; on the device it reads the pinned slab (tests/kvc/test_cuda_store.py)."""
import pytest

from .test_gpu_checksum import interpret

INTERP = """
import torch
from kvc import hostcopy
g = torch.Generator().manual_seed(0)
src = torch.randint(-2**62, 2**62, (20_000,), dtype=torch.int64, generator=g)
for width, n, ctas in ((1030, 7, 3), (2048, 4, 96), (5, 9, 2)):
    offs = torch.randint(0, 20_000 - width - 3, (n + 2,), generator=g)  # more offsets than rows
    dst = torch.full((n, width), -1, dtype=torch.int64)
    hostcopy.gather_rows(dst, src, offs, 3, ctas=ctas)
    want = torch.stack([src[o + 3:o + 3 + width] for o in offs[:n].tolist()])
    assert torch.equal(dst, want), (width, n, ctas)
for bad in (dict(dst=torch.zeros((2, 4), dtype=torch.int32)), dict(offsets=torch.zeros(1, dtype=torch.int64))):
    args = dict(dst=torch.zeros((2, 4), dtype=torch.int64), src=src, offsets=torch.zeros(2, dtype=torch.int64))
    args.update(bad)
    try:
        hostcopy.gather_rows(**args)
        raise SystemExit(f"taken: {bad}")
    except ValueError:
        pass
print("ok")
"""


def test_gather_rows_under_interpreter():
    pytest.importorskip("triton")
    interpret(INTERP)
