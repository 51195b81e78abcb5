"""Real `kvc serve` and `kvc cache-server` processes on 127.0.0.1, for end-to-end tests."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A kvc subprocess with its log; stop() sends SIGTERM (or SIGKILL) and waits."""

    def __init__(self, args: list[str], log: Path, env=None, python_args: tuple[str, ...] = ("-m", "server.cli")):
        """python_args: what runs (the kvc CLI, or a script given with -c that calls it)."""
        self.log = log
        self.args = args
        self._f = open(log, "ab")
        self.p = subprocess.Popen([sys.executable, *python_args, *args], cwd=ROOT, stdout=self._f,
                                  stderr=subprocess.STDOUT, env=env or dict(os.environ, PYTHONUNBUFFERED="1"))

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._f.close()
        return self.p.returncode


def wait_http(url: str, proc: Proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            raise RuntimeError(f"process exited with {proc.p.returncode}:\n{proc.output()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up:\n{proc.output()[-3000:]}")


def wait_port(port: int, proc: Proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            raise RuntimeError(f"process exited with {proc.p.returncode}:\n{proc.output()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} did not open:\n{proc.output()[-3000:]}")


SERVE_YAML = """
model: {{path: {model}, device: cpu, dtype: float32}}
attn: {{page_size: 16, chunk_size: 128}}
kvc: {{cpu_memory_size_GB: 0.125, disk_path: {disk}, disk_size_GB: 0.25, num_device_blocks: 256}}
scheduler: {{max_num_seqs: 8, max_num_batched_tokens: 512}}
server: {{host: 127.0.0.1, http_port: {port}}}
"""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from engine.tiny import make_tiny_model
    d = tmp_path_factory.mktemp("model") / "tiny-qwen3-moe"
    make_tiny_model(d, "qwen3_moe", seed=0)
    return d


def start_serve(tmp: Path, model: Path, name: str, disk: Path | None = None, extra: list[str] = ()):
    port = free_port()
    disk = disk or tmp / f"{name}-pages"
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(SERVE_YAML.format(model=model, disk=disk, port=port))
    proc = Proc(["serve", "--config", str(cfg), *extra], tmp / f"{name}.log")
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"http://127.0.0.1:{port}"


def metric_value(base: str, name: str, **labels) -> float:
    text = httpx.get(base + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    m = re.search(r"^" + pat + "$", text, re.M)
    return float(m.group(1)) if m else 0.0
