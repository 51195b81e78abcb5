"""Pins cannot switch caching off for everyone (issue 13): a TTL ceiling and a per-owner budget."""
import math
import time

import pytest

from kvc.backend import PinBudgetExceeded
from kvc.config import ConfigError, load_config
from kvc.store import TieredStore

from .conftest import NS, SPEC, kvc_config, make_pages


@pytest.mark.parametrize("ttl", [math.inf, 1e12])
def test_a_ttl_above_the_ceiling_is_cut_to_it(tmp_path, ttl):
    with TieredStore(kvc_config(tmp_path, disk_path=None, lease_ttl_s=0.1, max_lease_ttl_s=0.2)) as s:
        ha, pa = make_pages(NS, list(range(8)))
        s.put_pages(NS, pa)
        lease = s.pin(NS, ha, ttl_s=ttl)
        assert s.stats()["pinned_pages"] == 2
        time.sleep(0.3)
        assert s.stats()["pinned_pages"] == 0 and s.unpin(lease) is False


@pytest.mark.parametrize("ttl", [math.nan, -1.0, 0.0, -math.inf])
def test_a_nonsense_ttl_is_an_error(tmp_path, ttl):
    with TieredStore(kvc_config(tmp_path, disk_path=None)) as s:
        with pytest.raises(ValueError, match="ttl"):
            s.pin(NS, [], ttl_s=ttl)


def test_each_owner_pins_at_most_its_budget(tmp_path):
    page = SPEC.page_bytes
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=16 * page / (1 << 30), disk_path=None)  # budget: 8 pages
    with TieredStore(cfg) as s:
        ha, pa = make_pages(NS, list(range(64)))
        assert s.put_pages(NS, pa).stored == 16
        first = s.pin(NS, ha[:6], owner="alice")
        with pytest.raises(PinBudgetExceeded, match="pin_budget_fraction"):
            s.pin(NS, ha[6:9], owner="alice")
        assert s.pin(NS, ha[6:9], owner="bob")  # another owner has its own budget
        for _ in range(100):  # re-pinning the same pages still costs: no endless leases
            try:
                s.pin(NS, ha[:1], owner="alice")
            except PinBudgetExceeded:
                break
        else:
            pytest.fail("leases on the same page never hit the budget")
        assert s.unpin(first)
        assert s.pin(NS, ha[6:9], owner="alice")


def test_ttl_ceiling_config_is_checked():
    with pytest.raises(ConfigError, match="kvc.max_lease_ttl_s"):
        load_config(None, lease_ttl_s=120, max_lease_ttl_s=60)
    with pytest.raises(ConfigError, match="max_lease_ttl_s"):
        load_config(None, max_lease_ttl_s=math.inf)
    with pytest.raises(ConfigError, match="pin_budget_fraction"):
        load_config(None, pin_budget_fraction=0)
