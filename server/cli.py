"""The `kvc` command: one argparse subcommand per process kind."""
from __future__ import annotations

import argparse
import logging
import sys

from kvc.config import ConfigError


def _cache_server(args: argparse.Namespace) -> int:
    from server import cache_server
    try:
        config = cache_server.config_from_args(args)
    except ConfigError as e:
        print(f"kvc cache-server: {e}", file=sys.stderr)
        return 2
    return cache_server.run_cache_server(config)


def build_parser() -> argparse.ArgumentParser:
    from server import cache_server
    parser = argparse.ArgumentParser(prog="kvc", description="kvc: tiered KV cache, engine and servers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cache-server", help="run the gRPC cache service (configs/cache.yaml)")
    cache_server.add_arguments(p)
    p.set_defaults(func=_cache_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
