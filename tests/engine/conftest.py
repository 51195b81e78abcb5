from __future__ import annotations

import pytest

from kvc.config import load_config
from kvc.store import TieredStore

from engine.tiny import make_tiny_model


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen"), "qwen3_moe", seed=0)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("mixtral"), "mixtral", seed=0)


@pytest.fixture(params=["qwen3_moe", "mixtral"])
def model_dir(request, qwen_dir, mixtral_dir):
    return qwen_dir if request.param == "qwen3_moe" else mixtral_dir


@pytest.fixture
def store(tmp_path):
    s = TieredStore(load_config().replace(cpu_memory_size_GB=0.01, disk_path=str(tmp_path / "pages"),
                                          disk_size_GB=0.05).kvc)
    yield s
    s.close()
