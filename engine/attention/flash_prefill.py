"""Long prefill pieces through PyTorch's own FlashAttention-2 varlen kernel.

FA2's causal mask is bottom-right aligned when a sequence has more keys than queries, which is
exactly a chunk after its cached prefix, and it takes GQA natively; but it needs each sequence's
keys contiguous, so the pieces' pages are first gathered out of the pool (one index_select per K
and V: about 2 x keys x kv_heads x head_dim elements, small next to the attention itself). Used
for steps whose longest piece has at least FLASH_MIN_Q queries; shorter ones (a suffix after a
prefix hit) go to the Triton kernel, whose split-K keeps the GPU busy where FA2 would not be.
"""
from __future__ import annotations

import logging

import torch

from kvc import pinned

from . import key_slots, sdpa_op_usable

log = logging.getLogger(__name__)
FLASH_MIN_Q = 512
_broken: str | None = None  # set when the op failed once; the Triton kernel takes over


def flash_usable(q: torch.Tensor) -> bool:
    return sdpa_op_usable(q, _broken, 256, (8, 0), "_flash_attention_forward")


def _step_inputs(pieces, P: int, dev: torch.device):
    """(key slots [sum k_len], query rows [sum q_len] or None when the pieces are adjacent rows,
    cu_seqlens [2, B+1] int32, first row, end row) of a step's pieces. The same for every layer:
    made once a step and kept on the first piece (a step's Piece objects are new each step)."""
    key = tuple(map(id, pieces))
    got = pieces[0].__dict__.get("flash_inputs")
    if got is not None and got[0] == key:
        return got[1]
    slots = torch.cat([key_slots(p.block_table, p.k_len, P) for p in pieces])  # [sum k_len], piece after piece
    first, last = pieces[0].q_start, pieces[-1].q_start + pieces[-1].q_len
    adjacent = all(a.q_start + a.q_len == b.q_start for a, b in zip(pieces, pieces[1:]))
    rows = None if adjacent else torch.cat([torch.arange(p.q_start, p.q_start + p.q_len, device=dev)
                                            for p in pieces])
    cu_q, cu_k = [0], [0]
    for p in pieces:
        cu_q.append(cu_q[-1] + p.q_len)
        cu_k.append(cu_k[-1] + p.k_len)
    # pinned + non_blocking: a pageable upload would wait for the GPU and stall the host
    cu = pinned.upload(torch.tensor([cu_q, cu_k], dtype=torch.int32), dev)  # [2, B+1]
    made = (slots, rows, cu, first, last)
    pieces[0].flash_inputs = (key, made)
    return made


def flash_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                  pieces, scale: float) -> bool:
    """Attention of every prefill piece (engine.layers.Piece) into out's rows; False if the op failed
    (nothing written: the caller falls back)."""
    global _broken
    N, P, Hkv, D = k_cache.shape
    slots, rows, cu, first, last = _step_inputs(pieces, P, q.device)
    keys = k_cache.view(N * P, Hkv, D).index_select(0, slots)  # [Tk, Hkv, D]
    vals = v_cache.view(N * P, Hkv, D).index_select(0, slots)
    adjacent = rows is None
    qp = q[first:last] if adjacent else q.index_select(0, rows)  # [Tq, Hq, D]
    try:
        o = torch.ops.aten._flash_attention_forward(
            qp.contiguous(), keys, vals, cu[0], cu[1], max(p.q_len for p in pieces),
            max(p.k_len for p in pieces), 0.0, True, False, scale=scale)[0]  # [Tq, Hq, D]
    except (RuntimeError, TypeError, NotImplementedError) as e:
        _broken = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("flash prefill off, using the Triton kernel: %s", _broken)
        return False
    if adjacent:
        out[first:last] = o
    else:
        out.index_copy_(0, rows, o)
    return True
