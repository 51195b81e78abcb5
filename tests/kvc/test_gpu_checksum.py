"""kvc.gpu_checksum: XXH3_64 of pages in Triton. The algorithm's Python form against the xxhash
package at every path through the long input (no block, one block, a partial last block, whole
blocks only); the kernel under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the flag
is read when kernels are defined) at the same sizes, and the CUDA get's device-verify path on CPU
tensors. On CUDA, tests/kvc/test_cuda_store.py."""
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
# segmented rows (a layer-major load buffer [S, n, seg]): the sums of the rows put back together
for S, seg in ((1, 1024), (3, 1024), (4, 2048)):
    data = torch.from_numpy(rng.integers(0, 256, (S, 5, seg), dtype=np.uint8))
    pages = data.permute(1, 0, 2).reshape(5, S * seg)
    want = [xxhash.xxh3_64_intdigest(r.numpy().tobytes()) for r in pages]
    out = torch.empty(5, dtype=torch.int64)
    for g in (1, 2):
        assert gc.xxh3_64_segmented(data, out, block_group=g).numpy().view(np.uint64).tolist() == want, (S, seg, g)
head = torch.empty(3, dtype=torch.int64)  # the first rows only (a load whose cpu run ended early)
assert gc.xxh3_64_segmented(data, head).numpy().view(np.uint64).tolist() == want[:3]
# in parts as the segments land (accumulators carried in acc): the same sums
for S, seg, cuts in ((2, 1024, (1,)), (4, 2048, (1, 3)), (5, 1024, (2, 3, 4)), (4, 2048, (3,))):
    data = torch.from_numpy(rng.integers(0, 256, (S, 6, seg), dtype=np.uint8))
    pages = data.permute(1, 0, 2).reshape(6, S * seg)
    want = [xxhash.xxh3_64_intdigest(r.numpy().tobytes()) for r in pages[:4]]
    out = torch.full((4,), 7, dtype=torch.int64)
    acc = torch.empty((4, 8), dtype=torch.int64)
    first = 0
    for c in cuts:
        gc.xxh3_64_segmented(data, out, acc=acc, first=first, upto=c)
        first = c
    assert out.tolist() == [7] * 4  # the parts before the last leave out alone
    assert gc.xxh3_64_segmented(data, out, acc=acc, first=first).numpy().view(np.uint64).tolist() == want, (S, seg, cuts)
for bad in (dict(acc=acc, first=0, upto=4), dict(acc=acc, first=2, upto=2), dict(first=1),
            dict(acc=acc[:3], upto=1)):
    try:
        gc.xxh3_64_segmented(data, out, **bad)
        raise SystemExit(f"parts {bad} were taken")
    except ValueError as e:
        assert "segments" in str(e) or "acc" in str(e), e
# pages in a device pool's blocks (index): pool [L, parts, blocks, part] seen as [L * parts, blocks,
# part]; page i lies in block index[i] of every segment; whole and in parts, rows in any order
L, parts, blocks, part = 3, 2, 9, 1024
pool = torch.from_numpy(rng.integers(0, 256, (L, parts, blocks, part), dtype=np.uint8))
index = torch.tensor([4, 5, 6, 0, 8], dtype=torch.int64)
pages = pool.permute(2, 0, 1, 3).reshape(blocks, L * parts * part)[index]
want = [xxhash.xxh3_64_intdigest(r.numpy().tobytes()) for r in pages]
seen = pool.view(L * parts, blocks, part)
out = torch.empty(5, dtype=torch.int64)
assert gc.xxh3_64_segmented(seen, out, index=index).numpy().view(np.uint64).tolist() == want
acc = torch.empty((5, 8), dtype=torch.int64)
gc.xxh3_64_segmented(seen, out, acc=acc, upto=4, index=index)
assert gc.xxh3_64_segmented(seen, out, acc=acc, first=4, index=index).numpy().view(np.uint64).tolist() == want
try:
    gc.xxh3_64_segmented(seen, out, index=index[:3])
    raise SystemExit("an index shorter than out was taken")
except ValueError as e:
    assert "index" in str(e), e
try:
    gc.xxh3_64_segmented(torch.zeros((2, 3, 1000), dtype=torch.uint8), out[:3])
    raise SystemExit("a segment of 1000 bytes was taken")
except ValueError as e:
    assert "seg_bytes" in str(e)
print("ok")
"""


def interpret(code: str) -> None:
    """Run code in a subprocess under Triton's interpreter (the flag is read when kernels are
    defined); it prints ok."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_kernel_under_interpreter():
    interpret(f"SIZES = {SIZES!r}\n" + INTERP)


GET = """
import contextlib, tempfile
import torch
from kvc import gpu_checksum
from kvc.store import TieredStore
from tests.kvc.conftest import NS, kvc_config, make_pages


class Stream:  # the get's stream calls, as no-ops: on the CPU every copy is done when it returns
    def wait_stream(self, other):
        pass


torch.cuda.current_stream = lambda device=None: Stream()
torch.cuda.Stream = lambda device=None: Stream()
torch.cuda.stream = lambda s: contextlib.nullcontext()
torch.Tensor.pin_memory = lambda self: self
gpu_checksum.supported = lambda rows: True  # CPU rows run under the interpreter
with tempfile.TemporaryDirectory() as d, TieredStore(kvc_config(__import__("pathlib").Path(d),
                                                                cpu_memory_size_GB=4 / 1024)) as s:
    hashes, pages = make_pages(NS, list(range(4 * 300)))
    s.put_pages(NS, pages)
    out = torch.zeros((300, *NS.spec.shape))
    parts = []
    assert s._get_to_device(NS, hashes, out, landed=lambda lo, hi: parts.append((lo, hi))) == 300
    assert parts == [(0, 75), (75, 150), (150, 225), (225, 300)], parts
    assert all(torch.equal(out[i], pages[i].data) for i in range(300))
    s.cpu.view(NS.root + hashes[250])[9] ^= 0x04
    assert s._get_to_device(NS, hashes, out.zero_()) == 250
    assert s.lookup(NS, hashes=hashes).num_pages == 250 and gpu_checksum._broken is None
print("ok")
"""


def test_device_verified_get_under_interpreter():
    """The CUDA get's device-verify path (copies and checksums in parts, landed per part, the
    first bad page ends the run and leaves the tier) on CPU tensors under the interpreter, its
    stream calls as no-ops; on CUDA the same runs with -m gpu (tests/kvc/test_cuda_store.py)."""
    interpret(GET)
