"""Generated protobuf and gRPC code for proto/kvc/v1/kvcache.proto (scripts/gen_proto.sh).

Checked in; tests/server/test_proto_generated.py regenerates it and fails on any difference.
"""
from .kvc.v1 import kvcache_pb2 as pb, kvcache_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
