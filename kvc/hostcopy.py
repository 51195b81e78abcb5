"""Host-to-device row gathers by a GPU kernel that reads page-locked host memory in place.

A layer-by-layer cpu-tier load moves one layer of every page: n rows of `width` bytes, one per
page, scattered over the pinned slab. As DMA (kvc.cudacopy's cuMemcpy2DAsync) that is one copy
per run of adjacent slots and layer. Here one kernel launch moves a whole layer: pinned host
memory is mapped into the GPU's address space (unified addressing), so a kernel can load from it
over PCIe, and a row's source is an offset read from a small device table. The grid is capped
(`CTAS`): each program loops over (row, chunk) tiles, so the copy keeps a bounded share of the SMs
while the step that waits for it runs beside it.

Written to test whether the DMA rows were what blocked other CUDA calls during a load (run BI,
benchmarks/RESULTS.md). Measured in run BK they were not (a launch right after a load's DMA copies
are queued took 0.02 ms), and this kernel moved a layered load at 50 GB/s against DMA's 53; the
cpu hits it fed were slower than DMA's in 7 of 8 interleaved rows (runs BL-BO, 8K and 32K). DMA is
the store's default (TieredStore.layer_copy); the kernel stays as the benchmarks' variant.

`gather_rows(dst, src, offsets, add)`: dst [n, w] (int64 words, contiguous, CUDA) receives, for
each row r, the w words of src starting at word offsets[r] + add. src is a 1-D int64 tensor on
the host (page-locked) or on the device; offsets an int64 CUDA tensor [>= n]. Under
TRITON_INTERPRET=1 every tensor may be on the CPU (the tests' path).
"""
from __future__ import annotations

import torch

CTAS = 96          # programs at most: each loops over its share of the tiles
BLOCK_WORDS = 1024  # 8 KiB a tile (128 threads, 64 bytes each)

_kernel = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_rows_kernel(Dst, Src, Offs, add, n_rows, width, chunks, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        lane = tl.arange(0, BLOCK)
        for t in range(pid, n_rows * chunks, step):
            r = t // chunks
            c = (t % chunks) * BLOCK
            src = tl.load(Offs + r) + add + c
            m = c + lane < width
            x = tl.load(Src + src + lane, mask=m)
            tl.store(Dst + r.to(tl.int64) * width + c + lane, x, mask=m)

    return _gather_rows_kernel


def gather_rows(dst: torch.Tensor, src: torch.Tensor, offsets: torch.Tensor, add: int = 0,
                ctas: int = CTAS) -> None:
    """Queue the gather on the current stream (see the module's docstring)."""
    global _kernel
    if dst.dtype != torch.int64 or src.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise ValueError("gather_rows moves int64 words: dst, src and offsets must be int64")
    if dst.dim() != 2 or not dst.is_contiguous() or src.dim() != 1 or offsets.shape[0] < dst.shape[0]:
        raise ValueError(f"dst must be a contiguous [n, w] tensor and offsets hold >= n entries; got "
                         f"dst {tuple(dst.shape)}, src {tuple(src.shape)}, offsets {tuple(offsets.shape)}")
    n, width = dst.shape
    if n == 0 or width == 0:
        return
    if _kernel is None:
        _kernel = _build()
    chunks = -(-width // BLOCK_WORDS)
    grid = (max(1, min(ctas, n * chunks)),)
    _kernel[grid](dst, src, offsets, add, n, width, chunks, BLOCK=BLOCK_WORDS, num_warps=4)
