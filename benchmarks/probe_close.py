"""What device memory a closed LLM still holds: live allocations after close() by allocation site.

    python benchmarks/probe_close.py   (CUDA)
"""
import collections
import sys
import tempfile

import torch
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..'))
from engine.tiny import make_tiny_model
from engine import LLM, SamplingParams
d = tempfile.mkdtemp()
make_tiny_model(d, "qwen3_moe", dtype="bfloat16")
torch.cuda.empty_cache()
base = torch.cuda.memory_allocated()
torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
llm = LLM(d, dtype="bfloat16", device="cuda", disk_path=None, cpu_memory_size_GB=0)
llm.generate([1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
llm.close()
print("left", torch.cuda.memory_allocated() - base)
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
