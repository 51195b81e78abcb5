"""What device memory a closed LLM still holds: live allocations after close() by allocation site.

    python benchmarks/probe_close.py           (CUDA; device pool only)
    python benchmarks/probe_close.py --tiers   (cpu + disk tiers, prompts that hit the device pool
                                                and the cpu tier, as bench_gpu_reuse's LLMs do)
"""
import collections
import gc
import os
import random
import sys
import tempfile
import weakref

import torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from engine.tiny import make_tiny_model
from engine import LLM, SamplingParams
tiers = "--tiers" in sys.argv
d = tempfile.mkdtemp()
make_tiny_model(d, "qwen3_moe", dtype="bfloat16")
torch.cuda.empty_cache()
base = torch.cuda.memory_allocated()
torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
if tiers:  # a pool of 64 pages of 16: three 600-token prompts push the first out to the cpu tier
    llm = LLM(d, dtype="bfloat16", device="cuda", disk_path=os.path.join(d, "pages"), cpu_memory_size_GB=0.5,
              num_device_blocks=64, chunk_size=256)
    rng = random.Random(0)
    prompts = [[rng.randrange(200) for _ in range(600)] for _ in range(3)]
    for p in prompts + prompts[:1] + prompts[:1]:  # cold x 3, then a cpu hit and a device hit
        out = llm.generate(p + [1], greedy)[0]
        print("prompt of", len(p) + 1, "tokens: cached", getattr(out, "num_cached_tokens", "?"))
else:
    llm = LLM(d, dtype="bfloat16", device="cuda", disk_path=None, cpu_memory_size_GB=0)
    llm.generate([1, 2, 3, 4, 5], greedy)
pool = weakref.ref(llm.engine.kv.pool.kv)
llm.close()
del llm
gc.collect()
print("left", torch.cuda.memory_allocated() - base, "bytes; the pool", "alive" if pool() is not None else "freed")
if pool() is not None:  # who holds it
    for ref in gc.get_referrers(pool()):
        print("  held by", type(ref).__name__, repr(ref)[:200])
snap = torch.cuda.memory._snapshot()
live = collections.Counter()
for seg in snap["segments"]:
    for b in seg["blocks"]:
        if b["state"] == "active_allocated":
            fr = b.get("frames", [])
            key = " <- ".join(f"{f['filename'].split('/')[-1]}:{f['line']}:{f['name']}" for f in fr
                              if f['filename'].endswith('.py'))[:600]
            live[key] += b["size"]
for k, v in live.most_common(8):
    print(v, k)
