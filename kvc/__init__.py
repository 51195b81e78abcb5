"""kvc: a tiered KV cache with prefix reuse (hash spec v1, device/cpu/disk tiers)."""
from .backend import CacheBackend, LookupResult, PutResult
from .config import Config, ConfigError, load_config
from .hashing import Namespace, PageSpec, namespace_root, page_hashes
from .record import Page

__all__ = ["CacheBackend", "LookupResult", "PutResult", "Config", "ConfigError", "load_config",
           "Namespace", "PageSpec", "namespace_root", "page_hashes", "Page", "TieredStore"]


def __getattr__(name):
    if name == "TieredStore":  # imported lazily: it pulls in lmdb
        from .store import TieredStore
        return TieredStore
    raise AttributeError(name)
