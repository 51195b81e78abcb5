#!/usr/bin/env bash
# Installs Prometheus and promtool from Debian's `prometheus` package when they are missing
# (used by tests/deploy, the Prometheus round-trip test).
exec bash "$(dirname "$0")/apt_install.sh" prometheus prometheus promtool
