"""Prefix reuse for chats that grow turn by turn and agents that resend a long system prompt.

Turn N+1's prompt is turn N's prompt ids + its output ids + a new message: every full page of
turn N's computed tokens (prompt and output; the last sampled token's KV is never computed, and a
last partial page is not kept, as in vLLM) is reused, from the device pool or the host tiers.
Agents that arrive together with the same system prompt reuse the first one's pages: a running
request's launched steps' pages are committed when a request with the same first page is
admitted (vLLM caches a block as soon as its step is scheduled), and a request whose next page a
running prefill is still to compute waits for it instead of computing it beside it. Every cached
path's greedy output equals the plain path's (prefix caching off)."""
from __future__ import annotations

import pytest

from kvc.config import load_config
from engine import LLMEngine, SamplingParams
from engine.tiny import make_tiny_model
from .paged import run_to_end

P = 4


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("deepseek"), "deepseek_v2", seed=0)


@pytest.fixture(params=["qwen3_moe", "mixtral", "deepseek_v2"])
def any_dir(request, qwen_dir, mixtral_dir):
    if request.param == "deepseek_v2":
        return request.getfixturevalue("deepseek_dir")
    return qwen_dir if request.param == "qwen3_moe" else mixtral_dir


def make_engine(path, cache=None, **kw):
    kw = {"page_size": P, "chunk_size": 64, "num_device_blocks": 256, **kw}
    cfg = load_config().replace(path=str(path), dtype="float32", device="cpu", gpu_only=cache is None, **kw)
    return LLMEngine(cfg, cache=cache)


def user(i: int) -> list[int]:
    """A new user message's ids (any ids: the engine sees token ids only)."""
    return [(i * 31 + k * 7 + 3) % 250 for k in range(5 + i % 3)]


def chat(engine, plain, turns: int, max_tokens: int, reset=None, salt: str = ""):
    """Run a chat whose every turn resends the last one's prompt + output ids + a new message.
    Returns (cached, ideal) per turn; each turn's output is checked against the plain engine."""
    ids, prev, rows = [(k * 13 + 5) % 250 for k in range(11)], None, []
    for t in range(turns):
        params = SamplingParams(temperature=0, max_tokens=max_tokens + t, ignore_eos=True)
        out = run_to_end(engine, [ids], params, salt)[0]
        ref = run_to_end(plain, [ids], params)[0]
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids, f"turn {t + 1}: greedy output differs"
        # every full page of the last turn's computed tokens (its last sampled token has no KV)
        rows.append((out.num_cached_tokens, 0 if prev is None else (len(prev) - 1) // P * P))
        prev = ids + list(out.outputs[0].token_ids)
        ids = prev + user(t)
        if reset is not None:
            reset()
    return rows


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_chat_turns_reuse_prompt_and_output_pages(any_dir, async_scheduling):
    eng = make_engine(any_dir, async_scheduling=async_scheduling)
    plain = make_engine(any_dir, prefix_caching=False)
    rows = chat(eng, plain, turns=5, max_tokens=6)
    assert [c for c, _ in rows] == [i for _, i in rows]
    assert rows[-1][1] > 0
    eng.close()
    plain.close()


def test_chat_turns_reuse_output_pages_from_the_host_tiers(qwen_dir, store):
    """The device pool forgets everything between turns: the output pages come back from the host tiers."""
    eng = make_engine(qwen_dir, cache=store, load_policy="always")
    plain = make_engine(qwen_dir, prefix_caching=False)

    def reset():
        eng.prefix_cache.flush()
        assert eng.prefix_cache.reset_device_cache() > 0
    rows = chat(eng, plain, turns=4, max_tokens=7, reset=reset, salt="tenant-a")
    assert [c for c, _ in rows] == [i for _, i in rows]
    eng.close()
    plain.close()


def test_chat_turn_after_a_stop_token_reuses_its_pages(qwen_dir):
    """A turn that ends on a stop token: the next turn resends it (as a template's end-of-turn token)."""
    eng = make_engine(qwen_dir)
    plain = make_engine(qwen_dir, prefix_caching=False)
    ids = [(k * 17 + 2) % 250 for k in range(13)]
    free = run_to_end(plain, [ids], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop = free.outputs[0].token_ids[6]
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop], ignore_eos=True)
    out = run_to_end(eng, [ids], params)[0]
    assert out.outputs[0].token_ids == run_to_end(plain, [ids], params)[0].outputs[0].token_ids
    prev = ids + list(out.outputs[0].token_ids)
    nxt = run_to_end(eng, [prev + user(1)], params)[0]
    assert nxt.num_cached_tokens >= (len(prev) - 1) // P * P
    assert nxt.outputs[0].token_ids == run_to_end(plain, [prev + user(1)], params)[0].outputs[0].token_ids
    eng.close()
    plain.close()


def test_aborted_turn_keeps_its_computed_pages(qwen_dir):
    """A reply cut short (the client went away): the next turn resends what it got, and reuses it."""
    eng = make_engine(qwen_dir)
    plain = make_engine(qwen_dir, prefix_caching=False)
    ids = [(k * 19 + 4) % 250 for k in range(14)]
    eng.add_request("cut", ids, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    got = []
    while len(got) < 9:
        for o in eng.step():
            got = list(o.outputs[0].token_ids)
    eng.abort("cut")
    prev = ids + got
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    nxt = run_to_end(eng, [prev + user(2)], params)[0]
    assert nxt.num_cached_tokens >= (len(prev) - 1) // P * P
    assert nxt.outputs[0].token_ids == run_to_end(plain, [prev + user(2)], params)[0].outputs[0].token_ids
    eng.close()
    plain.close()


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("budget", [32, 128])
def test_agents_arriving_together_reuse_the_first_ones_system_prompt(model_dir, async_scheduling, budget):
    """Three agents with one 70-token system prompt (17 full pages, 68 tokens) arrive at once;
    prefill chunks of 32 tokens. budget 32: a step computes one chunk (as on CUDA, where both are
    2048); the second agent is admitted beside the first's last chunk. budget 128: a step holds
    four chunks (as on the CPU: 256 and 2048), so all three are placed in the first step. Either
    way the later two reuse all 68 (before: budget 32 gave the second only the pages of steps
    already read back and committed, 32 tokens with synchronous scheduling and 0 with
    asynchronous; budget 128 gave nothing: all three computed the system prompt side by side)."""
    system = [(k * 23 + 9) % 250 for k in range(70)]
    prompts = [system + [200 + i, 7, 8, 9, 10, 11] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eng = make_engine(model_dir, chunk_size=32, max_num_batched_tokens=budget, async_scheduling=async_scheduling)
    outs = run_to_end(eng, prompts, params)
    plain = make_engine(model_dir, prefix_caching=False)
    refs = [run_to_end(plain, [p], params)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in refs]
    assert [o.num_cached_tokens for o in outs] == [0, 68, 68]
    eng.close()
    plain.close()


def test_identical_prompts_arriving_together_compute_it_once(qwen_dir):
    """Four copies of one prompt at once: the first computes it, the others wait for its pages and
    compute only the last one (before: four computed it side by side)."""
    prompt = [(k * 29 + 1) % 250 for k in range(50)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    eng = make_engine(qwen_dir, chunk_size=16, max_num_batched_tokens=64)
    outs = run_to_end(eng, [prompt] * 4, params)
    ref = run_to_end(make_engine(qwen_dir, prefix_caching=False), [prompt], params)[0]
    assert all(o.outputs[0].token_ids == ref.outputs[0].token_ids for o in outs)
    assert [o.num_cached_tokens for o in outs] == [0, 48, 48, 48]
    assert eng.kv.blocks.num_free == 256
    eng.close()
