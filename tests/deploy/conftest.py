"""Fixtures for tests/deploy: the Prometheus / promtool / docker-compose binaries (installed from
Debian by scripts/install_*.sh when missing) and a live stack on 127.0.0.1: kvc cache-server,
kvc serve --cache-url, and Prometheus scraping both with the shipped scrape config and rules."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import Proc, free_port, wait_http, wait_port

from .promql import ALERTS, PROM_CONFIG, ROOT


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "prometheus: runs a real Prometheus (installed from Debian by scripts/install_prometheus.sh)")


def _install(script: str, *binaries: str) -> str | None:
    """Run scripts/<script> unless the binaries are on PATH; None when they are, else why not."""
    if all(shutil.which(b) for b in binaries):
        return None
    if not shutil.which("apt-get"):
        return f"{', '.join(binaries)} missing and apt-get is not available to install them"
    r = subprocess.run(["bash", str(ROOT / "scripts" / script)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not all(shutil.which(b) for b in binaries):
        return f"scripts/{script} failed (rc {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}"
    return None


@pytest.fixture(scope="session")
def promtool() -> str:
    why = _install("install_prometheus.sh", "prometheus", "promtool")
    if why:
        print(why)
        pytest.skip(why)
    return shutil.which("promtool")


@pytest.fixture(scope="session")
def docker_compose() -> str:
    why = _install("install_docker_compose.sh", "docker-compose")
    if why:
        print(why)
        pytest.skip(why)
    return shutil.which("docker-compose")


CACHE_YAML = """
kvc: {{cpu_memory_size_GB: 0.0625, disk_path: {disk}, disk_size_GB: 0.125}}
server: {{host: 127.0.0.1, grpc_port: {port}, metrics_port: {mport}}}
"""

# A device pool of 24 pages: a few unrelated prompts push a prefix out of it, so the next request
# for that prefix is served from the cache-server's cpu tier (a host-tier hit). Half the MoE experts
# run from CPU memory, so that the kvc_experts_* series exist.
SERVE_YAML = """
model: {{path: {model}, device: cpu, dtype: float32}}
attn: {{page_size: 16, chunk_size: 128}}
kvc: {{num_device_blocks: 24}}
experts: {{gpu_experts_ratio: 0.5}}
scheduler: {{max_num_seqs: 4, max_num_batched_tokens: 512}}
server: {{host: 127.0.0.1, http_port: {port}}}
"""


class Prometheus:
    """A Prometheus process on 127.0.0.1 with its HTTP API."""

    def __init__(self, config: Path, storage: Path, log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._f = open(log, "ab")
        self.p = subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={storage}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._f, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.p.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query (now, or at unix time `at`); the result vector (a scalar as one element).
        Fails on any API error."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        r = httpx.get(self.base + "/api/v1/query", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]

    def value(self, expr: str, at: float | None = None) -> float | None:
        res = self.query(expr, at)
        assert len(res) <= 1, f"{expr}: {len(res)} series"
        return float(res[0]["value"][1]) if res else None

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._f.close()


def scrape_config_for(serve_port: int, metrics_port: int, interval: str = "1s") -> dict:
    """The shipped prometheus.yml with its two targets on 127.0.0.1 and a short interval."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"kvc-serve", "kvc-cache-server"}, sorted(jobs)
    jobs["kvc-serve"]["static_configs"] = [{"targets": [f"127.0.0.1:{serve_port}"]}]
    jobs["kvc-cache-server"]["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    assert cfg["rule_files"] == ["alerts.yml"], cfg["rule_files"]
    cfg["rule_files"] = [str(ALERTS)]
    cfg["global"] = {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval}
    return cfg


class Stack:
    def __init__(self, serve: Proc, serve_base: str, cache: Proc, cache_port: int, metrics_base: str,
                 prom: Prometheus):
        self.serve, self.serve_base, self.cache, self.cache_port = serve, serve_base, cache, cache_port
        self.metrics_base, self.prom = metrics_base, prom

    def scrape(self) -> tuple[str, str]:
        """(/metrics of kvc serve, /metrics of the cache-server)."""
        return (httpx.get(self.serve_base + "/metrics", timeout=5).text,
                httpx.get(self.metrics_base + "/metrics", timeout=5).text)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, promtool):
    from engine.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("stack")
    cache_port, mport = free_port(), free_port()
    (tmp / "cache.yaml").write_text(CACHE_YAML.format(disk=tmp / "cache-pages", port=cache_port, mport=mport))
    cache = Proc(["cache-server", "--config", str(tmp / "cache.yaml")], tmp / "cache.log")
    procs, prom = [cache], None
    try:
        model = tmp / "tiny-qwen3-moe"
        make_tiny_model(model, "qwen3_moe", seed=0)
        port = free_port()
        (tmp / "serve.yaml").write_text(SERVE_YAML.format(model=model, port=port))
        serve = Proc(["serve", "--config", str(tmp / "serve.yaml"), "--cache-url", f"grpc://127.0.0.1:{cache_port}"],
                     tmp / "serve.log")
        procs.append(serve)
        wait_port(cache_port, cache)
        wait_http(f"http://127.0.0.1:{mport}/metrics", cache)
        serve_base = f"http://127.0.0.1:{port}"
        wait_http(serve_base + "/health", serve)
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(scrape_config_for(port, mport)))
        prom = Prometheus(tmp / "prometheus.yml", tmp / "tsdb", tmp / "prometheus.log")
        prom.wait_ready()
        yield Stack(serve, serve_base, cache, cache_port, f"http://127.0.0.1:{mport}", prom)
    finally:
        if prom is not None:
            prom.stop()
        for p in reversed(procs):
            p.stop()
