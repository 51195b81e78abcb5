"""Profile one prefill and a few decode steps of the engine (torch.profiler), print the top ops.

    python benchmarks/profile_step.py --device cuda --preset qwen3-30b-a3b-shapes --layers 4
"""
from __future__ import annotations

import argparse
import tempfile
import time
import traceback

import torch

from engine import LLMEngine, SamplingParams
from engine.moe import grouped_mm_works
from engine.tiny import make_tiny_model
from kvc.config import load_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="qwen3-30b-a3b-shapes, or none for the tiny model")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    a = ap.parse_args()
    dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    d = tempfile.mkdtemp()
    make_tiny_model(d, "qwen3_moe", preset=a.preset, num_hidden_layers=a.layers, dtype=dtype, std=0.02)
    dev = torch.device(a.device)
    fn = getattr(torch, "_grouped_mm", None)
    print("torch", torch.__version__, "_grouped_mm present:", fn is not None)
    if fn is not None and dev.type == "cuda":
        try:
            a_ = torch.zeros(4, 2048, device=dev, dtype=torch.bfloat16)
            b_ = torch.zeros(2, 1536, 2048, device=dev, dtype=torch.bfloat16).transpose(1, 2)
            fn(a_, b_, offs=torch.tensor([2, 4], device=dev, dtype=torch.int32))
            print("grouped_mm probe: ok")
        except Exception:
            traceback.print_exc()
    print("grouped_mm_works:", grouped_mm_works(dev, getattr(torch, dtype), 2048, 768))
    if dev.type == "cuda":  # the expert GEMMs alone, both paths, Qwen3-30B-A3B shapes, 512 tokens
        from engine.moe import experts_sorted
        E, H, I, T, k = 128, 2048, 768, a.prompt_len, 8
        w13 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * 0.02
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        ids = torch.randint(0, E, (T, k), device=dev)
        w = torch.rand(T, k, device=dev)
        for grouped in (True, False):
            try:
                for _ in range(3):
                    experts_sorted(w13, w2, x, ids, w, grouped)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(10):
                    experts_sorted(w13, w2, x, ids, w, grouped)
                torch.cuda.synchronize()
                print(f"experts_sorted grouped={grouped}: {(time.perf_counter() - t) * 100:.2f} ms per layer")
            except Exception:
                traceback.print_exc()
    cfg = load_config().replace(path=d, dtype=dtype, device=a.device, gpu_only=True, page_size=16,
                                chunk_size=4096, max_num_batched_tokens=4096)
    eng = LLMEngine(cfg)
    vocab = eng.args.vocab_size
    g = torch.Generator().manual_seed(0)
    n = [0]

    def once(plen, max_tokens):
        n[0] += 1
        eng.add_request(f"p{n[0]}", torch.randint(0, vocab, (plen,), generator=g).tolist(),
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        while eng.has_unfinished():
            eng.step()
        eng.prefix_cache.reset_device_cache()

    for _ in range(3):
        once(a.prompt_len, 1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    once(a.prompt_len, 1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"prefill {a.prompt_len} tokens: {(time.perf_counter() - t) * 1e3:.1f} ms")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        once(a.prompt_len, 1)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    if dev.type == "cuda":
        print(prof.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    main()
