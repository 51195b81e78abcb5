"""LLMEngine: add_request / step / abort over the scheduler, runner, device pool and host tiers."""
from __future__ import annotations

import array
import atexit
import gc
import operator
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from kvc.backend import CacheBackend
from kvc.config import Config, chunk_size_for
from kvc.device_pool import DevicePool
from kvc.hashing import PageSpec
from kvc.metrics import KvcMetrics
from kvc.record import dtype_name

from .cuda_graphs import DecodeGraphs, graphs_supported
from .deepseek import DeepseekCausalLM
from .host_tier import HostTier
from .kv_cache import KVCache
from .layers import set_attention_backend
from .load_policy import LoadPlanner, PrefillClock
from .loader import load_model
from .metrics import EngineMetrics
from .model import CausalLM
from .offload import approximate_experts, experts_load_device, setup_experts
from .prefill_graphs import MlaPrefillGraphs, PrefillGraphs
from .prefix_cache import PrefixCache
from .request import Request, RequestOutput, Status
from .runner import Launched, ModelRunner
from .sampling import SamplingParams, make_generator
from .scheduler import Scheduler
from .token_cache import TokenIds
from .tokenizer import Detokenizer, Tokenizer

BUILTIN = {"tiny-qwen3-moe": "qwen3_moe", "tiny-mixtral": "mixtral", "tiny-deepseek-v2": "deepseek_v2",
           "tiny-deepseek-v3": "deepseek_v3"}
CPU_POOL_BYTES = 1 << 30  # the device pool's budget when the "device" is the CPU
PREFILL_SAMPLE_TOKENS = 256  # steps of at least this many tokens measure the prefill rate


def resolve_model_path(path: str) -> Path:
    """A directory, or builtin:<name> (a tiny random model written once under ~/.cache/kvc/models)."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name not in BUILTIN:
            raise ValueError(f"model.path {path!r}: unknown builtin model; known: "
                             f"{', '.join('builtin:' + n for n in BUILTIN)}")
        from .tiny import CHAT_TEMPLATE, make_tiny_model
        out = Path("~/.cache/kvc/models").expanduser() / name
        if not (out / "config.json").is_file():
            make_tiny_model(out, BUILTIN[name])
        template = out / "chat_template.jinja"
        if not template.is_file() or template.read_text(encoding="utf-8") != CHAT_TEMPLATE:
            # written by an older kvc (before the template's tool parts): the weights stay, the
            # template is this version's, so the builtin model serves what the README says
            tmp = template.with_suffix(".tmp")
            tmp.write_text(CHAT_TEMPLATE, encoding="utf-8")
            tmp.replace(template)
        return out
    return Path(path).expanduser()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"model.device {device!r} is not a torch device (use auto, cpu, cuda, cuda:N)") from None


def _num_blocks(config: Config, spec: PageSpec, device: torch.device) -> int:
    if config.kvc.num_device_blocks is not None:
        return config.kvc.num_device_blocks
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * config.kvc.utilization_percentage)
    else:
        budget = int(CPU_POOL_BYTES * config.kvc.utilization_percentage)
    return DevicePool.blocks_for_budget(spec, budget)


def _token_ids(prompt) -> tuple[list[int], bytes | None, int, int]:
    """(the prompt's token ids as Python ints, the same as little-endian uint32 bytes or None when
    they do not fit, their min, their max). A 32K-token prompt arrives on every request of a long
    shared prefix: array('I') converts and range-checks it in C (0.2 ms, where int() per token and
    min/max took 4 ms), numpy reads its buffer for the bounds, and the packed bytes are what the
    page hashes and the prefix match read (they packed the ids again, twice). Anything array('I')
    refuses (numpy ints, negative ids, floats) goes through operator.index() and its error.
    A list that array('I') took is copied as it is (arr.tolist() built a new int object per token,
    on every long prompt's critical path: add_request 0.30-0.32 -> 0.24 ms for a 32K prompt in
    bench_host_path.py on the 2-core VM, 1.13 -> 0.43 ms in probe_cpu_hit.py on the H200 host); its
    elements are Python ints or int-likes that array('I') read as such."""
    if type(prompt) is TokenIds:  # the tokenizer's (engine.token_cache): packed there, piece by piece
        return list(prompt), prompt.packed, prompt.low, prompt.high
    try:
        arr = array.array("I", prompt)
        if arr.itemsize != 4:  # 32-bit wherever torch runs; the general path otherwise
            raise TypeError("array('I') is not 32-bit here")
        view = np.frombuffer(arr, dtype=np.uint32)  # no copy
    except (TypeError, OverflowError):
        try:
            arr = array.array("q", prompt)
        except (TypeError, OverflowError):
            try:
                arr = array.array("q", [operator.index(t) for t in prompt])  # numpy ints, not floats
            except TypeError as e:
                raise ValueError(f"prompt token ids must be integers ({e})") from None
            except OverflowError:  # past 64 bits: no vocabulary is that large
                bad = next(t for t in prompt if not -2**63 <= operator.index(t) < 2**63)
                raise ValueError(f"prompt token ids must be in [0, vocab size); got {bad}") from None
        view = np.frombuffer(arr, dtype=np.int64)  # no copy
    if not arr:
        return [], b"", 0, 0
    low, high = int(view.min()), int(view.max())
    packed = view.astype("<u4", copy=False).tobytes() if 0 <= low and high <= 0xFFFFFFFF else None
    ids = list(prompt) if type(prompt) is list and arr.typecode == "I" else arr.tolist()
    return ids, packed, low, high


class Closed:
    """Stands in for what a closed engine (or LLM) dropped: any use is a clear error."""

    def __init__(self, message: str):
        self._message = message

    def __getattr__(self, name):
        raise RuntimeError(self._message)

    def __bool__(self):
        raise RuntimeError(self._message)


_unfreeze_at_exit = False


def freeze_long_lived_objects() -> None:
    """Put every object alive now (torch's, the model's modules, the tokenizer: some 200K) out of
    the cyclic collector's reach. A full collection traverses every tracked object; with torch
    loaded that took 85 ms on a 2-core VM, at whatever moment of a request the allocation count
    tripped it (a TTFT spike). Frozen objects are still freed by reference counting, and
    release_device_memory unfreezes before it collects, so a closed engine's cycles are reclaimed.
    Only the young generations are collected first (cheap): older garbage frozen here is reclaimed
    at close."""
    global _unfreeze_at_exit
    gc.collect(1)
    gc.freeze()
    if not _unfreeze_at_exit:  # the shutdown's last collection must see them (nanobind, used by
        atexit.register(gc.unfreeze)  # triton, reports objects it never saw finalized as leaks)
        _unfreeze_at_exit = True


def release_device_memory(device: torch.device) -> None:
    gc.unfreeze()  # an engine froze its startup objects: let the collection below reach them
    gc.collect()  # modules and closures can hold tensors in reference cycles
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # cuBLAS keeps a workspace per (handle, stream) in the caching allocator for the process's
        # life: 32 MiB each on Hopper, one per stream that ran a GEMM (decode-graph warm-up and
        # capture streams too); measured as the 96 MiB a closed LLM still held (probe_close.py)
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()


class _Step(NamedTuple):
    sched: list[tuple[Request, int]]
    launched: Launched
    early: bool  # it read early loads' pages (settled when read back)


class LLMEngine:
    def __init__(self, config: Config, cache: CacheBackend | None = None,
                 registry: CollectorRegistry | None = None, kvc_metrics: KvcMetrics | None = None):
        self.config = config
        self.device = resolve_device(config.model.device)
        path = resolve_model_path(config.model.path)
        dtype = None if config.model.dtype == "auto" else getattr(torch, config.model.dtype)
        self.model, self.args, digest = load_model(path, dtype, self.device, experts_load_device(config.experts))
        set_attention_backend(self.model, config.attn.backend, config.attn.prefill_kernel,
                              config.attn.moe_kernel)
        self.model_name = config.model.path
        self.tokenizer = Tokenizer.from_dir(path, self.args.eos_token_ids)
        self.eos_token_ids = self.tokenizer.eos_token_ids if self.tokenizer else self.args.eos_token_ids
        a = self.args
        kv_dtype = dtype_name(self.model.lm_head.weight.dtype)
        spec = a.page_spec(config.attn.page_size, kv_dtype)  # MLA models cache one latent part
        experts = approximate_experts(config.experts, self.model.lm_head.weight.dtype)
        if experts:  # not the exact model's KV: never shared with an exact engine's pages
            digest = f"{digest}+cpu-experts:{experts}"
        self.kv = KVCache(spec, _num_blocks(config, spec, self.device), self.device, a.arch, digest)
        reuse = config.kvc.prefix_caching
        self.planner = LoadPlanner(config.kvc.load_policy, spec.page_size, spec.page_bytes)
        self.prefill_clock = PrefillClock(self.planner, self.device)
        host = (HostTier(cache, observe=self.planner.observe_load, ring_bytes=int(config.kvc.put_buffer_GB * (1 << 30)))
                if cache is not None and not config.kvc.gpu_only and reuse else None)
        if host is not None:
            host.warm(spec.page_bytes, self.device, spec.shape[0], spec.shape[1])
        chunk = chunk_size_for(config.attn, self.device.type)
        self.prefix_cache = PrefixCache(self.kv, host, chunk, reuse, self.planner)
        self.scheduler = Scheduler(config.scheduler, chunk, self.prefix_cache)
        self.runner = ModelRunner(self.model, self.kv, self.device)
        self._pace_puts = host is not None and self.device.type == "cuda"
        self.runner.on_launched = self.prefix_cache.step_launched  # loaded pages register beside the GPU's step
        if self._pace_puts:
            host.pace_disk_writes()
        self.max_model_len = config.scheduler.max_model_len or a.max_position_embeddings
        registry = registry if registry is not None else CollectorRegistry()
        self.metrics = EngineMetrics(registry, kvc_metrics)
        self.experts = setup_experts(self.model, config.experts, self.device, registry)
        why_not = ("model.enforce_eager" if config.model.enforce_eager
                   else graphs_supported(self.model, self.device, config.attn.backend))
        if why_not is None:
            self.runner.graphs = DecodeGraphs(self.model, self.kv, self.device, config.scheduler.max_num_seqs,
                                              self.max_model_len)
            most = min(config.model.prefill_graph_tokens, config.scheduler.max_num_batched_tokens)
            graphs = {CausalLM: PrefillGraphs, DeepseekCausalLM: MlaPrefillGraphs}.get(type(self.model))
            if most > 0 and graphs is not None:  # their layers split around attention
                self.runner.prefill_graphs = graphs(self.model, self.kv, self.device, most,
                                                    max_model_len=self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.async_scheduling = config.scheduler.async_scheduling
        self._in_flight: _Step | None = None  # a launched step not yet read back
        # The longest step() waits for a host load when nothing else can run (None: until one
        # lands). A caller that takes new requests and aborts between steps (the server's engine
        # loop) sets it: a slow load (a cache service near its RPC timeout, a busy disk) must not
        # hold back the requests that arrive meanwhile, nor the abort of the loading one.
        self.load_wait_s: float | None = None
        self._update_gauges()
        freeze_long_lived_objects()

    # --- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    cache_salt: str = "", arrival: float | None = None) -> None:
        """Queue a request. `arrival` (time.monotonic()) is when it reached the caller, if earlier
        than now: kvc_time_to_first_token_seconds counts from it (the server passes the HTTP
        handler's start, so the histogram includes tokenizing and the hand-over to this thread)."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer.json; send token ids, not text")
            # as vLLM's LLM and the server's completions: with the special tokens the tokenizer's
            # post-processor adds (a DeepSeek or Llama BOS; none for Qwen's)
            text, raw = prompt, self.tokenizer.encode(prompt, cache_salt, add_special_tokens=True)
        else:
            text, raw = None, prompt
        ids, packed, low, high = _token_ids(raw)
        if not ids:
            raise ValueError("the prompt is empty")
        if low < 0 or high >= self.args.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.args.vocab_size}); got {low}..{high}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model length is {self.max_model_len} "
                             f"(scheduler.max_model_len)")
        if params.max_tokens > self.max_model_len:  # an impossible request, not "until the end"
            raise ValueError(f"max_tokens is {params.max_tokens}; the model length is {self.max_model_len} "
                             f"(scheduler.max_model_len)")
        max_len = min(len(ids) + params.max_tokens, self.max_model_len)
        P = self.kv.page_size
        if (max_len + P - 1) // P > self.kv.pool.num_blocks:
            raise ValueError(f"a request of {max_len} tokens needs more than the device pool's "
                             f"{self.kv.pool.num_blocks} pages; raise kvc.num_device_blocks or lower max_tokens")
        req = Request(request_id, text, ids, params, cache_salt, max_len=max_len,
                      generator=make_generator(params, self.device), prompt_bytes=packed)
        if arrival is not None:
            req.arrival = min(arrival, req.arrival)
        self.requests[request_id] = req
        self.scheduler.add(req)
        self.metrics.prompt_tokens.inc(len(ids))

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.remove(req)
            req.status = Status.FINISHED
            self._update_gauges()

    def has_unfinished(self) -> bool:
        """Whether a request is unfinished (a step in flight whose requests were all aborted or
        stopped holds nothing back: the next step or close reads it)."""
        step = self._in_flight
        return self.scheduler.has_unfinished() or (
            step is not None and any(req.status is not Status.FINISHED for req, _ in step.sched))

    def flush_commits(self) -> None:
        """The last step's page bookkeeping, now: register its newly full pages in the device pool,
        offer them to the host tiers, free the pages of the requests it finished. A step hands its
        tokens out first and leaves this to the next call into the engine (the next step does the
        finished requests' before it schedules and the running ones' once its kernels are queued;
        abort, close and LLM.generate before it returns do it all): a first token does not wait
        for its prompt's registration and offers. A loop that goes idle calls this (the server's
        engine loop does, every 50 ms while idle); the blocks of a request aborted while its load
        ran come back here once that load has ended."""
        did = self.prefix_cache.run_deferred()
        if self.prefix_cache.end_freed_loads() or did:  # an aborted request's load that ended meanwhile
            self._update_gauges()  # the freed pages show in the device tier's gauges while idle

    # --- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; return the outputs of the step before it.

        With scheduler.async_scheduling the engine keeps one step in flight: it schedules and
        launches the next step before it reads the last one's samples back, so the GPU has queued
        work while the host hands outputs out, registers pages and prepares. A request whose token
        is still on the GPU is scheduled as a decode of it (its id patched in on the device), unless
        that token ends it by length; one that then stops on an EOS, a stop token or a stop string
        has computed one step more than it needed, and that step's sample is dropped. Without it
        each step is read back before the next is scheduled (the outputs are this step's)."""
        prev, self._in_flight = self._in_flight, None
        if prev is not None and prev.early:  # its verdict decides what the next step computes
            return self._finish(prev)
        self.prefix_cache.run_deferred(running=False)  # the finished requests', before scheduling
        if self._pace_puts:
            self.prefix_cache.step_started()
        preempted = self.scheduler.num_preemptions
        sched = self.scheduler.schedule()
        self.metrics.preemptions.inc(self.scheduler.num_preemptions - preempted)
        if not sched:
            if prev is not None:
                return self._finish(prev)
            self.prefix_cache.run_deferred()  # no launch to do it beside
            self.scheduler.wait_for_loads(self.load_wait_s)  # nothing else can run until a load lands
            return []
        launched = self._launch(sched)
        if prev is None and not self.async_scheduling:
            return self._finish(launched)
        self._in_flight = launched
        return self._finish(prev) if prev is not None else []

    def _launch(self, sched: list[tuple[Request, int]]) -> "_Step":
        n_tokens = sum(n for _, n in sched)
        early = self.prefix_cache.step_waits(sched)  # the GPU waits for early loads' writes
        # mostly prefill: a sample of the recompute rate (not a step that waited for a load)
        sample = n_tokens >= PREFILL_SAMPLE_TOKENS and not early
        started = self.prefill_clock.start() if sample else None
        launched = self.runner.launch(sched)
        if sample:
            self.prefill_clock.stop(n_tokens, started)
        for j, req in enumerate(launched.reqs):  # its token is pending until _finish reads it
            req.pending += 1
            req.pending_row = j
        for req, n in sched:  # queued: the next schedule goes on from there
            req.num_computed += n
        return _Step(sched, launched, early)

    def _finish(self, step: "_Step") -> list[RequestOutput]:
        """Read a launched step's samples back and hand its outputs out."""
        # put work runs here until the samples are ready (HostTier.put_gate "engine"), or on the put
        # thread meanwhile ("gpu-wait")
        self.prefix_cache.gpu_wait(True, step.launched.ready)
        try:
            tokens = step.launched.tokens()
        finally:
            self.prefix_cache.gpu_wait(False)
        self.experts.step()
        early = step.early
        now = time.monotonic()
        outputs = []
        for req, n in step.sched:
            tok = tokens.get(req)
            if tok is not None:
                req.pending -= 1
            if early and not self.prefix_cache.settle(req):
                continue  # it read pages that then failed their checksum: recomputed from there
            if req.status is Status.FINISHED:
                continue  # aborted, or stopped by the step before (this step ran it once more)
            self.prefix_cache.commit_later(req)  # registered and offered after the outputs go out
            if tok is None:
                continue
            if req.last_token_time is None:
                self.metrics.ttft.observe(now - req.arrival)
                self.metrics.cached_tokens.inc(req.num_cached_tokens)
                self.metrics.device_hit_tokens.inc(req.num_device_hit_tokens)
            else:
                self.metrics.tpot.observe(now - req.last_token_time)
            req.last_token_time = now
            req.output_ids.append(tok)
            self._check_stop(req, tok)
            if req.finish_reason is not None:
                req.status = Status.FINISHED
                self.scheduler.remove(req, free=False)
                self.prefix_cache.free_later(req)  # once committed
                self.requests.pop(req.request_id, None)
            outputs.append(req.output())
        self._update_gauges()
        return outputs

    def _check_stop(self, req: Request, tok: int) -> None:
        p = req.params
        by_token = tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids)
        by_length = len(req.output_ids) >= p.max_tokens or req.num_tokens >= req.max_len
        if self.tokenizer is not None:
            prev = len(req.text)
            if req.detok is None:  # the text that follows the prompt's (a SentencePiece space kept)
                req.detok = Detokenizer(self.tokenizer, req.prompt_ids)
            # the output's last text: nothing held back (a character cut off by the length is U+FFFD)
            req.text = req.detok.update(req.output_ids, final=by_token or by_length)
            hit = p.find_stop(req.text, prev) if p.stop_strings else None  # the stop string met first
            if hit is not None:
                at, s = hit
                req.text = req.text[:at + len(s)] if p.include_stop_str_in_output else req.text[:at]
                req.finish_reason = "stop"
                return
        if by_token:
            req.finish_reason = "stop"
        elif by_length:
            req.finish_reason = "length"

    def _update_gauges(self) -> None:
        sch = self.scheduler
        self.metrics.requests(len(sch.waiting), self.prefix_cache.num_loading + len(sch.loaded), len(sch.running))
        b = self.kv.blocks
        self.metrics.device_tier(self.kv.pool.num_blocks * self.kv.spec.page_bytes,
                                 b.num_blocks - b.num_free, self.kv.spec.page_bytes)
        self.metrics.rates(self.planner.prefill_rate(), self.planner.tier_rates())
        host = self.prefix_cache.host
        if host is not None:
            self.metrics.dropped(host.dropped_puts)
            self.metrics.put_pieces(host.engine_put_pieces, host.engine_forced_pieces, host.thread_put_pieces)

    def close(self) -> None:
        """Stop the workers and drop the weights, the device pool and everything that holds them
        (the device memory goes back to the allocator, and to the driver on CUDA). A closed
        engine raises RuntimeError when used."""
        if isinstance(self.__dict__.get("model"), Closed):
            return
        if self._in_flight is not None:  # its kernels may still write the pool
            self._in_flight.launched.tokens()
            self._in_flight = None
        self.experts.close()
        self.prefix_cache.close()
        gone = Closed("this LLMEngine is closed")
        for name in ("model", "kv", "prefix_cache", "scheduler", "runner", "requests"):
            setattr(self, name, gone)
        self.experts.backends, self.experts.context = {}, None  # its recorder stays readable
        release_device_memory(self.device)
