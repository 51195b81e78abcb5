"""The checked-in generated code is exactly what scripts/gen_proto.sh makes from proto/."""
import filecmp
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("kvcache_pb2.py", "kvcache_pb2.pyi", "kvcache_pb2_grpc.py")


# the gRPC module names the grpcio-tools that wrote it, and refuses to import under an older grpcio:
# the checked-in one names the floor pyproject.toml asks for, whatever grpcio-tools this machine has
GRPC_VERSION = re.compile(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", re.M)


def _without_grpc_version(path: Path) -> str:
    return GRPC_VERSION.sub("GRPC_GENERATED_VERSION = ...", path.read_text())


def test_generated_code_matches_proto(tmp_path):
    subprocess.run(["bash", str(REPO / "scripts/gen_proto.sh"), str(tmp_path)], cwd=REPO, check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in GENERATED:
        fresh, checked_in = tmp_path / "kvc/v1" / name, REPO / "kvc/pb/kvc/v1" / name
        assert fresh.exists(), f"gen_proto.sh did not write {name}"
        same = (filecmp.cmp(fresh, checked_in, shallow=False) if not name.endswith("_grpc.py")
                else _without_grpc_version(fresh) == _without_grpc_version(checked_in))
        assert same, (f"kvc/pb/kvc/v1/{name} differs from what proto/kvc/v1/kvcache.proto generates; "
                      "run scripts/gen_proto.sh and commit the result")


def test_generated_grpc_code_asks_for_the_grpcio_floor():
    """The checked-in gRPC module's GRPC_GENERATED_VERSION is the grpcio floor in pyproject.toml
    (a newer one would refuse to import under a grpcio the project says is enough)."""
    floor = re.search(r'"grpcio>=([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    named = GRPC_VERSION.search((REPO / "kvc/pb/kvc/v1/kvcache_pb2_grpc.py").read_text()).group(1)
    assert named == floor, f"kvcache_pb2_grpc.py names grpcio {named}, pyproject.toml asks for >= {floor}"


def test_service_is_kvc_v1_kvcache():
    from kvc.pb import pb
    svc = pb.DESCRIPTOR.services_by_name["KVCache"]
    assert svc.full_name == "kvc.v1.KVCache"
    assert {m.name for m in svc.methods} == {"Lookup", "GetPages", "PutPages", "Pin", "Unpin", "Delete",
                                             "Stats", "WatchEvents"}
    assert svc.methods_by_name["GetPages"].server_streaming
    assert svc.methods_by_name["PutPages"].client_streaming
