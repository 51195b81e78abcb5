"""The Python and ctypes around one native CPU expert call (issue 15's 1-token decode step).

A 1-token call of the native kernel (engine/offload/native) on small weights, timed three ways over
--calls calls: through grouped_cpu_experts (the engine's path), through NativeLib.moe (the weight
pointers made every call) and straight through the ctypes function with every argument made once.
Each row subtracts the kernel's own phase times (NativePool.phases) from the wall time: what is left
is the Python, ctypes and pool hand-off outside the kernel.

    python benchmarks/probe_native_call.py            # bf16 and int8, 2 threads
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.offload.grouped import ExpertThreads, grouped_cpu_experts, prepare  # noqa: E402


def timed(pool, fn, calls: int) -> tuple[float, float]:
    """(wall us a call, kernel us a call) over `calls` calls of fn."""
    pool.native().phases()  # reset
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    wall = (time.perf_counter() - t0) / calls
    ph = pool.native().phases()
    n = max(ph.pop("calls"), 1)
    return wall * 1e6, sum(ph.values()) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--formats", default="bfloat16,int8")
    a = ap.parse_args()
    E, H, I, k = a.experts, a.hidden, a.inter, 8
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.02).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) * 0.02).bfloat16()
    pool = ExpertThreads(a.threads)
    x = torch.randn(1, H, generator=g).bfloat16()
    ids = torch.tensor([[0, 1, 2, 3, -1, -1, -1, -1]])
    w = torch.rand(1, k, generator=g)
    out = torch.empty(1, H)
    print(f"# 1 token, {E} experts (4 on this call), H {H}, I {I}, {a.threads} threads, {a.calls} calls a row")
    print("| format | path | us a call | in the kernel | outside the kernel |")
    print("|---|---|---|---|---|")
    for fmt in a.formats.split(","):
        wt = dataclasses.replace(prepare(w13, w2, fmt, kernel="native"), max_rows=float("inf"))
        if wt.kernel != "native":
            print(f"# {fmt}: the native kernel did not build; skipped")
            continue
        lib, np_ = pool.native().lib, pool.native()
        wargs = wt.native_args
        raw = (np_.handle, wargs[0], x.data_ptr(), 1, 1, H, I, k, E, ids.data_ptr(), w.data_ptr(), *wargs[4:],
               out.data_ptr(), wt.max_rows)
        paths = [
            ("grouped_cpu_experts", lambda: grouped_cpu_experts(wt, x, ids, w, out, pool)),
            ("NativeLib.moe (pointers a call)", lambda: lib.moe(np_, wt.native_wf, x, ids, w, wt.w13, wt.w2, wt.s13,
                                                                 wt.s2, wt.rs13, wt.rs2, out, wt.max_rows)),
            ("ctypes alone", lambda: lib._lib.kvc_moe(*raw)),
        ]
        for _ in range(200):  # warm
            paths[0][1]()
        for name, fn in paths:
            wall, inside = timed(pool, fn, a.calls)
            print(f"| {fmt} | {name} | {wall:.1f} | {inside:.1f} | {wall - inside:.1f} |", flush=True)
    pool.close()


if __name__ == "__main__":
    main()
