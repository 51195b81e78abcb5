"""`kvc serve` SIGKILLed in the middle of a stream restarts on the same port at once and reuses
the pages its disk tier committed before the kill; a `kvc serve` whose engine loop died exits."""
import signal

import httpx
import pytest

from .conftest import SERVE_YAML, Proc, free_port, metric_value, wait_http

PROMPT = "You are a careful assistant for a team of engineers who run caches. " * 8 + "Crash test."


def _start(tmp, model, port, disk):
    cfg = tmp / "crash.yaml"
    cfg.write_text(SERVE_YAML.format(model=model, disk=disk, port=port)
                   .replace("disk_size_GB: 0.25,", "disk_size_GB: 0.25, disk_write: through,"))
    proc = Proc(["serve", "--config", str(cfg)], tmp / "crash.log")
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.slow  # two `kvc serve` start-ups: ~30 s on the 2-core VM
def test_sigkill_mid_stream_restarts_and_reuses_disk_pages(tmp_path, tiny_model):
    port, disk = free_port(), tmp_path / "pages"
    body = {"model": "tiny-qwen3-moe", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    proc, base = _start(tmp_path, tiny_model, port, disk)
    try:
        first = httpx.post(base + "/v1/completions", json=body, timeout=60).json()
        with httpx.stream("POST", base + "/v1/completions", timeout=60, json={
                **body, "prompt": "another prompt " * 20, "max_tokens": 3000, "ignore_eos": True,
                "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    proc.p.send_signal(signal.SIGKILL)  # mid-stream
                    break
        proc.p.wait(30)
    finally:
        proc.stop()
    proc, base = _start(tmp_path, tiny_model, port, disk)  # same port, same disk, right away
    try:
        again = httpx.post(base + "/v1/completions", json=body, timeout=60).json()
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 16
        assert metric_value(base, "kvc_lookup_hit_tokens_total", tier="disk") > 0
    finally:
        proc.stop()


_FAULTY_SERVE = """
import os, sys
from engine.llm_engine import LLMEngine
from server.cli import main

step = LLMEngine.step


def faulty_step(self):  # a fault in the engine's step (a CUDA error, a bug) once the trigger file exists
    if os.path.exists(sys.argv[1]):
        raise RuntimeError("injected fault in step")
    return step(self)


LLMEngine.step = faulty_step
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow  # one `kvc serve` start-up: ~15 s on the 2-core VM
def test_a_dead_engine_loop_ends_kvc_serve_with_status_1(tmp_path, tiny_model):
    """The engine loop dead, nothing could be served until a restart: the request in flight gets
    its 503, then the process exits with status 1 (a supervisor's restart policy restarts it)
    instead of answering 503 forever."""
    port, trigger = free_port(), tmp_path / "fail-now"
    cfg = tmp_path / "faulty.yaml"
    cfg.write_text(SERVE_YAML.format(model=tiny_model, disk=tmp_path / "pages", port=port))
    log = tmp_path / "faulty.log"
    proc = Proc([str(trigger), "serve", "--config", str(cfg)], log, python_args=("-c", _FAULTY_SERVE))
    p = proc.p
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", proc)
        body = {"model": "tiny-qwen3-moe", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 200
        trigger.touch()
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and "injected fault" in r.json()["error"]["message"], r.text
        assert p.wait(30) == 1, log.read_text()
        out = log.read_text()
        assert "kvc serve exits with status 1" in out and "Traceback" in out  # the step's, logged once
    finally:
        proc.stop(signal.SIGKILL)
