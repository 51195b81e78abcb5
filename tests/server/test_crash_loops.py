"""kill -9 loops over `kvc cache-server` (see tests/server/crashloop.py for what one cycle does).

The seed is printed (and taken from KVC_CRASH_SEED when set) so a failing run can be replayed.
"""
import os
import random

import pytest

from .crashloop import run_cycles


# 100 cycles of a server restart each (2-4.5 s a cycle on the 2-core VMs) outlast the suite's 300 s a test
@pytest.mark.parametrize("cycles", [10, pytest.param(100, marks=[pytest.mark.slow, pytest.mark.timeout(900)])])
def test_kill9_loop_serves_no_wrong_byte_and_keeps_durable_pages(make_server, cycles):
    seed = int(os.environ.get("KVC_CRASH_SEED") or random.randrange(1 << 32))
    print(f"crash-loop seed={seed} (replay with KVC_CRASH_SEED={seed})")
    results = run_cycles(make_server(kvc={"disk_size_GB": 0.25}), cycles, seed)
    problems = [e for r in results for e in r.errors]
    assert not problems, f"seed {seed}: {problems[:5]}"
    assert len(results) == cycles
    assert results[-1].wrong_bytes == 0 and results[-1].durable_lost == 0
    assert results[-1].reads_checked > 0
    assert sum(r.acked_pages for r in results) > 0 and sum(r.durable_pages for r in results) > 0
