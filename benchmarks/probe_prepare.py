"""Host time of ModelRunner.prepare (a step's ids, positions, pool slots and tables, one upload) for
step shapes of a no-reuse throughput batch and of a prefix hit, on CPU (a tiny checkpoint; prepare
does not depend on the model's size). Median of 200 calls after 20 warm-up calls.

    python benchmarks/probe_prepare.py            # from any checkout: compare two commits by running
                                                  # it from each
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import tokens_bytes  # noqa: E402


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
        r.block_table = rng.sample(range(100_000), (prompt + outputs) // P + 2)
        return r
    cases = {"one 2,048-token piece": [(req(2048, 0), 2048)],
             "30 decodes + a 2,018-token piece": [(req(2048, 2048, 3), 1) for _ in range(30)] + [(req(4096, 2048), 2018)],
             "64 new tokens after 32K cached": [(req(32768 + 64, 32768), 64)],
             "48 decodes": [(req(2048, 2048, 5), 1) for _ in range(48)]}
    print("| step | prepare, ms (median of 200) |\n|---|---|")
    for name, sched in cases.items():
        for _ in range(20):
            eng.runner.prepare(sched)
        ts = []
        for _ in range(200):
            t = time.perf_counter()
            eng.runner.prepare(sched)
            ts.append(time.perf_counter() - t)
        ts.sort()
        print(f"| {name} | {ts[len(ts) // 2] * 1e3:.3f} |")


if __name__ == "__main__":
    main()
