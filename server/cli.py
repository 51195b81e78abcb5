"""The `kvc` command: one argparse subcommand per process kind."""
from __future__ import annotations

import argparse
import logging
import sys

from kvc.config import ConfigError


def _cache_server(args: argparse.Namespace) -> int:
    from server import cache_server
    config = cache_server.config_from_args(args)
    return cache_server.run_cache_server(config)


def _serve(args: argparse.Namespace) -> int:
    from server import serve
    return serve.main_serve(args)


def _make_tiny_model(args: argparse.Namespace) -> int:
    from engine.tiny import make_tiny_model
    make_tiny_model(args.dir, args.arch, seed=args.seed)
    print(f"wrote a random-weight {args.arch} checkpoint to {args.dir}")
    return 0


def _version() -> str:
    """The installed package's version (and, in a git checkout, its commit: what a bug report needs)."""
    from importlib import metadata
    try:
        v = metadata.version("kvc")
    except metadata.PackageNotFoundError:
        v = "unknown (not installed)"
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{v} ({commit})" if commit else v


def build_parser() -> argparse.ArgumentParser:
    from server import cache_server, serve
    parser = argparse.ArgumentParser(prog="kvc", description="kvc: tiered KV cache, engine and servers")
    parser.add_argument("--version", action="version", version=f"kvc {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the OpenAI-compatible server with the engine and its cache")
    serve.add_arguments(p)
    p.set_defaults(func=_serve)
    p = sub.add_parser("cache-server", help="run the gRPC cache service (configs/cache.yaml)")
    cache_server.add_arguments(p)
    p.set_defaults(func=_cache_server)
    p = sub.add_parser("make-tiny-model", help="write a small random-weight checkpoint in Hugging Face format")
    p.add_argument("dir")
    p.add_argument("--arch", default="qwen3_moe", choices=["qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:
        print(f"kvc {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
