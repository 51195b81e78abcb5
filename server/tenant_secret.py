"""The cache service's tenant secret: the key of every tenant's salt (see cache_service).

Kept so that a restarted service computes the same salts and serves its disk pages again:
`KVC_TENANT_SECRET` (hex or text) when set, else the file `server.tenant_secret_file` (default
`<kvc.disk_path>/tenant-secret`), created with 32 random bytes and mode 0600 at the first start.
Without either (no disk tier) the secret lives as long as the process, as do its pages.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat

from kvc.config import Config, ConfigError

log = logging.getLogger("kvc.cache_server")
ENV = "KVC_TENANT_SECRET"
FILE_NAME = "tenant-secret"
MIN_BYTES = 16


def secret_path(config: Config) -> str | None:
    if config.server.tenant_secret_file:
        return os.path.expanduser(config.server.tenant_secret_file)
    if config.kvc.disk_path:
        return os.path.join(os.path.expanduser(config.kvc.disk_path), FILE_NAME)
    return None


def load_tenant_secret(config: Config, environ=os.environ) -> bytes:
    value = environ.get(ENV)
    if value:
        if len(value.encode()) < MIN_BYTES:
            raise ConfigError(f"{ENV} must hold at least {MIN_BYTES} bytes of secret")
        return value.encode()
    path = secret_path(config)
    if path is None:
        return secrets.token_bytes(32)
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # a file where a folder should be, no permission
        raise _unusable(config, path, "read", e) from None
    try:
        return _create(path)
    except OSError as e:  # a read-only filesystem, a file where a folder should be, no permission
        raise _unusable(config, path, "create", e) from None


def _create(path: str) -> bytes:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another start won the race: use its secret
        return _read(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.info("created the tenant secret %s", path)
    return _read(path)


def _unusable(config: Config, path: str, verb: str, e: OSError) -> ConfigError:
    if config.server.tenant_secret_file:
        fix = "give server.tenant_secret_file a path the process may create and read"
    else:  # the default place, in the disk tier's folder
        fix = "fix kvc.disk_path, or give server.tenant_secret_file a path the process may create and read"
    where = f" ({e.filename})" if e.filename and e.filename != path else ""
    return ConfigError(f"cannot {verb} the tenant secret {path!r}: {e.strerror or e}{where}; {fix}")


def _read(path: str) -> bytes:
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the tenant secret {path!r} (server.tenant_secret_file) is readable by others "
                          f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    with open(path) as f:
        value = f.read().strip()
    if len(value) < MIN_BYTES:
        raise ConfigError(f"the tenant secret {path!r} (server.tenant_secret_file) is shorter than "
                          f"{MIN_BYTES} characters")
    return value.encode()
