"""Restarting `kvc serve` on its port right after it served traffic (issue 13)."""
import socket

import openai
import pytest

from kvc.config import ConfigError
from server.serve import _check_port_free

from .conftest import SERVE_YAML, Proc, free_port, wait_http


def test_port_check_ignores_closed_connections_and_refuses_a_listener():
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's listener does
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    conn = socket.create_connection(("127.0.0.1", port))
    peer, _ = lsock.accept()
    with pytest.raises(ConfigError, match="cannot listen"):
        _check_port_free("127.0.0.1", port)  # a live listener: refused
    peer.close()  # the server side closes first: its end lingers in TIME_WAIT, as after traffic
    conn.close()
    lsock.close()
    _check_port_free("127.0.0.1", port)


def test_serve_restarts_at_once_on_the_same_port(tmp_path, tiny_model):
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(SERVE_YAML.format(model=tiny_model, disk=tmp_path / "pages", port=port))
    base = f"http://127.0.0.1:{port}"
    texts = []
    for run in range(2):
        proc = Proc(["serve", "--config", str(cfg)], tmp_path / f"serve-{run}.log")
        try:
            wait_http(base + "/health", proc)
            c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
            for i in range(3):  # several connections, closed by the server when it stops
                r = c.completions.create(model="tiny-qwen3-moe", prompt=f"restart {i}", max_tokens=2,
                                         temperature=0)
                texts.append(r.choices[0].text)
        finally:
            assert proc.stop() == 0, proc.output()[-2000:]  # closes the kept-alive connections
        c.close()
    assert texts[:3] == texts[3:]
