"""OpenAI request bodies (the subset kvc serves) and their mapping onto SamplingParams."""
from __future__ import annotations

import json

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine import SamplingParams

TOKEN_ID_LIMIT = 1 << 31  # token ids are below this (any real vocabulary is far smaller)


def _set(v) -> bool:
    return v not in (None, False, 0, "", [], {})


def _invalid(param: str, message: str) -> PydanticCustomError:
    """A validation error whose 400 names `param` (api.py reads ctx["param"])."""
    return PydanticCustomError("invalid_value", "{message}", {"message": message, "param": param})


def _check_token_ids(param: str, ids: list[int]) -> None:
    bad = next((t for t in ids if not 0 <= t < TOKEN_ID_LIMIT), None)
    if bad is not None:
        raise _invalid(param, f"token ids must be integers in [0, 2**31); got {bad}")


# Fields of OpenAI's API (and vLLM's extensions) that would change the output, which kvc's sampler
# does not do: a request that sets one to anything but its default is refused, not served as if
# it were absent. Each: the test of "set", and what to say.
_NOT_SUPPORTED = {
    "presence_penalty": (_set, "penalties are not supported"),
    "frequency_penalty": (_set, "penalties are not supported"),
    "repetition_penalty": (lambda v: v not in (None, 1, 1.0), "penalties are not supported"),
    "logit_bias": (_set, "logit_bias is not supported"),
    "min_p": (_set, "min_p is not supported"),
    "min_tokens": (_set, "min_tokens is not supported"),
    "best_of": (lambda v: v not in (None, 1), "best_of must be 1"),
    "top_logprobs": (_set, "logprobs are not supported"),
    "prompt_logprobs": (_set, "logprobs are not supported"),
    "response_format": (lambda v: _set(v) and not (isinstance(v, dict) and v.get("type") in (None, "text")),
                        "response_format other than text (JSON mode, schemas) is not supported"),
    # tools are ChatRequest's own fields: on /v1/completions they are refused
    "tools": (_set, "function calling on /v1/completions (use /v1/chat/completions) is not supported"),
    "functions": (_set, "functions (the legacy function calling: send tools) are not supported"),
    "tool_choice": (lambda v: v not in (None, "none", "auto"),
                    "function calling on /v1/completions (use /v1/chat/completions) is not supported"),
    "guided_json": (_set, "guided decoding is not supported"),
    "guided_regex": (_set, "guided decoding is not supported"),
    "guided_choice": (_set, "guided decoding is not supported"),
    "guided_grammar": (_set, "guided decoding is not supported"),
    "suffix": (_set, "suffix is not supported"),
    # vLLM's extensions: kvc skips special tokens in the output and renders the model's own chat
    # template with the generation prompt added
    "skip_special_tokens": (lambda v: v not in (None, True), "special tokens are always skipped in the output"),
    "spaces_between_special_tokens": (lambda v: v not in (None, True),
                                      "spaces_between_special_tokens is not supported"),
    "chat_template": (_set, "a request's own chat_template is not supported (the model's is used)"),
    "chat_template_kwargs": (_set, "chat_template_kwargs are not supported"),
    "add_generation_prompt": (lambda v: v not in (None, True), "the generation prompt is always added"),
    "continue_final_message": (_set, "continue_final_message is not supported"),
    "echo": (_set, "echo is not supported on chat completions"),
    "documents": (_set, "documents are not supported"),
    "truncate_prompt_tokens": (_set, "truncate_prompt_tokens is not supported"),
    "allowed_token_ids": (_set, "allowed_token_ids is not supported"),
    "bad_words": (_set, "bad_words is not supported"),
    "logits_processors": (_set, "logits_processors are not supported"),
    "use_beam_search": (_set, "beam search is not supported"),
    "length_penalty": (lambda v: v not in (None, 1, 1.0), "beam search is not supported"),
    "return_tokens_as_token_ids": (_set, "return_tokens_as_token_ids is not supported"),
    "prompt_embeds": (_set, "prompt_embeds are not supported"),
    "structured_outputs": (_set, "guided decoding is not supported"),
    "guided_decoding_backend": (_set, "guided decoding is not supported"),
    "guided_whitespace_pattern": (_set, "guided decoding is not supported"),
}


class _Base(BaseModel):
    # Clients send fields we do not act on (user, metadata, ...): accept and ignore them, but
    # refuse the ones whose meaning we would silently change (n > 1, logprobs, penalties, JSON mode,
    # legacy functions: _NOT_SUPPORTED).
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _refuse_what_would_change_the_output(self):
        for name, value in (self.model_extra or {}).items():
            rule = _NOT_SUPPORTED.get(name)
            if rule is not None and rule[0](value):
                raise _invalid(name, f"{name}={value!r}: {rule[1]} by kvc; leave it out (or at its default)")
        return self

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)  # torch.Generator.manual_seed's range
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    cache_salt: str | None = Field(default=None, max_length=256)
    logprobs: Any = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise ValueError("n must be 1: kvc returns one choice per prompt")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, v):
        _check_token_ids("stop_token_ids", v or ())
        return v

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, seed=self.seed,
            max_tokens=self.max_tokens or default_max_tokens,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Base):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    # vLLM's extension, its default here: a text prompt gets the special tokens the tokenizer's
    # post-processor adds (a BOS for Llama- and DeepSeek-style tokenizers); token ids are kept as sent
    add_special_tokens: bool = True

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs_count(cls, v):
        # the completions API's logprobs is a count: 0 asks for the sampled tokens' logprobs (with
        # no alternatives), which kvc does not return; only absent/null/false leaves them out
        if v is not None and v is not False:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("prompt")
    @classmethod
    def _non_empty_and_in_range(cls, v):
        if isinstance(v, (str, list)) and len(v) == 0:
            raise ValueError("prompt is empty")
        if isinstance(v, list) and isinstance(v[0], int):
            _check_token_ids("prompt", v)
        elif isinstance(v, list):
            for p in v:
                if isinstance(p, list):
                    _check_token_ids("prompt", p)
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return [x if isinstance(x, str) else list(x) for x in p]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        """The content as one string: a list of text parts joined with newlines, as vLLM, SGLang
        and TensorRT-LLM join them for a template that takes string content."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"message content of type {part.get('type')!r} is not supported; send text")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text part of a message's content needs its text as a string")
            parts.append(part["text"])
        return "\n".join(parts)

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template sees it (as transformers and vLLM hand it over): role,
        content as text, and the message's other fields (name, tool_call_id, an assistant's
        tool_calls, reasoning_content) as sent, a tool call's JSON `arguments` string parsed into
        the mapping templates such as Qwen's iterate over."""
        msg = {**(self.model_extra or {}), "role": self.role, "content": self.text()}
        calls = msg.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise ValueError("tool_calls must be a list of objects")
            msg["tool_calls"] = [_parsed_arguments(c) for c in calls]
        return msg


def _parsed_arguments(call: dict) -> dict:
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except json.JSONDecodeError as e:
            raise ValueError(f"tool_calls: function.arguments is not valid JSON: {e}") from None
        return {**call, "function": {**fn, "arguments": args}}
    return call


def _check_tool(i: int, tool) -> str:
    """The name of the function tool `tool` (tools[i]) declares; a 400 naming the field that is wrong."""
    at = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise _invalid(at, f'{at} must be an object: {{"type": "function", "function": {{"name": ...}}}}')
    if tool.get("type") != "function":
        raise _invalid(f"{at}.type", f'{at}.type must be "function" (got {tool.get("type")!r}): '
                                     "function tools are the only kind kvc calls")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise _invalid(f"{at}.function", f"{at}.function must be an object with the function's name, "
                                         "description and parameters")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{at}.function.name", f"{at}.function.name must be a non-empty string "
                                              f"(got {name!r})")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise _invalid(f"{at}.function.description", f"{at}.function.description must be a string")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise _invalid(f"{at}.function.parameters", f"{at}.function.parameters must be a JSON schema object "
                                                    f"(got {type(fn['parameters']).__name__})")
    return name


class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    # vLLM's default for chat: the template writes the special tokens itself
    add_special_tokens: bool = False
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # function tools, in OpenAI's shape; they reach the chat template as sent
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # accepted: a Hermes model may write several calls either way

    @field_validator("tools")
    @classmethod
    def _function_tools(cls, v):
        seen: dict[str, int] = {}
        for i, tool in enumerate(v or ()):
            name = _check_tool(i, tool)
            if name in seen:
                raise _invalid(f"tools[{i}].function.name", f"tools[{i}].function.name {name!r} is also "
                                                            f"tools[{seen[name]}]'s: function names must be unique")
            seen[name] = i
        return v

    @field_validator("tool_choice")
    @classmethod
    def _auto_or_none(cls, v):
        # "required" and a named function force a call: only decoding constrained to the tools'
        # schemas can promise one, and kvc samples freely
        if v == "required" or isinstance(v, dict):
            raise _invalid("tool_choice", f"tool_choice={v!r} needs guided decoding (to force a tool call), "
                                          'which kvc does not have; send "auto" or "none"')
        if v not in (None, "none", "auto"):
            raise _invalid("tool_choice", f'tool_choice must be "none" or "auto" (got {v!r})')
        return v

    @property
    def parse_tools(self) -> bool:
        """Whether the reply's tool calls are read out of its text: tools given and tool_choice not
        "none" (with "none" the template still lists the tools, as in vLLM, and the text is content)."""
        return bool(self.tools) and self.tool_choice != "none"

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens)
