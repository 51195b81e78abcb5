"""Decode throughput with every request decoding: the benches' decode rows after long prompts.

With chunked prefill, a request whose prompt is done decodes beside the later requests' prefill
chunks. The rows used to time from the step that gave the last request its first token until every
request reached max_tokens = n: after long prompts the first requests were done, or nearly, before
that step, so the window held fewer decoding requests than the row's count, and a share of the
tokens it counted came from the steps between (run GV, 16 decodes after 32K-token prompts at 27
DeepSeek layers: 557 tok/s one run, 1,616 the next, where profile_mla_decode's steps with all 16
decoding took 18.8 ms, 851 tok/s). Now every request may decode past n, the window is n steps that
start once all of them have their first token, and the requests are then aborted.
"""
from __future__ import annotations

import time

from engine import SamplingParams


def room(conc: int, plen: int, chunk: int, n: int) -> int:
    """max_tokens for decode_window: its n steps, plus a token a prefill step before the window."""
    return n + -(-conc * plen // chunk) + 2


def decode_window(eng, prompts: list[list[int]], n: int, chunk: int, tag: str, sync) -> tuple[int, float]:
    """(tokens handed out, seconds) over n engine steps with all of `prompts` decoding; `sync()`
    waits for the device. The requests are aborted after, and the engine left idle."""
    plen = max(len(p) for p in prompts)
    params = SamplingParams(temperature=0, max_tokens=room(len(prompts), plen, chunk, n), ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, p, params)
    while not all(eng.requests[r].output_ids for r in ids):
        eng.step()
    sync()
    t0, produced = time.perf_counter(), 0
    for _ in range(n):
        produced += len(eng.step())
    sync()
    dt = time.perf_counter() - t0
    for r in ids:
        eng.abort(r)
    eng.step()  # reads the step in flight back (its requests aborted: nothing else runs)
    while eng.has_unfinished():
        eng.step()
    eng.flush_commits()
    return produced, dt
