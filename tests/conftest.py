"""Session-wide test settings."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def native_kernel_dir(tmp_path_factory):
    """The native CPU expert kernel builds into a temp dir, never ~/.cache (subprocesses inherit it)."""
    old = os.environ.get("KVC_NATIVE_DIR")
    os.environ["KVC_NATIVE_DIR"] = str(tmp_path_factory.mktemp("native"))
    yield os.environ["KVC_NATIVE_DIR"]
    if old is None:
        os.environ.pop("KVC_NATIVE_DIR", None)
    else:
        os.environ["KVC_NATIVE_DIR"] = old
