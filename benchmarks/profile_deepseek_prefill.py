"""Where DeepSeek's long prefill goes: a prompt in --chunk-sized chunks against one chunk and transformers.

For each prefill chunk size (and --cudnn setting: MLA's long pieces on cuDNN or SDPA) the engine is built once over the same V2-Lite-shapes checkpoint; one
--prompt-len prompt is timed (median of --repeat, wall, after two warm-ups), then split by module
with CUDA events around each layer's attention (and, inside it, kv_b_proj: the expansion of latents
to per-head K and V), its MLP/MoE, and the rest (embedding, norms, lm_head, host), then profiled
once for the kernel table (benchmarks/profile_prefill.py's). Transformers on the same checkpoint is
timed and profiled last.

    python benchmarks/profile_deepseek_prefill.py --prompt-len 32768 --chunk 8192 32768
"""
from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deepseek import close, engine, rand_prompts, sync, ttft  # noqa: E402
from profile_prefill import kernel_table  # noqa: E402
from engine import mla  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402


class ModuleTimes:
    """CUDA events around named modules' forwards; totals in ms by name after a synchronised run."""

    def __init__(self, named: dict[str, list[torch.nn.Module]]):
        self.pairs: dict[str, list] = collections.defaultdict(list)
        self.handles = []
        for name, mods in named.items():
            for m in mods:
                self.handles.append(m.register_forward_pre_hook(lambda mod, inp, n=name: self._start(n)))
                self.handles.append(m.register_forward_hook(lambda mod, inp, out, n=name: self._end(n)))
        self.open: dict[str, list] = collections.defaultdict(list)

    def _start(self, name):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.open[name].append(e)

    def _end(self, name):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.pairs[name].append((self.open[name].pop(), e))

    def totals(self) -> dict[str, tuple[float, int]]:
        torch.cuda.synchronize()
        out = {n: (sum(a.elapsed_time(b) for a, b in ps), len(ps)) for n, ps in self.pairs.items()}
        self.pairs.clear()
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def split_table(label: str, wall_ms: float, totals: dict[str, tuple[float, int]]) -> None:
    print(f"\n### {label}: by module (CUDA events, one run, {wall_ms:.1f} ms wall)")
    print("| module | ms | calls | share of wall |\n|---|---|---|---|")
    for name, key in (("attention", "attention"), ("  of which kv_b_proj (expanding latents)", "kv_b_proj"),
                      ("mlp / moe", "mlp")):
        ms, n = totals.get(key, (0.0, 0))
        print(f"| {name} | {ms:.1f} | {n} | {ms / wall_ms * 100:.0f}% |")
    rest = wall_ms - totals.get("attention", (0.0, 0))[0] - totals.get("mlp", (0.0, 0))[0]
    print(f"| the rest (embedding, norms, lm_head, scheduler, host) | {rest:.1f} | | {rest / wall_ms * 100:.0f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32768)
    ap.add_argument("--chunk", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--cudnn", nargs="+", default=["off", "on"], choices=["off", "on"],
                    help="engine.mla.CUDNN_PIECES for the engine's runs, each chunk size once per value "
                         "(on: long expanded pieces through cuDNN, V at its own width)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    L = a.prompt_len
    ns = argparse.Namespace(ttft_len=[L], kt_len=0, prefill_len=[L], delta=64, concurrency=[1],
                            decode_prompt_len=32, decode_tokens=8, dtype="bfloat16", device=torch.device("cuda"))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = make_tiny_model(Path(tmp) / "model", "deepseek_v2", preset="deepseek-v2-lite-shapes",
                               dtype="bfloat16", std=0.02, num_hidden_layers=a.layers, device="cuda")
        print(f"# DeepSeek-V2-Lite shapes, {a.layers} layers, bf16, {torch.cuda.get_device_name()}, torch "
              f"{torch.__version__}; checkpoint in {time.perf_counter() - t:.1f}s; one {L}-token prompt, "
              f"no prefix hit")
        summary = []
        for cudnn, chunk in ((c, n) for c in a.cudnn for n in a.chunk):
            mla.CUDNN_PIECES = cudnn == "on"
            ns.chunk = chunk
            eng = engine(path, ns)
            V = eng.args.vocab_size
            ps = rand_prompts(a.repeat + 3, L, V, chunk)

            def run(p, eng=eng):
                t, _ = ttft(eng, p)
                eng.prefix_cache.reset_device_cache()
                return t
            run(ps[0]), run(ps[1])  # warm-up: autotune, allocator
            wall = statistics.median(run(p) for p in ps[2:2 + a.repeat]) * 1e3
            layers = eng.model.model.layers
            mt = ModuleTimes({"attention": [m.self_attn for m in layers],
                              "kv_b_proj": [m.self_attn.kv_b_proj for m in layers],
                              "mlp": [m.mlp for m in layers]})
            one = run(ps[-1]) * 1e3
            split_table(f"kvc, chunk {chunk}, cuDNN {cudnn}", one, mt.totals())
            mt.remove()
            kernel_table(lambda: run(ps[0]), f"kvc {L} tokens, chunk {chunk}, cuDNN {cudnn}", a.top)
            summary.append((f"kvc, chunk {chunk}, cuDNN {cudnn}", wall))
            close(eng)
            del eng
            gc.collect()
            torch.cuda.empty_cache()
        if not a.no_hf:
            import transformers
            m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
            ids = torch.tensor(rand_prompts(1, L, m.config.vocab_size, 1), device="cuda")

            @torch.inference_mode()
            def hf():
                m(ids, logits_to_keep=1, use_cache=False)
                sync(ids.device)
            hf(), hf()
            ts = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                hf()
                ts.append(time.perf_counter() - t)
            wall = statistics.median(ts) * 1e3
            mt = ModuleTimes({"attention": [layer.self_attn for layer in m.model.layers],
                              "kv_b_proj": [layer.self_attn.kv_b_proj for layer in m.model.layers],
                              "mlp": [layer.mlp for layer in m.model.layers]})
            t = time.perf_counter()
            hf()
            split_table("transformers", (time.perf_counter() - t) * 1e3, mt.totals())
            mt.remove()
            kernel_table(hf, f"transformers {L} tokens", a.top)
            summary.append(("transformers", wall))
        print(f"\n## {L}-token prefill, median of {a.repeat} (wall ms; no profiler, no hooks)")
        print("| path | ms | tok/s | / transformers time |\n|---|---|---|---|")
        ref = dict(summary).get("transformers")
        for name, ms in summary:
            print(f"| {name} | {ms:.1f} | {L / ms * 1e3:,.0f} | {ms / ref:.2f}x |" if ref else
                  f"| {name} | {ms:.1f} | {L / ms * 1e3:,.0f} | |")


if __name__ == "__main__":
    main()
