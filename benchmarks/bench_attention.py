"""Prefill attention of a short suffix over a long cached prefix: the device-hit step's attention.

A device hit of 32K cached tokens + 64 new ones runs one prefill piece of 64 queries whose keys are
the whole 32K prefix: in the engine (12 layers of Qwen3-30B-A3B shapes: 32 query heads over 4 kv
heads, head_dim 128, page 16, bf16) that attention is the step's largest cost after the MoE weights.
This script times one layer's attention for such pieces, reading the pool in place through a block
table, and prints a table: the Triton kernel with pointer loads (split-K and the merge) over a
shuffled table, with every key tile through the masks (the kernel before its unmasked loop), with
P.V accumulated inside the dot (acc_dot), and over pages in table order (what the gather costs);
the engine's kernel (key tiles whose pages are adjacent read as TMA boxes) over scattered pages
(the adjacency check's cost), pages in table order, in reverse table order and pages in runs of one prefill chunk's
blocks; cuDNN over (query, head) rows with the prefix cut into slices that run as the op's batch
(pages adjacent: cudnn_prefill.cudnn_hit); without --no-sweep, slice counts and tile overrides; and
the cuDNN pair (prefix gathered, queries padded to 512) where it runs. Every variant is checked
against the first one before it is timed; GPU time (launches queued behind a sleep kernel) and the
host time of a launch are both given. A last table (CUDA) gives the host time of one launch, alone
and beside a thread that waits for copies as a cpu hit's loader does.

    python benchmarks/bench_attention.py                  # CUDA
    python benchmarks/bench_attention.py --device cpu --prefix 300 --new 5 --iters 1   # smoke (interpreter)
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TILES = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2),
         (256, 64, 8, 2)]
SLEEP_MS = 100.0  # the sleep kernel ahead of timed launches; its cycles at the H200's ~1.98 GHz
SLEEP_CYCLES = int(SLEEP_MS * 1.98e6)
TMA_TILES = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4)]  # with the engine's slices
RUN = 128  # blocks of one 2,048-token prefill chunk at page 16: handed out ascending, one run
HIT_SPLITS = [2, 4, 8, 16]  # cudnn_hit's prefix slices: Hkv x (new x G / 128) x slices programs (64 new: 16 a slice)
SPLITS = [4, 8, 16, 32, 64, 128]  # key slices (before run AY the engine filled 512 programs: 32 slices at 64 new
# tokens, 128 at 16; now about one wave of programs: 8 and 33)


def make(prefix: int, new: int, Hq: int, Hkv: int, D: int, P: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K = prefix + new
    nb = -(-K // P)
    N = nb + 8
    kc = (torch.randn(N, P, Hkv, D, generator=g) * 0.5).to(device=device, dtype=dtype)
    vc = torch.randn(N, P, Hkv, D, generator=g).to(device=device, dtype=dtype)
    table = torch.randperm(N, generator=g)[:nb].to(torch.int32)  # scattered pages, as a pool holds them
    q = torch.randn(new, Hq, D, generator=g).to(device=device, dtype=dtype)
    i32 = dict(dtype=torch.int32, device=device)
    return dict(q=q, kc=kc, vc=vc, tables=table[None].to(device), starts=torch.zeros(1, **i32),
                q_lens=torch.tensor([new], **i32), k_lens=torch.tensor([K], **i32), table=table.to(device),
                prefix=prefix, new=new)


def run_triton(x, out, scale, unmasked=True, tiles=None, scratch=None, splits=None, acc_dot=False, tma=None):
    from engine.attention.triton_prefill import prefill_attention  # after TRITON_INTERPRET is set (CPU)
    prefill_attention(x["q"], x["kc"], x["vc"], out, x["tables"], x["starts"], x["q_lens"], x["k_lens"],
                      x["new"], scale, x["prefix"] + x["new"], scratch=scratch, unmasked=unmasked, tiles=tiles,
                      splits=splits, acc_dot=acc_dot, tma=tma)


def run_cudnn(x, out, scale):
    from engine.attention.cudnn_prefill import cudnn_prefill
    from engine.layers import Piece
    p = Piece(0, x["new"], x["prefix"] + x["new"], x["table"], None)  # no host table: the prefix gathered
    T = x["new"]
    # the piece's own keys: the last `new` keys of the table, as the engine passes the step's k/v
    flat_k = x["kc"].view(-1, *x["kc"].shape[2:])
    flat_v = x["vc"].view(-1, *x["vc"].shape[2:])
    P = x["kc"].shape[1]
    pos = torch.arange(x["prefix"], x["prefix"] + T, device=out.device)
    slots = x["table"][pos // P].long() * P + pos % P
    if not cudnn_prefill(x["q"], flat_k[slots], flat_v[slots], x["kc"], x["vc"], out, [p], scale):
        raise RuntimeError("cuDNN attention did not run")


def run_cudnn_hit(xs, out, scale, splits):
    """cudnn_prefill.cudnn_hit over xs, whose pages are in table order (block i at pool block i: the
    prefix and the suffix's own keys at adjacent rows from 0)."""
    from engine.attention.cudnn_prefill import cudnn_hit
    cudnn_hit(xs["q"], xs["kc"], xs["vc"], out, 0, xs["prefix"], xs["new"], splits, scale)


def timed(fn, iters: int, device) -> tuple[float, float]:
    """(GPU ms a call, host ms a call) of fn() over iters calls after two warm-up calls. The GPU time
    is taken between CUDA events with the calls queued behind a sleep kernel, so it is the kernels'
    own time even where launching them takes longer than running them (run AX's 8K rows, timed
    without the sleep, read the host's launch rate: the same kernel 0.087 and 0.201 ms). The host
    time is the loop's wall time to launch them. On CPU (the interpreter's smoke run) both are the
    wall time."""
    fn()
    fn()
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        ms = (time.perf_counter() - t) / iters * 1e3
        return ms, ms
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(SLEEP_CYCLES)  # the launches below queue up behind it
    a.record()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t) / iters * 1e3
    b.record()
    b.synchronize()
    gpu = a.elapsed_time(b) / iters
    if host * iters >= SLEEP_MS:  # the sleep ended before the last launch: the GPU may have waited
        gpu = float("nan")
    return gpu, host


def decode_table(args, device, dtype, scale) -> None:
    """Split-K decode attention (one query a sequence) at long contexts, one layer: slices sized from
    the batch's longest context (an eager step's bound) against a decode graph's bound (the model's
    length), whose slices either cut each sequence's own keys (the engine's) or are a fixed size
    from the bound (the kernel before run EX). Each row checked against the first."""
    from engine.attention.triton_decode import decode_attention
    Hq, Hkv, D, P = args.heads[0], args.heads[1], args.head_dim, args.page
    print("\n| sequences x context | variant | GPU ms a layer | K/V GB/s | x the K/V read at 4.8 TB/s | "
          "host ms a launch | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for ctx in args.decode_context:
        for B in args.decode_batch:
            g = torch.Generator().manual_seed(0)
            nb = -(-ctx // P)
            kc = torch.randn(B * nb, P, Hkv, D, generator=g).to(device=device, dtype=dtype)
            vc = torch.randn(B * nb, P, Hkv, D, generator=g).to(device=device, dtype=dtype)
            tables = torch.randperm(B * nb, generator=g).to(torch.int32).view(B, nb).to(device)
            q = torch.randn(B, Hq, D, generator=g).to(device=device, dtype=dtype)
            rows = torch.arange(B, device=device)
            lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
            kv_bytes = 2 * B * ctx * Hkv * D * kc.element_size()
            base = None
            for label, bound, per in ((f"slices from the context ({ctx:,}: an eager step)", ctx, True),
                                      (f"a graph's bound ({args.decode_bound:,}), each sequence's keys sliced",
                                       args.decode_bound, True),
                                      (f"a graph's bound ({args.decode_bound:,}), slices fixed from the bound "
                                       "(before run EX)", args.decode_bound, False)):
                out = torch.empty_like(q)

                def fn():
                    decode_attention(q, kc, vc, out, rows, tables, lens, bound, scale, per_sequence=per)
                fn()
                if base is None:
                    base = out.clone()
                diff = (out.float() - base.float()).abs().max().item()
                ms, host = timed(fn, args.iters, device)
                print(f"| {B} x {ctx:,} | {label} | {ms:.4f} | {kv_bytes / ms / 1e6:,.0f} | "
                      f"{ms / (kv_bytes / 4.8e12 * 1e3):.2f}x | {host:.4f} | {diff:.2e} |", flush=True)


def launch_table(x, scale, device, calls: int = 200) -> None:
    """Host time of one prefill_attention call (the split-K kernel and the merge, launched, not run)
    with the engine's thread alone, and beside a thread that waits for a side stream's copies as a
    cpu hit's loader waits for its verdict: by Event.synchronize, or by polling Event.query with
    short sleeps. Run AW's 8K cpu hit launched its 64-token step in 7.9 ms while its loader waited
    in an event synchronize (run AV's 8K device hit took 6.7 ms to its token in all)."""
    src = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)  # a ~1.2 ms copy at ~55 GB/s
    dst = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    side = torch.cuda.Stream(device)
    out, scratch = torch.empty_like(x["q"]), {}

    def waiter(stop: threading.Event, how: str) -> None:
        while not stop.is_set():
            with torch.cuda.stream(side):
                dst.copy_(src, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(side)
            if how == "synchronize":
                ev.synchronize()
            else:
                while not ev.query():
                    time.sleep(5e-5)

    print("\n| host time of one prefill_attention call (launched, not run) | us | x alone |\n|---|---|---|")
    alone = None
    for how in ("alone", "synchronize", "query"):
        stop = threading.Event()
        th = None if how == "alone" else threading.Thread(target=waiter, args=(stop, how), daemon=True)
        if th is not None:
            th.start()
            time.sleep(0.05)
        per = []
        for _ in range(5):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            for _ in range(calls):
                run_triton(x, out, scale, scratch=scratch)
            per.append((time.perf_counter() - t) / calls * 1e6)
        us = sorted(per)[len(per) // 2]
        stop.set()
        if th is not None:
            th.join()
        alone = alone or us
        label = {"alone": "the engine's thread alone",
                 "synchronize": "beside a thread waiting on side-stream copies by Event.synchronize",
                 "query": "beside a thread waiting on the same copies by Event.query + 50 us sleeps"}[how]
        print(f"| {label} | {us:.1f} | {us / alone:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prefix", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--new", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 4], metavar=("HQ", "HKV"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--layers", type=int, default=12, help="the per-step column multiplies by this")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-sweep", action="store_true", help="only the engine's kernel, the masked one and cuDNN")
    ap.add_argument("--no-launch", action="store_true", help="no table of the launch's host time (CUDA)")
    ap.add_argument("--decode", action="store_true", help="only the decode table (split-K decode attention)")
    ap.add_argument("--decode-context", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--decode-bound", type=int, default=40960,
                    help="a decode graph's bound on the context: the model's length (Qwen3-30B-A3B's 40,960)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    Hq, Hkv, D = args.heads[0], args.heads[1], args.head_dim
    commit = os.environ.get("KVC_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=Path(__file__).parents[1]).stdout.strip()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"# {name}, torch {torch.__version__}, commit {commit}, {datetime.date.today()}; "
          f"Hq {Hq}, Hkv {Hkv}, head_dim {D}, page {args.page}, {dtype}; ms per layer (mean of {args.iters})")
    scale = D ** -0.5
    if device.type == "cuda":  # clocks up before the first row (run AV's first row read 1.9x its repeat)
        a = torch.randn(4096, 4096, device=device, dtype=dtype)
        t = time.perf_counter()
        while time.perf_counter() - t < 1.0:
            a @ a
        torch.cuda.synchronize()
    if args.decode:
        decode_table(args, device, dtype, scale)
        return
    print("| cached + new | variant | GPU ms a layer | x the engine's | TFLOP/s | GPU ms a step of "
          f"{args.layers} layers | host ms a launch | max abs diff vs the engine's |")
    print("|---|---|---|---|---|---|---|---|")
    for prefix in args.prefix:
        for new in args.new:
            x = make(prefix, new, Hq, Hkv, D, args.page, dtype, device)
            flop = 4.0 * new * Hq * (prefix + new / 2) * D
            # the same keys with the pages in table order (block i at pool slot i), and in runs of
            # RUN blocks placed in a shuffled order (what one prefill chunk's fresh blocks are)
            nb = x["table"].numel()
            xs = dict(x, kc=x["kc"][x["table"].long()].contiguous(), vc=x["vc"][x["table"].long()].contiguous())
            xs["table"] = torch.arange(nb, dtype=torch.int32, device=device)
            xs["tables"] = xs["table"][None]
            g = torch.Generator().manual_seed(1)
            starts = torch.randperm(-(-nb // RUN), generator=g) * RUN
            xr = dict(x, table=(starts[:, None] + torch.arange(RUN)).reshape(-1)[:nb].to(torch.int32).to(device))
            pool = (len(starts) * RUN, *x["kc"].shape[1:])  # every run's blocks, the last run's unused ones too
            xr["kc"] = x["kc"].new_zeros(pool).index_copy_(0, xr["table"].long(), xs["kc"][:nb])
            xr["vc"] = x["vc"].new_zeros(pool).index_copy_(0, xr["table"].long(), xs["vc"][:nb])
            xr["tables"] = xr["table"][None]
            # pages in reverse table order (block i at pool slot nb-1-i): a sequence freed tail-first
            # and handed out again
            xv = dict(x, kc=xs["kc"].flip(0).contiguous(), vc=xs["vc"].flip(0).contiguous())
            xv["table"] = torch.arange(nb - 1, -1, -1, dtype=torch.int32, device=device)
            xv["tables"] = xv["table"][None]
            variants = [("Triton, pointer loads (the engine's kernel before TMA)",
                         lambda o, s: run_triton(x, o, scale, scratch=s, tma=False)),
                        ("Triton, every tile masked, pointer loads",
                         lambda o, s: run_triton(x, o, scale, unmasked=False, scratch=s, tma=False)),
                        ("Triton, pointer loads, P.V accumulated inside the dot (acc_dot)",
                         lambda o, s: run_triton(x, o, scale, scratch=s, acc_dot=True, tma=False)),
                        ("Triton, pointer loads, pages in table order",
                         lambda o, s: run_triton(xs, o, scale, scratch=s, tma=False)),
                        ("Triton, the engine's (TMA where adjacent), pages scattered (pointer loads after the check)",
                         lambda o, s: run_triton(x, o, scale, scratch=s)),
                        ("Triton, the engine's (TMA where adjacent), pages in table order",
                         lambda o, s: run_triton(xs, o, scale, scratch=s)),
                        (f"Triton, the engine's (TMA where adjacent), pages in runs of {RUN} blocks, runs shuffled",
                         lambda o, s: run_triton(xr, o, scale, scratch=s)),
                        ("Triton, the engine's (TMA where adjacent), pages in reverse table order",
                         lambda o, s: run_triton(xv, o, scale, scratch=s)),
                        ("Triton, pointer loads, pages in reverse table order",
                         lambda o, s: run_triton(xv, o, scale, scratch=s, tma=False))]
            if device.type == "cuda":
                from engine.attention.triton_prefill import plan as attn_plan
                S = attn_plan(x["q"], Hkv, new, prefix + new, 1).splits  # the engine's slices, for the tile rows
                for t in TMA_TILES:
                    variants.append((f"Triton, TMA, table order, tiles M{t[0]} N{t[1]} {t[2]}w {t[3]}st, {S} slices",
                                     lambda o, s, t=t: run_triton(xs, o, scale, scratch=s, tiles=t, splits=S)))
            if device.type == "cuda":
                for sp in HIT_SPLITS:
                    if prefix % sp == 0:
                        variants.append((f"cuDNN, (query, head) rows, prefix in {sp} slices (pages in table order)",
                                         lambda o, s, xs=xs, sp=sp: run_cudnn_hit(xs, o, scale, sp)))
            if not args.no_sweep:
                for sp in SPLITS:
                    variants.append((f"Triton, the engine's tiles, {sp} key slices",
                                     lambda o, s, sp=sp: run_triton(x, o, scale, scratch=s, splits=sp)))
                for t in TILES:
                    variants.append((f"Triton, tiles M{t[0]} N{t[1]} {t[2]}w {t[3]}st",
                                     lambda o, s, t=t: run_triton(x, o, scale, tiles=t, scratch=s)))
            if device.type == "cuda" and prefix % 512 == 0:
                variants.append(("cuDNN pair (prefix gathered, queries padded to 512) + merge",
                                 lambda o, s: run_cudnn(x, o, scale)))
            base = base_ms = None
            for label, fn in variants:
                out, scratch = torch.empty_like(x["q"]), {}
                try:
                    fn(out, scratch)
                    if base is None:
                        base = out.clone()
                    diff = (out.float() - base.float()).abs().max().item()
                    ms, host = timed(lambda: fn(out, scratch), args.iters, device)
                except Exception as e:  # a tile that does not fit (shared memory) or a kernel that does not run here
                    why = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    print(f"| {prefix:,} + {new} | {label} | failed: {why} | | | | | |")
                    continue
                base_ms = base_ms or ms
                print(f"| {prefix:,} + {new} | {label} | {ms:.4f} | {ms / base_ms:.2f}x | {flop / ms / 1e9:,.0f} | "
                      f"{ms * args.layers:.2f} | {host:.4f} | {diff:.2e} |", flush=True)
    if device.type == "cuda" and not args.no_launch:
        launch_table(make(args.prefix[0], args.new[0], Hq, Hkv, D, args.page, dtype, device), scale, device)


if __name__ == "__main__":
    main()
