"""Pages belong to their namespace in every tier (issue 13): a page put in namespace B under the
last page of A's prefix has the hash A's next page would have, and must not extend A's chain."""
import pytest
import torch

from kvc.store import TieredStore

from .conftest import NS, kvc_config, make_pages

B = NS.with_salt("tenant-b")
TIERS = {"cpu": dict(disk_path=None), "disk": dict(cpu_memory_size_GB=0),
         "cpu+disk": dict(disk_write="through")}


@pytest.mark.parametrize("tiers", TIERS)
def test_a_graft_from_another_namespace_never_extends_the_chain(tmp_path, tiers):
    toks = list(range(16))
    ha, pa = make_pages(NS, toks)
    _, forged = make_pages(NS, toks, seed=7)  # the same hashes, parents and tokens, other KV
    with TieredStore(kvc_config(tmp_path, **TIERS[tiers])) as s:
        assert s.put_pages(NS, pa[:3]).stored == 3
        r = s.put_pages(B, [forged[3]])  # B knows A's hashes and hangs a page from A's prefix
        assert (r.stored, r.rejected) == (0, 1) and "not a page of this namespace" in r.reasons[0]
        assert s.lookup(NS, tokens=toks).num_pages == 3  # A counts only what A stored
        assert s.lookup(B, hashes=ha).num_pages == 0
        assert len(s.get_pages(NS, ha)) == 3
        r = s.put_pages(NS, pa[3:])  # A's own page is stored, not a collision
        assert (r.stored, r.rejected) == (1, 0)
        got = s.get_pages(NS, ha)
        assert len(got) == 4 and torch.equal(got[3].data, pa[3].data)
        s.flush()


def test_the_same_page_in_two_namespaces_is_two_pages(tmp_path):
    toks = list(range(8))
    ha, pa = make_pages(NS, toks)
    hb, pb = make_pages(B, toks, seed=1)
    with TieredStore(kvc_config(tmp_path, disk_write="through")) as s:
        assert s.put_pages(NS, pa).stored == 2 and s.put_pages(B, pb).stored == 2
        assert s.delete(B) == 2
        assert s.lookup(NS, tokens=toks).num_pages == 2 and s.lookup(B, tokens=toks).num_pages == 0
        assert s.pin(B, ha) and s.stats()["pinned_pages"] == 0  # B pins nothing of A's


def test_a_page_whose_parent_is_unknown_is_refused(tmp_path):
    ha, pa = make_pages(NS, list(range(12)))
    with TieredStore(kvc_config(tmp_path, disk_path=None)) as s:
        r = s.put_pages(NS, [pa[0], pa[2]])  # pa[2] hangs from pa[1], which this store does not hold
        assert (r.stored, r.rejected) == (1, 1)
        assert s.put_pages(NS, pa).stored == 2
