"""The checked-in generated code is exactly what scripts/gen_proto.sh makes from proto/."""
import filecmp
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("kvcache_pb2.py", "kvcache_pb2.pyi", "kvcache_pb2_grpc.py")


def test_generated_code_matches_proto(tmp_path):
    subprocess.run(["bash", str(REPO / "scripts/gen_proto.sh"), str(tmp_path)], cwd=REPO, check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in GENERATED:
        fresh, checked_in = tmp_path / "kvc/v1" / name, REPO / "kvc/pb/kvc/v1" / name
        assert fresh.exists(), f"gen_proto.sh did not write {name}"
        assert filecmp.cmp(fresh, checked_in, shallow=False), (
            f"kvc/pb/kvc/v1/{name} differs from what proto/kvc/v1/kvcache.proto generates; "
            "run scripts/gen_proto.sh and commit the result")


def test_service_is_kvc_v1_kvcache():
    from kvc.pb import pb
    svc = pb.DESCRIPTOR.services_by_name["KVCache"]
    assert svc.full_name == "kvc.v1.KVCache"
    assert {m.name for m in svc.methods} == {"Lookup", "GetPages", "PutPages", "Pin", "Unpin", "Delete",
                                             "Stats", "WatchEvents"}
    assert svc.methods_by_name["GetPages"].server_streaming
    assert svc.methods_by_name["PutPages"].client_streaming
