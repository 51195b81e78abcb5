"""A chat message's fields reach the chat template as transformers and vLLM hand them over: name,
tool_call_id, an assistant's tool_calls (their JSON `arguments` parsed, as vLLM does for
templates such as Qwen's that iterate over them). Before, kvc passed role and content only, so an
agent's earlier tool calls vanished from its prompt."""
import json

import pytest

from engine.tiny import make_tiny_model
from server.protocol import ChatMessage

from .test_api_hardening import _serve, error

# renders what Qwen-style templates take from a message besides its content
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}{% if m.name %} ({{ m.name }}){% endif %}\n"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}] {% endif %}{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}"
    "{% for k, v in c.function.arguments.items() %} {{ k }}={{ v }}{% endfor %}</call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

MESSAGES = [
    {"role": "system", "content": "You call tools.", "name": "planner"},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": json.dumps({"city": "Paris", "unit": "C"})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    make_tiny_model(path, "qwen3_moe", num_hidden_layers=1)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    for a, eng, _ in _serve(path):  # test_api_hardening's in-process server
        yield a, eng, path


def test_the_template_sees_names_tool_call_ids_and_tool_calls(api):
    a, eng, path = api
    rendered = eng.tokenizer.apply_chat_template([ChatMessage(**m).for_template() for m in MESSAGES])
    assert "system (planner)" in rendered and "[call_1] 21 degrees" in rendered
    assert "<call>weather city=Paris unit=C</call>" in rendered
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    parsed = json.loads(json.dumps(MESSAGES))
    parsed[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "unit": "C"}
    assert rendered == ref.apply_chat_template(parsed, tokenize=False, add_generation_prompt=True)
    r = a.post("/v1/chat/completions", {"model": "tiny", "max_tokens": 1, "messages": MESSAGES})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(eng.tokenizer.encode(rendered))


def test_tool_call_arguments_that_are_not_json_are_a_400(api):
    a, _, _ = api
    bad = json.loads(json.dumps(MESSAGES))
    bad[2]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    r = a.post("/v1/chat/completions", {"model": "tiny", "max_tokens": 1, "messages": bad})
    assert r.status_code == 400 and error(r)["param"] == "messages", r.text
    assert "arguments is not valid JSON" in error(r)["message"]
    bad[2]["tool_calls"] = "weather"
    r = a.post("/v1/chat/completions", {"model": "tiny", "max_tokens": 1, "messages": bad})
    assert r.status_code == 400 and "tool_calls must be a list" in error(r)["message"], r.text
