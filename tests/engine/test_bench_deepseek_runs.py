"""bench_deepseek.py's TTFT table, probe_deepseek_step.py and bench_mla_pieces.py's tile sweeps run on
the CPU (--quick, or the kernels under triton's interpreter) to their last rows: device time is
spent on them, and a script that stops on the device wastes a run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str, tmp_path: Path, env: dict | None = None) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_bench_deepseek_ttft_table_runs(tmp_path):
    out = run("bench_deepseek.py", "--quick", "--sections", "ttft", "--repeat", "1", tmp_path=tmp_path)
    for tier in ("cold", "device", "device, writers idle", "delta alone", "cpu", "disk"):
        assert f"| 512 + 16 | {tier} |" in out, tier
    assert "first step host ms" in out


def test_probe_deepseek_step_runs(tmp_path):
    out = run("probe_deepseek_step.py", "--quick", "--n", "2", "--top", "3", "--compare-eager", tmp_path=tmp_path)
    assert "| TTFT ms | add_request ms |" in out and "cProfile, 2 requests, by tottime" in out
    assert "ops by host time (self)" in out and "prefill steps eager (model.prefill_graph_tokens 0)" in out


def test_probe_deepseek_step_after_a_cached_prefix_runs(tmp_path):
    """--cached: each timed step a device hit of the shared prefix (the probe asserts the hit)."""
    out = run("probe_deepseek_step.py", "--quick", "--n", "2", "--top", "3", "--cached", "2048", tmp_path=tmp_path)
    assert "after 2048 cached tokens (device hits)" in out and "| TTFT ms | add_request ms |" in out


def test_bench_mla_pieces_tile_sweeps_run(tmp_path):
    """--tiles and --decode-tiles under the interpreter at V2-Lite's sizes (tiny lengths): each tile's
    output equals the first's."""
    pytest.importorskip("triton")
    out = run("bench_mla_pieces.py", "--device", "cpu", "--shapes", "--decode", "--iters", "1",
              "--tiles", "64x32x8x2", "64x64x8x3", "--tile-shapes", "4x300",
              "--decode-tiles", "16x32x4x2", "16x64x4x3@64", "--decode-tile-shapes", "2x300", "--decode-tile-bound",
              "2000", tmp_path=tmp_path,
              env=dict(os.environ, TRITON_INTERPRET="1"))
    piece = next(line for line in out.splitlines() if line.startswith("| 4 x 300 |"))
    decode = next(line for line in out.splitlines() if line.startswith("| 2 x 300 |"))
    for row in (piece, decode):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 3 and cells[2].endswith("(0.0000)"), row
    assert "quickest decode tile: 16x" in out


def test_bench_deepseek_decode_tile_variant_runs(tmp_path):
    """--mla-backends auto,auto@MxNxWxS: an engine with decode's MLA launch set, a column each; a
    tile that is not decode's shape is a clear error."""
    out = run("bench_deepseek.py", "--quick", "--sections", "throughput", "--repeat", "1", "--no-hf",
              "--mla-backends", "auto,auto@16x64x4x3@64", tmp_path=tmp_path)
    assert "| kvc, MLA auto, tok/s | kvc, MLA auto@16x64x4x3@64, tok/s |" in out
    assert "| decode | 4 requests x 8 tokens |" in out
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_deepseek.py"), "--quick", "--sections",
                        "throughput", "--no-hf", "--mla-backends", "auto@32x64"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "decode tile '32x64' is not MxNxWxS[@T]" in r.stderr
