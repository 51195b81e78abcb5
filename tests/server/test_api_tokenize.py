"""The HTTP API tokenizes text prompts off the engine's thread: the engine receives token ids."""
import threading

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from engine import LLMEngine
from engine.tiny import make_tiny_model
from engine.tokenizer import Tokenizer
from kvc.config import load_config
from server.api import create_app
from server.engine_loop import AsyncEngine


@pytest.fixture
def app_engine(tmp_path):
    make_tiny_model(tmp_path / "m", "qwen3_moe", num_hidden_layers=1)
    cfg = load_config().replace(path=str(tmp_path / "m"), dtype="float32", device="cpu", gpu_only=True,
                                page_size=4, chunk_size=64, num_device_blocks=256)
    eng = LLMEngine(cfg)
    loop = AsyncEngine(eng)
    yield create_app(loop, ["tiny"], CollectorRegistry()), eng, loop
    loop.shutdown()
    eng.close()


def test_text_prompts_are_tokenized_off_the_engine_thread(app_engine, monkeypatch):
    app, eng, loop = app_engine
    seen, encoded_on, salts = [], [], []
    add = eng.add_request

    def record_add(rid, prompt, *a, **k):
        seen.append(prompt)
        return add(rid, prompt, *a, **k)
    monkeypatch.setattr(eng, "add_request", record_add)
    encode = Tokenizer.encode

    def record_encode(self, text, cache_salt="", add_special_tokens=False):
        encoded_on.append(threading.current_thread())
        salts.append(cache_salt)
        return encode(self, text, cache_salt, add_special_tokens)
    monkeypatch.setattr(Tokenizer, "encode", record_encode)
    prompt = "the cached prefix of a long prompt " * 20
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 3,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        c = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "temperature": 0,
                                                      "messages": [{"role": "user", "content": prompt}],
                                                      "cache_salt": "tenant-b"})
        assert c.status_code == 200, c.text
    assert len(seen) == 2 and all(isinstance(p, list) for p in seen)
    assert salts == ["", "tenant-b"]  # the tokenizer keeps long pieces per tenant (engine.token_cache)
    assert seen[0] == eng.tokenizer.encode(prompt)
    assert r.json()["usage"]["prompt_tokens"] == len(seen[0])
    assert encoded_on and all(t is not loop._thread for t in encoded_on)


def test_encode_is_the_tokenizers_encode(tmp_path):
    make_tiny_model(tmp_path, "qwen3_moe", num_hidden_layers=1)
    tok = Tokenizer.from_dir(tmp_path)
    for text in ("", "hello world", "<|im_start|>user\nhi<|im_end|>", "é ü 漢字 🙂" * 3):
        assert tok.encode(text) == tok._tok.encode(text, add_special_tokens=False).ids


def test_ttft_counts_from_the_request_not_from_the_engine(app_engine, monkeypatch):
    """kvc_time_to_first_token_seconds includes tokenizing (before, it started when the engine's
    thread added the request, after the text was tokenized)."""
    import time
    app, eng, loop = app_engine
    encode = Tokenizer.encode

    def slow_encode(self, text, cache_salt="", add_special_tokens=False):
        time.sleep(0.3)
        return encode(self, text, cache_salt, add_special_tokens)
    monkeypatch.setattr(Tokenizer, "encode", slow_encode)

    def ttft_sum():
        return next(s.value for m in eng.metrics.ttft.collect() for s in m.samples if s.name.endswith("_sum"))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 1})
        assert r.status_code == 200, r.text
    assert ttft_sum() >= 0.3
