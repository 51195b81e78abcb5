"""`kvc serve`'s start-up line says what was configured (issue 13)."""
import pytest

from kvc.config import load_config
from server.serve import cache_description


@pytest.mark.parametrize("gb,text", [(0.25, "cpu 0.25 GB"), (0.125, "cpu 0.125 GB"), (4, "cpu 4 GB"),
                                     (0.05, "cpu 0.05 GB")])
def test_start_up_line_prints_the_cpu_size_exactly(tmp_path, gb, text):
    config = load_config(None, cpu_memory_size_GB=gb, disk_path=str(tmp_path))
    assert text + "," in cache_description(config)
