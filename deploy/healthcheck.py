"""Container health check for the kvc image: exit 0 when the server answers healthy, 1 otherwise.

    python3 deploy/healthcheck.py grpc 127.0.0.1:50051   # grpc.health.v1 Check, service kvc.v1.KVCache
    python3 deploy/healthcheck.py http http://127.0.0.1:30000/health
"""
from __future__ import annotations

import sys
import urllib.request

TIMEOUT_S = 3.0


def grpc_ok(target: str, service: str = "kvc.v1.KVCache") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        except grpc.RpcError as e:
            print(f"{target}: {e.code().name}", file=sys.stderr)
            return False
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
        return False
    return True


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            return r.status == 200
    except OSError as e:
        print(f"{url}: {e}", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("grpc", "http"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, target = argv
    return 0 if (grpc_ok(target) if kind == "grpc" else http_ok(target)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
