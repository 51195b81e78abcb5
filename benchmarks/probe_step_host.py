"""Where the engine's thread spends a no-reuse throughput batch on CUDA (bench_gpu_reuse's
throughput workload: 48 fresh 2K-token prompts, 16 new tokens each), with async scheduling on and
off, caching off and host tiers on: tokens/s, steps, and the engine thread's stack samples (every
millisecond: the innermost engine/ or kvc/ frame and the call it is in). With async scheduling the
thread should mostly wait in Launched.tokens (the GPU is the limit); time anywhere else that adds
up to more than the GPU's step is what leaves the GPU idle (run BQ: 27-30% of a batch).

    python benchmarks/probe_step_host.py --model-dir /tmp/kvc-q30b-12l [--prompts 48] [--top 12]
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu_reuse import StackSampler, batch_rate, free_gpu, rand_ids, sync  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/kvc-q30b-12l")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run on the tiny model")
    a = ap.parse_args()
    model_dir = Path(a.model_dir)
    if a.device == "cpu":
        import bench_gpu_reuse
        bench_gpu_reuse.VOCAB = 256
        model_dir = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "qwen3_moe", num_hidden_layers=1,
                                    max_position_embeddings=8192)
    elif not (model_dir / "config.json").is_file():
        make_tiny_model(model_dir, "qwen3_moe", preset="qwen3-30b-a3b-shapes", num_hidden_layers=12,
                        dtype="bfloat16", std=0.02, device="cuda")
    work = Path(tempfile.mkdtemp(prefix="kvc-step-host-"))
    base = dict(dtype="bfloat16" if a.device == "cuda" else "float32", device=a.device, page_size=16, chunk_size=2048,
                num_device_blocks=2 * a.prompts * (a.length + 16) // 16 + 64)
    kinds = [("off", dict(base, prefix_caching=False)),
             ("host tiers on", dict(base, cpu_memory_size_GB=4, disk_path=str(work / "pages"), disk_size_GB=16))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    rng = random.Random(0)
    reports = []
    print("| engine | scheduling | tok/s | steps | ms a step |\n|---|---|---|---|---|", flush=True)
    for name, kw in kinds:
        llm = LLM(str(model_dir), **kw)
        eng = llm.engine
        host = eng.prefix_cache.host
        modes = [(True, None), (False, None), (True, None)] if host is None else \
            [(True, "gpu-wait"), (True, "gpu-queued"), (False, "gpu-wait"), (True, "gpu-wait"), (True, "gpu-queued")]
        for asy, gate in modes:
            eng.async_scheduling = asy
            if host is not None:
                host.put_gate = gate
            llm.generate([rand_ids(rng, a.length) for _ in range(a.prompts)], params)  # warm / steady state
            steps = [0]
            real = eng.step

            def counted(real=real, steps=steps):
                steps[0] += 1
                return real()
            eng.step = counted
            tag = f"{name}, {'async' if asy else 'sync'}" + (f", put gate {gate}" if gate else "")
            samplers = [StackSampler(threading.get_ident(), f"engine thread, {tag}")]
            samplers += [StackSampler(t.ident, f"put thread, {tag}") for t in threading.enumerate() if t.name == "kvc-put"]
            sync()
            t0 = time.perf_counter()
            outs = llm.generate([rand_ids(rng, a.length) for _ in range(a.prompts)], params)
            dt = time.perf_counter() - t0
            report = "\n".join(x.report(a.top) for x in samplers)
            if host is not None:
                report += f"\n# dropped put pages so far {host.dropped_puts}"
            del eng.step
            print(f"| {name} | {'async' if asy else 'sync'}{', put gate ' + gate if gate else ''} | {batch_rate(outs, dt):,.0f} | {steps[0]} | "
                  f"{dt / steps[0] * 1e3:.2f} |", flush=True)
            reports.append(report)
        llm.close()
        del llm, eng
        free_gpu()
    print("\n" + "\n\n".join(reports))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
