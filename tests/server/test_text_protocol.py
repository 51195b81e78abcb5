"""What a chat request's text becomes, as OpenAI-compatible servers make it: content parts joined
with newlines, a template's refusal a 400, logprobs a client asked for refused rather than dropped."""
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from engine import LLMEngine
from engine.tiny import CHAT_TEMPLATE, make_tiny_model
from kvc.config import load_config
from server.api import create_app
from server.engine_loop import AsyncEngine
from server.protocol import ChatMessage, ChatRequest, CompletionRequest

# the tiny model's template, refusing a conversation that does not start with a user or system turn
STRICT = ("{% if messages[0]['role'] not in ('user', 'system') %}"
          "{{ raise_exception('Conversation must start with a user or system message') }}{% endif %}"
          + CHAT_TEMPLATE)


@pytest.fixture
def app_engine(tmp_path):
    make_tiny_model(tmp_path / "m", "qwen3_moe", num_hidden_layers=1)
    (tmp_path / "m" / "chat_template.jinja").write_text(STRICT)
    cfg = load_config().replace(path=str(tmp_path / "m"), dtype="float32", device="cpu", gpu_only=True,
                                page_size=4, chunk_size=64, num_device_blocks=256)
    eng = LLMEngine(cfg)
    loop = AsyncEngine(eng)
    yield create_app(loop, ["tiny"], CollectorRegistry()), eng
    loop.shutdown()
    eng.close()


def test_a_template_refusing_the_messages_is_a_400(app_engine):
    app, eng = app_engine
    body = {"model": "tiny", "max_tokens": 1, "temperature": 0}
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "assistant", "content": "x"}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "must start with a user" in err["message"] and err["param"] == "messages"
        assert err["type"] == "invalid_request_error"
        r = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200, r.text


def test_text_parts_are_joined_with_newlines(app_engine, monkeypatch):
    """vLLM (and SGLang, TensorRT-LLM) join a message's text parts with "\\n" for a template that
    takes string content; kvc joined them with nothing ("Hello" + "world" -> "Helloworld")."""
    app, eng = app_engine
    seen = []
    add = eng.add_request

    def record_add(rid, prompt, *a, **k):
        seen.append(list(prompt))
        return add(rid, prompt, *a, **k)
    monkeypatch.setattr(eng, "add_request", record_add)
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, "temperature": 0,
                                                      "messages": [{"role": "user", "content": parts}]})
        assert r.status_code == 200, r.text
    tok = eng.tokenizer
    assert seen == [tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hello\nworld"}]))]


def test_a_text_part_needs_its_text():
    assert ChatMessage(role="user", content=[{"type": "text", "text": "a"}]).text() == "a"
    assert ChatMessage(role="user", content=[]).text() == ""
    for bad in ({"type": "text", "text": None}, {"type": "text"}, {"type": "text", "text": 5}):
        with pytest.raises(ValueError, match="text"):
            ChatMessage(role="user", content=[bad]).text()  # before: "None", "", "5" in the prompt


def test_completions_logprobs_zero_is_refused():
    """The completions API's logprobs is a count, and 0 asks for the sampled tokens' logprobs
    (OpenAI: "the API will always return the logprob of the sampled token"); kvc returns none, so
    it refuses 0 as it refuses 1-5. Chat's logprobs is a flag: false (0) leaves them out."""
    for ok in (None, False):
        CompletionRequest(model="m", prompt="x", logprobs=ok)
    for bad in (0, 1, 5, True):
        with pytest.raises(ValueError, match="logprobs"):
            CompletionRequest(model="m", prompt="x", logprobs=bad)
    for ok in (None, False, 0):
        ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], logprobs=ok)
    with pytest.raises(ValueError, match="logprobs"):
        ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], logprobs=True)


def test_a_seed_out_of_the_generators_range_is_a_400_naming_it():
    # it reached torch.Generator.manual_seed: "Overflow when unpacking long long", no param
    from pydantic import ValidationError

    from server.protocol import CompletionRequest
    for seed in (1 << 64, -(1 << 63) - 1):
        with pytest.raises(ValidationError, match="seed"):
            CompletionRequest(model="tiny", prompt="x", seed=seed)
    for seed in ((1 << 64) - 1, -(1 << 63), 0):
        assert CompletionRequest(model="tiny", prompt="x", seed=seed).seed == seed
