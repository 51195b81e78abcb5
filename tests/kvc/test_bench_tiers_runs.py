"""benchmarks/bench_tiers.py --quick runs to its summary line: the script's own lookups of pages in
the tiers follow the tiers' keys (it stopped with a KeyError before its first table once the tiers
keyed a page by namespace root and hash, and no test noticed)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_tiers_quick_runs_to_its_summary(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tiers.py"), "--quick"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    for row in ("targets met", "cpu get: CpuTier.read_into", "disk get: DiskTier.read_run", "lookup(hashes="):
        assert row in r.stdout, row
