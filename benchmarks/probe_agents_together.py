"""Agents that arrive together with one new system prompt: how much of it each one reuses, and
how many prompt tokens the engine computes in all (the offline LLM on the CPU, the tiny Qwen3
checkpoint, page 16). Two settings: the CPU defaults (chunk 256 under a 2,048-token step budget:
several arrivals placed in one step) and chunk = step budget = 512 (as on CUDA, where the chunk is
the step's budget). The ideal: the first agent computes the system prompt, the others reuse all its
full pages.

    python benchmarks/probe_agents_together.py [--agents 4] [--repeat 30]
"""
import argparse
import time

from engine import LLM, SamplingParams


def run(agents: int, repeat: int, **kw) -> tuple[list[int], int, int, float]:
    llm = LLM("builtin:tiny-qwen3-moe", device="cpu", dtype="float32", page_size=16, gpu_only=True, **kw)
    tok = llm.tokenizer
    system = tok.encode("<|im_start|>system\n" + "You are an agent that operates a build system. "
                        "Never invent results. " * repeat + "<|im_end|>\n")
    prompts = [system + tok.encode(f"<|im_start|>user\nagent {i}: run the tests<|im_end|>\n"
                                   "<|im_start|>assistant\n") for i in range(agents)]
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4))
    wall = time.perf_counter() - t
    llm.close()
    reused = [o.num_cached_tokens for o in outs]
    return reused, sum(len(p) for p in prompts) - sum(reused), len(system), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=30, help="sentences in the system prompt")
    args = ap.parse_args()
    print("| setting | system prompt tokens | reused by each agent | ideal for agents 2+ | prompt tokens computed | wall (s) |")
    print("|---|---|---|---|---|---|")
    for label, kw in (("CPU defaults (chunk 256, budget 2,048)", {}),
                      ("chunk = budget = 512", dict(chunk_size=512, max_num_batched_tokens=512))):
        reused, computed, n_sys, wall = run(args.agents, args.repeat, **kw)
        print(f"| {label} | {n_sys} | {' / '.join(map(str, reused))} | {n_sys // 16 * 16} | {computed:,} | {wall:.2f} |")


if __name__ == "__main__":
    main()
