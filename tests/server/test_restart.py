"""`kvc cache-server` restarts at once on its port after traffic; new clients see it up (issue 13)."""
import signal

from tests.kvc.conftest import NS, make_pages

from .conftest import CacheServer


def test_cache_server_restarts_on_its_port_and_new_clients_reach_it(tmp_path, client_factory):
    s = CacheServer(tmp_path)
    toks = list(range(32))
    try:
        s.start()
        a = client_factory(s.url, timeout=1.0)
        assert a.put_pages(NS, make_pages(NS, toks)[1]).stored == 8
        assert s.stop() == 0
        assert a.lookup(NS, tokens=toks).num_pages == 0  # A sees it down and backs off
        s.start()  # the same port, at once
        for _ in range(3):  # a new client's first calls reach the restarted service
            b = client_factory(s.url, timeout=1.0)
            assert b.lookup(NS, tokens=toks).num_pages == 8
            b.close()
    finally:
        s.stop(signal.SIGKILL)
