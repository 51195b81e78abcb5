"""LLM: the offline API in vLLM's shape. `LLM(path, **config_overrides).generate(prompts, params)`."""
from __future__ import annotations

import itertools
from typing import Sequence

from kvc.config import Config, load_config

from .llm_engine import Closed, LLMEngine, release_device_memory
from .request import RequestOutput
from .sampling import SamplingParams


def _make_store(config: Config):
    """The host tiers (cpu + disk [+ cluster] TieredStore), unless gpu_only, prefix_caching off (the
    engine would not use them; the slab alone is cpu_memory_size_GB) or there is nothing to hold."""
    kvc = config.kvc
    if kvc.gpu_only or not kvc.prefix_caching or (kvc.cpu_memory_size_GB <= 0 and kvc.disk_path is None
                                                  and kvc.cluster_url is None):
        return None
    from kvc.store import TieredStore
    return TieredStore(kvc)


class LLM:
    def __init__(self, model: str | None = None, config: Config | str | None = None, **overrides):
        """model: a checkpoint directory or builtin:<name>; overrides: config leaf names."""
        if not isinstance(config, Config):
            config = load_config(config)
        if model is not None:
            overrides["path"] = str(model)
        self.config = config.replace(**overrides) if overrides else config
        self._store = _make_store(self.config)
        self.engine = LLMEngine(self.config, cache=self._store)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 cache_salt: str = "") -> list[RequestOutput]:
        """One output per prompt, in order. A flat list of ints is a single token-id prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        done: dict[str, RequestOutput] = {}
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(rid, list(prompt) if not isinstance(prompt, str) else prompt, p, cache_salt)
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:  # a prompt refused, an interrupt: the others would stay in the engine,
            for rid in ids:    # holding pages and running in every later generate for nobody
                if rid not in done:
                    self.engine.abort(rid)
            raise
        self.engine.flush_commits()  # the pages are cached (and offered) when generate returns
        return [done[r] for r in ids]

    def close(self) -> None:
        """Give everything back: the engine's weights and device pool, the host tiers (the disk
        path's lock included). Using a closed LLM raises RuntimeError."""
        if isinstance(self.engine, Closed):
            return
        engine, self.engine = self.engine, Closed("this LLM is closed; create a new one")
        engine.close()
        if self._store is not None:
            self._store.close()
            self._store = None
        device = engine.device
        del engine
        release_device_memory(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
