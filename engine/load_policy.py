"""Load or recompute: how many leading host-tier pages of a request are worth loading.

Loading page i costs page_bytes / bandwidth(tier of page i); recomputing it costs
page_size / prefill rate. The plan loads the leading run whose summed saving is largest (pages
are loaded in order, so a slow tier after a fast one ends the run where it stops paying). Both
rates are measured online (EWMA) by the engine: the prefill rate from its own steps, each tier's
bandwidth from its own loads.

A tier not yet measured counts at a cautious prior (PRIOR_BYTES_PER_S): a disk read on a fast GPU
is often slower than recomputing, and the first hit after a restart must not find that out by
being slower than no cache at all. Where the plan stops before such a tier, a probe reads a few
MiB of it in the background (into the loader's staging buffer, not the request's blocks) to
measure it; the request recomputes meanwhile. A measured tier that keeps being skipped is probed
again every REPROBE skips or REPROBE_S seconds (at a skip), in case it got faster (a cold disk
warmed) or its measurement met a one-off stall. `kvc.load_policy` pins the
choice: always (load every hit), never (recompute).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from itertools import groupby, islice
from typing import Sequence

import torch

POLICIES = ("auto", "always", "never")
REPROBE = 64  # a measured tier skipped this many times is probed again
# ... or skipped once this long after its last probe (never probed: at its first skip). A tier
# measured only by a load that met a one-off stall (run DL: a kernel compiled inside the first cpu
# hit read 3 GB/s) was skipped for the next 64 hits; now the next skip re-measures it.
REPROBE_S = 10.0
PROBE_BYTES = 16 << 20  # a probe reads this much (whole pages, at least one): enough that the
# rate it measures is bandwidth, not the fixed cost of one get (4 MiB from a 20 GB/s cpu tier read 1.8 GB/s)
# Bandwidth assumed for a tier before its first measurement, on the slow side of what each is
# (pinned host memory over PCIe 3, a network-attached disk with a cold page cache, a remote Redis): loading still wins wherever recomputing is slow (CPU experts, a small GPU).
PRIOR_BYTES_PER_S = {"cpu": 8e9, "disk": 0.25e9, "cluster": 0.1e9}
OTHER_PRIOR = 0.1e9


class PrefillClock:
    """Times the engine's prefill steps for LoadPlanner.observe_prefill.

    A step whose pieces produce no token (the chunks before a prompt's last) returns before the
    GPU has run it: nothing is read back. Eager, such a step was bound by its launches and its host
    time was close to its GPU time; replayed as CUDA graphs its host time is a fraction of it (on
    the H200 the rate read that way was 370K tok/s where prefill ran at ~110K). So on CUDA a step
    is timed by two events around it on the compute stream, and the sample is taken once the later
    one has completed (polled at later steps, never waited for). On CPU the step is synchronous and
    its host time is its time."""

    def __init__(self, planner: "LoadPlanner", device):
        self.planner, self.device = planner, device
        self.cuda = getattr(device, "type", "cpu") == "cuda"
        self._pending: list[tuple[int, object, object]] = []  # (tokens, start event, end event)

    def start(self):
        """Called before a sampled step's launches; returns what `stop` needs."""
        self.poll()
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def stop(self, tokens: int, started) -> None:
        if not self.cuda:
            self.planner.observe_prefill(tokens, time.perf_counter() - started)
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        self._pending.append((tokens, started, ev))

    def poll(self) -> None:
        """Report every timed step the GPU has finished."""
        while self._pending and self._pending[0][2].query():
            tokens, a, b = self._pending.pop(0)
            self.planner.observe_prefill(tokens, a.elapsed_time(b) / 1e3)


class Ewma:
    def __init__(self, alpha: float = 0.3):
        self.alpha, self.value = alpha, None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


@dataclass(frozen=True)
class Plan:
    end: int                                # load pages [start, end) of the request
    probe: tuple[int, int] | None = None    # pages [a, b) of one tier to read only to measure it


class LoadPlanner:
    def __init__(self, policy: str = "auto", page_size: int = 16, page_bytes: int = 1):
        if policy not in POLICIES:
            raise ValueError(f"kvc.load_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.page_size, self.page_bytes = policy, page_size, page_bytes
        self.prefill = Ewma()  # tokens / s
        self.bandwidth: dict[str, Ewma] = {}  # tier -> bytes / s
        self._skips: dict[str, int] = {}  # tier -> decisions that stopped loading at it since its last probe
        self._probed_at: dict[str, float] = {}  # tier -> when its last probe was planned (monotonic)
        self._lock = threading.Lock()  # loads and probes report from the loader thread

    # -- measurements ----------------------------------------------------------------------------
    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill.add(tokens / seconds)

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            with self._lock:
                self.bandwidth.setdefault(tier, Ewma()).add(nbytes / seconds)

    def prefill_rate(self) -> float | None:
        return self.prefill.value

    def tier_rates(self) -> dict[str, float]:
        with self._lock:
            return {t: e.value for t, e in self.bandwidth.items() if e.value is not None}

    # -- the decision ----------------------------------------------------------------------------
    def plan(self, located: Sequence[str], start: int) -> Plan:
        """Which of the leading pages the host tiers hold to load: `located` gives the tier of
        every such page; pages before `start` are already on the device."""
        end = len(located)
        if self.policy == "never" or end <= start:
            return Plan(start)
        if self.policy == "always":
            return Plan(end)
        prefill = self.prefill.value
        if prefill is None:  # nothing to compare with yet (the engine's first steps): load
            return Plan(end)
        recompute = self.page_size / prefill
        rates = self.tier_rates()
        best, best_at, saving = 0.0, start, 0.0
        i = start
        for tier, run in groupby(islice(located, start, end)):  # runs of one tier: a 32K hit is one
            k = len(list(run))
            bw = rates.get(tier) or PRIOR_BYTES_PER_S.get(tier, OTHER_PRIOR)
            saving += k * (recompute - self.page_bytes / bw)  # per page: the same gain (or loss)
            i += k
            if saving > best:  # a gain grows to the run's end; a loss never makes a new best
                best, best_at = saving, i
        if best_at == end:
            return Plan(end)
        return Plan(best_at, self._probe(located, best_at, located[best_at] in rates))

    def _probe(self, located: Sequence[str], at: int, measured: bool) -> tuple[int, int] | None:
        """The pages to probe where the plan stopped at page `at`, if its tier is due: at once when
        never measured, else every REPROBE skips, or at a skip REPROBE_S after its last probe."""
        tier = located[at]
        now = time.monotonic()
        with self._lock:
            n = self._skips.get(tier, 0)
            self._skips[tier] = n + 1
            due = (n % REPROBE == (0 if not measured else REPROBE - 1)
                   or (measured and now - self._probed_at.get(tier, -REPROBE_S) >= REPROBE_S))
            if due:
                self._probed_at[tier] = now
                self._skips[tier] = 1 if not measured else 0
        if not due:
            return None
        end = at
        want = max(1, -(-PROBE_BYTES // self.page_bytes))
        while end < len(located) and located[end] == tier and end - at < want:
            end += 1
        return at, end
