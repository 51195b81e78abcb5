"""What the page-carrying messages cost to write and read, in one process, without gRPC: protobuf's
own path (fields set on messages, SerializeToString, FromString, the payload read out of each parsed
frame) against kvc.wire's hand-written one (page_wire, read_message), both into the same assembler.

    python benchmarks/probe_wire.py [--pages 128] [--reps 5] [--layers 32 --kv-heads 8]

Pages of bench_service.py's spec by default (2 MiB: a 16-token page of a Llama-3-8B-shaped model;
--layers 4 --kv-heads 2 --pages 2048: 32 KiB pages, many frames a message). Prints ms
for the whole batch, best of --reps, per step and side (the sender's write, the receiver's read).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_service import PAGE_SPEC, make_pages  # noqa: E402
from kvc import wire  # noqa: E402
from kvc.hashing import Namespace, PageSpec  # noqa: E402
from kvc.pb import pb  # noqa: E402


def protobuf_write(pages) -> list[bytes]:
    """Messages built through protobuf (kvc.wire.page_messages, the path before page_wire), serialised."""
    return [m.SerializeToString() for m in wire.page_messages(pages, pb.GetPagesResponse)]


def best(fn, reps: int) -> tuple[float, object]:
    ms, result = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        result = fn()
        ms = min(ms, (time.perf_counter() - t) * 1e3)
    return ms, result


def assemble(messages, out, spec) -> list:
    asm = wire.PageAssembler(spec, out=out, max_pages=len(out))
    for m in messages:
        asm.add_all(m.frames)
    return asm.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=PAGE_SPEC.num_layers)
    ap.add_argument("--kv-heads", type=int, default=PAGE_SPEC.num_kv_heads)
    args = ap.parse_args()
    spec = PageSpec(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=PAGE_SPEC.head_dim,
                    page_size=PAGE_SPEC.page_size, dtype=PAGE_SPEC.dtype)
    ns = Namespace("bench", spec)
    _, pages = make_pages(ns, args.pages, seed=1)
    out = torch.empty((args.pages, *spec.shape), dtype=pages[0].data.dtype)
    mib = args.pages * spec.page_bytes / 2 ** 20
    rows = []
    w_pb, wires_pb = best(lambda: protobuf_write(pages), args.reps)
    p_pb, parsed = best(lambda: [pb.GetPagesResponse.FromString(b) for b in wires_pb], args.reps)
    a_pb, got = best(lambda: assemble(parsed, out, spec), args.reps)
    assert [p.hash for p in got] == [p.hash for p in pages]
    rows.append(("protobuf", w_pb, p_pb, a_pb))
    w_kv, wires_kv = best(lambda: list(wire.page_wire(pages, 1)), args.reps)
    assert wires_kv == wires_pb  # the same bytes on the wire
    p_kv, read = best(lambda: [wire.read_message(b, pb.GetPagesResponse) for b in wires_kv], args.reps)
    a_kv, got = best(lambda: assemble(read, out, spec), args.reps)
    assert all(torch.equal(a.data, b.data) for a, b in zip(got, pages))
    rows.append(("kvc.wire", w_kv, p_kv, a_kv))
    print(f"{args.pages} pages of {spec.page_bytes / 2 ** 10:,.0f} KiB ({mib:.0f} MiB) in messages of "
          f"{wire.CHUNK_BYTES >> 20} MiB, ms for the batch (best of {args.reps}); the bytes written are equal\n")
    print("| path | sender: write (checksums, messages, serialise) | receiver: parse | receiver: assemble "
          "(copy out, checksums, hashes) | receiver total | both sides |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, w, p, a in rows:
        print(f"| {name} | {w:.1f} | {p:.1f} | {a:.1f} | {p + a:.1f} | {w + p + a:.1f} |")


if __name__ == "__main__":
    main()
