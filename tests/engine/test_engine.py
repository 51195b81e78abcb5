"""Engine paths against the plain path: prefix hits, host-tier hits, batching, preemption, stops."""
from __future__ import annotations

import pytest

from kvc.config import load_config
from engine import LLM, LLMEngine, SamplingParams
from .paged import run_to_end

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = [(i * 37 + 11) % 250 for i in range(29)]


def make_engine(path, cache=None, **kw):
    kw = {"page_size": 4, "chunk_size": 64, "num_device_blocks": 64, **kw}
    cfg = load_config().replace(path=str(path), dtype="float32", device="cpu",
                                gpu_only=cache is None, **kw)
    return LLMEngine(cfg, cache=cache)


def run(engine, prompts, params=GREEDY, salt=""):
    """Run prompts to completion; returns the final outputs in prompt order."""
    return run_to_end(engine, prompts, params, salt)


def test_prefix_hit_matches_cold(model_dir):
    eng = make_engine(model_dir)
    cold = run(eng, [PROMPT])[0]
    assert cold.num_cached_tokens == 0
    warm = run(eng, [PROMPT])[0]
    assert warm.num_cached_tokens == 28  # 7 full pages; the cap leaves the last token to compute
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    other = run(eng, [PROMPT[:9] + [1, 2, 3]])[0]
    assert other.num_cached_tokens == 8
    salted = run(eng, [PROMPT], salt="tenant-b")[0]
    assert salted.num_cached_tokens == 0


def test_host_tier_hit_with_device_pool_emptied_matches_cold(model_dir, store):
    cold = run(make_engine(model_dir), [PROMPT])[0]
    eng = make_engine(model_dir, cache=store)
    first = run(eng, [PROMPT])[0]
    eng.prefix_cache.flush()
    assert eng.prefix_cache.reset_device_cache() > 0  # the device tier forgets everything
    second = run(eng, [PROMPT])[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 28
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == cold.outputs[0].token_ids
    eng.close()


def test_host_load_does_not_block_other_requests(model_dir, store):
    eng = make_engine(model_dir, cache=store)
    run(eng, [PROMPT])
    eng.prefix_cache.flush()
    eng.prefix_cache.reset_device_cache()
    eng.add_request("loads", PROMPT, GREEDY)
    eng.add_request("cold", [9, 8, 7], GREEDY)
    eng.step()  # the first request starts loading and the second one runs meanwhile
    assert eng.requests["cold"].num_computed == 3
    eng.close()


def test_batched_matches_single(model_dir):
    prompts = [PROMPT, PROMPT[:5], [3, 1, 4, 1, 5, 9, 2, 6], PROMPT[3:20]]
    singles = [run(make_engine(model_dir), [p])[0].outputs[0].token_ids for p in prompts]
    eng = make_engine(model_dir, chunk_size=6, max_num_batched_tokens=10)
    batched = run(eng, prompts)
    assert [o.outputs[0].token_ids for o in batched] == singles


def test_preemption_and_resume_match_unpreempted(model_dir):
    prompts = [PROMPT[:13], PROMPT[5:18], PROMPT[10:22]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    singles = [run(make_engine(model_dir), [p], params)[0].outputs[0].token_ids for p in prompts]
    eng = make_engine(model_dir, num_device_blocks=12)  # 48 slots for 3 x 25 tokens
    outs = run(eng, prompts, params)
    assert eng.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == singles
    assert all(o.num_cached_tokens == 0 for o in outs)  # recompute is not a hit
    assert eng.kv.blocks.num_free == 12


def test_stop_strings_and_tokens(qwen_dir):
    eng = make_engine(qwen_dir)
    free = run(eng, ["hello"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    text = free.text
    assert len(text) >= 4
    stop = text[2:4]
    out = run(eng, ["hello"], SamplingParams(temperature=0, max_tokens=10, stop=[stop], ignore_eos=True))[0]
    assert out.outputs[0].text == text[:text.index(stop)]
    assert out.outputs[0].finish_reason == "stop"
    tok = free.token_ids[3]
    out = run(eng, ["hello"], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[tok], ignore_eos=True))[0]
    assert out.outputs[0].token_ids == free.token_ids[:free.token_ids.index(tok) + 1]
    assert out.outputs[0].finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.token_ids) == 10


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(qwen_dir):
    eng = make_engine(qwen_dir)
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=10, ignore_eos=True)
    a, b = run(eng, [PROMPT, PROMPT], p)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    c = run(eng, [PROMPT], SamplingParams(temperature=1.0, seed=8, max_tokens=10, ignore_eos=True))[0]
    assert c.outputs[0].token_ids != a.outputs[0].token_ids
    g = run(eng, [PROMPT], GREEDY)[0].outputs[0].token_ids
    k1 = run(eng, [PROMPT], SamplingParams(temperature=0.7, top_k=1, seed=1, max_tokens=8, ignore_eos=True))
    assert k1[0].outputs[0].token_ids == g


def test_abort_frees_pages(qwen_dir):
    eng = make_engine(qwen_dir)
    eng.add_request("x", PROMPT, GREEDY)
    eng.step()
    assert eng.kv.blocks.num_free < 64
    eng.abort("x")
    assert eng.kv.blocks.num_free == 64 and not eng.has_unfinished()


def test_llm_api_strings_ids_and_unknown_override(qwen_dir, tmp_path):
    llm = LLM(str(qwen_dir), dtype="float32", device="cpu", page_size=4, chunk_size=8,
              disk_path=str(tmp_path / "pages"), cpu_memory_size_GB=0.01)
    outs = llm.generate(["hello world", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(outs) == 2 and all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("hello world")
    assert isinstance(outs[0].outputs[0].text, str)
    llm.close()
    with pytest.raises(ValueError, match="no_such_key"):
        LLM(str(qwen_dir), no_such_key=1)


def test_model_without_tokenizer_serves_token_ids(qwen_dir, tmp_path):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((qwen_dir / f).read_bytes())
    eng = make_engine(tmp_path)
    assert eng.tokenizer is None
    assert len(run(eng, [[1, 2, 3]])[0].outputs[0].token_ids) == 8
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request("t", "text", GREEDY)


def test_prefix_caching_off_reuses_nothing_and_matches(model_dir, store):
    on = make_engine(model_dir, cache=store)
    cold = run(on, [PROMPT])[0]
    off = make_engine(model_dir, cache=store, prefix_caching=False)
    assert off.prefix_cache.host is None
    outs = run(off, [PROMPT, PROMPT])
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    assert all(o.outputs[0].token_ids == cold.outputs[0].token_ids for o in outs)
    on.close()


def test_device_hits_are_counted_by_tier(model_dir):
    from prometheus_client import CollectorRegistry
    reg = CollectorRegistry()
    cfg = load_config().replace(path=str(model_dir), dtype="float32", device="cpu", gpu_only=True,
                                page_size=4, chunk_size=64, num_device_blocks=64)
    eng = LLMEngine(cfg, registry=reg)
    run(eng, [PROMPT])
    run(eng, [PROMPT])
    assert reg.get_sample_value("kvc_lookup_hit_tokens_total", {"tier": "device"}) == 28
    assert reg.get_sample_value("kvc_request_cached_tokens_total") == 28
    assert reg.get_sample_value("kvc_request_prompt_tokens_total") == 2 * len(PROMPT)


def test_request_gauges_follow_the_queue(model_dir):
    """kvc_engine_requests{state}: waiting past max_num_seqs, running while scheduled, 0 at the end."""
    from prometheus_client import CollectorRegistry
    reg = CollectorRegistry()
    cfg = load_config().replace(path=str(model_dir), dtype="float32", device="cpu", gpu_only=True,
                                page_size=4, chunk_size=64, num_device_blocks=64, max_num_seqs=2)
    eng = LLMEngine(cfg, registry=reg)
    gauge = {s: (lambda s=s: reg.get_sample_value("kvc_engine_requests", {"state": s})) for s in
             ("waiting", "loading", "running")}
    assert [g() for g in gauge.values()] == [0, 0, 0]
    for i in range(3):
        eng.add_request(f"r{i}", PROMPT[:8 + i], GREEDY)
    eng.step()
    eng.step()  # with async scheduling the first step's outputs (and gauges) come with the second
    assert gauge["running"]() == 2 and gauge["waiting"]() == 1
    while eng.has_unfinished():
        eng.step()
    eng.flush_commits()
    assert [g() for g in gauge.values()] == [0, 0, 0]
    eng.close()


def test_prompt_ids_are_checked_and_packed_once(model_dir):
    """add_request converts a prompt in C (array('I')) and keeps its uint32 bytes for the page
    hashes and the prefix match; whatever array('I') refuses goes through operator.index() and the same checks."""
    import numpy as np

    from engine.llm_engine import _token_ids
    from kvc.hashing import tokens_bytes
    ids, packed, low, high = _token_ids([5, 0, 7])
    assert ids == [5, 0, 7] and packed == tokens_bytes([5, 0, 7]) and (low, high) == (0, 7)
    ids, packed, low, high = _token_ids(np.array([3, 9], dtype=np.int64))
    assert ids == [3, 9] and all(type(t) is int for t in ids) and (low, high) == (3, 9)
    given = [4, 8, 2]
    ids = _token_ids(given)[0]
    assert ids == given and ids is not given  # a list is copied as it is (no new int per token)
    assert _token_ids([np.int64(4), 2])[0] == [4, 2]
    assert _token_ids([-1, 4])[2:] == (-1, 4)  # array('I') refuses: the slow path reports the range
    assert _token_ids([2 ** 40])[3] == 2 ** 40
    with pytest.raises(ValueError, match="must be integers"):
        _token_ids([1, 1.5])  # not truncated to 1
    eng = make_engine(model_dir)
    vocab = eng.args.vocab_size
    for bad, what in (([1, -1], "-1..1"), ([vocab], f"{vocab}..{vocab}"), ([1, 2 ** 40], "1..")):
        with pytest.raises(ValueError, match=f"must be in \\[0, {vocab}\\); got {what}"):
            eng.add_request("bad", bad, GREEDY)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("bad", [], GREEDY)
    assert not eng.requests
    eng.add_request("np", np.array(PROMPT, dtype=np.int32), GREEDY)
    req = eng.requests["np"]
    assert req.prompt_ids == PROMPT and req.ids_bytes(0, 8) == tokens_bytes(PROMPT[:8])
    cold = run(make_engine(model_dir), [PROMPT])[0]
    done = []
    while eng.has_unfinished():
        done += [o for o in eng.step() if o.finished]
    assert done[0].outputs[0].token_ids == cold.outputs[0].token_ids


def test_each_steps_output_keeps_the_tokens_it_had(qwen_dir):
    """The engine's outputs share the request's growing id list and copy their prefix when first
    read: every step's output still says the tokens it had then, read before or after later
    steps (and an output's own copy is the caller's to change)."""
    eng = make_engine(qwen_dir)
    eng.add_request("x", PROMPT, GREEDY)
    seen = []
    while eng.has_unfinished():
        for o in eng.step():
            seen.append(o)
    eng.flush_commits()
    mid = seen[3].outputs[0].token_ids  # read before the later ones
    mid.append(-1)  # the caller's copy: the later outputs do not see it
    final = seen[-1].outputs[0].token_ids
    assert len(final) == GREEDY.max_tokens and seen[-1].finished
    assert mid == final[:4] + [-1]
    assert [o.outputs[0].token_ids for i, o in enumerate(seen) if i != 3] == \
        [final[:i + 1] for i in range(len(final)) if i != 3]
    assert seen[-1].outputs[0] == type(seen[-1].outputs[0])(0, seen[-1].outputs[0].text, final, "length")


def test_chunk_size_auto_is_the_cpus_on_cpu(qwen_dir):
    """attn.chunk_size unset: the engine on the CPU chunks by 256 tokens (2048 on CUDA: the GPU tests);
    a prompt of 600 tokens then takes three prefill steps."""
    from prometheus_client import CollectorRegistry
    eng = LLMEngine(load_config().replace(path=str(qwen_dir), dtype="float32", device="cpu", gpu_only=True,
                                          num_device_blocks=128), registry=CollectorRegistry())
    try:
        assert eng.scheduler.chunk == eng.prefix_cache.chunk == 256
        eng.add_request("a", [(i * 7 + 3) % 250 for i in range(600)], SamplingParams(max_tokens=1))
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
        assert steps >= 3, steps
    finally:
        eng.close()
