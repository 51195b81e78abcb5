"""The Triton paged-attention kernels against the gather+SDPA reference: random block tables,
ragged pieces, cached prefixes that end mid-page, decodes mixed into the same step, GQA 1:1/4:1/8:1.

On CUDA (`-m gpu`) at real shapes; on CPU under triton's interpreter (TRITON_INTERPRET=1, in a
subprocess because the flag is read when the kernels are defined) at tiny shapes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.layers import AttnMetadata, Piece, paged_attention_reference

ROOT = Path(__file__).resolve().parents[2]


def make_step(pieces: list[tuple[int, int]], Hq: int, Hkv: int, D: int, P: int, dtype, device, seed=0,
              runs: int = 0):
    """pieces: (cached, new) per sequence; new == 1 is a decode. Returns inputs and AttnMetadata.
    runs: 0, every block anywhere in the pool; k > 0, a sequence's blocks in runs of k consecutive
    ids (the runs in a shuffled order); -1, one run a sequence."""
    g = torch.Generator().manual_seed(seed)
    need = sum((c + n + P - 1) // P for c, n in pieces)
    N = need + 3
    k_cache = torch.randn(N, P, Hkv, D, generator=g).to(dtype).to(device)  # [N, P, Hkv, D]
    v_cache = torch.randn(N, P, Hkv, D, generator=g).to(dtype).to(device)
    perm = torch.randperm(N, generator=g).tolist()  # blocks scattered over the pool
    if runs:  # runs of consecutive blocks placed in a shuffled order; pop() takes from the end
        cuts = []  # (sequence, its blocks' count in this run)
        for i, (c, n) in enumerate(pieces):
            nb = (c + n + P - 1) // P
            k = nb if runs < 0 else runs
            cuts += [(i, min(k, nb - j)) for j in range(0, nb, k)]
        start, b = [0] * len(cuts), 1
        for r in torch.randperm(len(cuts), generator=g).tolist():
            start[r], b = b, b + cuts[r][1]
        seqs = [[] for _ in pieces]
        for (i, k), b in zip(cuts, start):
            seqs[i] += range(b, b + k)
        perm = [blk for seq in reversed(seqs) for blk in reversed(seq)]
    T = sum(n for _, n in pieces)
    q = torch.randn(T, Hq, D, generator=g).to(dtype).to(device)
    k = torch.randn(T, Hkv, D, generator=g).to(dtype).to(device)
    v = torch.randn(T, Hkv, D, generator=g).to(dtype).to(device)
    positions, slots, prefills, dec = [], [], [], ([], [], [])
    row = 0
    for c, n in pieces:
        nb = (c + n + P - 1) // P
        table = [perm.pop() for _ in range(nb)]
        pos = list(range(c, c + n))
        positions += pos
        slots += [table[p // P] * P + p % P for p in pos]
        if n == 1:
            dec[0].append(row), dec[1].append(table), dec[2].append(c + 1)
        else:
            prefills.append(Piece(row, n, c + n, torch.tensor(table, dtype=torch.long, device=device), table))
        row += n
    lt = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    meta = AttnMetadata(lt(positions), lt(slots), prefills, None, None, None)
    if dec[0]:
        width = max(len(t) for t in dec[1])
        meta.decode_rows, meta.decode_lens = lt(dec[0]), lt(dec[2])
        meta.decode_tables = lt([t + [0] * (width - len(t)) for t in dec[1]])
    return q, k, v, k_cache, v_cache, meta


def check(pieces, Hq, Hkv, D, P, dtype, device, atol):
    """Kernels == reference: prefill by the Triton kernel with and without split-K, and by FA2 varlen
    and cuDNN attention where they run (CUDA, fp16/bf16; cuDNN from sm90)."""
    from engine.attention import kernel_attention, prefill_backend, prefill_inputs
    q, k, v, kc, vc, meta = make_step(pieces, Hq, Hkv, D, P, dtype, device)
    ref = paged_attention_reference(q, k, v, kc.clone(), vc.clone(), meta, D ** -0.5)
    backends = ["triton"] + [b for b in ("flash", "cudnn") if prefill_backend(q, 1, b) == b] + ["auto"]
    for split, backend in [(True, b) for b in backends] + [(False, "triton")]:
        kc2, vc2 = kc.clone(), vc.clone()
        if meta.prefills:  # packed as the runner does; max_k = 0 turns split-K off
            (meta.prefill_tables, meta.prefill_q_starts, meta.prefill_q_lens, meta.prefill_k_lens,
             meta.prefill_max_q, max_k) = prefill_inputs(meta, P, q.device)
            meta.prefill_max_k = max_k if split else 0
        out = kernel_attention(q, k, v, kc2, vc2, meta, D ** -0.5, prefill=backend)
        ref_kc, ref_vc = kc.clone(), vc.clone()
        paged_attention_reference(q, k, v, ref_kc, ref_vc, meta, D ** -0.5)
        assert torch.equal(kc2, ref_kc) and torch.equal(vc2, ref_vc), "the kernels wrote the pool differently"
        if backend == "flash":
            from engine.attention import flash_prefill
            assert flash_prefill._broken is None, flash_prefill._broken  # it ran, no silent fallback
        if backend == "cudnn":
            from engine.attention import cudnn_prefill
            assert cudnn_prefill._broken is None, cudnn_prefill._broken  # it ran, no silent fallback
        err = (out.float() - ref.float()).abs().max().item()
        assert err <= atol, (f"max abs error {err} > {atol} for pieces {pieces} Hq={Hq} Hkv={Hkv} D={D} "
                             f"P={P} {dtype} split={split} prefill={backend}")


def check_decode_bound(device, D=16, P=16, dtype=torch.float32, atol=1e-4):
    """Decodes under a bound far past their lengths (a decode graph's: the model's length), each
    sequence's keys in the bound's number of slices and in slices of a size fixed from the bound:
    both equal the reference, for lengths under one key tile, at a tile's edges and over many."""
    from engine.attention import triton_decode
    lens = [1, 5, 63, 64, 65, 200, 700, 1500, 5000]
    q, k, v, kc, vc, meta = make_step([(n - 1, 1) for n in lens], 8, 2, D, P, dtype, device)
    ref = paged_attention_reference(q, k, v, kc, vc, meta, D ** -0.5)  # stores the new keys too
    for bound in (max(lens), 16384):
        for per_sequence in (True, False):
            out = torch.zeros_like(q)
            triton_decode.decode_attention(q, kc, vc, out, meta.decode_rows, meta.decode_tables, meta.decode_lens,
                                           bound, D ** -0.5, per_sequence=per_sequence)
            err = (out.float() - ref.float()).abs().max().item()
            assert err <= atol, f"max abs error {err} > {atol}: bound {bound}, per_sequence={per_sequence}"


def check_merge_live(device):
    """merge_splits given each row's keys reads only the slices that hold some (the split kernels'
    cut: max(ceil(tiles / S) tiles, min_keys) keys a slice): NaN in every slice past them, outputs
    and log-sum-exps alike, changes nothing; a row with no keys gets 0."""
    from engine.attention.triton_merge import merge_splits
    g = torch.Generator().manual_seed(11)
    B, H, S, D, tile = 4, 3, 8, 16, 4
    for min_keys, lens, live in ((0, [10, 0, 40, 32], [3, 0, 5, 8]), (16, [10, 0, 40, 100], [1, 0, 3, 7])):
        mid_o, mid_l = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, generator=g) * 4
        mid_l[0, 1, 1] = float("-inf")  # a live slice a row saw no key in
        want = torch.zeros(B, H, D)
        for b, n in enumerate(live):
            if n:
                w = torch.exp2(mid_l[b, :, :n] - mid_l[b, :, :n].amax(-1, keepdim=True))
                want[b] = (w[..., None] * mid_o[b, :, :n]).sum(1) / w.sum(-1, keepdim=True)
            mid_o[b, :, n:], mid_l[b, :, n:] = float("nan"), float("nan")
        out = torch.full((B + 2, H, D), 7.0, device=device)
        rows = torch.tensor([5, 0, 2, 3], device=device)  # output rows in another order
        merge_splits(mid_o.to(device), mid_l.to(device), out, rows,
                     lens=torch.tensor(lens, dtype=torch.int32, device=device), tile=tile, min_keys=min_keys)
        torch.testing.assert_close(out[rows].cpu(), want, msg=f"min_keys {min_keys}")
        assert (out[[1, 4]] == 7.0).all()  # rows not named: untouched


def check_split_scratch(device):
    """Split-K's buffers made once per step (meta.scratch) and used by every layer: each layer's
    output equals the same kernel with buffers of its own, across two layers' different caches."""
    from engine.attention import prefill_inputs
    from engine.attention.triton_prefill import prefill_attention
    pieces = [(200, 5), (3, 1), (90, 7)]
    q, k, v, kc, vc, meta = make_step(pieces, 4, 2, 16, 16, torch.float32, device)
    tables, starts, q_lens, k_lens, max_q, max_k = prefill_inputs(meta, 16, q.device)
    scratch = {}
    for layer in range(2):
        kc_l, vc_l = torch.randn_like(kc), torch.randn_like(vc)  # another layer's keys
        want, got = torch.zeros_like(q), torch.zeros_like(q)
        prefill_attention(q, kc_l, vc_l, want, tables, starts, q_lens, k_lens, max_q, 0.25, max_k)
        prefill_attention(q, kc_l, vc_l, got, tables, starts, q_lens, k_lens, max_q, 0.25, max_k, scratch=scratch)
        assert scratch, "split-K did not run"
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def check_unmasked_loop(device, dtype=torch.float32, atol=1e-4):
    """The kernel's unmasked loop (whole key tiles that every row of a query tile sees) against the
    reference and against the same kernel with every tile masked, with and without split-K, with tile
    overrides whose key tiles straddle pages, splits and each piece's first query; and other slice
    counts than the one chosen against the reference."""
    from engine.attention import prefill_inputs
    from engine.attention.triton_prefill import prefill_attention
    pieces = [(300, 5), (64, 40), (3, 2), (129, 17), (0, 9)]  # prefixes whole tiles and not
    q, k, v, kc, vc, meta = make_step(pieces, 8, 2, 16, 16, dtype, device)
    ref = paged_attention_reference(q, k, v, kc, vc, meta, 0.25)  # also stores the step's K/V in kc, vc
    tables, starts, q_lens, k_lens, max_q, max_k = prefill_inputs(meta, 16, q.device)
    tile_sets = [None, (16, 16, 4, 2), (32, 32, 4, 2)]
    for tiles in tile_sets:
        for split_k in (max_k, 0):
            outs = []
            for unmasked in (True, False):
                out = torch.zeros_like(q)
                prefill_attention(q, kc, vc, out, tables, starts, q_lens, k_lens, max_q, 0.25, split_k,
                                  unmasked=unmasked, tiles=tiles)
                err = (out.float() - ref.float()).abs().max().item()
                assert err <= atol, f"max abs error {err} tiles={tiles} split={bool(split_k)} unmasked={unmasked}"
                outs.append(out)
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=atol)
    for split_k in (max_k, 0):  # the ACC_DOT variant (P.V accumulated inside the dot, scale folded)
        out = torch.zeros_like(q)
        prefill_attention(q, kc, vc, out, tables, starts, q_lens, k_lens, max_q, 0.25, split_k, acc_dot=True)
        err = (out.float() - ref.float()).abs().max().item()
        assert err <= atol, f"max abs error {err} acc_dot split={bool(split_k)}"
    for splits in (1, 2, 7):  # slice counts other than the one chosen, each key run split unevenly
        out = torch.zeros_like(q)
        prefill_attention(q, kc, vc, out, tables, starts, q_lens, k_lens, max_q, 0.25, max_k, splits=splits)
        err = (out.float() - ref.float()).abs().max().item()
        assert err <= atol, f"max abs error {err} splits={splits}"


def check_tma(device, dtype=torch.float32, atol=1e-4, heads=(8, 2), D=16, P=16, full=True):
    """launch(tma=True) (key tiles on adjacent pages as TMA boxes, the others by pointer) against
    the reference, with and without split-K, with the default tiles and with 32-key tiles of two
    pages: each sequence's pages in one run, in one run with its whole cached pages reversed (a
    descending run: TMA boxes in pool order), in runs of two (adjacent within a 32-key tile, not
    across), and scattered. full=False: a subset of those (the interpreter's CI time; each distinct
    launch is also compiled for sm_90 by test_triton_compile)."""
    from engine.attention import prefill_inputs
    from engine.attention.triton_prefill import prefill_attention
    pieces = [(300, 5), (64, 40), (3, 2), (129, 17), (0, 9)]
    REV = -2  # one run a sequence with its whole cached pages reversed (a descending run of block ids)
    cases = [(runs, tiles, split) for runs in (-1, REV, 2, 0) for tiles in (None, (16, 32, 4, 2))
             for split in (True, False)]
    if not full:
        cases = [(-1, None, True), (-1, (16, 32, 4, 2), False), (REV, (16, 32, 4, 2), True), (REV, None, False),
                 (2, (16, 32, 4, 2), True), (0, None, True)]
    for runs in sorted({c[0] for c in cases}):
        q, k, v, kc, vc, meta = make_step(pieces, *heads, D, P, dtype, device, runs=-1 if runs == REV else runs)
        if runs == REV:
            kc, vc = _reverse_prefix_pages(P, kc, vc, meta)
        ref = paged_attention_reference(q, k, v, kc, vc, meta, D ** -0.5)
        tables, starts, q_lens, k_lens, max_q, max_k = prefill_inputs(meta, P, q.device)
        for _, tiles, split in (c for c in cases if c[0] == runs):
            out = torch.zeros_like(q)
            prefill_attention(q, kc, vc, out, tables, starts, q_lens, k_lens, max_q, D ** -0.5, max_k if split else 0,
                              tiles=tiles, tma=True)
            err = (out.float() - ref.float()).abs().max().item()
            assert err <= atol, f"max abs error {err}: tma, runs {runs}, tiles {tiles}, split {split}"


def check_fixed_plan(device, dtype=torch.float32, atol=1e-4, heads=(4, 2), D=16, NP=3, width=40, T=48,
                     steps=([(300, 5), (64, 40), (0, 3)], [(129, 17), (600, 2)])):
    """The launch engine.prefill_graphs captures: one plan fixed for any prefix (each piece splits its
    own keys in the kernel), tables padded to NP pieces and `width` pages (pieces past the step's
    have no queries), T rows, split buffers kept across steps. Each step of pieces (cached, new)
    through the same buffers equals the reference."""
    from engine.attention import prefill_inputs
    from engine.attention.triton_prefill import fixed_plan, launch, split_buffers
    Hq, Hkv = heads
    bufs = None
    for seed, pieces in enumerate(steps):
        q, k, v, kc, vc, meta = make_step(pieces, Hq, Hkv, D, 16, dtype, device, seed=seed)
        ref = paged_attention_reference(q, k, v, kc, vc, meta, D ** -0.5)  # stores the step's K/V
        tables, starts, q_lens, k_lens, _, _ = prefill_inputs(meta, 16, q.device)
        n = tables.shape[0]
        st_tables = torch.zeros(NP, width, dtype=torch.int32, device=device)
        st_tables[:n, :tables.shape[1]] = tables
        st = [torch.zeros(NP, dtype=torch.int32, device=device) for _ in range(3)]
        for dst, src in zip(st, (starts, q_lens, k_lens)):
            dst[:n] = src
        qp = torch.zeros(T, Hq, D, dtype=dtype, device=device)
        qp[:q.shape[0]] = q
        p = fixed_plan(qp, Hkv, T, width * 16)
        assert p.splits > 1 and p.kps == 0, p
        bufs = bufs or split_buffers(T, Hq, p, device)
        out = torch.zeros_like(qp)
        launch(p, qp, kc, vc, out, st_tables, st[0], st[1], st[2], T, D ** -0.5, bufs)
        err = (out[:q.shape[0]].float() - ref.float()).abs().max().item()
        assert err <= atol, f"max abs error {err} step {seed} {dtype} heads {heads} plan {p}"


def check_one_wave():
    """The split-K slice count of the wide tiles: about one wave of programs on the SMs (run AY:
    8 slices at 64 new tokens after 32K were 18% faster than the 32 that filled 512 programs)."""
    from engine.attention.triton_prefill import one_wave
    for programs, max_k, sms in ((16, 32832, 132), (4, 8208, 132), (16, 8256, 132), (3, 300, 132), (16, 100, 132),
                                 (200, 32768, 132), (16, 32832, 78)):
        kps, S = one_wave(programs, max_k, 128, sms)
        assert kps % 128 == 0 and (S - 1) * kps < max_k <= S * kps, (programs, max_k, kps, S)  # every key once
        assert programs * S <= max(sms, programs), (programs, max_k, S)  # no second wave
    assert one_wave(16, 32832, 128, 132) == (4224, 8) and one_wave(4, 32784, 128, 132)[1] == 33


def check_norm(device):
    """The RMSNorm kernel against the eager reference (fp32 sums may differ in order only)."""
    from engine.layers import RMSNorm
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)):  # ~2 ulp
        norm = RMSNorm(96, 1e-6).to(device=device, dtype=dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(96) + 1)
        x = (torch.randn(7, 3, 96) * 3).to(device=device, dtype=dtype)
        from engine.attention import rms_norm
        got, want = rms_norm(x, norm.weight, norm.eps), norm.reference(x)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5)
        from engine.attention import add_rms_norm  # the fused residual add + norm
        x2, d = x.reshape(21, 96), (torch.randn(21, 96) * 3).to(device=device, dtype=dtype)
        s, h = add_rms_norm(x2, d, norm.weight, norm.eps)
        if device == "cuda" or dtype != torch.bfloat16:  # the interpreter truncates to bf16, torch rounds
            assert torch.equal(s, x2 + d)  # the residual stream exactly as torch's add rounds it
        torch.testing.assert_close(s, x2 + d, rtol=rtol, atol=1e-5)
        torch.testing.assert_close(h, norm.reference(s), rtol=rtol, atol=1e-5)


def check_qk_norm_rope(device):
    """The fused per-head RMSNorm + RoPE of q and k against RMSNorm.reference then apply_rope,
    with and without the norms (Qwen3 / Mixtral), GQA head counts, strided q/k as projections give."""
    from engine.attention import qk_norm_rope
    from engine.attention.triton_rope import qk_norm_rope as kernel
    from engine.layers import RMSNorm, Rope, apply_rope_reference
    rope = Rope(32, 1e6).to(device)
    cases = [(torch.float32, 1e-5), (torch.float16, 2e-3)] + ([(torch.bfloat16, 1.6e-2)] if device == "cuda" else [])
    for dtype, rtol in cases:
        cos, sin = rope.cos_sin(torch.tensor([0, 5, 77, 4000, 9], device=device), dtype)  # [5, 32]
        qkv = (torch.randn(5, 12, 32) * 2).to(device=device, dtype=dtype)  # q: heads 0-7, k: 8-9, v: 10-11
        q, k = qkv[:, :8], qkv[:, 8:10]  # strided views, as q_proj/k_proj outputs can be
        for normed in (True, False):
            qn, kn = RMSNorm(32, 1e-6).to(device=device, dtype=dtype), RMSNorm(32, 1e-6).to(device=device, dtype=dtype)
            with torch.no_grad():
                qn.weight.copy_(torch.randn(32) + 1), kn.weight.copy_(torch.randn(32) + 1)
            got_q, got_k = qk_norm_rope(q, k, qn.weight if normed else None, kn.weight if normed else None,
                                        1e-6, cos, sin)
            want_q = apply_rope_reference(qn.reference(q) if normed else q, cos, sin)
            want_k = apply_rope_reference(kn.reference(k) if normed else k, cos, sin)
            assert got_q.dtype == want_q.dtype and got_q.shape == want_q.shape and got_k.shape == want_k.shape
            torch.testing.assert_close(got_q, want_q, rtol=rtol, atol=4 * rtol)
            torch.testing.assert_close(got_k, want_k, rtol=rtol, atol=4 * rtol)
            # into given buffers (the prefill graphs' static ones): the same values, no new tensors;
            # buffers of another dtype are left alone and new tensors come back
            bufs = (torch.full_like(got_q, float("nan")), torch.full_like(got_k, float("nan")))
            args = (q, k, qn.weight if normed else None, kn.weight if normed else None, 1e-6, cos, sin)
            in_q, in_k = qk_norm_rope(*args, out=bufs)
            assert in_q.data_ptr() == bufs[0].data_ptr() and in_k.data_ptr() == bufs[1].data_ptr()
            assert torch.equal(in_q, got_q) and torch.equal(in_k, got_k)
            other = (bufs[0].double(), bufs[1].double())
            new_q, _ = qk_norm_rope(*args, out=other)
            assert new_q.data_ptr() != other[0].data_ptr() and torch.equal(new_q, got_q)
            # v copied in the same launch (a fused q/k/v projection's output), into a given buffer
            # or a new tensor, bit for bit; q and k at any number of heads a program as at one (the
            # norm's sum is reduced in another order when compiled: a rounding apart, run ET)
            v = qkv[:, 10:12]
            for hb in (1, 2, 4, 8, 16):
                vbuf = torch.full_like(v.contiguous(), float("nan"))
                into = kernel(*args, out=bufs + (vbuf,), v=v, heads_per_program=hb)
                assert into[0] is bufs[0] and into[1] is bufs[1] and into[2] is vbuf
                for y in (into, kernel(*args, v=v, heads_per_program=hb)):
                    assert len(y) == 3 and y[2].is_contiguous() and torch.equal(y[2], v)
                    torch.testing.assert_close(y[0], got_q, rtol=rtol, atol=4 * rtol)
                    torch.testing.assert_close(y[1], got_k, rtol=rtol, atol=4 * rtol)
                    if device == "cpu" or hb == 1:
                        assert torch.equal(y[0], got_q) and torch.equal(y[1], got_k)
                # k and v into the paged pool in the same launch: what store_kv writes, padding
                # rows (slot -1) and other slots untouched
                from engine.attention.triton_cache import store_kv
                slots = torch.tensor([9, -1, 3, 14, 0], device=device)
                kc, vc = (torch.full((4, 4, 2, 32), float("nan"), device=device, dtype=dtype) for _ in range(2))
                y = kernel(*args, v=v, heads_per_program=hb, store=(kc, vc, slots))
                wk, wv = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
                store_kv(y[1], y[2], wk, wv, slots)
                assert torch.equal(kc.nan_to_num(7.0), wk.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0),
                                                                                         wv.nan_to_num(7.0))
                assert kc.view(-1, 2, 32)[slots[slots >= 0]].isfinite().all() and kc.isnan().sum() == 12 * 64
            with pytest.raises(ValueError, match="store needs v"):
                kernel(*args, store=(kc, vc, slots))
            with pytest.raises(ValueError, match="v must be"):
                kernel(*args, v=v.double())
            with pytest.raises(ValueError, match="power of two"):
                kernel(*args, heads_per_program=3)


def check_merge_two(device):
    """merge_two (the cuDNN path's merge of a piece's own keys and its cached prefix) against the
    softmax over the union of both key sets, D not a power of two included."""
    from engine.attention import cudnn_prefill
    g = torch.Generator().manual_seed(3)
    for D in (16, 24):
        Q, Hq, K1, K2 = 5, 3, 7, 4
        q = torch.randn(Q, Hq, D, generator=g)
        k1, v1, k2, v2 = (torch.randn(n, Hq, D, generator=g) for n in (K1, K1, K2, K2))

        def part(k, v):
            s = torch.einsum("qhd,khd->hqk", q, k)  # [Hq, Q, K]
            return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v), torch.logsumexp(s, -1)

        (o1, l1), (o2, l2) = part(k1, v1), part(k2, v2)
        want = part(torch.cat([k1, k2]), torch.cat([v1, v2]))[0]
        out = torch.empty(Q, Hq, D, device=device)
        saved, cudnn_prefill._lse_to_e = cudnn_prefill._lse_to_e, 1.0
        try:
            cudnn_prefill.merge_two(o1.to(device), l1.to(device), o2.to(device), l2.to(device), out)
        finally:
            cudnn_prefill._lse_to_e = saved
        torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-5)


def _reference_cudnn_op(q, k, v, causal, scale):
    """cudnn_prefill._attend4's contract in plain torch ([B, H, rows, D] views; lse in base e): where
    cuDNN does not run (the CPU), so the packing and merging around it are checked there too."""
    G = q.shape[1] // k.shape[1]
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.repeat_interleave(G, 1).float()) * scale
    if causal:  # top-left, as cuDNN's
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return (torch.softmax(s, -1) @ v.repeat_interleave(G, 1).float()).to(q.dtype), torch.logsumexp(s, -1)


def check_cudnn_hit(device, dtype=torch.float32, atol=1e-4, heads=(8, 2), D=16, P=4, prefix=96, new=5,
                    splits=(1, 4), real_op=True):
    """cudnn_prefill.cudnn_hit (a suffix over adjacent pages: (query, head) rows, the prefix in
    slices as the op's batch, merged with the own keys' causal call) against the softmax over the
    whole prefix and the causal own keys. real_op=False: _reference_cudnn_op stands in for cuDNN's."""
    from engine.attention import cudnn_prefill
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(5)
    start = 2 * P  # the prefix starts at the pool's third block
    N = (start + prefix + new) // P + 2
    kc, vc = (torch.randn(N, P, Hkv, D, generator=g).to(device, dtype) for _ in range(2))
    q = torch.randn(new, Hq, D, generator=g).to(device, dtype)
    keys = slice(start, start + prefix + new)
    K, V = (c.view(-1, Hkv, D)[keys].repeat_interleave(Hq // Hkv, 1).float() for c in (kc, vc))
    s = torch.einsum("qhd,khd->hqk", q.float(), K) * D ** -0.5
    seen = torch.arange(prefix + new, device=device)[None, :] <= prefix + torch.arange(new, device=device)[:, None]
    want = torch.einsum("hqk,khd->qhd", torch.softmax(s.masked_fill(~seen, float("-inf")), -1), V)
    saved = cudnn_prefill._attend4, cudnn_prefill._lse_to_e
    if not real_op:
        cudnn_prefill._attend4, cudnn_prefill._lse_to_e = _reference_cudnn_op, 1.0
    try:
        for sp in splits:
            out = torch.full((new, Hq, D), float("nan"), device=device, dtype=dtype)
            cudnn_prefill.cudnn_hit(q, kc, vc, out, start, prefix, new, sp, D ** -0.5)
            torch.testing.assert_close(out.float(), want, rtol=0, atol=atol, msg=f"{sp} slices")
    finally:
        cudnn_prefill._attend4, cudnn_prefill._lse_to_e = saved


def _reverse_prefix_pages(P, kc, vc, meta):
    """Each piece's whole cached pages in the reverse order of their blocks, the pool's pages moved
    to match (the same keys at the same positions): as blocks freed tail-first come back."""
    kc2, vc2 = kc.clone(), vc.clone()
    for p in meta.prefills:
        full = (p.k_len - p.q_len) // P
        old = list(p.host_table)
        new = old[:full][::-1] + old[full:]
        for a, b in zip(new, old):
            kc2[a], vc2[a] = kc[b], vc[b]
        p.host_table = new
        p.block_table = torch.tensor(new, dtype=torch.long, device=kc.device)
    return kc2, vc2


def check_cudnn_prefix_views(device, dtype=torch.float32, atol=1e-4, heads=(4, 2), D=16, P=4, real_op=True):
    """cudnn_prefill's cached prefix read as a slice of the pool where its pages are one run of
    block ids (in order, or reversed as freed blocks come back) and gathered where they are not:
    each equals the reference, and the prefix's keys handed to the op are a view of the pool
    exactly for the layouts whose prefix pages are such a run (prefixes ending mid-page and on a
    page; pages in runs of 3, scattered). real_op=False: _reference_cudnn_op stands in for cuDNN's."""
    from engine.attention import cudnn_prefill
    pieces = [(96, 5), (42, 7), (0, 9), (8, 3)]
    saved = cudnn_prefill._attend4, cudnn_prefill._lse_to_e
    if not real_op:
        cudnn_prefill._attend4, cudnn_prefill._lse_to_e = _reference_cudnn_op, 1.0
    op = cudnn_prefill._attend4
    ways = set()
    try:
        for layout in ("in order", "reversed", "runs of 3", "scattered"):
            runs = {"runs of 3": 3, "scattered": 0}.get(layout, -1)
            q, k, v, kc, vc, meta = make_step(pieces, *heads, D, P, dtype, device, runs=runs)
            if layout == "reversed":
                kc, vc = _reverse_prefix_pages(P, kc, vc, meta)
            ref = paged_attention_reference(q, k, v, kc, vc, meta, D ** -0.5)  # stores the step's K/V
            seen = []

            def spy(q4, k4, v4, causal, scale):
                if not causal:  # the prefix's call
                    seen.append(k4.untyped_storage().data_ptr() == kc.untyped_storage().data_ptr())
                return op(q4, k4, v4, causal, scale)
            cudnn_prefill._attend4 = spy
            out = torch.zeros_like(q)
            assert cudnn_prefill.cudnn_prefill(q, k, v, kc, vc, out, meta.prefills, D ** -0.5), cudnn_prefill._broken
            cudnn_prefill._attend4 = op
            # a view exactly where the prefix's pages are one run of block ids (in any order, a
            # partial last page at its end); in order and reversed: every piece
            want = []
            for p in meta.prefills:
                off = p.k_len - p.q_len
                if off:
                    pages = p.host_table[:-(-off // P)]
                    want.append(sorted(pages) == list(range(min(pages), min(pages) + len(pages)))
                                and (off % P == 0 or pages[-1] == max(pages)))
            assert seen == want, (layout, seen, want)
            assert all(want) or layout not in ("in order", "reversed"), (layout, want)
            ways.update(seen)
            err = (out.float() - ref.float()).abs().max().item()
            assert err <= atol, f"max abs error {err}: {layout}"
    finally:
        cudnn_prefill._attend4, cudnn_prefill._lse_to_e = saved
    assert ways == {True, False}, ways


def test_adjacent_rows():
    """engine.attention.adjacent_rows: the first n keys' first pool row when their pages are one run
    of block ids in any order, with a partial last page at the run's end; else -1 (a gap, a
    duplicate, a partial page inside the run, a table too short or not known)."""
    from engine.attention import adjacent_rows
    assert adjacent_rows([5, 6, 7, 2], 12, 4) == 20  # three whole pages
    assert adjacent_rows([5, 6, 7, 2], 10, 4) == 20  # the last one partly
    assert adjacent_rows([7, 6, 5], 12, 4) == 20 and adjacent_rows([6, 5, 7], 12, 4) == 20  # any order
    assert adjacent_rows([6, 5, 7], 10, 4) == 20  # a partial page at the run's highest id
    assert adjacent_rows([7, 6, 5], 10, 4) == -1  # a partial page inside the run: its rest is not the prefix's
    assert adjacent_rows([5, 6, 7, 2], 13, 4) == -1  # a fourth page elsewhere
    assert adjacent_rows([5, 3, 7], 12, 4) == -1 and adjacent_rows([5, 5, 7], 12, 4) == -1
    assert adjacent_rows([9], 1, 16) == 144
    assert adjacent_rows([5, 6], 12, 4) == -1 and adjacent_rows(None, 4, 4) == -1 and adjacent_rows([], 0, 4) == -1


# (cached, new): cold prefill, prefix ending mid-page, one-token decodes of several lengths
def check_cudnn_buckets(Hq, Hkv, dtype):
    """Under attn.prefill_kernel auto, a step mixing pieces whose cached prefix is a multiple of
    CUDNN_ALIGN (cuDNN, queries padded to the bucket) and one whose prefix is not (FA2) matches the
    reference; cuDNN ran only the aligned pieces and with bucketed query lengths."""
    from engine.attention import cudnn_prefill, prefill_backend
    from engine.attention.cudnn_prefill import CUDNN_ALIGN
    q = torch.empty(1, Hq, 128, dtype=dtype, device="cuda")
    if prefill_backend(q, 1, "cudnn") != "cudnn":
        pytest.skip("cuDNN attention does not run here")
    from engine.attention import kernel_attention, prefill_inputs
    A = CUDNN_ALIGN
    pieces = [(2 * A, A + 188), (0, A + 388), (2 * A + 5, 600)]  # aligned, aligned (no prefix), not
    q, k, v, kc, vc, meta = make_step(pieces, Hq, Hkv, 128, 16, dtype, "cuda")
    ref = paged_attention_reference(q, k, v, kc.clone(), vc.clone(), meta, 128 ** -0.5)
    (meta.prefill_tables, meta.prefill_q_starts, meta.prefill_q_lens, meta.prefill_k_lens,
     meta.prefill_max_q, meta.prefill_max_k) = prefill_inputs(meta, 16, q.device)
    seen = []
    real = cudnn_prefill._attend4

    def spy(q, k, v, causal, scale):  # [1, heads, rows, D] views
        seen.append((q.shape[2], k.shape[2]))
        return real(q, k, v, causal, scale)
    cudnn_prefill._attend4 = spy
    try:
        out = kernel_attention(q, k, v, kc, vc, meta, 128 ** -0.5, prefill="auto")
    finally:
        cudnn_prefill._attend4 = real
    assert cudnn_prefill._broken is None, cudnn_prefill._broken
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= 2e-2, f"max abs error {err} under auto with bucketed cuDNN shapes"
    # own keys of the two aligned pieces and the first one's prefix, each padded to 2A queries;
    # nothing of the unaligned piece (its prefix 2A + 5 went to FA2)
    assert sorted(seen) == [(2 * A, 2 * A)] * 3, seen


def test_cudnn_rows_read_spare_rows_in_place_or_pad_with_zeros():
    """cudnn_prefill._rows: a piece's rows extended to its bucket: the rows after it where x has
    them, then `spare` rows of x's storage past its end (a view, no copy), else zero rows (a copy)."""
    pytest.importorskip("triton")
    from engine.attention.cudnn_prefill import _rows
    buf = torch.arange(12 * 2 * 3, dtype=torch.float32).reshape(12, 2, 3)  # a static buffer, 12 rows
    x = buf[:8]  # a bucket of 8 rows, 4 spare rows after it in the storage
    assert _rows(x, 2, 3, 5).data_ptr() == buf[2].data_ptr()  # rows after the piece inside x
    got = _rows(x, 5, 3, 6, spare=4)  # 5 + 6 = 11 rows: 3 past x's end, inside the spare rows
    assert got.shape == (6, 2, 3) and torch.equal(got, buf[5:11])
    assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # in place
    padded = _rows(x, 5, 3, 6)  # no spare rows: zero rows appended
    assert torch.equal(padded[:3], buf[5:8]) and not padded[3:].any()
    assert torch.equal(_rows(x, 5, 3, 12, spare=4)[:3], buf[5:8])  # past the spare rows too: padded
    assert not _rows(x, 5, 3, 12, spare=4)[3:].any()
    strided = buf[:8, :1]  # not contiguous: its storage rows hold other data; padded
    assert not _rows(strided, 5, 3, 6, spare=4)[3:].any()


RAGGED = [(0, 37), (21, 50), (5, 1), (130, 1), (64, 17), (1, 1), (77, 2)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,page,heads", [  # every dtype, page size and GQA ratio, 6 compiles
    (torch.bfloat16, 16, (8, 8)), (torch.bfloat16, 32, (16, 4)), (torch.bfloat16, 64, (32, 4)),
    (torch.float16, 16, (32, 4)), (torch.float16, 32, (8, 8)), (torch.float16, 64, (16, 4))],
    ids=["bf16-p16-gqa1", "bf16-p32-gqa4", "bf16-p64-gqa8", "fp16-p16-gqa8", "fp16-p32-gqa1", "fp16-p64-gqa4"])
def test_kernels_match_reference_cuda(dtype, page, heads):
    pytest.importorskip("triton")
    Hq, Hkv = heads
    check(RAGGED, Hq, Hkv, 128, page, dtype, "cuda", atol=2e-2)
    long = [(3000, 1), (2048 + 5, 300), (0, 700), (40, 1)] + [(i * 97, 1) for i in range(1, 33)]
    check(long, Hq, Hkv, 128, page, dtype, "cuda", atol=2e-2)
    check([(8000 + 7, 64)], Hq, Hkv, 128, page, dtype, "cuda", atol=2e-2)  # short suffix, long prefix
    if page == 16:  # auto: cuDNN for the aligned prefixes (padded queries), FA2 for the other piece
        check_cudnn_buckets(Hq, Hkv, dtype)
    if page == 16:
        check([(0, 1), (9, 1), (30, 20)], Hq, Hkv, 64, page, dtype, "cuda", atol=2e-2)  # smaller head_dim
        check_norm("cuda")
        check_one_wave()
        check_split_scratch("cuda")
        check_decode_bound("cuda")
        check_decode_bound("cuda", D=128, P=page, dtype=dtype, atol=2e-2)
        check_merge_live("cuda")
        check_fixed_plan("cuda")
        check_fixed_plan("cuda", torch.bfloat16, atol=2e-2)
        check_fixed_plan("cuda", torch.bfloat16, atol=2e-2, heads=(32, 4), D=128, NP=8, width=2200, T=64,
                         steps=([(32768 + 7, 64)], [(8000, 20), (100, 30), (0, 9)]))  # the engine's hit plan
        check_unmasked_loop("cuda")
        check_unmasked_loop("cuda", torch.bfloat16, atol=2e-2)
        check_tma("cuda", torch.bfloat16, atol=2e-2)
        check_tma("cuda", torch.bfloat16, atol=2e-2, heads=(32, 4), D=128)
        check_merge_two("cuda")
        check_qk_norm_rope("cuda")
        from engine.attention import prefill_backend
        if prefill_backend(torch.empty(1, Hq, 128, dtype=dtype, device="cuda"), 1, "cudnn") == "cudnn":
            check_cudnn_hit("cuda", dtype, atol=2e-2, heads=(32, 4), D=128, P=16, prefix=8192, new=64,
                            splits=(1, 8))
            check_cudnn_prefix_views("cuda", dtype, atol=2e-2, heads=(Hq, Hkv), D=128, P=page)


# Four subprocesses (each well under pytest's 300 s timeout on a 2-core runner: as one they took
# ~250 s alone, over 300 beside other work): the kernels' checks in three parts, the engine's dispatch.
INTERP_KERNELS = """
from tests.engine.test_attention_kernels import (check_decode_bound, check_fixed_plan, check_merge_live, check_norm,
                                                check_one_wave, check_split_scratch, check_unmasked_loop)
check_norm("cpu")
check_one_wave()
check_split_scratch("cpu")
check_decode_bound("cpu")
check_merge_live("cpu")
check_fixed_plan("cpu")
check_unmasked_loop("cpu")
print("ok")
"""

INTERP_TMA = """
from tests.engine.test_attention_kernels import check_tma
check_tma("cpu", full=False)
check_tma("cpu", P=12, full=False)  # key tiles of 32 that do not start on a page: the pointer loop throughout
print("ok")
"""

INTERP_PREFILL = """
import torch
from tests.engine.test_attention_kernels import (check, check_cudnn_hit, check_cudnn_prefix_views, check_merge_two,
                                                check_qk_norm_rope)
pieces = [(0, 9), (5, 6), (3, 1), (20, 1), (16, 3)]
for Hq, Hkv, P in ((2, 2, 16), (4, 1, 16), (8, 1, 32)):
    check(pieces, Hq, Hkv, 16, P, torch.float32, "cpu", atol=1e-4)
check([(0, 1), (40, 1)], 4, 2, 16, 16, torch.float16, "cpu", atol=2e-2)
check([(300, 5), (3, 1), (200, 1), (100, 20)], 4, 2, 16, 16, torch.float32, "cpu", atol=1e-4)
check_merge_two("cpu")
check_cudnn_hit("cpu", real_op=False)
check_cudnn_prefix_views("cpu", real_op=False)
check_qk_norm_rope("cpu")
print("ok")
"""

INTERP_ENGINE = """
import sys
from tests.engine.test_attention_kernels import count_paths, engine_tokens
calls = count_paths()
ref = engine_tokens(sys.argv[1], backend="reference")  # attn.backend is obeyed under the interpreter
assert calls["reference"] > 0 and calls["kernels"] == calls["norm"] == calls["rope"] == 0, calls
calls.update(dict.fromkeys(calls, 0))
got = engine_tokens(sys.argv[1])
assert calls["reference"] == 0 and min(calls["kernels"], calls["norm"], calls["rope"]) > 0, calls
assert got == ref, (got, ref)
split = engine_tokens(sys.argv[1], split_steps=True)  # prefill graphs' split, run without capture
assert split == ref, (split, ref)
print("ok")
"""


def count_paths() -> dict[str, int]:
    """Count the calls engine.layers makes to the kernels and to the reference attention (each
    call still runs the real function)."""
    import engine.layers as layers
    calls = {}
    for key, name in (("kernels", "kernel_attention"), ("norm", "rms_norm"), ("rope", "qk_norm_rope"),
                      ("reference", "paged_attention_reference")):
        def counted(*a, _fn=getattr(layers, name), _key=key, **kw):
            calls[_key] += 1
            return _fn(*a, **kw)
        calls[key] = 0
        setattr(layers, name, counted)
    return calls


def check_split_steps(eng, pg):
    """pg (engine.prefill_graphs' split, run without capture) with each step checked: it waited
    for every layer's load events (KVCache.layer) before that layer's attention, captured or not,
    and its hidden states equal the model's own forward over the same metadata. Returns pg."""
    split, kv_layer, waited = pg.forward, eng.kv.layer, []
    eng.kv.layer = lambda i: waited.append(i) or kv_layer(i)

    def checked(input_ids, meta):
        waited.clear()
        got = split(input_ids, meta).clone()
        assert waited == list(range(len(eng.model.model.layers))), waited
        want = eng.model(input_ids, meta, eng.kv.pool.layer)  # stores the same K/V (or latent rows) again
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return got
    pg.forward = checked
    return pg


def engine_tokens(path: str, split_steps: bool = False, **overrides) -> dict[str, list[int]]:
    """Greedy tokens of a ragged batch run twice (the second round hits the device pool).
    split_steps: every step goes through engine.prefill_graphs' pieces (padded to a bucket, static
    buffers, attention between them or, in steps of prefill pieces only, inside them) without
    capturing graphs."""
    from engine import LLMEngine, SamplingParams
    from engine.prefill_graphs import PrefillGraphs
    from kvc.config import load_config
    eng = LLMEngine(load_config().replace(path=path, device="cpu", page_size=4, chunk_size=8,
                                          num_device_blocks=64, gpu_only=True, **overrides))
    if split_steps:
        eng.runner.graphs = None  # decode steps too
        eng.runner.prefill_graphs = check_split_steps(eng, PrefillGraphs(eng.model, eng.kv, eng.device, 64,
                                                                         capture=False, max_model_len=64))
    prompts = [[(i * 7 + 3) % 250 for i in range(13)], [(i * 5 + 1) % 250 for i in range(6)]]
    out = {}
    for r in range(2):
        for i, p in enumerate(prompts):
            eng.add_request(f"{r}{i}", p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        while eng.has_unfinished():
            out.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
    if split_steps:  # steps of prefill pieces only ran their attention inside the pieces, mixed ones not
        pg = eng.runner.prefill_graphs
        assert pg.replays > pg.attention_replays > 0, (pg.replays, pg.attention_replays)
    return out


def _interpret(script: str, *args: str) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    r = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=290)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_kernels_match_reference_interpreter():
    """The kernels on CPU tensors under triton's interpreter, against the reference: norms, decode,
    merges, plans."""
    _interpret(INTERP_KERNELS)


def test_tma_kernels_match_reference_interpreter():
    """The prefill kernel's TMA tiles (and its pointer loop where a tile does not start on a page)."""
    _interpret(INTERP_TMA)


def test_prefill_kernels_match_reference_interpreter():
    """The same for the prefill pieces (ragged, GQA, fp16), the merge of two, cuDNN's packing, q/k
    norm + RoPE."""
    _interpret(INTERP_PREFILL)


def test_engine_kernel_dispatch_interpreter(qwen_dir):
    """The engine's kernel dispatch under triton's interpreter: attn.backend obeyed, the kernels'
    tokens equal the reference's, the prefill graphs' split too."""
    _interpret(INTERP_ENGINE, str(qwen_dir))


def test_attn_backend_config_reaches_the_layers_cpu(qwen_dir):
    """attn.backend / attn.prefill_kernel from the config land on every norm and attention layer;
    on CPU (no interpreter) both backends run the reference path, so the tokens are equal."""
    from engine import LLMEngine
    from engine.layers import Attention, RMSNorm
    from kvc.config import load_config
    eng = LLMEngine(load_config().replace(path=str(qwen_dir), device="cpu", num_device_blocks=64, gpu_only=True,
                                          backend="reference", prefill_kernel="triton"))
    attn = [m for m in eng.model.modules() if isinstance(m, Attention)]
    norms = [m for m in eng.model.modules() if isinstance(m, RMSNorm)]
    assert attn and norms and eng.runner.graphs is None
    assert all(m.backend == "reference" and m.prefill_kernel == "triton" for m in attn)
    assert all(m.backend == "reference" for m in norms)
    assert engine_tokens(str(qwen_dir), backend="reference") == engine_tokens(str(qwen_dir))
