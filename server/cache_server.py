"""`kvc cache-server`: the stand-alone cache service process.

Order of life: bind the gRPC port (SO_REUSEPORT off, so a port in use is an error) with health
NOT_SERVING and every KVCache call UNAVAILABLE; start Prometheus /metrics on server.metrics_port;
open the TieredStore (disk lock, integrity check); then SERVING. On SIGTERM or SIGINT: health
NOT_SERVING, new calls UNAVAILABLE, in-flight calls finish within the grace period, then the
store is flushed and closed.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from kvc.config import Config, ConfigError, load_config
from kvc.metrics import KvcMetrics
from kvc.pb import pb
from server.cache_service import CacheService, add_to_server
from server.heap import retain_freed_memory
from server.tenant_secret import load_tenant_secret

log = logging.getLogger("kvc.cache_server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVCache"].full_name  # "kvc.v1.KVCache"
SHUTDOWN_GRACE_S = 10.0
MAX_CONCURRENT_RPCS = 512


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.so_reuseport", 0),  # a second server on this port must fail, not share it
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_concurrent_streams", 256),
        ("grpc.max_metadata_size", 16 << 10),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def _bind(server: grpc.aio.Server, config: Config) -> int:
    s = config.server
    addr = f"{s.host}:{s.grpc_port}"
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("set both server.tls_cert and server.tls_key, or neither")
    try:
        if s.tls_cert:
            with open(s.tls_key, "rb") as k, open(s.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            port = server.add_secure_port(addr, creds)
        else:
            port = server.add_insecure_port(addr)
    except OSError as e:
        raise ConfigError(f"cannot read server.tls_cert / server.tls_key: {e}") from None
    except RuntimeError as e:
        raise ConfigError(f"cannot listen on {addr} (server.grpc_port): {e}; is another server "
                          "using the port?") from None
    if not port:
        raise ConfigError(f"cannot listen on {addr} (server.grpc_port); is another server using the port?")
    return port


async def serve(config: Config, stop: asyncio.Event | None = None) -> int:
    """Run the service until `stop` is set (or SIGTERM / SIGINT); returns the exit status. A tenant
    secret that cannot be read or created raises ConfigError before anything starts."""
    from kvc.store import TieredStore  # the store pulls in torch; keep `--help` fast

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    s = config.server
    metrics = KvcMetrics()
    # before anything starts: a ConfigError here is the CLI's one-line error (exit 2), as a bad
    # config file's is
    secret = load_tenant_secret(config) if s.auth_tokens else None
    # every call's buffers are fresh allocations: keep what calls free (up to the bytes calls in
    # progress may hold) for the next call, not page-faulted in again (server/heap.py)
    retain_freed_memory(s.max_inflight_bytes)
    service = CacheService(s, metrics, tenant_secret=secret)
    health_servicer = health.aio.HealthServicer()
    server = grpc.aio.server(options=_options(s.max_message_bytes),
                             maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    add_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        port = _bind(server, config)
    except ConfigError as e:
        log.error("%s", e)
        return 1
    await server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    httpd = store = None
    try:
        try:
            httpd, _ = start_http_server(s.metrics_port, addr=s.host, registry=metrics.registry)
        except OSError as e:
            log.error("cannot serve metrics on %s:%s (server.metrics_port): %s", s.host, s.metrics_port, e)
            return 1
        try:
            store = await loop.run_in_executor(None, TieredStore, config.kvc, metrics)
        except (OSError, RuntimeError, ValueError) as e:
            log.error("cannot open the cache store: %s", e)
            return 1
        service.serve(store)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        print(f"kvc cache-server serving grpc={s.host}:{port} metrics={s.host}:{httpd.server_port} "
              f"disk_path={config.kvc.disk_path}", flush=True)
        await stop.wait()
        log.info("shutting down: finishing in-flight calls (grace %.0f s)", SHUTDOWN_GRACE_S)
        await health_servicer.enter_graceful_shutdown()
        service.begin_shutdown()
        await server.stop(SHUTDOWN_GRACE_S)
        return 0
    finally:
        await server.stop(0)
        service.close()
        if store is not None:
            await loop.run_in_executor(None, _close_store, store)
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _close_store(store) -> None:
    store.flush()
    store.close()


def run_cache_server(config: Config) -> int:
    """The CLI's entry: serve until SIGTERM / SIGINT, then return the exit status."""
    return asyncio.run(serve(config))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/cache.yaml)")
    parser.add_argument("--port", type=int, default=None, help="override server.grpc_port")
    parser.add_argument("--metrics-port", type=int, default=None, help="override server.metrics_port")
    parser.add_argument("--disk-path", default=None, help="override kvc.disk_path")
    parser.add_argument("--cluster-url", default=None, help="override kvc.cluster_url (redis://host:port)")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {k: v for k, v in (("grpc_port", args.port), ("metrics_port", args.metrics_port),
                                   ("disk_path", args.disk_path), ("cluster_url", args.cluster_url))
                 if v is not None}
    return load_config(args.config, **overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvc cache-server", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_cache_server(config_from_args(args))
    except ConfigError as e:
        print(f"kvc cache-server: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
