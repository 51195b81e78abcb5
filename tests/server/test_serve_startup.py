"""`kvc serve`'s start-up line says what was configured (issue 13)."""
import pytest

from kvc.config import load_config
from server.serve import cache_description


@pytest.mark.parametrize("gb,text", [(0.25, "cpu 0.25 GB"), (0.125, "cpu 0.125 GB"), (4, "cpu 4 GB"),
                                     (0.05, "cpu 0.05 GB")])
def test_start_up_line_prints_the_cpu_size_exactly(tmp_path, gb, text):
    config = load_config(None, cpu_memory_size_GB=gb, disk_path=str(tmp_path))
    assert text + "," in cache_description(config)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("cache_url", ["grpc://127.0.0.1:1", None])
def test_serve_keeps_freed_buffers_only_with_a_cache_url(tmp_path, monkeypatch, cache_url):
    """`kvc serve` with a shared cache service keeps freed buffers in its heap for the next load
    (server.heap); with the embedded cache it leaves glibc's defaults."""
    import socket

    from server import heap, serve

    calls = []
    monkeypatch.setattr(heap, "retain_freed_memory", lambda n: calls.append(n) or True)

    def build(*a, **k):
        raise _Stop()
    monkeypatch.setattr(serve, "build", build)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = load_config(None, http_port=port, host="127.0.0.1", cache_url=cache_url, disk_path=str(tmp_path))
    with pytest.raises(_Stop):
        serve.run_serve(config)
    assert calls == ([serve.CLIENT_RETAIN_BYTES] if cache_url else [])
