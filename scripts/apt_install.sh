#!/usr/bin/env bash
# apt_install.sh PACKAGE COMMAND... : installs Debian's PACKAGE when any COMMAND is missing from PATH.
# Exit 0: every COMMAND is on PATH; otherwise the reason on stderr.
set -euo pipefail
pkg=$1; shift
have() { for c in "$@"; do command -v "$c" >/dev/null || return 1; done; }
have "$@" && exit 0
if ! command -v apt-get >/dev/null; then
  echo "apt_install.sh: apt-get not found; install $pkg by hand" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "apt_install.sh: not root and no password-less sudo; cannot apt-get install $pkg" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends "$pkg" >/dev/null
}
have "$@"
