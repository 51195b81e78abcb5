"""kvc.disk_admission_hits: a page goes down to disk (and the cluster) only after N uses."""
import pytest

from kvc.admission import Admission
from kvc.config import ConfigError, load_config
from kvc.store import TieredStore

from .conftest import NS, SPEC, kvc_config, make_pages


def metric(store, name, **labels):
    v = store.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_counts():
    a = Admission(3)
    assert a.on_put(b"x") is False and a.uses == {b"x": 1}
    assert a.on_hit(b"x") is False and a.uses == {b"x": 2}
    assert a.on_hit(b"x") is True and a.admitted(b"x")  # third use admits
    assert a.on_hit(b"x") is False  # exactly once
    assert a.on_hit(b"unknown") is False and a.admitted(b"unknown")  # came up from a lower tier
    a.on_put(b"y")
    a.forget(b"y")
    assert a.uses == {}
    one = Admission(1)
    assert one.on_put(b"z") is True and one.uses == {}  # N = 1: nothing is counted


def _evict_all(s):
    """Push every page out of a 4-page cpu tier with 4 new pages."""
    _, pc = make_pages(NS, list(range(900, 916)), seed=9)
    s.put_pages(NS, pc)


@pytest.mark.parametrize("hits, on_disk", [(1, 4), (2, 2), (3, 1)])
def test_only_pages_used_n_times_reach_disk(tmp_path, hits, on_disk):
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=4 * SPEC.page_bytes / (1 << 30), high_watermark=0.99,
                     low_watermark=0.1, disk_admission_hits=hits)
    with TieredStore(cfg) as s:
        ha, pa = make_pages(NS, list(range(16)))
        s.put_pages(NS, pa)                 # use 1 of every page
        s.get_pages(NS, ha[:2])             # use 2 of pages 0, 1
        s.get_pages(NS, ha[:1])             # use 3 of page 0
        _evict_all(s)
        assert [s.disk.get(NS.root + h) is not None for h in ha] == [i < on_disk for i in range(4)]
        assert metric(s, "kvc_store_pages_total", tier="disk", result="not_admitted") == 4 - on_disk
        assert s.admission.uses.keys() <= set(s.cpu.entries)  # counts only for cpu pages
        assert s.lookup(NS, hashes=ha).num_pages == on_disk


def test_write_through_waits_for_admission(tmp_path):
    cfg = kvc_config(tmp_path, disk_write="through", disk_admission_hits=2)
    with TieredStore(cfg) as s:
        ha, pa = make_pages(NS, list(range(8)))
        s.put_pages(NS, pa)
        assert s.disk.pages == 0
        s.get_pages(NS, ha[:1])
        assert s.disk.get(NS.root + ha[0]) is not None and s.disk.get(NS.root + ha[1]) is None
        s.get_pages(NS, ha[:1])
        assert s.disk.pages == 1  # written once


def test_close_writes_back_only_admitted_pages(tmp_path):
    cfg = kvc_config(tmp_path, disk_admission_hits=2)
    ha, pa = make_pages(NS, list(range(8)))
    with TieredStore(cfg) as s:
        s.put_pages(NS, pa)
        s.get_pages(NS, ha[:1])
    with TieredStore(cfg) as s:
        assert s.lookup(NS, hashes=ha).num_pages == 1


def test_admission_hits_must_be_positive():
    with pytest.raises(ConfigError, match="kvc.disk_admission_hits"):
        load_config(None, disk_admission_hits=0)
