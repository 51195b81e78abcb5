"""--cluster-url on `kvc serve` and `kvc cache-server` sets kvc.cluster_url; a bad URL names the key."""
import argparse

import pytest

from kvc.config import ConfigError
from server import cache_server, serve


def parse(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return module.config_from_args(p.parse_args(argv))


@pytest.mark.parametrize("module", [serve, cache_server])
def test_cluster_url_flag(module):
    assert parse(module, []).kvc.cluster_url is None
    cfg = parse(module, ["--cluster-url", "rediss://:pw@10.0.0.5:7000"])
    assert cfg.kvc.cluster_url == "rediss://:pw@10.0.0.5:7000"
    with pytest.raises(ConfigError, match="kvc.cluster_url"):
        parse(module, ["--cluster-url", "10.0.0.5:7000"])
