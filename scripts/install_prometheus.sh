#!/usr/bin/env bash
# Installs Prometheus and promtool from Debian's `prometheus` package when they are missing.
# Used by tests/deploy (the Prometheus round-trip test). Exit 0: both on PATH; else the reason on stderr.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_prometheus.sh: apt-get not found; install prometheus (with promtool) by hand" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_prometheus.sh: not root and no password-less sudo; cannot apt-get install prometheus" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# The package's post-install starts a service where an init system runs; policy-rc.d keeps it off.
$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null
}
command -v prometheus >/dev/null && command -v promtool >/dev/null
