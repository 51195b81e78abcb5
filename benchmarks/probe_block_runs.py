"""How often a long prompt's cached prefix lies on one run of block ids in the device pool, under
the pool's allocate / free order: what decides whether the cuDNN path reads it as one slice of the
pool (engine.attention.adjacent_rows) instead of gathering it per layer and chunk.

Simulates bench_engine's pattern on kvc.device_pool.BlockPool alone (no model, no GPU): each prompt
takes its blocks chunk by chunk, its full pages are registered, it is freed, and (as bench_engine's
prefill rows do) the pool's cache may be reset; printed per pool size and policy, how many prompts
got their prefix on one run of block ids (any order) and on one ascending run. `before` replays
the free order this pool had until the twenty-eighth session (every freed block to the end of the
queue, tail first), for comparison.

    python benchmarks/probe_block_runs.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.attention import adjacent_rows  # noqa: E402
from kvc.device_pool import BlockPool  # noqa: E402


class BeforePool(BlockPool):
    """The free order before blank blocks went to the front: every block reaching ref 0 joins the
    end of the queue, tail first; reset_cache leaves the queue's order as it is."""

    def free(self, blocks):
        for b in reversed(blocks):
            self.ref_count[b] -= 1
            if not self.ref_count[b]:
                self.free_queue[b] = None

    def reset_cache(self):
        dropped = [b for b in self._cached if self.ref_count[b] == 0]
        for b in dropped:
            self._uncache(b)
        return len(dropped)


def run(pool: BlockPool, prompts: int, tokens: int, chunk: int, page: int, reset: bool) -> tuple[int, int]:
    """(prompts whose prefix lay on one run of block ids, of those one ascending run)."""
    runs = ascending = 0
    for r in range(prompts):
        seq: list[int] = []
        for _ in range(-(-tokens // chunk)):
            seq += pool.allocate(chunk // page)
        seq += pool.allocate(1)  # the page of the first generated token
        full = tokens // page
        pool.cache_blocks(seq[:full], [r.to_bytes(4, "little") + i.to_bytes(4, "little") for i in range(full)],
                          [b""] * full, [b""] * full)
        prefix = tokens - chunk  # the last chunk's cached prefix
        runs += adjacent_rows(seq, prefix, page) >= 0
        nb = prefix // page
        ascending += seq[:nb] == list(range(seq[0], seq[0] + nb))
        pool.free(seq)
        if reset:
            pool.reset_cache()
    return runs, ascending


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--blocks", type=int, nargs="+", default=[4500, 20000])
    a = ap.parse_args()
    print(f"{a.prompts} prompts of {a.tokens} tokens in chunks of {a.chunk}, page {a.page}")
    print("| pool blocks | free order | reset_cache after each prompt | prefix on one run of blocks | of them ascending |")
    print("|---|---|---|---|---|")
    for n in a.blocks:
        for label, cls in (("blank blocks first (now)", BlockPool), ("before", BeforePool)):
            for reset in (True, False):
                runs, asc = run(cls(n), a.prompts, a.tokens, a.chunk, a.page, reset)
                print(f"| {n} | {label} | {'yes' if reset else 'no'} | {runs} of {a.prompts} | {asc} |")


if __name__ == "__main__":
    main()
