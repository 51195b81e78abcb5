"""server.max_request_bytes under a real uvicorn: a body over the limit gets a 413 with OpenAI's
error shape before the server reads it (a declared Content-Length) or as soon as it passes the
limit (a chunked body), and the server keeps serving. uvicorn itself reads bodies of any size."""
import json
import socket
import time

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from engine import LLMEngine
from engine.tiny import make_tiny_model
from kvc.config import ConfigError, ServerConfig, load_config
from server.api import create_app
from server.engine_loop import AsyncEngine

from .conftest import free_port, start_uvicorn

LIMIT = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    make_tiny_model(path, "qwen3_moe", num_hidden_layers=1)
    cfg = load_config().replace(path=str(path), dtype="float32", device="cpu", gpu_only=True,
                                page_size=4, chunk_size=64, num_device_blocks=128)
    eng = LLMEngine(cfg)
    loop = AsyncEngine(eng)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(loop, ["tiny"], CollectorRegistry(), LIMIT),
                                        host="127.0.0.1", port=port, log_level="warning"))
    thread = start_uvicorn(srv)
    yield port
    srv.should_exit = True
    thread.join(10)
    loop.shutdown()
    eng.close()


def _raw(port: int, head: bytes, body_parts=(), timeout=10.0) -> tuple[int, dict, bytes]:
    """Send a request by hand (a declared length with too few bytes, or a chunked body); read
    the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        for part in body_parts:
            try:
                s.sendall(part)
            except OSError:  # the server answered and closed: stop sending
                break
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    head_part, body = data.split(b"\r\n\r\n", 1)
    return status, json.loads(body[:_length(data)]) if body else {}, head_part


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return int(v)
    return 0


def _check_413(status, body):
    assert status == 413, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["code"] == "request_too_large"
    assert "server.max_request_bytes" in err["message"] and str(LIMIT) in err["message"]


def test_declared_length_over_the_limit_is_refused_before_the_body(server):
    # 1 GB declared, nothing sent: a server that reads the body first waits until the timeout
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n")
    t0 = time.monotonic()
    status, body, _ = _raw(server, head)
    _check_413(status, body)
    assert time.monotonic() - t0 < 5


def test_chunked_body_over_the_limit_is_refused(server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b'{"model": "tiny", "prompt": "' + b"a" * 1000
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] + [b"3e8\r\n" + b"a" * 1000 + b"\r\n"] * 20
    status, body, _ = _raw(server, head, chunks)
    _check_413(status, body)


def test_body_under_the_limit_is_served_and_the_server_keeps_serving(server):
    url = f"http://127.0.0.1:{server}/v1/completions"
    r = httpx.post(url, json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0},
                   timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    r = httpx.post(url, json={"model": "tiny", "prompt": "x" * (2 * LIMIT)}, timeout=30)
    _check_413(r.status_code, r.json())
    r = httpx.get(f"http://127.0.0.1:{server}/health", timeout=10)
    assert r.status_code == 200


def test_the_limit_is_a_checked_config_key():
    assert ServerConfig().max_request_bytes == 32 << 20
    assert load_config().replace(max_request_bytes=1 << 20).server.max_request_bytes == 1 << 20
    with pytest.raises(ConfigError, match="max_request_bytes"):
        load_config().replace(max_request_bytes=10)
