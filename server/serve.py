"""`kvc serve`: the engine, its cache and the OpenAI-compatible HTTP server in one process.

Embedded default: the host tiers are an in-process TieredStore (cpu + disk). With --cache-url
they are a shared `kvc cache-server`, reached through kvc.client.RemoteCache.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from kvc.config import Config, ConfigError, load_config
from kvc.metrics import KvcMetrics

log = logging.getLogger("kvc.serve")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: configs/default.yaml, else built-in defaults)")
    p.add_argument("--model", help="model directory in Hugging Face format, or builtin:<name>")
    p.add_argument("--cache-url", help="grpc://host:port of a shared kvc cache-server for the host tiers")
    p.add_argument("--cache-token", help="bearer token for the cache-server (or KVC_CACHE_TOKEN)")
    p.add_argument("--host", help="listen address (server.host)")
    p.add_argument("--port", type=int, help="HTTP port (server.http_port)")
    p.add_argument("--disk-path", help="disk tier directory (kvc.disk_path)")
    p.add_argument("--cluster-url", help="redis://host:port of a Redis Cluster shared by machines (kvc.cluster_url)")
    p.add_argument("--device", help="torch device: auto, cpu, cuda (model.device)")
    p.add_argument("--record-expert-stats", metavar="DIR",
                   help="write MoE expert activation counts (.pt) under DIR (experts.record_expert_stats)")


def config_from_args(args: argparse.Namespace) -> Config:
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    over = {}
    for arg, key in (("model", "model.path"), ("cache_url", "server.cache_url"), ("host", "server.host"),
                     ("port", "server.http_port"), ("disk_path", "kvc.disk_path"), ("device", "model.device"),
                     ("record_expert_stats", "experts.record_expert_stats"), ("cluster_url", "kvc.cluster_url")):
        if getattr(args, arg, None) is not None:
            over[key] = getattr(args, arg)
    return load_config(path, **over)


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on. SO_REUSEADDR, as uvicorn binds it: connections a
    previous run closed (TIME_WAIT, FIN_WAIT2) must not block a restart on the same port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); "
                              f"is another server running? choose another --port") from None


CLIENT_RETAIN_BYTES = 256 << 20  # freed heap a `kvc serve` with a cache URL keeps for its next loads


def build(config: Config, cache_token: str | None = None):
    """The registry, the cache backend (or None) and the engine for a config."""
    from engine import LLMEngine

    registry = CollectorRegistry()
    kvc_metrics = KvcMetrics(registry)
    cache = None
    if config.server.cache_url:
        from kvc.client import RemoteCache
        cache = RemoteCache(config.server.cache_url, token=cache_token, timeout=config.server.rpc_timeout_s,
                            shared_memory=config.server.shared_memory,
                            max_message_bytes=config.server.max_message_bytes, metrics=kvc_metrics,
                            refused_token="miss")  # later refusals are misses: requests go on
        try:
            reached = cache.probe()
        except PermissionError as e:
            cache.close()
            raise ConfigError(f"{e}; give `kvc serve` a token the cache-server's server.auth_tokens lists "
                              f"(--cache-token or KVC_CACHE_TOKEN)") from None
        if not reached:
            log.warning("cache service %s cannot be reached now; serving, with misses until it can",
                        config.server.cache_url)
    elif not config.kvc.gpu_only and (config.kvc.cpu_memory_size_GB > 0 or config.kvc.disk_path
                                      or config.kvc.cluster_url):
        from kvc.store import TieredStore
        cache = TieredStore(config.kvc, metrics=kvc_metrics)
    try:
        engine = LLMEngine(config, cache=cache, registry=registry, kvc_metrics=kvc_metrics)
    except Exception:
        if cache is not None:
            cache.close()
        raise
    return registry, cache, engine


def served_names(config: Config) -> list[str]:
    path = config.model.path
    short = path.removeprefix("builtin:") if path.startswith("builtin:") else Path(path).name
    return [short, path] if short != path else [path]


def cache_description(config: Config) -> str:
    """Where the host tiers are, with the sizes as configured (0.25 GB prints as 0.25, not 0.2)."""
    if config.server.cache_url:
        return "shared cache-server " + config.server.cache_url
    return (f"embedded cache: cpu {config.kvc.cpu_memory_size_GB:g} GB, disk {config.kvc.disk_path}"
            + (", cluster tier" if config.kvc.cluster_url else ""))


GRACEFUL_S = 10.0  # uvicorn's graceful shutdown: requests still running then have their connections cut
DRAIN_S = 8.0  # of it, how long requests may run on before the engine loop ends them
DEATH_EXIT_S = 1.0  # after the engine loop failed: time for the requests it failed to get their errors


def http_server(app, loop, host: str, port: int, died: threading.Event | None = None):
    """uvicorn's server for `app`. At shutdown (SIGTERM) it stops accepting and waits for running
    requests; those still running DRAIN_S later are ended by the engine loop (`loop`, an
    AsyncEngine): a stream gets an error event and [DONE], a plain request a 503, before uvicorn's
    graceful timeout would cut their connections mid-response. `died` set (the engine loop failed):
    the server shuts down DEATH_EXIT_S later, as at SIGTERM."""
    import asyncio
    import time

    import uvicorn

    class Server(uvicorn.Server):
        died_at: float | None = None

        async def on_tick(self, counter: int) -> bool:
            if died is not None and died.is_set():
                now = time.monotonic()
                self.died_at = self.died_at or now
                if now - self.died_at >= DEATH_EXIT_S:
                    return True
            return await super().on_tick(counter)

        async def shutdown(self, sockets=None):
            ending = asyncio.get_running_loop().call_later(DRAIN_S, loop.stop)
            try:
                await super().shutdown(sockets)
            finally:
                ending.cancel()

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                 timeout_graceful_shutdown=GRACEFUL_S))


def run_serve(config: Config, cache_token: str | None = None) -> int:
    from .api import create_app
    from .engine_loop import AsyncEngine

    host, port = config.server.host, config.server.http_port
    _check_port_free(host, port)
    if config.server.cache_url:
        # each received GetPages message is a fresh buffer: keep freed ones for the next load
        # instead of page-faulting them in again (benchmarks/probe_client_heap.py: a 256 MiB load
        # 0.24 -> 0.19 s on the 2-core VM). Not for the embedded cache: the same settings changed
        # nothing in its H200 runs (benchmarks/RESULTS.md, run DD).
        from .heap import retain_freed_memory
        retain_freed_memory(CLIENT_RETAIN_BYTES)
    registry, cache, engine = build(config, cache_token)
    died = threading.Event()

    def engine_died(error: BaseException) -> None:
        # nothing can be served until a restart: exit (status 1) so that systemd, compose's restart
        # policy or Kubernetes restarts kvc serve, as vLLM's server exits when its engine dies
        log.error("the engine loop failed (%s: %s): kvc serve exits with status 1 in %.0f s",
                  type(error).__name__, error, DEATH_EXIT_S)
        died.set()

    loop = AsyncEngine(engine, on_death=engine_died)
    names = served_names(config)
    app = create_app(loop, names, registry, config.server.max_request_bytes)
    print(f"kvc serve: model {names[0]!r} on {engine.device}, {cache_description(config)}", flush=True)
    print(f"kvc serve: OpenAI API at http://{host}:{port}/v1  (metrics: http://{host}:{port}/metrics)",
          flush=True)
    server = http_server(app, loop, host, port, died)
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers in place
    # that is a no-op, so the cleanup below runs and the cpu tier is written back to disk.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        loop.shutdown()
        engine.close()
        if cache is not None:
            cache.close()
    return 1 if died.is_set() else 0


def main_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    token = args.cache_token or os.environ.get("KVC_CACHE_TOKEN")
    return run_serve(config, token)
