"""kvc.gpu_checksum: XXH3_64 of pages in Triton. The algorithm's Python form against the xxhash
package at every path through the long input (no block, one block, a partial last block, whole
blocks only); the kernel under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the flag
is read when kernels are defined) at the same sizes. On CUDA, tests/kvc/test_cuda_store.py."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from kvc import gpu_checksum

ROOT = Path(__file__).resolve().parents[2]
SIZES = [241, 248, 1000, 1024, 1025, 1096, 2048, 2049, 3000, 4160, 16384]


@pytest.mark.parametrize("n", SIZES)
def test_reference_equals_xxhash(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert gpu_checksum.reference(data) == xxhash.xxh3_64_intdigest(data)


def test_reference_refuses_short_input():
    with pytest.raises(ValueError, match="241"):
        gpu_checksum.reference(b"x" * 240)


def test_rows_checked_before_launch():
    assert not gpu_checksum.supported(torch.zeros((2, 512), dtype=torch.uint8))  # not on a GPU
    for bad in (torch.zeros((2, 244), dtype=torch.uint8), torch.zeros((2, 232), dtype=torch.uint8)):
        with pytest.raises(ValueError, match="nbytes"):
            gpu_checksum.xxh3_64_rows(bad)
    assert gpu_checksum.to_signed([0, 1 << 63, (1 << 64) - 1]) == [0, -(1 << 63), -1]


INTERP = """
import numpy as np, torch, xxhash
from kvc import gpu_checksum as gc
rng = np.random.default_rng(0)
for n in [s for s in SIZES if s % 8 == 0]:
    rows = torch.from_numpy(rng.integers(0, 256, (3, n), dtype=np.uint8))
    got = gc.xxh3_64_rows(rows).numpy().view(np.uint64).tolist()
    assert got == [xxhash.xxh3_64_intdigest(r.numpy().tobytes()) for r in rows], n
wide = torch.from_numpy(rng.integers(0, 256, (4, 2048), dtype=np.uint8))
half = wide[:, :1024]  # rows of a wider buffer
got = gc.xxh3_64_rows(half).numpy().view(np.uint64).tolist()
assert got == [xxhash.xxh3_64_intdigest(r.numpy().tobytes()) for r in half]
for g in (1, 2):  # blocks per step (a power of two): the result does not depend on it
    assert gc.xxh3_64_rows(half, block_group=g).numpy().view(np.uint64).tolist() == got
print("ok")
"""


def test_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    code = f"SIZES = {SIZES!r}\n" + INTERP
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
