"""Host time of a step's inputs: ModelRunner.prepare (ids, positions, pool slots and tables, one
upload; eager steps) for step shapes of a no-reuse throughput batch, of a prefix hit and of decode
batches at long contexts, the decode CUDA graphs' host inputs (DecodeGraphs.step_inputs, built
here on the CPU) for the same decode batches, and a decode step's outputs (Request.output) for 32
requests at long outputs. On CPU with a tiny checkpoint (neither depends on the
model's size). Median of 200 calls (50 for the long decode batches) after 20 warm-up calls.

    python benchmarks/probe_prepare.py            # from any checkout: compare two commits by running
                                                  # it from each (rows a checkout lacks print "-")
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.cuda_graphs import DecodeGraphs  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import tokens_bytes  # noqa: E402

try:  # the tables as the prefix cache builds them (a checkout from before BlockTable: lists)
    from engine.request import BlockTable  # noqa: E402
except ImportError:
    BlockTable = list


def median_ms(fn, n: int) -> float:
    for _ in range(20):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main() -> None:
    d = tempfile.mkdtemp()
    make_tiny_model(d, "qwen3_moe", num_hidden_layers=1)
    eng = LLMEngine(load_config().replace(path=d, device="cpu", num_device_blocks=64, gpu_only=True))
    P, V = eng.kv.page_size, eng.args.vocab_size
    rng = random.Random(0)

    def req(prompt: int, computed: int, outputs: int = 0) -> Request:
        ids = [rng.randrange(V) for _ in range(prompt)]
        r = Request(f"q{rng.random()}", None, ids, SamplingParams(temperature=0), prompt_bytes=tokens_bytes(ids))
        r.output_ids = [rng.randrange(V) for _ in range(outputs)]
        r.num_computed = computed
        r.block_table = BlockTable(rng.sample(range(100_000), (prompt + outputs) // P + 2))
        return r
    cases = {"one 2,048-token piece": [(req(2048, 0), 2048)],
             "30 decodes + a 2,018-token piece": [(req(2048, 2048, 3), 1) for _ in range(30)] + [(req(4096, 2048), 2018)],
             "64 new tokens after 32K cached": [(req(32768 + 64, 32768), 64)],
             "48 decodes": [(req(2048, 2048, 5), 1) for _ in range(48)]}
    decodes = {f"32 decodes at {n // 1024}K tokens of context": [(req(n, n + 4, 5), 1) for _ in range(32)]
               for n in (8192, 32768)}
    graphs = DecodeGraphs(eng.model, eng.kv, torch.device("cpu"), 64, 40_000)
    step_inputs = getattr(graphs, "step_inputs", None)

    def nested(sched) -> torch.Tensor:
        """The decode graphs' tables as they were built before the thirty-second session: nested
        lists through torch.tensor (a reference column)."""
        nbs = [r.num_computed // P + 1 for r, _ in sched]
        width = max(nbs)
        return torch.tensor([r.block_table[:nb] + [0] * (width - nb) for (r, _), nb in zip(sched, nbs)],
                            dtype=torch.int32)
    print("| step | prepare (eager), ms | decode graphs' host inputs, ms | their tables as nested lists "
          "(the code before BlockTable), ms |\n|---|---|---|---|")
    for name, sched in {**cases, **decodes}.items():
        n = 50 if name in decodes else 200
        graph = ref = "-"
        if all(k == 1 for _, k in sched):
            ref = f"{median_ms(lambda: nested(sched), n):.3f}"
            if step_inputs is not None:
                graph = f"{median_ms(lambda: step_inputs(sched), n):.3f}"
        print(f"| {name} | {median_ms(lambda: eng.runner.prepare(sched), n):.3f} | {graph} | {ref} |")

    # the step's outputs: one RequestOutput per running request (what the engine hands out)
    print("\n| step's outputs | ms (median of 50) |\n|---|---|")
    for n_out in (512, 4096, 16384):
        reqs = [req(100, 100 + n_out, n_out) for _ in range(32)]
        print(f"| 32 requests at {n_out:,} output tokens | "
              f"{median_ms(lambda: [r.output() for r in reqs], 50):.3f} |")


if __name__ == "__main__":
    main()
