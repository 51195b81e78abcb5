#!/usr/bin/env bash
# Installs redis-server and redis-cli from Debian's `redis-server` package when they are missing
# (the cluster tier's tests start a local Redis Cluster with them; benchmarks/bench_cluster.py too).
exec bash "$(dirname "$0")/apt_install.sh" redis-server redis-server redis-cli
