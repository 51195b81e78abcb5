"""A stream still running at shutdown ends with an error event and [DONE], before uvicorn's
graceful timeout; it was cut mid-response (an incomplete chunked body: httpx's
RemoteProtocolError) once the timeout passed."""
import json
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from engine import LLMEngine
from engine.tiny import make_tiny_model
from kvc.config import load_config
from server import serve
from server.api import create_app
from server.engine_loop import AsyncEngine

from .conftest import free_port, start_uvicorn


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "GRACEFUL_S", 4.0)
    monkeypatch.setattr(serve, "DRAIN_S", 0.3)
    path = make_tiny_model(tmp_path / "m", "qwen3_moe", num_hidden_layers=1)
    cfg = load_config().replace(path=str(path), dtype="float32", device="cpu", gpu_only=True,
                                page_size=4, chunk_size=64, num_device_blocks=4096)
    eng = LLMEngine(cfg)
    loop = AsyncEngine(eng)
    port = free_port()
    srv = serve.http_server(create_app(loop, ["tiny"], CollectorRegistry()), loop, "127.0.0.1", port)
    thread = start_uvicorn(srv)
    yield srv, port, thread
    srv.should_exit = True
    thread.join(10)
    loop.shutdown()
    eng.close()


def test_a_stream_running_at_shutdown_ends_with_an_error_event(server):
    srv, port, thread = server
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    lines, t_stop = [], None
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():  # raises RemoteProtocolError on a cut body
            if line:
                lines.append(line)
            if t_stop is None and len(lines) > 5:
                t_stop = time.monotonic()
                srv.should_exit = True  # what uvicorn's SIGTERM handler does
    waited = time.monotonic() - t_stop
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert lines[-1] == "data: [DONE]"
    assert "shutting down" in events[-1]["error"]["message"], events[-1]
    assert not any(e["choices"][0]["finish_reason"] for e in events[:-1])  # it had not finished
    assert 0.25 < waited < 4.0, waited  # ended by the engine loop after DRAIN_S, before GRACEFUL_S
    thread.join(10)
    assert not thread.is_alive()
