"""`kvc serve`'s start-up line says what was configured (issue 13)."""
import re

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


@pytest.mark.parametrize("where", ["a_file", "a_file/below", "held"])
def test_unusable_disk_path_is_a_one_line_error(tmp_path, capsys, where):
    """A disk_path that is a file, lies below one, or that another process holds: `kvc serve`
    names the key and exits 2 (before: a traceback from os.makedirs or DiskPathLocked)."""
    import socket

    from kvc.disk_tier import DiskTier
    from kvc.metrics import KvcMetrics
    from server.cli import main

    (tmp_path / "a_file").write_text("not a folder")
    holder = DiskTier(str(tmp_path / "held"), 1 << 20, KvcMetrics()) if where == "held" else None
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rc = main(["serve", "--disk-path", str(tmp_path / where), "--port", str(port)])
    finally:
        if holder is not None:
            holder.close()
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("kvc serve: ") and "disk_path" in err and "Traceback" not in err, err
    assert ("in use by another kvc process" if where == "held" else "cannot be used") in err


@pytest.mark.parametrize("server,needle", [
    ({"auth_tokens": ["tok"]}, "server.auth_tokens must be a mapping of strings to strings"),
    ({"auth_tokens": {1: "tenant"}}, "server.auth_tokens must be a mapping of strings to strings"),
    ({"max_message_bytes": 1 << 32}, "server.max_message_bytes must be in"),
    ({"auth_tokens": {"tok": "tenant"}}, "Not a directory.*fix kvc.disk_path"),
    ({"auth_tokens": {"tok": "tenant"}, "tenant_secret_file": "{tmp}/a_file/secret"},
     "Not a directory.*give server.tenant_secret_file a path"),
])
def test_cache_server_config_errors_are_one_line(tmp_path, capsys, server, needle):
    """`kvc cache-server` with a server value gRPC or the service cannot take, or a tenant secret
    it cannot read or create (kvc.disk_path is a file): a one-line error naming the key, exit 2,
    as a bad config file gives (before: AttributeError, OverflowError or NotADirectoryError
    tracebacks)."""
    import yaml

    from server.cli import main

    (tmp_path / "a_file").write_text("not a folder")
    server = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in server.items()}
    config = tmp_path / "cache.yaml"
    config.write_text(yaml.safe_dump({"kvc": {"cpu_memory_size_GB": 0.01, "disk_path": str(tmp_path / "a_file")},
                                      "server": {"grpc_port": 0, "metrics_port": 0, **server}}))
    rc = main(["cache-server", "--config", str(config)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("kvc cache-server: ") and err.count("\n") == 1, err
    assert re.search(needle, err), err


def test_version_says_the_package(capsys):
    """`kvc --version`: the installed version (and the commit, in a git checkout)."""
    from importlib import metadata

    from server.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"kvc {metadata.version('kvc')}"), out
