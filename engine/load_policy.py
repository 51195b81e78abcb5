"""Load or recompute: how many leading host-tier pages of a request are worth loading.

Loading page i costs page_bytes / bandwidth(tier of page i); recomputing it costs
page_size / prefill rate. The plan loads the leading run whose summed saving is largest (pages
are loaded in order, so a slow tier after a fast one ends the run where it stops paying). Both
rates are measured online (EWMA) by the engine: the prefill rate from its own steps, each tier's
bandwidth from its own loads. A rate not yet measured counts as "loading pays" so that it gets
measured, and a tier skipped REPROBE times is loaded once to re-measure it. `kvc.load_policy` pins the choice: always (load every hit), never (recompute).
"""
from __future__ import annotations

import threading
from typing import Sequence

POLICIES = ("auto", "always", "never")
REPROBE = 64  # after this many decisions that skipped a tier, load from it once to re-measure it


class Ewma:
    def __init__(self, alpha: float = 0.3):
        self.alpha, self.value = alpha, None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


class LoadPlanner:
    def __init__(self, policy: str = "auto", page_size: int = 16, page_bytes: int = 1):
        if policy not in POLICIES:
            raise ValueError(f"kvc.load_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.page_size, self.page_bytes = policy, page_size, page_bytes
        self.prefill = Ewma()  # tokens / s
        self.bandwidth: dict[str, Ewma] = {}  # tier -> bytes / s
        self._skips: dict[str, int] = {}  # tier -> decisions that stopped loading at it
        self._lock = threading.Lock()  # loads report from the loader thread

    # -- measurements ----------------------------------------------------------------------------
    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill.add(tokens / seconds)

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            with self._lock:
                self.bandwidth.setdefault(tier, Ewma()).add(nbytes / seconds)
                self._skips[tier] = 0

    def prefill_rate(self) -> float | None:
        return self.prefill.value

    def tier_rates(self) -> dict[str, float]:
        with self._lock:
            return {t: e.value for t, e in self.bandwidth.items() if e.value is not None}

    # -- the decision ----------------------------------------------------------------------------
    def pages_to_load(self, located: Sequence[str], start: int) -> int:
        """End (exclusive) of the run of pages [start, end) to load; `located` gives the tier of
        every leading page that the host tiers hold; pages before `start` are already on device."""
        end = len(located)
        if self.policy == "never" or end <= start:
            return start
        if self.policy == "always":
            return end
        prefill = self.prefill.value
        if prefill is None:
            return end
        recompute = self.page_size / prefill
        rates = self.tier_rates()
        best, best_at, saving = 0.0, start, 0.0
        for i in range(start, end):
            bw = rates.get(located[i])
            saving += recompute - (self.page_bytes / bw if bw else 0.0)
            if saving > best:
                best, best_at = saving, i + 1
        if best_at < end:  # a measured-slow tier is never loaded, so never re-measured: now and
            tier = located[best_at]  # then it is, in case it got faster (e.g. a cold disk warmed)
            self._skips[tier] = self._skips.get(tier, 0) + 1
            if self._skips[tier] >= REPROBE:
                self._skips[tier] = 0
                return end
        return best_at
