"""One MLA layer's attention for a prefill piece after cached tokens, three ways side by side.

DeepSeek-V2-Lite's sizes (16 heads, kv_lora 512, rope 64, nope 128, v 128), random weights and
latents; a piece of Q queries at the end of K latents (K - Q cached tokens before it):

- mask:   expanded through kv_b_proj, SDPA with a boolean [Q, K] mask (the path before 2026-12-05)
- bias:   expanded, SDPA with the bottom-right causal bias (the engine's path for long pieces)
- latent: absorbed into latent space as decode over gathered rows, as two GEMMs over fp32 scores
          (MLAttention._absorbed_piece, the CPU's path below MLAttention.absorb_below; SDPA with a
          [rows, K] mask before the thirty-ninth session); checked against the bias path first, its
          largest difference printed
- kernel: absorbed, the Triton kernel over the paged pool (engine.attention.triton_mla; CUDA only,
          the path below half of absorb_below, engine.mla.ABSORB_PIECES)

Then decode (--decode BxK: B sequences of K keys, one query each, pages of 16 in a shuffled pool):
the gather of the rows + SDPA with a padding mask (the path before the kernel) against the kernel.

--tiles MxNxWxS ... (CUDA): the kernel's launch for pieces of at least M rows swept on the
--tile-shapes pieces: M rows a program, N keys a tile, W warps, S pipeline stages, a column each
(the first is the reference: each other's largest difference from it is printed; a tile that does
not fit the GPU's shared memory or registers prints its error's name). Each call is captured in a
CUDA graph and replayed, so the cells are GPU time even where the call's host work (~0.5 ms on an
H100 host: the query's absorption, the launches) is longer than its kernels. --decode-tiles
MxNxWxS ... does the same for decode's launch (engine.attention.triton_mla.BLOCK_M and DECODE_*)
on the --decode-tile-shapes batches (BxK: B decodes over K keys each); MxNxWxS@T also sets the
programs the split-K launch aims at (triton_mla.DECODE_TARGET_PROGRAMS; default
engine.attention.triton_merge.TARGET_PROGRAMS) to T.

Prints ms per call (CUDA: GPU time over --iters calls after a warm-up; CPU: wall time).

    python benchmarks/bench_mla_pieces.py                       # CUDA if present, bf16
    python benchmarks/bench_mla_pieces.py --device cpu --shapes 64x4096 16x2048 --decode 4x4096
    python benchmarks/bench_mla_pieces.py --shapes --decode --tiles 64x32x8x2 64x64x8x2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import mla  # noqa: E402
from engine.attention import triton_mla  # noqa: E402
from engine.layers import AttnMetadata, Piece  # noqa: E402
from engine.model_args import ModelArgs  # noqa: E402
from engine.tiny import tiny_config  # noqa: E402


def timed(fn, device: torch.device, iters: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--shapes", nargs="*", default=["64x8192", "64x32768", "16x32768", "128x32768",
                                                     "185x32768", "512x32768", "2048x32768", "8192x32768",
                                                     "16x8192", "32x8192", "32x32768"],
                    help="QxK: Q queries after K - Q cached tokens")
    ap.add_argument("--decode", nargs="*", default=["1x8192", "1x32768", "8x32768", "32x8192", "32x32768"],
                    help="BxK: B decodes over K keys each")
    ap.add_argument("--block-m", type=int, nargs="+", default=[16],
                    help="the kernel's rows a program (engine.attention.triton_mla's BLOCK_M and PIECE_BLOCK_M), "
                         "a column each")
    ap.add_argument("--tiles", nargs="*", default=[],
                    help="MxNxWxS: the pieces' kernel launch (rows a program, keys a tile, warps, stages), a "
                         "column each on --tile-shapes; the first is the reference")
    ap.add_argument("--tile-shapes", nargs="+", default=["64x32768", "64x8192", "128x32768", "16x32768"],
                    help="QxK pieces for --tiles")
    ap.add_argument("--decode-tiles", nargs="*", default=[],
                    help="MxNxWxS: decode's kernel launch, a column each on --decode-tile-shapes; the first is the "
                         "reference")
    ap.add_argument("--decode-tile-shapes", nargs="+", default=["1x32768", "8x32768", "16x32768", "32x32768",
                                                                "32x8192"],
                    help="BxK decode batches for --decode-tiles")
    ap.add_argument("--decode-tile-bound", type=int, default=0,
                    help="the host bound on the keys handed to decode's launch (the engine's CUDA graphs hand it "
                         "max_model_len, 163,840 for V2-Lite: the slices come from it); default each shape's K")
    ap.add_argument("--iters", type=int, default=None, help="default: 20 on cuda, 3 on cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    iters = a.iters or (20 if device.type == "cuda" else 3)
    torch.manual_seed(0)
    cfg = tiny_config("deepseek_v2", "deepseek-v2-lite-shapes", num_hidden_layers=1)
    layer = mla.MLAttention(ModelArgs.from_dict(cfg)).to(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# one MLA layer, V2-Lite sizes, {dtype}, {name}, torch {torch.__version__}; "
          f"latent form taken below {layer.absorb_below} queries")
    kernel = device.type == "cuda"
    block_m = triton_mla.BLOCK_M, triton_mla.PIECE_BLOCK_M
    kms = [f"kernel{m} ms" for m in a.block_m]
    kr = [f"kernel{m} / bias" for m in a.block_m]
    head = ["Q x K", "mask ms", "bias ms", "latent ms", *kms, "bias / mask", "latent / bias", *kr,
            "latent max diff"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    P, W = 16, layer.r + layer.dr
    with torch.inference_mode():
        for shape in a.shapes:
            Q, K = (int(v) for v in shape.split("x"))
            q = torch.randn(Q, layer.heads, layer.dn + layer.dr, device=device, dtype=dtype)
            pool, table = paged(K, P, W, device, dtype)
            lat = pool[table].reshape(-1, W)[:K]
            ms = {}
            for path, lower_right in (("mask", False), ("bias", True)):
                mla.LOWER_RIGHT = lower_right
                ms[path] = timed(lambda: layer._expanded(q, lat, K - Q, None, 0.1), device, iters)
            mla.LOWER_RIGHT = True
            ms["latent"] = timed(lambda: layer._absorbed_piece(q, lat, 0.1), device, iters)
            piece = Piece(0, Q, K, table)
            k_ms = []
            for m in a.block_m:
                triton_mla.BLOCK_M = triton_mla.PIECE_BLOCK_M = m
                k_ms.append(timed(lambda: layer._kernel_piece(q, pool, piece, 0.1), device, iters) if kernel else 0)
            triton_mla.BLOCK_M, triton_mla.PIECE_BLOCK_M = block_m
            want = layer._expanded(q, lat, K - Q, None, 0.1).float()
            diff = (layer._absorbed_piece(q, lat, 0.1).float() - want).abs().max().item()
            cells = [f"{Q} x {K}", f"{ms['mask']:.3f}", f"{ms['bias']:.3f}", f"{ms['latent']:.3f}",
                     *[f"{t:.3f}" if kernel else "-" for t in k_ms], f"{ms['bias'] / ms['mask']:.2f}x",
                     f"{ms['latent'] / ms['bias']:.2f}x", *[f"{t / ms['bias']:.2f}x" if kernel else "-" for t in k_ms],
                     f"{diff:.4f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
        if kernel:
            how = "torch.mm out_dtype fp32" if mla._MM_OUT_DTYPE == [True] else "fp32 GEMM"
            print(f"(the latent form's scores: {how})")
        sweeps = kernel or os.environ.get("TRITON_INTERPRET") == "1"  # CPU: the interpreter's smoke runs
        if a.tiles and sweeps:
            sweep_tiles(layer, a.tiles, a.tile_shapes, device, dtype, iters)
        if a.decode_tiles and sweeps:
            sweep_decode_tiles(layer, a.decode_tiles, a.decode_tile_shapes, device, dtype, iters, a.decode_tile_bound)
        if not a.decode:
            return
        print("\n| decode B x K | gather + SDPA ms | kernel ms | kernel / gather |\n|---|---|---|---|")
        for shape in a.decode:
            B, K = (int(v) for v in shape.split("x"))
            pool, tables, lens, q = decode_batch(layer, B, K, device, dtype)
            nb = tables.shape[1]
            meta = AttnMetadata(positions=lens - 1, slot_mapping=lens, prefills=[], decode_rows=torch.arange(
                B, device=device), decode_tables=tables, decode_lens=lens, decode_max_len=K)

            def gathered():
                rows = pool[tables].reshape(B, nb * P, W)
                valid = torch.arange(nb * P, device=device)[None, :] < lens[:, None]
                return layer._absorbed(q, rows, valid, 0.1)
            ms_g = timed(gathered, device, iters)
            if kernel:
                ms_k = timed(lambda: layer._kernel_decode(q, pool, meta, 0.1), device, iters)
                print(f"| {B} x {K} | {ms_g:.3f} | {ms_k:.3f} | {ms_k / ms_g:.2f}x |", flush=True)
            else:
                print(f"| {B} x {K} | {ms_g:.3f} | - | - |", flush=True)


def timed_graph(fn, iters: int, device: torch.device) -> float:
    """GPU ms of fn as one captured CUDA graph replayed iters times (CPU: wall ms a call, for the
    interpreter's smoke runs)."""
    if device.type != "cuda":
        return timed(fn, device, iters)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()  # compiled and allocated before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def tile_cell(cells: list, t: float, o: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """A sweep's cell: ms, and past the first tile the largest difference of o from ref (the
    first tile's output, returned)."""
    o = o.float()
    cells.append(f"{t:.3f}" if ref is None else f"{t:.3f} ({(o - ref).abs().max().item():.4f})")
    return o if ref is None else ref


def sweep_tiles(layer, tiles: list[str], shapes: list[str], device, dtype, iters: int) -> None:
    """The pieces' kernel under each tile (module doc), ms per call and the largest difference from
    the first tile's output."""
    keep = (triton_mla.PIECE_BLOCK_M, triton_mla.PIECE_BLOCK_N, triton_mla.PIECE_WARPS, triton_mla.PIECE_STAGES)
    print(f"\n(the engine's tile: {'x'.join(map(str, keep))}; cells: GPU ms a call (CUDA graph replays), then "
          f"the largest difference from {tiles[0]})")
    print("| Q x K | " + " | ".join(tiles) + " |\n" + "|---" * (len(tiles) + 1) + "|")
    P, W = 16, layer.r + layer.dr
    try:
        for shape in shapes:
            Q, K = (int(v) for v in shape.split("x"))
            q = torch.randn(Q, layer.heads, layer.dn + layer.dr, device=device, dtype=dtype)
            pool, table = paged(K, P, W, device, dtype)
            piece = Piece(0, Q, K, table)
            ref, cells = None, []
            for tile in tiles:
                m, n, w, st, _ = tile_spec(tile)
                (triton_mla.PIECE_BLOCK_M, triton_mla.PIECE_BLOCK_N, triton_mla.PIECE_WARPS,
                 triton_mla.PIECE_STAGES) = m, n, w, st
                triton_mla._TOO_BIG.clear()
                try:
                    t = timed_graph(lambda: layer._kernel_piece(q, pool, piece, 0.1), iters, device)
                except Exception as e:
                    cells.append(type(e).__name__)
                    continue
                if triton_mla._TOO_BIG:  # past the GPU's shared memory or registers: the engine falls back
                    cells.append("OutOfResources")
                    continue
                ref = tile_cell(cells, t, layer._kernel_piece(q, pool, piece, 0.1), ref)
            print(f"| {Q} x {K} | " + " | ".join(cells) + " |", flush=True)
    finally:
        triton_mla.PIECE_BLOCK_M, triton_mla.PIECE_BLOCK_N, triton_mla.PIECE_WARPS, triton_mla.PIECE_STAGES = keep
        triton_mla._TOO_BIG.clear()


def sweep_decode_tiles(layer, tiles: list[str], shapes: list[str], device, dtype, iters: int, bound: int = 0) -> None:
    """Decode's kernel (as _kernel_decode calls it: query absorption, kernel, merge, output
    absorption) under each tile, GPU ms a call as CUDA graph replays and the largest difference from
    the first tile's output; a tile past the GPU's resources prints its error's name."""
    engine_tile = (triton_mla.BLOCK_M, triton_mla.DECODE_BLOCK_N, triton_mla.DECODE_WARPS, triton_mla.DECODE_STAGES)
    print(f"\n(decode's tile: {'x'.join(map(str, engine_tile))}; cells: GPU ms a call (CUDA graph "
          f"replays), then the largest difference from {tiles[0]}; keys bound {bound or 'K'})")
    print("| decode B x K | " + " | ".join(tiles) + " |\n" + "|---" * (len(tiles) + 1) + "|")
    totals = dict.fromkeys(tiles, 0.0)  # ms summed over the shapes; None once a tile failed one
    for shape in shapes:
        decode_tile_row(layer, shape, tiles, totals, device, dtype, iters, bound)
    ran = {t: v for t, v in totals.items() if v is not None}
    if ran:
        print("sum over the shapes, ms: " + ", ".join(f"{t} {v:.3f}" for t, v in ran.items()))
        print(f"quickest decode tile: {min(ran, key=ran.get)}")


def decode_tile_row(layer, shape: str, tiles: list[str], totals: dict, device, dtype, iters: int,
                    bound: int) -> None:
    """One --decode-tile-shapes row of sweep_decode_tiles (each tile's ms added to totals)."""
    B, K = (int(v) for v in shape.split("x"))
    pool, tables, lens, q = decode_batch(layer, B, K, device, dtype)
    idx = torch.arange(B, dtype=torch.int32, device=device), torch.ones(B, dtype=torch.int32, device=device)
    ref, cells = None, []
    for tile in tiles:
        m, n, w, st, target = tile_spec(tile)

        def call():
            qf = layer._absorb_query(q, pool.dtype)
            o = q.new_empty(B, layer.heads, layer.r)
            triton_mla.mla_attention(qf, pool, layer.r, idx[0], idx[1], lens, tables, 1, max(bound, K), 0.1, o,
                                     block_m=m, block_n=n, num_warps=w, num_stages=st, target_programs=target)
            return torch.einsum("bhr,hvr->bhv", o, layer._w_kv_b()[1])
        try:
            t = timed_graph(call, iters, device)
        except Exception as e:  # a tile past the GPU's shared memory or registers
            cells.append(type(e).__name__)
            totals[tile] = None
            continue
        ref = tile_cell(cells, t, call(), ref)
        if totals[tile] is not None:
            totals[tile] += t
    print(f"| {B} x {K} | " + " | ".join(cells) + " |", flush=True)


def tile_spec(text: str) -> tuple:
    """'MxNxWxS[@T]' (rows a program, keys a tile, warps, stages; programs the split-K launch aims
    at) -> (M, N, W, S, T or None); ValueError naming the text otherwise."""
    launch, _, target = text.partition("@")
    try:
        m, n, w, st = (int(v) for v in launch.split("x"))
        return m, n, w, st, int(target) if target else None
    except ValueError:
        raise ValueError(f"tile {text!r} is not MxNxWxS[@T] (e.g. 16x64x4x3@1024)") from None


def decode_batch(layer, B: int, K: int, device, dtype, P: int = 16):
    """B decodes over K keys each: a shuffled pool of pages of P (paged), block tables [B, ceil(K / P)],
    key counts [B] and queries [B, h, dn + dr]."""
    pool, table = paged(B * K, P, layer.r + layer.dr, device, dtype)
    nb = (K + P - 1) // P
    lens = torch.full((B,), K, dtype=torch.long, device=device)
    q = torch.randn(B, layer.heads, layer.dn + layer.dr, device=device, dtype=dtype)
    return pool, table[:B * nb].view(B, nb), lens, q


def paged(K: int, P: int, W: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool [N, P, 1, W] of random latents and a shuffled block table [ceil(K / P)] over it."""
    nb = (K + P - 1) // P
    pool = torch.randn(nb + 1, P, 1, W, device=device, dtype=dtype)
    return pool, torch.randperm(nb + 1, device=device)[:nb]


if __name__ == "__main__":
    main()
