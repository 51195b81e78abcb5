"""add_special_tokens as vLLM has it: a completion's text prompt gets the special tokens the
tokenizer's post-processor puts around a text (a BOS for Llama- and DeepSeek-style tokenizers),
unless the request says add_special_tokens: false; chat (whose template writes its own) gets them
only when asked; token-id prompts are kept as sent. Before, kvc never added them and refused the
option, so a DeepSeek checkpoint's completions ran without their BOS."""
import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.processors import TemplateProcessing

from engine.tiny import make_tiny_model
from engine.tokenizer import Tokenizer

from .test_api_hardening import _serve, error

BOS = "<|endoftext|>"  # the tiny tokenizer's; any special token serves as this test's BOS
TEXT = "Hello world, this is a test"


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    make_tiny_model(path, "qwen3_moe", num_hidden_layers=1)
    tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                            special_tokens=[(BOS, bos_id)])
    tok.save(str(path / "tokenizer.json"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "bos_token": BOS}))
    return path, bos_id


@pytest.fixture(scope="module")
def api(bos_model):
    path, bos_id = bos_model
    for a, eng, _ in _serve(path):  # test_api_hardening's in-process server
        yield a, eng, bos_id


def test_the_tokenizer_adds_what_transformers_adds(bos_model):
    transformers = pytest.importorskip("transformers")
    path, bos_id = bos_model
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    tok = Tokenizer(path)
    assert tok.special_prefix == [bos_id] and tok.special_suffix == []
    for text in (TEXT, "x" * 5000, "é" * 3):  # the long one goes through the segment cache
        assert tok.encode(text, add_special_tokens=True) == ref(text).input_ids
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids


def test_a_completion_prompt_gets_its_bos_unless_asked_not_to(api):
    a, eng, bos_id = api
    ids = eng.tokenizer.encode(TEXT)
    greedy = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    default = a.post("/v1/completions", {**greedy, "prompt": TEXT}).json()
    with_bos = a.post("/v1/completions", {**greedy, "prompt": [bos_id, *ids]}).json()
    assert default["usage"]["prompt_tokens"] == len(ids) + 1
    assert default["choices"][0]["text"] == with_bos["choices"][0]["text"]  # the model saw the BOS
    off = a.post("/v1/completions", {**greedy, "prompt": TEXT, "add_special_tokens": False}).json()
    plain = a.post("/v1/completions", {**greedy, "prompt": ids}).json()  # token ids: kept as sent
    assert off["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] == len(ids)
    assert off["choices"][0]["text"] == plain["choices"][0]["text"]


def test_chat_adds_them_only_when_asked(api):
    a, eng, _ = api
    body = {"model": "tiny", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": TEXT}]}
    n = a.post("/v1/chat/completions", body).json()["usage"]["prompt_tokens"]
    templ = eng.tokenizer.apply_chat_template([{"role": "user", "content": TEXT}], add_generation_prompt=True)
    assert n == len(eng.tokenizer.encode(templ))
    asked = a.post("/v1/chat/completions", {**body, "add_special_tokens": True}).json()
    assert asked["usage"]["prompt_tokens"] == n + 1


def test_add_special_tokens_must_be_a_boolean(api):
    a, _, _ = api
    r = a.post("/v1/completions", {"model": "tiny", "prompt": TEXT, "add_special_tokens": "maybe"})
    assert r.status_code == 400 and "add_special_tokens" in error(r)["message"], r.text


def test_the_offline_api_adds_them_to_text_prompts(bos_model):
    from engine import LLM, SamplingParams
    path, bos_id = bos_model
    llm = LLM(str(path), device="cpu", dtype="float32", gpu_only=True)
    try:
        ids = llm.engine.tokenizer.encode(TEXT)
        greedy = SamplingParams(temperature=0, max_tokens=4)
        text_out, ids_out = llm.generate([TEXT, [bos_id, *ids]], greedy)
        assert text_out.prompt_token_ids == [bos_id, *ids]  # as vLLM's LLM tokenizes a text prompt
        assert text_out.outputs[0].token_ids == ids_out.outputs[0].token_ids
    finally:
        llm.close()
