#!/usr/bin/env bash
# Installs Debian's `docker-compose` (v1, Python) when it is missing; tests/deploy uses it only
# for `docker-compose config` (validation; no Docker engine is needed). Exit 0: on PATH.
set -euo pipefail
if command -v docker-compose >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_docker_compose.sh: apt-get not found; install docker-compose by hand" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_docker_compose.sh: not root and no password-less sudo; cannot apt-get install docker-compose" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends docker-compose >/dev/null
}
command -v docker-compose >/dev/null
