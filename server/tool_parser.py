"""Tool calls in a chat reply's text, as vLLM's `--tool-call-parser hermes` reads them.

Hermes-format models (Qwen2.5, Qwen3, Hermes 2 Pro/3) write a call as a JSON object between tags,
possibly several, possibly after some text:

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The reply's content is the text before the first `<tool_call>` (null when that is empty or only
whitespace); every block must hold a JSON object with a string `name` and an `arguments` value, or
the whole text is the content and there are no calls (a model that writes a broken call gets its
text back, not a call that would fail at the client). A last block whose `</tool_call>` never came
is read up to the end of the text (a `stop` at "</tool_call>" cuts it off). This is what vLLM's
Hermes2ProToolParser.extract_tool_calls does, but for three things: ids in OpenAI's shape
("call_" and 24 letters and digits; vLLM's are "chatcmpl-tool-" and 32 hex digits), null content
where vLLM keeps a whitespace-only one, and finish_reason "length" kept for a reply max_tokens cut
(vLLM says "tool_calls" for any reply with calls). The streaming side (ToolCallStream) gives the
same content and calls, each call in one delta once its block is closed.
"""
from __future__ import annotations

import json
import secrets
import string

from engine.tokenizer import Tokenizer

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_ID_ALPHABET = string.ascii_letters + string.digits


def template_tool_format(tokenizer: Tokenizer) -> str | None:
    """The tool-call format the model's chat template teaches it: "hermes" when a conversation
    rendered with a tool in it mentions <tool_call> (Qwen2.5/Qwen3/Hermes templates tell the model to
    answer in those tags), else None (a template that ignores tools, or another format kvc does not
    parse: Llama 3.1's JSON, Mistral's [TOOL_CALLS], DeepSeek's tokens)."""
    probe = [{"type": "function", "function": {"name": "probe", "description": "a probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                             add_generation_prompt=True, tools=probe)
    except Exception:  # no template, or one that cannot render this conversation with a tool in it
        # (its own error, or a TypeError from a template written for other tool shapes): no format
        # kvc knows, which a request with tools then hears about, rather than a server that will not start
        return None
    return "hermes" if TOOL_CALL_START in text else None


def tool_call_id() -> str:
    """An id in OpenAI's shape: "call_" and 24 letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def _call(block: str) -> dict | None:
    """The OpenAI tool call a block's text holds, or None where it is no JSON object with a string
    name and an arguments value (arguments re-serialized as vLLM does: ensure_ascii off)."""
    try:
        obj = json.loads(block)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
        return None
    return {"id": tool_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(obj["arguments"], ensure_ascii=False)}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a whole reply; no calls and the text as it is when it has no
    `<tool_call>` or any of its blocks is not a call."""
    first = text.find(TOOL_CALL_START)
    if first == -1:
        return text, []
    calls, pos = [], first
    while (start := text.find(TOOL_CALL_START, pos)) != -1:
        body = start + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, body)
        call = _call(text[body:] if end == -1 else text[body:end])
        if call is None:
            return text, []
        calls.append(call)
        if end == -1:
            break
        pos = end + len(TOOL_CALL_END)
    content = text[:first]
    return (content if content.strip() else None), calls


def chat_finish_reason(finish_reason: str | None, called: bool) -> str | None:
    """"tool_calls" for a reply that ended by itself (EOS or a stop string) with calls in it; a
    reply cut by max_tokens stays "length" (its calls are what came before the cut)."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


def chat_message(text: str, finish_reason: str | None, parse: bool) -> tuple[dict, str | None]:
    """The assistant message of a finished reply and its finish_reason: tool calls read out of the
    text when `parse` (the request has tools and a tool_choice other than "none")."""
    if not parse:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = parse_tool_calls(text)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message, chat_finish_reason(finish_reason, bool(calls))


def _partial_start(text: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of "<tool_call>"."""
    for n in range(min(len(text), len(TOOL_CALL_START) - 1), 0, -1):
        if TOOL_CALL_START.startswith(text[-n:]):
            return n
    return 0


class ToolCallStream:
    """A streamed reply's deltas with its tool calls read out, equal in sum to chat_message's.

    feed() takes each new piece of the text; it returns the deltas to send: {"content": ...} for
    text and {"tool_calls": [{"index", "id", "type", "function"}]} for each call, the call's whole
    arguments in one piece (as OpenAI's stream protocol allows) once its `</tool_call>` has come.
    Text is sent as it comes, except an end that may be the start of a `<tool_call>`, and the text
    before the first call while it is only whitespace (a reply whose content is only whitespace
    before a call has null content). Whatever follows the first `<tool_call>` is held: a block that
    is no call turns the whole text into content, and text between and after calls is no content.
    One divergence from the whole-text reading is unavoidable: a call already sent cannot be taken
    back, so a broken block after it is sent as content (from that block on) next to it.
    """

    def __init__(self):
        self.text = ""
        self.calls = 0  # calls sent
        self._sent = 0  # text before this is sent as content or read as calls
        self._first = -1  # where the first <tool_call> begins, -1 before it comes
        self._plain = False  # a broken block came: everything from _sent on is content

    def feed(self, piece: str, final: bool = False) -> list[dict]:
        """The deltas `piece` (the text's next characters) makes sendable; final: the text ends here."""
        seen = max(0, len(self.text) - len(TOOL_CALL_END))  # a tag found now ends after this
        self.text += piece
        if self._plain:
            return self._content(len(self.text))
        if self._first == -1:
            self._first = self.text.find(TOOL_CALL_START, seen)
            if self._first == -1:
                if final:
                    return self._content(len(self.text))
                return self._content(len(self.text) - _partial_start(self.text), hold_blank=True)
        out = self._content(self._first, hold_blank=True) if self.calls == 0 else []
        while (start := self.text.find(TOOL_CALL_START, self._sent if self.calls else self._first)) != -1:
            body = start + len(TOOL_CALL_START)
            end = self.text.find(TOOL_CALL_END, max(body, seen))
            if end == -1 and not final:
                break
            call = _call(self.text[body:] if end == -1 else self.text[body:end])
            if call is None:  # no call: content from the text's start, or from this block after a call
                self._plain = True
                if self.calls:
                    self._sent = start
                return out + self._content(len(self.text))
            out.append({"tool_calls": [{"index": self.calls, **call}]})
            self.calls += 1
            self._sent = len(self.text) if end == -1 else end + len(TOOL_CALL_END)
            if end == -1:
                break
        return out

    def _content(self, upto: int, hold_blank: bool = False) -> list[dict]:
        """A content delta of text[_sent:upto], if any; hold_blank: none while all the text so far
        up to `upto` is whitespace (it is null content if a call follows)."""
        if upto <= self._sent or (hold_blank and self._sent == 0 and not self.text[:upto].strip()):
            return []
        piece, self._sent = self.text[self._sent:upto], upto
        return [{"content": piece}]
