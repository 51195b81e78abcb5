"""Request: one sequence's state across steps (tokens, pages, progress, outputs)."""
from __future__ import annotations

import array
import enum
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kvc.hashing import tokens_bytes

from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # in the waiting queue (new, preempted, or host pages loaded)
    LOADING = "loading"  # host-tier pages are being fetched in the background
    RUNNING = "running"
    FINISHED = "finished"


class BlockTable(list):
    """A request's block ids: a list, with the same ids kept beside it as an array('I') (`u32`), so
    a step's tables are row copies (numpy) instead of a conversion of every id of every table (32
    decodes at 32K tokens of context hold 65K ids: ~3.6 ms a step as nested lists through
    torch.tensor on the 2-core VM), and the device pool takes a table's ids as they are (array('I')
    of a list subclass goes the slow way: ~67 us for 2,048 ids). Appends convert only the new ids;
    `del t[n:]` cuts the array; any other change rebuilds it. Changed only by engine.prefix_cache."""

    __slots__ = ("u32",)

    def __init__(self, blocks=()):
        super().__init__(blocks)
        self.u32 = array.array("I", blocks.u32 if isinstance(blocks, BlockTable) else
                               blocks if type(blocks) is list else list(self))

    def __iadd__(self, blocks):
        blocks = blocks if type(blocks) is list else list(blocks)
        u32 = array.array("I", blocks)  # first: an id it refuses changes nothing
        super().__iadd__(blocks)
        self.u32 += u32
        return self

    def extend(self, blocks) -> None:
        self.__iadd__(blocks)

    def append(self, block) -> None:
        self.u32.append(block)
        super().append(block)

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        if isinstance(key, slice) and key.step is None and key.stop is None and 0 <= (key.start or 0):
            del self.u32[key.start or 0:]
        else:
            self._rebuild()

    def clear(self) -> None:
        super().clear()
        self.u32 = array.array("I")

    def _rebuild(self) -> None:
        self.u32 = array.array("I", list(self))

    def __reduce__(self):  # a copy is a BlockTable of the same ids
        return (BlockTable, (list(self),))


def _rebuilding(name: str):
    base = getattr(list, name)

    def method(self, *args):
        out = base(self, *args)
        self._rebuild()
        return self if name == "__imul__" else out
    method.__name__ = name
    return method


for _name in ("__setitem__", "insert", "pop", "remove", "sort", "reverse", "__imul__"):
    setattr(BlockTable, _name, _rebuilding(_name))


def table_ids(table, n: int) -> np.ndarray:
    """The first n block ids of a table as a uint32 array: a copy of a BlockTable's array (a view
    would hold an export of it, and the table's next append would raise BufferError); a plain
    list, as tests build, is converted."""
    u = getattr(table, "u32", None)
    return np.frombuffer(u[:n], np.uint32) if u is not None else np.array(table[:n], dtype=np.uint32)


class CompletionOutput:
    """One choice of a RequestOutput (shaped like vLLM's): its text and token ids so far.

    The engine hands one out per running request per step. It keeps the request's output id list
    (which only grows) and its length then, and copies that prefix the first time `token_ids` is
    read: a copy every step cost O(tokens so far) a token, 0.18 ms a step for 32 requests at 4K
    output tokens and 0.66 ms at 16K on the 2-core VM (probe_prepare.py), for outputs that a
    server mostly drops unread."""

    __slots__ = ("index", "text", "_ids", "_n", "finish_reason", "cumulative_logprob")

    def __init__(self, index: int, text: str, token_ids: list[int], finish_reason: str | None = None,
                 cumulative_logprob: float | None = None):
        self.index, self.text, self.finish_reason = index, text, finish_reason
        self.cumulative_logprob = cumulative_logprob
        self._ids, self._n = token_ids, None

    @classmethod
    def prefix(cls, index: int, text: str, ids: list[int], finish_reason: str | None) -> "CompletionOutput":
        """token_ids will be ids[:len(ids) now], copied when first read (ids may only grow)."""
        out = cls(index, text, ids, finish_reason)
        out._n = len(ids)
        return out

    @property
    def token_ids(self) -> list[int]:
        if self._n is not None:
            self._ids, self._n = self._ids[:self._n], None
        return self._ids

    @token_ids.setter
    def token_ids(self, ids: list[int]) -> None:
        self._ids, self._n = ids, None

    def __eq__(self, other) -> bool:
        if not isinstance(other, CompletionOutput):
            return NotImplemented
        return (self.index, self.text, self.token_ids, self.finish_reason, self.cumulative_logprob) == \
            (other.index, other.text, other.token_ids, other.finish_reason, other.cumulative_logprob)

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
                f"finish_reason={self.finish_reason!r}, cumulative_logprob={self.cumulative_logprob})")


@dataclass
class RequestOutput:
    """Shaped like vLLM's RequestOutput."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: str = ""
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: BlockTable = field(default_factory=BlockTable)  # owned by engine.prefix_cache
    num_computed: int = 0  # tokens whose KV is in the device pool
    num_registered: int = 0  # full pages registered in the pool's hash map (and offered to host)
    num_cached_tokens: int = 0  # prompt tokens reused from a cache (set once, at first admission)
    admitted: bool = False
    num_device_hit_tokens: int = 0  # the part of num_cached_tokens that the device pool held
    hashes: list[bytes] = field(default_factory=list)  # chained page hashes of full pages
    generator: torch.Generator | None = None
    text: str = ""
    detok: object = None  # engine.tokenizer.Detokenizer of the output, when there is a tokenizer
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None
    max_len: int = 0  # prompt + max_tokens capped by the model length
    prompt_bytes: bytes | None = None  # prompt_ids as little-endian uint32 (packed once, at add_request)
    # a token sampled by the step in flight, not yet read back (scheduler.async_scheduling): the
    # next step may already compute its KV, its id patched in on the GPU from that step's samples
    pending: int = 0
    pending_row: int = -1  # its row in the in-flight step's sampled tokens

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids(self, start: int, stop: int) -> list[int]:
        """all_ids[start:stop] without building all_ids (hot: per page and per step)."""
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n:stop - n]
        return self.prompt_ids[start:] + self.output_ids[:stop - n]

    def ids_bytes(self, start: int, stop: int) -> bytes:
        """ids(start, stop) as little-endian uint32 bytes: a slice of prompt_bytes inside the prompt
        (page hashes and prefix matches of a long prompt read these, never packing it again)."""
        if self.prompt_bytes is not None and stop <= len(self.prompt_ids):
            return self.prompt_bytes[4 * start:4 * stop]
        return tokens_bytes(self.ids(start, stop))

    @property
    def num_tokens(self) -> int:
        """Tokens whose ids are on the host (a pending token is not among them)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_tokens_ahead(self) -> int:
        """num_tokens and the pending token: what the next step may compute up to."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    def stops_by_length_ahead(self) -> bool:
        """Whether the pending token ends the request by its length (max_tokens or max_len):
        then no step computes past it."""
        return self.pending > 0 and (len(self.output_ids) + self.pending >= self.params.max_tokens
                                     or self.num_tokens_ahead >= self.max_len)

    def output(self) -> RequestOutput:
        done = self.status is Status.FINISHED
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids,
                             [CompletionOutput.prefix(0, self.text, self.output_ids, self.finish_reason)],
                             done, self.num_cached_tokens)


def pending_patch(sched: list[tuple[Request, int]], rows: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(rows, sources) of the step's input ids that are pending tokens: row r's id is source s of
    the sampled tokens of the step in flight. rows: each piece's first row (default: piece i at i)."""
    out_rows, srcs = [], []
    for i, (req, n) in enumerate(sched):
        if req.pending:
            out_rows.append((i if rows is None else rows[i]) + req.num_tokens - req.num_computed)
            srcs.append(req.pending_row)
    return out_rows, srcs
