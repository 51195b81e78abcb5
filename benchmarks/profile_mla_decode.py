"""Decode steps of the DeepSeek engine (V2-Lite shapes) with the MLA layers on the latent kernel
(attn.backend auto) and on gather + SDPA (reference), in one process on the same requests: step
wall time, then over 3 profiled steps of each the GPU and host time a step and torch.profiler's
top CUDA kernels and CPU ops.

    python benchmarks/profile_mla_decode.py --conc 16 --prompt-len 8192
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402
from kvc.config import load_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--conc", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    dev = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / "m", "deepseek_v2", preset="deepseek-v2-lite-shapes", dtype="bfloat16",
                               std=0.02, num_hidden_layers=a.layers, device="cuda")
        blocks = a.conc * ((a.prompt_len + 4 * a.steps + 64) // 16 + 2) + 64
        cfg = load_config().replace(path=str(path), dtype="bfloat16", device="cuda", gpu_only=True, page_size=16,
                                    chunk_size=8192, max_num_batched_tokens=8192, num_device_blocks=blocks)
        eng = LLMEngine(cfg)
        g = torch.Generator().manual_seed(0)
        params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
        for i in range(a.conc):
            eng.add_request(str(i), torch.randint(0, eng.args.vocab_size, (a.prompt_len,), generator=g).tolist(),
                            params)
        while not all(r.output_ids for r in eng.requests.values()):
            eng.step()
        print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, {a.layers} layers, "
              f"{a.conc} decodes after {a.prompt_len}-token prompts")
        for backend in ("auto", "reference", "auto"):
            for layer in eng.model.model.layers:
                layer.self_attn.backend = backend
            for _ in range(3):
                eng.step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(a.steps):
                eng.step()
            torch.cuda.synchronize()
            print(f"\n## MLA {backend}: {(time.perf_counter() - t) / a.steps * 1e3:.2f} ms a step")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    eng.step()
                torch.cuda.synchronize()
            ev = prof.key_averages()
            gpu = sum(e.self_device_time_total for e in ev) / 3e3
            print(f"profiled: {gpu:.2f} ms of GPU time and {sum(e.self_cpu_time_total for e in ev) / 3e3:.2f} ms "
                  "of host time (CPU self) a step")
            print(ev.table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=60))
            print(ev.table(sort_by="self_cpu_time_total", row_limit=a.top // 2, max_name_column_width=60))
        eng.close()


if __name__ == "__main__":
    main()
