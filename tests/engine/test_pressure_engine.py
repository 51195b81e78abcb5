"""The engine under heavy traffic and callers that fail: many requests with distinct cache salts,
a generate that raises, a long queue aborted."""
from __future__ import annotations

import time

import pytest

from engine import LLM, SamplingParams, kv_cache

from .paged import run_to_end
from .test_engine import PROMPT, make_engine

ONE = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def test_per_request_cache_salts_do_not_grow_the_engine_without_bound(qwen_dir, monkeypatch):
    """A client that sends a fresh cache_salt with every request (one tenant per request) must not
    leave an entry per salt in the engine forever; a salt seen again still reuses its own pages,
    and no other salt's. (The bound, 1024 salts, lowered here so that a few requests cross it.)"""
    monkeypatch.setattr(kv_cache, "NAMESPACES_KEPT", 32, raising=False)
    eng = make_engine(qwen_dir, num_device_blocks=256, max_num_seqs=128, max_num_batched_tokens=4096)
    first = run_to_end(eng, [PROMPT], ONE, salt="tenant-0")[0]
    n = 100
    for i in range(n):
        eng.add_request(f"r{i}", [(i * 7) % 250 + 1] * 5, ONE, cache_salt=f"salt-{i}")  # a full page: hashed
    done = 0
    while eng.has_unfinished():
        done += sum(o.finished for o in eng.step())
    assert done == n
    assert len(eng.kv._ns) <= 32
    again = run_to_end(eng, [PROMPT], ONE, salt="tenant-0")[0]  # its namespace was dropped and rebuilt
    assert again.num_cached_tokens == 28 and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert run_to_end(eng, [PROMPT], ONE, salt="tenant-1")[0].num_cached_tokens == 0
    assert eng.kv.blocks.num_free == 256


def test_generate_that_fails_leaves_no_request_behind(qwen_dir):
    """LLM.generate refusing one of its prompts (or interrupted) must not leave the prompts it had
    already queued in the engine: they would hold pages and run, for nobody, inside every later
    generate."""
    llm = LLM(str(qwen_dir), device="cpu", dtype="float32", gpu_only=True, page_size=4, num_device_blocks=64)
    try:
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        with pytest.raises(ValueError, match="prompt token ids"):
            llm.generate([PROMPT, [1, 10**6]], params)
        assert not llm.engine.has_unfinished() and not llm.engine.requests
        assert llm.engine.kv.blocks.num_free == 64
        short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        out = llm.generate([[4, 5, 6]], short)[0]
        assert len(out.outputs[0].token_ids) == 2
        assert not llm.engine.requests and llm.engine.kv.blocks.num_free == 64
    finally:
        llm.close()


def test_aborting_a_long_queue_costs_the_engine_little(qwen_dir):
    """A burst of queued requests whose clients all go away (a load balancer's timeout) is aborted
    one request at a time on the engine's thread; each abort must not scan the queue (quadratic in
    the queue's length, while every running request waits; the bound below is generous for aborts
    that do not scan, and far below what the scans took)."""
    eng = make_engine(qwen_dir, num_device_blocks=64, max_num_seqs=4)
    n = 30000
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    for i in range(n):
        eng.add_request(f"r{i}", [1 + i % 200, 2, 3], params)
    eng.step()  # a few run, the rest wait
    t0 = time.perf_counter()
    for i in reversed(range(n)):  # the latest arrivals first: each the furthest from the queue's front
        eng.abort(f"r{i}")
    took = time.perf_counter() - t0
    assert not eng.has_unfinished() and eng.kv.blocks.num_free == 64
    assert took < 4.0, f"aborting {n} queued requests took {took:.1f} s"
    out = run_to_end(eng, [PROMPT], ONE)[0]  # and the engine serves on
    assert len(out.outputs[0].token_ids) == 1


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_identical_prompts_arriving_together_load_their_prefix_once(qwen_dir, store, async_scheduling):
    """Requests with one prompt arriving at once after its prefix left the device pool (a burst
    over a shared system prompt): one loads the pages from the host tiers, the others wait for that
    load and reuse its pages from the pool (before: each loaded its own copy, N copies of the prefix
    held in the pool and N reads of the host tiers, which under pressure ran the pool out)."""
    prompt = PROMPT + [(i * 11 + 3) % 250 for i in range(12)]  # 41 tokens: 10 full pages to load
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    cold = run_to_end(make_engine(qwen_dir), [prompt], params)[0].outputs[0].token_ids
    eng = make_engine(qwen_dir, cache=store, load_policy="always", async_scheduling=async_scheduling)
    run_to_end(eng, [prompt], params)
    eng.prefix_cache.flush()
    assert eng.prefix_cache.reset_device_cache() > 0  # in the host tiers only now
    for i in range(4):
        eng.add_request(f"same{i}", prompt, params)
    eng.step()  # the first starts its load; the others wait for it, holding nothing
    held = 64 - eng.kv.blocks.num_free
    assert held <= 11, f"{held} blocks held: the prefix was loaded more than once"
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert [done[f"same{i}"].outputs[0].token_ids for i in range(4)] == [cold] * 4
    assert [done[f"same{i}"].num_cached_tokens for i in range(4)] == [40] * 4
    eng.flush_commits()
    assert eng.kv.blocks.num_free == 64
    eng.close()
