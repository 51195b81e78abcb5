"""SamplingParams (vLLM names) and the sampler: greedy, temperature, top-k, top-p, per-request seed.

A temperature below GREEDY_BELOW (1e-5, vLLM's threshold) samples greedily, as 0 does."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Temperatures below this sample greedily, as in vLLM (_SAMPLING_EPS): logits / 1e-320 are inf, and
# softmax of them NaN, which torch.multinomial refuses.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # below GREEDY_BELOW (0 included) is greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self):
        if not self.temperature >= 0:  # NaN too: it is not greedy, and dividing by it NaNs every logit
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop_strings", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))

    def find_stop(self, text: str, searched: int = 0) -> tuple[int, str] | None:
        """(where, which) of the stop string that `text` completes first, or None: of the
        occurrences that end past `searched` (text[:searched] was searched before), the one that
        ends first (the one a character-by-character stream meets first), of those the one that
        starts first. So the text before it holds no stop string, whichever order the strings
        came in and however the text was cut into tokens; taking the first string of the list
        that occurs anywhere in the new text ([">", '"'] on 'a ">') left '"' in 'a "'."""
        best = None
        for s in self.stop_strings:
            at = text.find(s, max(0, searched - len(s) + 1))
            if at >= 0 and (best is None or (at + len(s), at) < (best[0] + len(best[1]), best[0])):
                best = (at, s)
        return best

    @property
    def greedy(self) -> bool:
        """Argmax: temperature 0, or so small (< GREEDY_BELOW) that dividing by it overflows."""
        return self.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """logits [B, V] fp32 -> one token id per row."""
    return sample_on_device(logits, params, generators).tolist()


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B] long on logits' device, queued without a host sync."""
    out = logits.argmax(-1)  # [B]
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature  # [V]
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, idx = torch.sort(row, descending=True)  # [V]
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p  # keep the smallest set reaching top_p
            row = row.scatter(0, idx, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(row, -1)
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out
