"""The structure-aware fuzzer (tests/server/fuzz_service.py) against a real `kvc cache-server`.

Seed printed; KVC_FUZZ_SEED replays a run."""
import os
import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvc.pb import pb_grpc

from .fuzz_service import run_fuzz


@pytest.mark.parametrize("cases", [1000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_mutated_frames_get_client_errors_and_change_nothing(make_server, cases):
    seed = int(os.environ.get("KVC_FUZZ_SEED") or random.randrange(1 << 32))
    print(f"service fuzz seed={seed} (replay with KVC_FUZZ_SEED={seed})")
    s = make_server(kvc={"cpu_memory_size_GB": 0.01}).start()
    with grpc.insecure_channel(f"127.0.0.1:{s.port}") as ch:
        t0 = time.monotonic()
        counts = run_fuzz(pb_grpc.KVCacheStub(ch), cases, seed)
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    print(f"service fuzz seed={seed} cases={cases} outcomes={counts} in {time.monotonic() - t0:.1f} s")
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert s.proc.poll() is None
    assert sum(counts.values()) == cases
    assert counts.get("INVALID_ARGUMENT", 0) > cases // 3  # most mutations are caught, not stored
