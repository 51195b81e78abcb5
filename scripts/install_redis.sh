#!/usr/bin/env bash
# Installs redis-server and redis-cli from Debian's `redis-server` package when they are missing
# (the cluster tier's tests start a local Redis Cluster with them; benchmarks/bench_cluster.py too),
# and openssl (the TLS test makes a self-signed certificate with it; it skips without).
bash "$(dirname "$0")/apt_install.sh" openssl openssl || echo "install_redis.sh: openssl not installed; the cluster TLS test will skip" >&2
exec bash "$(dirname "$0")/apt_install.sh" redis-server redis-server redis-cli
