#!/usr/bin/env bash
# Installs kvc and what it needs on a fresh machine. `--test` adds the test extras.
# A machine that already has torch (a GPU build, say) keeps it; otherwise the CPU build is taken.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
if [ "${1:-}" = "--test" ]; then
  "$PY" -m pip install -q -e ".[test]"
  # the cluster tier's tests need a local redis-server; best effort (they skip, saying why, without it)
  if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null; then
    bash scripts/install_redis.sh || echo "setup.sh: redis-server not installed; the cluster tier tests will skip" >&2
  fi
else
  "$PY" -m pip install -q -e .
fi
