"""One YAML file -> one frozen tree of typed config dataclasses.

Unknown keys and bad values are errors that name the key and the allowed values. The `kvc`
section keeps KTransformers' kvc2 key names, and `kvc2:` is accepted as an alias of `kvc:`.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml


# a number in exponent form that YAML 1.1 leaves a string (1e12, 5E-1: no dot or no exponent sign)
_YAML11_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _range(lo=None, hi=None, lo_open=False):
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


@dataclass(frozen=True)
class ModelConfig:
    path: str = "builtin:tiny-qwen3-moe"
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16", "float16")})
    device: str = "auto"
    # true: no CUDA graphs (decode or prefill: every step eager), for debugging and profiling
    enforce_eager: bool = False
    # steps of up to this many tokens (prefill chunks, mixed steps) run as piecewise CUDA graphs
    # (attention eager, the rest captured per token-count bucket); 0: such steps run eagerly
    prefill_graph_tokens: int = field(default=4096, metadata=_range(0, 1 << 16))


CHUNK_AUTO = {"cuda": 2048, "cpu": 256}  # attn.chunk_size when null / "auto", by device type


def chunk_size_for(attn: "AttnConfig", device_type: str) -> int:
    """attn.chunk_size as the engine uses it on a device of this type (CHUNK_AUTO when unset)."""
    return attn.chunk_size or CHUNK_AUTO.get(device_type, CHUNK_AUTO["cpu"])


@dataclass(frozen=True)
class AttnConfig:
    page_size: int = field(default=16, metadata=_range(1, 4096))
    # Tokens per prefill chunk (a request's share of one step). null or "auto": CHUNK_AUTO by device,
    # 2048 on CUDA (the size the GPU figures in benchmarks/RESULTS.md were measured at: MoE GEMMs of
    # a 256-token chunk give each expert ~16 rows) and 256 on the CPU.
    chunk_size: int | None = field(default=None, metadata={**_range(1, 1 << 20), "auto": True})
    # "auto": the Triton paged-attention kernels on CUDA when triton imports, else the gather + SDPA
    # reference path; "reference" always takes the reference path (debugging, the kernels' oracle).
    backend: str = field(default="auto", metadata={"choices": ("auto", "reference")})
    # Prefill pieces under the kernels: "auto" sends long pieces to cuDNN attention (steps of a few
    # pieces, bucketed shapes) or FA2 varlen where they run, short ones to the Triton kernel;
    # "triton", "flash" or "cudnn" forces one (comparisons, debugging).
    prefill_kernel: str = field(default="auto", metadata={"choices": ("auto", "triton", "flash", "cudnn")})
    # MoE experts under the kernels: "auto" runs the fused Triton MoE kernels (engine.moe_kernels)
    # where the attention kernels run, prefill-sized calls with their weight tiles loaded by TMA on
    # Hopper and newer; "triton" the same kernels with pointer loads only; "torch" keeps sort +
    # torch._grouped_mm (comparisons, debugging).
    moe_kernel: str = field(default="auto", metadata={"choices": ("auto", "triton", "torch")})


@dataclass(frozen=True)
class KvcConfig:
    gpu_only: bool = False
    # false: no reuse at all (no lookups, no puts): the baseline that benchmarks compare against.
    prefix_caching: bool = True
    utilization_percentage: float = field(default=0.9, metadata=_range(0.0, 1.0, lo_open=True))
    cpu_memory_size_GB: float = field(default=4.0, metadata=_range(0.0))
    disk_path: str | None = "~/.cache/kvc/pages"
    disk_size_GB: float = field(default=32.0, metadata=_range(0.0, 1e9))  # an exabyte: sizes stay finite in bytes
    # Where cpu pages go: "back" writes them to disk when evicted from cpu, "through" on every put.
    disk_write: str = field(default="back", metadata={"choices": ("back", "through")})
    # Eviction runs when a tier passes the high watermark and stops at the low one.
    high_watermark: float = field(default=0.95, metadata=_range(0.0, 1.0, lo_open=True))
    low_watermark: float = field(default=0.85, metadata=_range(0.0, 1.0, lo_open=True))
    # Device pool size in blocks; null sizes it from utilization_percentage of free memory.
    num_device_blocks: int | None = field(default=None, metadata=_range(1))
    lease_ttl_s: float = field(default=60.0, metadata=_range(0.0, lo_open=True))
    # Host-tier hits: auto loads a page only when the measured tier bandwidth beats the measured
    # prefill rate; always loads every hit; never recomputes (device-pool hits are always taken).
    load_policy: str = field(default="auto", metadata={"choices": ("auto", "always", "never")})
    # A page goes down to disk (and the cluster) only after N uses: its put and N-1 hits.
    disk_admission_hits: int = field(default=1, metadata=_range(1))
    # Pinned host buffer that offered pages leave the GPU into (CUDA); an offer that finds it full
    # is dropped. It must hold the pages of the longest prompt that should be stored whole while
    # the engine is busy (32K tokens of Qwen3-30B-A3B at 48 layers: 3 GB; at 12 layers: 0.8 GB).
    put_buffer_GB: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    # A Redis Cluster (any node) or one Redis below disk, shared by many kvc processes:
    # redis://host:port or rediss://host:port (TLS); password in the URL or KVC_CLUSTER_PASSWORD.
    cluster_url: str | None = None
    cluster_timeout_s: float = field(default=0.2, metadata=_range(0.0, lo_open=True))  # per call
    # The longest a lease may live: a longer (or infinite) Pin TTL is cut to it.
    max_lease_ttl_s: float = field(default=3600.0, metadata=_range(0.0, 30 * 86400.0, lo_open=True))
    # Share of the cpu tier (the disk tier when there is none) one tenant's leases may pin.
    pin_budget_fraction: float = field(default=0.5, metadata=_range(0.0, 1.0, lo_open=True))


@dataclass(frozen=True)
class ExpertsConfig:
    num_gpu_experts: int | None = field(default=None, metadata=_range(0))
    gpu_experts_ratio: float | None = field(default=None, metadata=_range(0.0, 1.0))
    placement_strategy: str = field(
        default="uniform", metadata={"choices": ("uniform", "frequency", "front-loading", "random")})
    init_expert_location: str | None = None
    dynamic_update: bool = False
    gpu_prefill_token_threshold: int = field(default=512, metadata=_range(1))
    cpu_expert_dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16", "int8")})
    cpu_expert_kernel: str = field(default="auto", metadata={"choices": ("auto", "torch")})
    record_expert_stats: str | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=64, metadata=_range(1))
    max_num_batched_tokens: int = field(default=2048, metadata=_range(1))
    max_model_len: int | None = field(default=None, metadata=_range(1))
    # keep one step in flight: the next step is scheduled and launched before the last one's
    # samples are read back (the GPU is not idle while the host prepares)
    async_scheduling: bool = True


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    http_port: int = field(default=30000, metadata=_range(0, 65535))
    grpc_port: int = field(default=50051, metadata=_range(0, 65535))
    metrics_port: int = field(default=9400, metadata=_range(0, 65535))
    cache_url: str | None = None
    # Bearer token -> tenant name; the tenant's salt is applied by the cache service.
    auth_tokens: Mapping[str, str] | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # gRPC takes a C int: at most 2**31 - 1
    max_message_bytes: int = field(default=64 << 20, metadata=_range(1 << 20, (1 << 31) - 1))
    # The HTTP server refuses a request body larger than this with 413 (uvicorn has no limit).
    max_request_bytes: int = field(default=32 << 20, metadata=_range(1 << 10))
    shared_memory: bool = False
    rpc_timeout_s: float = field(default=2.0, metadata=_range(0.0, lo_open=True))
    # Page bytes the cache service holds for PutPages / GetPages calls in progress, all callers
    # together; a call that would pass it gets RESOURCE_EXHAUSTED (the client retries later).
    max_inflight_bytes: int = field(default=2 << 30, metadata=_range(1 << 20))
    # Where the cache service keeps the key of its tenants' salts; null: <kvc.disk_path>/tenant-secret.
    tenant_secret_file: str | None = None


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attn: AttnConfig = field(default_factory=AttnConfig)
    kvc: KvcConfig = field(default_factory=KvcConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def replace(self, **overrides: Any) -> "Config":
        """A copy with leaf keys replaced, e.g. replace(page_size=32, disk_path=None).

        A leaf name is unique across sections; a dotted name ("kvc.disk_path") also works.
        """
        tree = to_dict(self)
        for name, value in overrides.items():
            section = _section_of(name)
            tree[section][name.split(".")[-1]] = value
        return from_dict(tree)


def _section_of(name: str) -> str:
    if "." in name:
        section, leaf = name.split(".", 1)
        if section not in _SECTIONS or leaf not in _leaf_names(_SECTIONS[section]):
            raise ConfigError(f"unknown config key {name!r}")
        return section
    owners = [s for s, cls in _SECTIONS.items() if name in _leaf_names(cls)]
    if not owners:
        raise ConfigError(f"unknown config key {name!r}; known keys: {', '.join(sorted(_all_leaves()))}")
    assert len(owners) == 1, f"config leaf {name!r} is ambiguous: {owners}"
    return owners[0]


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


def _leaf_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _all_leaves() -> list[str]:
    return [leaf for cls in _SECTIONS.values() for leaf in _leaf_names(cls)]


def _check_value(section: str, f: dataclasses.Field, value: Any) -> Any:
    key = f"{section}.{f.name}"
    hints = typing.get_type_hints(_SECTIONS[section])
    hint = hints[f.name]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if value == "auto" and f.metadata.get("auto"):
        value = None  # the key's automatic value, as null
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be null")
    origin = typing.get_origin(base) or base
    if origin is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            also = " or auto" if f.metadata.get("auto") else ""
            raise ConfigError(f"{key} must be an integer{also}, got {value!r}")
    elif origin is float:
        if isinstance(value, str) and _YAML11_EXPONENT.match(value):
            value = float(value)  # YAML 1.1 (PyYAML) reads 1e12 as a string: it wants 1.0e+12
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # .nan passes every range check (each comparison is false)
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
    elif origin is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
    elif origin in (dict, collections.abc.Mapping):  # get_origin(Mapping[str, str]) is the abc
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(f"{key} must be a mapping of strings to strings, got {value!r}")
        value = dict(value)
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    if "lo" in meta:
        lo, hi, lo_open = meta["lo"], meta["hi"], meta["lo_open"]
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and value > hi
        if too_low or too_high:
            lo_s = "-inf" if lo is None else str(lo)
            hi_s = "inf" if hi is None else str(hi)
            bracket = "(" if lo_open else "["
            raise ConfigError(f"{key} must be in {bracket}{lo_s}, {hi_s}]; got {value!r}")
    return value


def _total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def from_dict(data: Mapping[str, Any] | None) -> Config:
    data = dict(data or {})
    if "kvc2" in data:
        if "kvc" in data:
            raise ConfigError("config has both 'kvc' and its alias 'kvc2'; keep one")
        data["kvc"] = data.pop("kvc2")
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(_SECTIONS)}")
    sections = {}
    for name, cls in _SECTIONS.items():
        raw = data.get(name)
        if raw is None:  # `kvc:` with nothing under it: the defaults (0, [] or false is an error)
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config section {name!r} must be a mapping, got {raw!r}")
        known = {f.name: f for f in fields(cls)}
        bad = set(raw) - set(known)
        if bad:
            raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in sorted(bad))}; "
                              f"known keys in {name}: {', '.join(known)}")
        values = {k: _check_value(name, known[k], v) for k, v in raw.items()}
        sections[name] = cls(**values)
    cfg = Config(**sections)
    return _validate(cfg)


def _validate(cfg: Config) -> Config:
    kvc = cfg.kvc
    if kvc.low_watermark >= kvc.high_watermark:
        raise ConfigError(f"kvc.low_watermark ({kvc.low_watermark}) must be below "
                          f"kvc.high_watermark ({kvc.high_watermark})")
    if not kvc.lease_ttl_s <= kvc.max_lease_ttl_s:
        raise ConfigError(f"kvc.lease_ttl_s ({kvc.lease_ttl_s}) must not exceed "
                          f"kvc.max_lease_ttl_s ({kvc.max_lease_ttl_s})")
    total = _total_memory_bytes()
    if total is not None and kvc.cpu_memory_size_GB * (1 << 30) > total:
        raise ConfigError(f"kvc.cpu_memory_size_GB={kvc.cpu_memory_size_GB} is larger than this "
                          f"machine's memory ({total / (1 << 30):.1f} GB); lower it")
    if kvc.cluster_url is not None:
        from .cluster_tier import check_url  # imports redis-py only when a cluster is configured
        try:
            check_url(kvc.cluster_url)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if kvc.disk_path is not None:
        kvc = dataclasses.replace(kvc, disk_path=os.path.expanduser(kvc.disk_path))
    ex = cfg.experts
    if ex.num_gpu_experts is not None and ex.gpu_experts_ratio is not None:
        raise ConfigError("set one of experts.num_gpu_experts and experts.gpu_experts_ratio, not both")
    if ex.init_expert_location is not None:
        ex = dataclasses.replace(ex, init_expert_location=os.path.expanduser(ex.init_expert_location))
    return dataclasses.replace(cfg, kvc=kvc, experts=ex)


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {s.name: dict(dataclasses.asdict(getattr(cfg, s.name))) for s in fields(Config)}


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error: PyYAML keeps the last, so a
    second `kvc:` section silently dropped every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # PyYAML's own error for an unhashable key follows
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first {seen[key]})",
                    key_node.start_mark)
            seen[key] = f"at line {key_node.start_mark.line + 1}"
        return super().construct_mapping(node, deep)


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply leaf overrides."""
    data: Mapping[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text: {e}") from None
        except OSError as e:  # a folder, no permission
            raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if data is None:  # an empty file: the defaults
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    cfg = from_dict(data)
    return cfg.replace(**overrides) if overrides else cfg
