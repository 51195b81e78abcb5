"""Engine throughput against transformers on the same random checkpoint, in the same run.

Prefill: one prompt of --prompt-len tokens (engine: one chunk, device pool only, no prefix hit;
transformers: one forward with logits_to_keep=1). Decode: aggregate tokens/s of --concurrency
requests each generating --decode-tokens greedy tokens after a --decode-prompt-len prompt
(engine: step loop after the first token; transformers: generate(N) - generate(1), batched).

    python benchmarks/bench_engine.py                         # CPU, "small" preset, float32
    python benchmarks/bench_engine.py --device cuda --preset qwen3-30b-a3b-shapes --layers 4
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvc.config import load_config  # noqa: E402
from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402

PRESETS = {
    "tiny": {},
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=32,
                  num_experts_per_tok=4),
    "qwen3-30b-a3b-shapes": "qwen3-30b-a3b-shapes",
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prompts(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


class Ours:
    def __init__(self, path, a):
        cfg = load_config().replace(path=str(path), dtype=a.dtype, device=a.device, gpu_only=True,
                                    page_size=16, chunk_size=max(*a.prompt_len, 256),
                                    max_num_batched_tokens=max(*a.prompt_len, 2048), max_num_seqs=64)
        self.eng = LLMEngine(cfg)
        self.vocab, self.n = self.eng.args.vocab_size, 0

    def _run(self, ps, max_tokens, after_first=False):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for p in ps:
            self.n += 1
            self.eng.add_request(f"b{self.n}", p, params)
        started, t0, produced = False, time.perf_counter(), 0
        while self.eng.has_unfinished():
            outs = self.eng.step()
            if after_first and not started and all(r.output_ids for r in self.eng.requests.values()):
                started, t0, produced = True, time.perf_counter(), 0
                continue
            produced += len(outs)
        return produced, time.perf_counter() - t0

    def prefill(self, length, seed):
        p = prompts(1, length, self.vocab, seed)
        return lambda: self._run([p[0]], 1) and self.eng.kv.blocks.reset_cache()

    def decode_tps(self, c, plen, n, repeat):
        best = []
        for r in range(repeat + 1):
            produced, dt = self._run(prompts(c, plen, self.vocab, 100 + r), n, after_first=True)
            self.eng.kv.blocks.reset_cache()
            if r:
                best.append(produced / dt)
        return statistics.median(best)


class HF:
    def __init__(self, path, a):
        import transformers
        self.m = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, a.dtype)).to(a.device).eval()
        self.device, self.vocab = a.device, self.m.config.vocab_size

    def prefill(self, length, seed):
        ids = torch.tensor(prompts(1, length, self.vocab, seed), device=self.device)
        return lambda: self._fwd(ids)

    @torch.inference_mode()
    def _fwd(self, ids):
        self.m(ids, logits_to_keep=1, use_cache=False)

    @torch.inference_mode()
    def _gen(self, ids, n):
        self.m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def decode_tps(self, c, plen, n, repeat):
        ids = torch.tensor(prompts(c, plen, self.vocab, 100), device=self.device)
        t_n = timed(lambda: self._gen(ids, n), self.device, repeat)
        t_1 = timed(lambda: self._gen(ids, 1), self.device, repeat)
        return c * (n - 1) / max(t_n - t_1, 1e-9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--arch", default="qwen3_moe", choices=("qwen3_moe", "mixtral"))
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--decode-prompt-len", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    a = ap.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    preset = PRESETS[a.preset]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        if isinstance(preset, str):
            path = make_tiny_model(tmp, a.arch, preset=preset, dtype=a.dtype, std=0.02, num_hidden_layers=a.layers)
        else:
            path = make_tiny_model(tmp, a.arch, dtype=a.dtype, num_hidden_layers=a.layers, **preset)
        print(f"# checkpoint: {a.arch} preset={a.preset} layers={a.layers} dtype={a.dtype} "
              f"device={a.device} torch={torch.__version__} threads={torch.get_num_threads()} "
              f"(written in {time.perf_counter() - t:.1f}s)\n")
        systems = {"kvc engine": Ours(path, a)}
        if not a.no_hf:
            systems["transformers"] = HF(path, a)
        print("| prefill tokens | " + " | ".join(f"{s} tok/s" for s in systems) + " | ratio |")
        print("|---|" + "---|" * (len(systems) + 1))
        for L in sorted(set(a.prompt_len)):
            tps = [L / timed(s.prefill(L, L), a.device, a.repeat) for s in systems.values()]
            ratio = f"{tps[0] / tps[1]:.2f}x" if len(tps) > 1 else "-"
            print(f"| {L} | " + " | ".join(f"{x:,.0f}" for x in tps) + f" | {ratio} |", flush=True)
        print("\n| concurrent requests | " + " | ".join(f"{s} decode tok/s" for s in systems) + " | ratio |")
        print("|---|" + "---|" * (len(systems) + 1))
        single = {}
        for c in a.concurrency:
            tps = [s.decode_tps(c, a.decode_prompt_len, a.decode_tokens, a.repeat) for s in systems.values()]
            single.setdefault("v", tps)
            ratio = f"{tps[0] / tps[1]:.2f}x" if len(tps) > 1 else "-"
            print(f"| {c} | " + " | ".join(f"{x:,.1f}" for x in tps) + f" | {ratio} |", flush=True)
            if c != a.concurrency[0]:
                print(f"|   (vs {a.concurrency[0]}) | " + " | ".join(
                    f"{x / y:.2f}x" for x, y in zip(tps, single['v'])) + " | |")


if __name__ == "__main__":
    main()
