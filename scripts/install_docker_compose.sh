#!/usr/bin/env bash
# Installs Debian's `docker-compose` (v1, Python) when it is missing; tests/deploy uses it only for
# `docker-compose config` (validation; no Docker engine is needed).
exec bash "$(dirname "$0")/apt_install.sh" docker-compose docker-compose
