"""Small C sources compiled at first use with the system compiler, cached on disk, loaded with ctypes.

`build` compiles one source (`cc -O3 -march=native`: the compiler enables exactly the extensions
the CPU has) into a cache dir, `$KVC_NATIVE_DIR` or `~/.cache/kvc/native/`, under a name keyed by
the source and its headers, the compiler's version, the CPU's flags and the extra flags; it writes
a temp file and renames it, so concurrent builders (processes, threads) are safe and a reader sees
a whole file or none. `$KVC_NATIVE_CC` picks the compiler (default `cc`).

`once` makes a library once per process and key; any failure (no compiler, a failed build, a
missing symbol) logs one line and is remembered as None, and the caller runs its Python or torch
path instead. A library loaded with ctypes.CDLL releases the GIL for the length of each call.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
log = logging.getLogger("kvc.native")
_lock = threading.Lock()


def compiler(cc: str | None = None) -> str:
    return cc or os.environ.get("KVC_NATIVE_CC") or "cc"


_dirs: dict[tuple, Path] = {}


def cache_dir() -> Path:
    """Where built libraries are kept: KVC_NATIVE_DIR, else $XDG_CACHE_HOME/kvc/native, else
    ~/.cache/kvc/native. Kept per value of those variables: the libraries' callers look it up on
    every call (hashing a request's pages, a put's batch), and building the path with pathlib
    each time cost more than the native call itself (~13 us on the 2-core VM)."""
    env = os.environ
    key = (env.get("KVC_NATIVE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"))
    d = _dirs.get(key)
    if d is None:
        if key[0]:
            d = Path(key[0]).expanduser()
        else:
            d = Path(key[1] or Path.home() / ".cache") / "kvc" / "native"
        _dirs[key] = d
    return d


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build(source: Path, stem: str, cc: str, directory: Path | None = None, flags: Sequence[str] = (),
          headers: Sequence[Path] = (), libs: Sequence[str] = ()) -> Path:
    """The shared library of `source` (with `headers` in its key) for this CPU; built if not cached."""
    directory = Path(directory) if directory is not None else cache_dir()
    src = b"".join(Path(f).read_bytes() for f in [source, *sorted(headers)])
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    h = hashlib.sha256(src + version.encode() + cpu_flags().encode() + " ".join(flags).encode()).hexdigest()[:20]
    path = directory / f"{stem}_{h}.so"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=directory)
    os.close(fd)
    try:
        cmd = [cc, "-O3", "-march=native", *flags, "-shared", "-fPIC", str(source), "-o", tmp, *libs]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
        os.replace(tmp, path)  # atomic: a concurrent loader sees the whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built %s", path)
    return path


def once(memo: dict, key, make: Callable[[], T], log: logging.Logger, unavailable: str, instead: str) -> T | None:
    """make() once per process and key (memo is the caller's dict); on failure one warning line,
    `<unavailable> (<error>); <instead>`, and None from then on."""
    with _lock:
        if key not in memo:
            try:
                memo[key] = make()
            except Exception as e:  # noqa: BLE001 - any failure means: use the fallback path
                msg = str(e).strip()
                log.warning("%s (%s: %s); %s", unavailable, type(e).__name__,
                            msg.splitlines()[-1][:300] if msg else "", instead)
                memo[key] = None
        return memo[key]
