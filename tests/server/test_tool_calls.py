"""Tool calling on /v1/chat/completions, as vLLM serves it with `--enable-auto-tool-choice
--tool-call-parser hermes`: a request's tools reach the chat template, Hermes `<tool_call>` blocks in
the reply become OpenAI tool calls (finish_reason "tool_calls"), streamed or not with the same
content and calls; what kvc cannot do (tool_choice "required" or a named function: guided
decoding) is a 400 that says so. A random-weight model never writes a call, so the reply's
assembly is tested on Qwen3-style texts directly, in the engine's output shape."""
import asyncio
import json
import random
import re

import httpx
import pytest

from engine.request import CompletionOutput, RequestOutput
from engine.tiny import make_tiny_model
from engine.tokenizer import Detokenizer, Tokenizer
from server.api import _stream_chat
from server.protocol import ChatRequest
from server.tool_parser import (ToolCallStream, chat_message, parse_tool_calls, template_tool_format,
                                tool_call_id)

from .test_api_hardening import _serve, error

# a ChatML template with no tools section (as kvc's tiny template was): no tool-call format to read
PLAIN_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def call(name: str, args) -> str:
    """A call as Qwen3 writes it (its template's own rendering of an earlier call)."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args, ensure_ascii=False)}}}\n</tool_call>'


ONE = call("get_weather", {"city": "Paris", "unit": "C"})
TWO = ONE + "\n" + call("get_time", {})
BEFORE = "Let me look that up for you.\n\n" + ONE
UNICODE = call("translate", {"text": "日本語 — ça va? 🙂", "to": "ελληνικά"})
NESTED = call("create_event", {"title": "Review", "when": {"start": "2026-12-07T10:00", "days": [1, 3]},
                               "attendees": [{"name": "Ada", "tags": ["x", {"deep": None}]}], "ok": True})
THINK = "<think>\nThe user wants the weather, I should call the tool.\n</think>\n\n" + ONE
BAD_JSON = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>'
NO_NAME = '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>'
UNCLOSED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
CUT = '<tool_call>\n{"name": "get_weather", "arguments": {"ci'
SAMPLES = [ONE, TWO, BEFORE, UNICODE, NESTED, THINK, BAD_JSON, NO_NAME, UNCLOSED, CUT,
           "No tools needed: it is sunny.", "", "  \n", "a < b and <tool> or <tool_c", "x <tool_cal",
           "\n\n" + TWO + "\ntrailing text", ONE + " between " + call("get_time", {"tz": "UTC"}),
           '<tool_call>\n["get_weather"]\n</tool_call>', '<tool_call></tool_call>',
           '<tool_call>\n{"name": 7, "arguments": {}}\n</tool_call>',
           '<tool_call>\n{"name": "get_time"}\n</tool_call>']


def calls_of(text: str) -> list[dict]:
    """The function parts of the calls parse_tool_calls reads (ids are random)."""
    return [c["function"] for c in parse_tool_calls(text)[1]]


# -- the Hermes parser on Qwen3-style replies ----------------------------------------------------

def test_one_call():
    content, calls = parse_tool_calls(ONE)
    assert content is None and len(calls) == 1
    assert calls[0]["type"] == "function" and re.fullmatch(r"call_[A-Za-z0-9]{24}", calls[0]["id"])
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}


def test_two_calls_and_text_before_them():
    assert calls_of(TWO) == [{"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
                             {"name": "get_time", "arguments": "{}"}]
    content, calls = parse_tool_calls(BEFORE)
    assert content == "Let me look that up for you.\n\n" and len(calls) == 1
    content, calls = parse_tool_calls(THINK)  # no reasoning parser: the think block is content
    assert content.startswith("<think>") and len(calls) == 1
    # text between and after calls is no content (vLLM keeps only the text before the first)
    assert parse_tool_calls("\n\n" + TWO + "\ntrailing text")[0] is None


def test_ids_are_openais_shape_and_distinct():
    ids = {tool_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)


def test_unicode_and_nested_arguments_round_trip():
    args = json.loads(calls_of(UNICODE)[0]["arguments"])
    assert args == {"text": "日本語 — ça va? 🙂", "to": "ελληνικά"}
    assert "日本語" in calls_of(UNICODE)[0]["arguments"]  # not \\u-escaped, as vLLM writes them
    assert json.loads(calls_of(NESTED)[0]["arguments"]) == {
        "title": "Review", "when": {"start": "2026-12-07T10:00", "days": [1, 3]},
        "attendees": [{"name": "Ada", "tags": ["x", {"deep": None}]}], "ok": True}


@pytest.mark.parametrize("text", [
    BAD_JSON, NO_NAME, CUT, '<tool_call>\n["get_weather"]\n</tool_call>', "<tool_call></tool_call>",
    '<tool_call>\n{"name": 7, "arguments": {}}\n</tool_call>', '<tool_call>\n{"name": "get_time"}\n</tool_call>',
    ONE + "\n" + BAD_JSON])  # one broken block spoils them all, as in vLLM
def test_a_block_that_is_no_call_leaves_the_whole_text_as_content(text):
    assert parse_tool_calls(text) == (text, [])


def test_a_last_block_without_its_closing_tag_is_read_to_the_end():
    # vLLM's second pattern, <tool_call>(.*): the JSON is whole, the tag did not come (a stop string)
    assert calls_of(UNCLOSED) == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert calls_of(ONE + "\n<tool_call>\n" + '{"name": "get_time", "arguments": {}}') == [
        calls_of(ONE)[0], {"name": "get_time", "arguments": "{}"}]


def test_the_reply_message_and_finish_reason():
    assert chat_message(ONE, "stop", parse=False) == ({"role": "assistant", "content": ONE}, "stop")
    message, finish = chat_message(BEFORE, "stop", parse=True)
    assert finish == "tool_calls" and message["content"] == "Let me look that up for you.\n\n"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert chat_message(UNCLOSED, "length", parse=True)[1] == "length"  # cut by max_tokens: stays length
    assert chat_message(BAD_JSON, "stop", parse=True) == ({"role": "assistant", "content": BAD_JSON}, "stop")
    assert chat_message("hello", "stop", parse=True) == ({"role": "assistant", "content": "hello"}, "stop")


# -- streaming: content and calls add up to the unstreamed reply ---------------------------------

def streamed(pieces: list[str]) -> tuple[str | None, list[dict]]:
    """(content, calls' function parts) a ToolCallStream sends for these pieces of a text."""
    s, deltas = ToolCallStream(), []
    for i, p in enumerate(pieces):
        deltas += s.feed(p, final=i == len(pieces) - 1)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert all(len(c) == 1 for c in calls)  # one call a delta
    assert [c[0]["index"] for c in calls] == list(range(len(calls)))
    assert all(c[0]["type"] == "function" and c[0]["id"].startswith("call_") for c in calls)
    return content or None, [c[0]["function"] for c in calls]


def unstreamed(text: str) -> tuple[str | None, list[dict]]:
    content, calls = parse_tool_calls(text)
    return content or None, [c["function"] for c in calls]


def splits(text: str, rng: random.Random):
    """The text in one piece, in two at every point, one character a piece, and random pieces."""
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text) or [""]
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("text", SAMPLES)
def test_streamed_equals_unstreamed_at_every_split(text):
    rng = random.Random(text)
    for pieces in splits(text, rng):
        assert streamed(pieces) == unstreamed(text), pieces


def test_content_is_sent_as_it_comes_until_a_tool_call_may_begin():
    s = ToolCallStream()
    assert s.feed("Let me check") == [{"content": "Let me check"}]
    assert s.feed(". <tool_") == [{"content": ". "}]  # "<tool_" may begin a call: held
    assert s.feed("x> no") == [{"content": "<tool_x> no"}]  # it did not
    assert s.feed("\n<tool_call>\n{\"name\": \"get_time\", ") == [{"content": "\n"}]
    assert s.feed('"arguments": {}}\n') == []  # a call is sent whole, once closed
    (d,) = s.feed("</tool_call>")
    assert d["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert s.feed("", final=True) == []
    s = ToolCallStream()  # a reply that is only whitespace before its call has null content
    assert s.feed("\n\n") == [] and s.feed("<tool_call>") == []


def test_a_broken_block_after_a_sent_call_is_sent_as_content():
    # the one divergence: a call already sent cannot be taken back (unstreamed, the text is all content)
    text = ONE + "\n" + BAD_JSON
    s = ToolCallStream()
    deltas = s.feed(ONE) + s.feed("\n") + s.feed(BAD_JSON, final=True)
    assert [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d] == ["get_weather"]
    assert "".join(d.get("content", "") for d in deltas) == text[text.index(BAD_JSON) + len("Sure.\n"):]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    make_tiny_model(path, "qwen3_moe", num_hidden_layers=1)  # Qwen3's template, tool parts included
    return path


def outputs(tok: Tokenizer, text: str, finish: str, rng: random.Random):
    """RequestOutputs as the engine hands them out for a reply of `text`: its ids decoded as they
    come (Detokenizer), a few tokens an output (a slow reader gets the latest only)."""
    ids, det, outs, n = tok.encode(text), Detokenizer(tok), [], 0
    while n < len(ids):
        n = min(len(ids), n + rng.randint(1, 5))
        done = n == len(ids)
        so_far = det.update(ids[:n], final=done)
        choice = CompletionOutput.prefix(0, so_far, ids, finish if done else None)
        outs.append(RequestOutput("r", None, [1, 2, 3], [choice], done, 0))
    return outs


def sse(text: str, finish: str, tok: Tokenizer, rng: random.Random, hold: int = 0) -> list[dict]:
    async def engine_outputs():
        for o in outputs(tok, text, finish, rng):
            yield o

    async def run():
        return [e async for e in _stream_chat(engine_outputs(), "chatcmpl-1", 0, "tiny", False, hold, True)]
    events = asyncio.run(run())
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


@pytest.mark.parametrize("text", [ONE, TWO, BEFORE, UNICODE, NESTED, BAD_JSON, UNCLOSED, "plain words", "x <tool_cal"])
@pytest.mark.parametrize("finish", ["stop", "length"])
def test_the_chat_stream_over_engine_outputs_matches_the_reply(model_dir, text, finish):
    tok, rng = Tokenizer(model_dir), random.Random(text + finish)
    for _ in range(5):
        chunks = sse(text, finish, tok, rng, hold=rng.choice([0, 3]))
        choices = [c["choices"][0] for c in chunks]
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        finishes = [c["finish_reason"] for c in choices]
        message, want_finish = chat_message(text, finish, parse=True)
        assert finishes[-1] == want_finish and not any(finishes[:-1])
        content = "".join(c["delta"].get("content", "") for c in choices[1:]) or None
        calls = [t["function"] for c in choices for t in c["delta"].get("tool_calls", [])]
        assert (content, calls) == (message["content"] or None,
                                    [c["function"] for c in message.get("tool_calls", [])])


# -- requests: validation, the template, the 400s -------------------------------------------------

@pytest.mark.parametrize("tools,param", [
    ([WEATHER, {"type": "function", "function": {"description": "no name"}}], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": ""}}], "tools[0].function.name"),
    ([WEATHER, {"type": "function", "function": {"name": "f", "parameters": "object"}}],
     "tools[1].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "tools[0].function.parameters"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "tools[0].type"),
    ([{"function": {"name": "f"}}], "tools[0].type"),
    ([WEATHER, TIME, WEATHER], "tools[2].function.name"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"name": "f", "description": 5}}], "tools[0].function.description"),
    (["get_weather"], "tools[0]"),
])
def test_malformed_tools_are_400s_naming_the_field(tools, param):
    with pytest.raises(ValueError) as e:
        ChatRequest(model="m", messages=USER, tools=tools)
    assert e.value.errors()[0]["ctx"]["param"] == param and param in str(e.value)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forcing_a_call_needs_guided_decoding(choice):
    with pytest.raises(ValueError, match="needs guided decoding"):
        ChatRequest(model="m", messages=USER, tools=[WEATHER], tool_choice=choice)


def test_what_is_accepted():
    r = ChatRequest(model="m", messages=USER, tools=[WEATHER, TIME], tool_choice="auto", parallel_tool_calls=False)
    assert r.parse_tools and r.tools == [WEATHER, TIME]
    assert ChatRequest(model="m", messages=USER, tools=[WEATHER]).parse_tools  # auto by default
    assert not ChatRequest(model="m", messages=USER, tools=[WEATHER], tool_choice="none").parse_tools
    assert not ChatRequest(model="m", messages=USER, tools=[]).parse_tools
    with pytest.raises(ValueError, match="functions"):  # the legacy field stays refused
        ChatRequest(model="m", messages=USER, functions=[WEATHER["function"]])


def test_the_template_format_is_read_from_the_template(model_dir, tmp_path):
    assert template_tool_format(Tokenizer(model_dir)) == "hermes"
    plain = tmp_path / "plain"
    make_tiny_model(plain, "qwen3_moe", num_hidden_layers=1)
    (plain / "chat_template.jinja").write_text(PLAIN_CHATML)
    assert template_tool_format(Tokenizer(plain)) is None


@pytest.fixture(scope="module")
def shared(model_dir):
    yield from _serve(model_dir)


def chat(api, **body):
    return api.post("/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 3,
                                             "temperature": 0, **body})


def test_a_request_with_tools_is_served_and_the_tools_reach_the_prompt(shared, model_dir):
    api, _, _ = shared
    plain, with_tools = chat(api), chat(api, tools=[WEATHER, TIME])
    assert plain.status_code == 200 and with_tools.status_code == 200, with_tools.text
    tok = Tokenizer(model_dir)
    rendered = tok.apply_chat_template(USER, tools=[WEATHER, TIME])
    assert json.dumps(WEATHER, ensure_ascii=False) in rendered and "<tools>" in rendered
    grown = with_tools.json()["usage"]["prompt_tokens"] - plain.json()["usage"]["prompt_tokens"]
    assert grown == len(tok.encode(rendered)) - len(tok.encode(tok.apply_chat_template(USER))) > 100
    reply = with_tools.json()["choices"][0]
    assert reply["message"]["role"] == "assistant" and reply["finish_reason"] in ("stop", "length")
    # tool_choice "none": the model still sees the tools (as in vLLM); its text is not parsed
    none = chat(api, tools=[WEATHER, TIME], tool_choice="none")
    assert none.json()["usage"]["prompt_tokens"] == with_tools.json()["usage"]["prompt_tokens"]
    # an agent's next turn: its call and the tool's answer, rendered by the template
    turn = USER + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    r = chat(api, messages=turn, tools=[WEATHER], stream=True)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text


@pytest.mark.parametrize("extra,param,needle", [
    ({"tool_choice": "required"}, "tool_choice", "needs guided decoding"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice",
     "needs guided decoding"),
    ({"tools": [WEATHER, {"type": "function", "function": {"parameters": {}}}]}, "tools[1].function.name",
     "tools[1].function.name"),
    ({"functions": [WEATHER["function"]]}, "functions", "functions"),
])
def test_http_400s(shared, extra, param, needle):
    api, _, _ = shared
    r = chat(api, **{"tools": [WEATHER], **extra})
    assert r.status_code == 400 and error(r)["param"] == param and needle in error(r)["message"], r.text
    if param != "functions":  # named once ("tool_choice: tool_choice='required' ..." before)
        assert error(r)["message"].count(param) == 1, error(r)["message"]


def test_tools_on_completions_are_refused(shared):
    api, _, _ = shared
    r = api.completion(prompt="x", max_tokens=1, tools=[WEATHER])
    assert r.status_code == 400 and error(r)["param"] == "tools" and "chat/completions" in error(r)["message"]


def test_a_template_without_a_tool_format_refuses_auto_tools(tmp_path):
    make_tiny_model(tmp_path / "m", "qwen3_moe", num_hidden_layers=1)
    (tmp_path / "m" / "chat_template.jinja").write_text(PLAIN_CHATML)
    for api, _, _ in _serve(tmp_path / "m"):
        r = chat(api, tools=[WEATHER])
        assert r.status_code == 400 and error(r)["param"] == "tools", r.text
        assert "no tool-call format" in error(r)["message"]
        assert chat(api, tools=[WEATHER], tool_choice="none").status_code == 200  # shown, not parsed


def test_the_openai_client_sends_tools_and_reads_the_reply(shared):
    openai = pytest.importorskip("openai")
    api, _, _ = shared

    async def ask(stream: bool):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app), base_url="http://kvc/v1")
        async with openai.AsyncOpenAI(base_url="http://kvc/v1", api_key="unused", http_client=http,
                                      max_retries=0) as client:
            kw = dict(model="tiny", messages=USER, tools=[WEATHER, TIME], tool_choice="auto",
                      parallel_tool_calls=True, max_tokens=4, temperature=0)
            if not stream:
                return await client.chat.completions.create(**kw)
            return [c async for c in await client.chat.completions.create(stream=True, **kw)]

    def run(stream: bool):
        return asyncio.run_coroutine_threadsafe(ask(stream), api._loop).result(30)
    r = run(False)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 100  # the tools are in the prompt
    chunks = run(True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (r.choices[0].message.content or "")
    with pytest.raises(openai.BadRequestError, match="guided decoding"):
        asyncio.run_coroutine_threadsafe(_required(openai, api), api._loop).result(30)


async def _required(openai, api):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app), base_url="http://kvc/v1")
    async with openai.AsyncOpenAI(base_url="http://kvc/v1", api_key="unused", http_client=http,
                                  max_retries=0) as client:
        await client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER],
                                             tool_choice="required", max_tokens=2)
