#!/usr/bin/env bash
# Regenerates the checked-in protobuf and gRPC code from proto/ into kvc/pb (or into $1).
# tests/server/test_proto_generated.py runs this into a temp dir and fails on any difference.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-kvc/pb}
mkdir -p "$OUT"
${PYTHON:-python3} -m grpc_tools.protoc -I proto \
  --python_out="$OUT" --grpc_python_out="$OUT" --pyi_out="$OUT" \
  proto/kvc/v1/kvcache.proto
# protoc writes `from kvc.v1 import ...`; the modules live in the package kvc.pb.kvc.v1.
sed -i 's/^from kvc\.v1 import /from kvc.pb.kvc.v1 import /' "$OUT/kvc/v1/kvcache_pb2_grpc.py"
