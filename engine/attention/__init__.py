"""Paged attention kernels (Triton) over the device pool, used on CUDA when triton imports.

`use_kernels(q, backend)` decides (config `attn.backend`); `kernel_attention` runs one step: store
the new K/V, the prefill pieces (cuDNN attention for a few long pieces, see cudnn_prefill; PyTorch's
FA2 varlen kernel over gathered keys for many long ones, see flash_prefill; the Triton kernel for
short ones; config `attn.prefill_kernel` can force one),
one split-K decode launch plus its reduce. The gather+SDPA path in engine.layers is the CPU path
and the oracle the kernels are tested against.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install: fall back to the reference path
        return False
    return True


def use_kernels(q: torch.Tensor, backend: str = "auto") -> bool:
    """Kernels on CUDA tensors (or any device under TRITON_INTERPRET=1, triton's own switch) when
    triton imports and `backend` (config attn.backend) is "auto"; "reference" never uses them."""
    if backend == "reference" or not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return triton_available()


def sdpa_op_usable(q: torch.Tensor, broken: str | None, max_head_dim: int, capability: tuple[int, int],
                   op: str) -> bool:
    """Whether one of PyTorch's fused attention ops (cuDNN's, FA2's) runs for q: not failed before
    (`broken`), CUDA fp16/bf16, head_dim a multiple of 8 up to max_head_dim, the device's compute
    capability, and the op present in this torch."""
    if broken is not None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    D = q.shape[-1]
    return (D % 8 == 0 and D <= max_head_dim and torch.cuda.get_device_capability(q.device) >= capability
            and hasattr(torch.ops.aten, op))


def key_slots(block_table: torch.Tensor, n: int, P: int) -> torch.Tensor:
    """Pool rows (block * P + offset) of a piece's first n keys: [n] long, on the table's device."""
    ar = torch.arange(P, device=block_table.device)
    return (block_table[:(n + P - 1) // P, None] * P + ar).reshape(-1)[:n]


def adjacent_rows(table, n: int, P: int) -> int:
    """The pool row (block * P) from which a piece's first n keys are rows row..row+n-1 of the pool
    seen as [N * P, heads, D], in some order of their pages, or -1. For keys every query sees whole
    (a cached prefix in an unmasked call) the order does not matter, so it suffices that the pages
    are a run of consecutive block ids in any order (a prompt's chunks take fresh blocks in order;
    blocks freed tail-first come back in descending order) with a partial last page, if any, at the
    run's highest id (the rows past its n % P are not the prefix's). -1 also when the host's copy of
    the table is not known (table None)."""
    nb = -(-n // P)
    if table is None or nb <= 0 or len(table) < nb:
        return -1
    pages = table[:nb]
    lo, hi = min(pages), max(pages)
    if hi - lo != nb - 1 or (n % P and pages[-1] != hi) or len(set(pages)) != nb:
        return -1
    return lo * P


def prefill_inputs(meta, P: int, device: torch.device):
    """(tables [B, W], q_starts [B], q_lens [B], k_lens [B] (int32), max_q, max_k) of the prefill
    pieces.

    The runner fills them in AttnMetadata; a metadata built without them gets them from `prefills`.
    """
    if meta.prefill_tables is not None:
        return (meta.prefill_tables, meta.prefill_q_starts, meta.prefill_q_lens, meta.prefill_k_lens,
                meta.prefill_max_q, meta.prefill_max_k)
    ps = meta.prefills
    width = max((p.k_len + P - 1) // P for p in ps)
    tables = torch.zeros(len(ps), width, dtype=torch.int32, device=device)
    for i, p in enumerate(ps):
        nb = (p.k_len + P - 1) // P
        tables[i, :nb] = p.block_table[:nb]
    starts, q_lens, k_lens = (torch.tensor(x, dtype=torch.int32, device=device) for x in
                              ([p.q_start for p in ps], [p.q_len for p in ps], [p.k_len for p in ps]))
    return tables, starts, q_lens, k_lens, max(p.q_len for p in ps), max(p.k_len for p in ps)


_KERNELS = None


def _kernels():
    """The kernel modules (cudnn_prefill, flash_prefill, triton_cache, triton_decode, triton_prefill),
    imported at the first call, not when this package is (triton's interpreter flag is read when the
    kernels are defined), and kept: seven `from .x import y` statements a layer were ~3.8 us of host
    time on the 2-core VM (benchmarks/probe_dispatch.py) in a step whose attention launches already
    bound it (runs AX-AZ)."""
    global _KERNELS
    if _KERNELS is None:
        from . import cudnn_prefill, flash_prefill, triton_cache, triton_decode, triton_prefill
        _KERNELS = (cudnn_prefill, flash_prefill, triton_cache, triton_decode, triton_prefill)
    return _KERNELS


def prefill_backend(q: torch.Tensor, max_q: int, choice: str = "auto", pieces: int = 1) -> str:
    """"cudnn" (cuDNN attention, a pair of calls per piece) for steps of a few long pieces, "flash"
    (FA2 varlen over gathered keys) for many long pieces, else "triton", each where it runs.

    `choice` (config attn.prefill_kernel) "triton", "flash" or "cudnn" forces one where it runs."""
    cudnn, flash = _kernels()[:2]
    if choice == "triton":
        return "triton"
    if choice == "cudnn" and cudnn.cudnn_usable(q):
        return "cudnn"
    if choice not in ("flash", "cudnn") and max_q < flash.FLASH_MIN_Q:
        return "triton"
    if choice == "auto" and pieces <= cudnn.CUDNN_MAX_PIECES and cudnn.cudnn_usable(q):
        return "cudnn"
    return "flash" if flash.flash_usable(q) else "triton"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from .triton_norm import rms_norm as kernel
    return kernel(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    from .triton_norm import add_rms_norm as kernel
    return kernel(x, delta, weight, eps)


def qk_norm_rope(q, k, q_weight, k_weight, eps, cos, sin, out=None, v=None, store=None):
    from .triton_rope import qk_norm_rope as kernel
    return kernel(q, k, q_weight, k_weight, eps, cos, sin, out, v, store=store)


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, meta, scale: float, prefill: str = "auto",
                     out: torch.Tensor | None = None, store: bool = True, spare_rows: int = 0) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], caches [N, P, Hkv, D] -> out [T, Hq, D]; `prefill` is
    attn.prefill_kernel. `out`: written in place (rows no piece covers are left as they are);
    store=False: the step's K/V are already in the pool (engine.prefill_graphs stores them).
    spare_rows: rows of finite values that the storage of q, k and v (contiguous) holds past their
    last row; the cuDNN path reads its pieces' padding there instead of padding copies."""
    cudnn, flash, cache, decode, prefill_k = _kernels()
    P = k_cache.shape[1]
    k, v = k.contiguous(), v.contiguous()
    if store:
        cache.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    if meta.prefills:
        max_q = meta.prefill_max_q or max(p.q_len for p in meta.prefills)
        which = prefill_backend(q, max_q, prefill, len(meta.prefills))
        rest = meta.prefills
        if which == "cudnn":  # pieces with a bucketable prefix (cudnn_prefill's doc); the rest: FA2
            mine, others = [], []
            for p in rest:
                (mine if cudnn.cudnn_piece(p, prefill == "cudnn") else others).append(p)
            if mine and cudnn.cudnn_prefill(q, k, v, k_cache, v_cache, out, mine, scale, spare_rows):
                rest = others
            which = "flash" if flash.flash_usable(q) else "triton"
        done = not rest or (which == "flash" and flash.flash_prefill(q, k_cache, v_cache, out, rest, scale))
        if not done:
            tables, starts, q_lens, k_lens, max_q, max_k = prefill_inputs(meta, P, q.device)
            prefill_k.prefill_attention(q, k_cache, v_cache, out, tables, starts, q_lens, k_lens, max_q, scale,
                                        max_k, scratch=meta.scratch)
    if meta.decode_rows is not None:
        bound = meta.decode_max_len or meta.decode_tables.shape[1] * P
        decode.decode_attention(q, k_cache, v_cache, out, meta.decode_rows, meta.decode_tables, meta.decode_lens,
                                bound, scale)
    return out
