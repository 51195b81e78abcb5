"""A real `kvc cache-server` subprocess on a free 127.0.0.1 port, for the service tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kvc.client import RemoteCache

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CacheServer:
    """One service process; start() waits until it reports SERVING (or fails)."""

    def __init__(self, tmp: Path, disk_path: Path | None = None, kvc: dict | None = None, **server):
        self.tmp = tmp
        self.kvc = kvc or {}
        self.port = server.pop("grpc_port", None) or free_port()
        self.metrics_port = server.pop("metrics_port", None) or free_port()
        self.disk_path = disk_path or tmp / "pages"
        self.server = {"host": "127.0.0.1", "grpc_port": self.port, "metrics_port": self.metrics_port, **server}
        self.proc: subprocess.Popen | None = None
        self.log = tmp / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        cfg = {"kvc": {"cpu_memory_size_GB": 0.02, "disk_path": str(self.disk_path), "disk_size_GB": 0.2,
                       **self.kvc},
               "server": self.server}
        path = self.tmp / f"cache-{self.port}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def spawn(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "server.cli", "cache-server", "--config", str(self.write_config())]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=open(self.log, "ab"),
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self.proc

    def start(self, timeout: float = 30.0) -> "CacheServer":
        self.spawn()
        line = self.proc.stdout.readline()  # the "serving" line, or EOF when it exits
        if "serving" not in line:
            self.proc.wait(timeout)
            raise RuntimeError(f"cache-server did not start (exit {self.proc.returncode}): {self.log.read_text()}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def make_server(tmp_path):
    servers: list[CacheServer] = []

    def make(**kw) -> CacheServer:
        s = CacheServer(tmp_path, **kw)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for a whole module (tests that clean up after themselves)."""
    s = CacheServer(tmp_path_factory.mktemp("cache")).start()
    yield s
    s.stop()


@pytest.fixture
def client_factory():
    clients: list[RemoteCache] = []

    def make(url: str, **kw) -> RemoteCache:
        c = RemoteCache(url, **kw)
        clients.append(c)
        return c
    yield make
    for c in clients:
        c.close()


def wait_until(pred, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def start_uvicorn(srv):
    """Run a uvicorn.Server (its signal handlers left to the test process) on a thread of its own;
    returns the thread once the server listens. Stop it with srv.should_exit = True."""
    import asyncio
    import threading
    srv.install_signal_handlers = lambda: None
    thread = threading.Thread(target=lambda: asyncio.run(srv.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return thread
