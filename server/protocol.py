"""OpenAI request bodies (the subset kvc serves) and their mapping onto SamplingParams."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine import SamplingParams


def _set(v) -> bool:
    return v not in (None, False, 0, "", [], {})


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
    "tools": (_set, "tools (function calling) are not supported"),
    "functions": (_set, "functions (function calling) are not supported"),
    "tool_choice": (lambda v: v not in (None, "none", "auto"), "tool_choice is not supported"),
    "guided_json": (_set, "guided decoding is not supported"),
    "guided_regex": (_set, "guided decoding is not supported"),
    "guided_choice": (_set, "guided decoding is not supported"),
    "guided_grammar": (_set, "guided decoding is not supported"),
    "suffix": (_set, "suffix is not supported"),
}


class _Base(BaseModel):
    # Clients send fields we do not act on (user, metadata, ...): accept and ignore them, but
    # refuse the ones whose meaning we would silently change (n > 1, logprobs, penalties, JSON mode,
    # tools: _NOT_SUPPORTED).
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _refuse_what_would_change_the_output(self):
        for name, value in (self.model_extra or {}).items():
            rule = _NOT_SUPPORTED.get(name)
            if rule is not None and rule[0](value):
                raise ValueError(f"{name}={value!r}: {rule[1]} by kvc; leave it out (or at its default)")
        return self

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
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

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, seed=self.seed,
            max_tokens=self.max_tokens or default_max_tokens,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Base):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, (str, list)) and len(v) == 0:
            raise ValueError("prompt is empty")
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
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"message content of type {part.get('type')!r} is not supported; send text")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens)
