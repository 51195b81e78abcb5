"""`kvc serve` SIGKILLed in the middle of a stream restarts on the same port at once and reuses
the pages its disk tier committed before the kill."""
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
