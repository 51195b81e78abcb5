"""bench_gpu_reuse.py's smoke run on the CPU (--device cpu --quick) prints its hit rows, and lets
go of its first LLM before the sections after it: the hit section's variant lambdas and closures
held that LLM's engine, so on the device the disk and throughput LLMs ran beside it and the
paired rows ran out of memory (121 GB held on an H200, run GO)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_gpu_reuse_releases_its_first_llm(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu_reuse.py"), "--device", "cpu",
                        "--quick", "--skip", "transformers,cpu-experts,tput-variants,throughput,disk",
                        "--model-dir", str(tmp_path / "model"), "--work-dir", str(tmp_path / "work")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "# first LLM done at" in r.stdout
    assert "TTFT cpu hit |" in r.stdout and "TTFT device hit |" in r.stdout
    assert "still referenced after close" not in r.stdout, r.stdout[-3000:]
