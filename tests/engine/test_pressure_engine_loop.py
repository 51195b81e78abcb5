"""The server's engine loop (server/engine_loop.py) under pressure: a submit cancelled before the
engine took its request, an event loop closed with a request still running, a slow host-tier load
while other requests arrive."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine import LLMEngine, SamplingParams
from kvc.config import load_config
from server.engine_loop import AsyncEngine

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture
def served(qwen_dir):
    cfg = load_config().replace(path=str(qwen_dir), dtype="float32", device="cpu", gpu_only=True,
                                page_size=4, chunk_size=64, num_device_blocks=256)
    eng = LLMEngine(cfg)
    loop = AsyncEngine(eng)
    yield eng, loop
    loop.shutdown()
    eng.close()


def _idle(eng: LLMEngine, loop: AsyncEngine) -> bool:
    """Whether the engine holds no request and the loop no stream (read from this thread: sizes
    only, which the loop thread changes whole)."""
    return not eng.requests and not loop._streams and eng.kv.blocks.num_free == 256


def _wait_idle(eng: LLMEngine, loop: AsyncEngine, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _idle(eng, loop):
            return True
        time.sleep(0.02)
    return False


def test_submit_cancelled_before_accepted_aborts_its_request(served):
    """A caller cancelled while submit() waits for the engine to take its request (a client gone,
    an asyncio.wait_for timeout) never gets a Stream that could abort it: the request must not
    run its 400 tokens for nobody, holding pages and a running slot."""
    eng, loop = served

    async def cancel_submit():
        task = asyncio.ensure_future(loop.submit("gone", [5, 6, 7, 8, 9], LONG))
        await asyncio.sleep(0)  # in the inbox, waiting for the engine's answer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # a 4-token request submitted after it ends long before 400 tokens could (this event loop
        # stays open meanwhile, so nothing but the cancel can end the first one)
        out = await (await loop.submit("probe", [1, 2, 3], SHORT)).final()
        return out, list(eng.requests)
    out, left = asyncio.run(cancel_submit())
    assert len(out.outputs[0].token_ids) == 4
    assert left == [], f"the cancelled request still runs: {left}"
    assert _wait_idle(eng, loop) and loop.alive


def test_closed_event_loop_fails_only_its_own_requests(served):
    """A request whose caller's event loop closed while it ran (asyncio.run returned without
    reading its stream) is aborted; the engine loop keeps serving other callers."""
    eng, loop = served

    async def leave():
        return await loop.submit("orphan", [1, 2, 3], LONG)  # never read
    asyncio.run(leave())

    async def serve_one():
        stream = await loop.submit("next", [1, 2, 3], SHORT)
        return await stream.final()
    out = asyncio.run(serve_one())
    assert loop.alive and loop.error is None
    assert len(out.outputs[0].token_ids) == 4
    assert _wait_idle(eng, loop), f"still running: {list(eng.requests)}"


class SlowLoadStore:
    """A real TieredStore whose loads into the engine start only once `gate` is set (a cache
    service near its RPC timeout, a disk under load)."""

    def __init__(self, store):
        self.store, self.gate = store, threading.Event()

    def get_into(self, ns, hashes, out, landed=None):
        assert self.gate.wait(30)
        return self.store.get_into(ns, hashes, out, landed)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_slow_host_load_does_not_hold_back_new_requests_or_aborts(qwen_dir, store):
    """While the only request in the engine waits for its host-tier load, a request that arrives
    is taken and served, and the loading request can be aborted (before: the engine's thread
    blocked until the load ended, and every submit waited for it); once the load ends its blocks
    come back."""
    slow = SlowLoadStore(store)
    slow.gate.set()
    cfg = load_config().replace(path=str(qwen_dir), dtype="float32", device="cpu", gpu_only=False,
                                page_size=4, chunk_size=64, num_device_blocks=256, load_policy="always")
    eng = LLMEngine(cfg, cache=slow)
    prompt = [(i * 37 + 11) % 250 for i in range(29)]
    eng.add_request("warm", prompt, SHORT)
    while eng.has_unfinished():
        eng.step()
    eng.prefix_cache.flush()
    assert eng.prefix_cache.reset_device_cache() > 0  # the prompt's pages are in the host tiers only
    slow.gate.clear()
    loop = AsyncEngine(eng)
    try:
        async def during_load():
            await loop.submit("loads", prompt, SHORT)  # a host hit: its load waits for the gate
            await asyncio.sleep(0.1)
            task = asyncio.ensure_future(_read_all(loop, "other", 4))
            await asyncio.wait({task}, timeout=3)
            assert task.done(), "a request that arrived during another's host load waited for the load"
            out = task.result()[-1]
            loop.abort("loads")
            deadline = time.monotonic() + 3
            while "loads" in eng.requests and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return out, "loads" in eng.requests
        out, still = asyncio.run(during_load())
        assert len(out.outputs[0].token_ids) == 4
        assert not still, "the abort of the loading request waited for its load"
    finally:
        slow.gate.set()
    assert _wait_idle(eng, loop)  # the aborted load's blocks came back once it ended
    loop.shutdown()
    eng.close()


def test_a_slow_reader_holds_its_latest_output_not_one_per_token(served):
    """Each output holds the whole text and token ids so far: a reader that falls behind (a slow
    client, TCP pushing back) must not have one queued per token (memory quadratic in the length),
    only the latest; what it reads adds up to the full output."""
    eng, loop = served
    n = 300

    async def slow_reader():
        stream = await loop.submit("slow", [1, 2, 3], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        while "slow" in eng.requests:  # the reader does not read until the request has finished
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the last output reaches this event loop
        return [out async for out in stream]
    outs = asyncio.run(slow_reader())
    assert len(outs) <= 2, f"{len(outs)} outputs held for one reader"
    last = outs[-1]
    assert last.finished and len(last.outputs[0].token_ids) == n
    assert last.outputs[0].finish_reason == "length"
    fast = asyncio.run(_read_all(loop, "fast", n))  # a reader that keeps up reads the same output
    assert fast[-1].outputs[0].token_ids == last.outputs[0].token_ids
    assert fast[-1].outputs[0].text == last.outputs[0].text


async def _read_all(loop: AsyncEngine, rid: str, n: int) -> list:
    stream = await loop.submit(rid, [1, 2, 3], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return [out async for out in stream]
