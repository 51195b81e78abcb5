"""The library's CacheBackend suite, unchanged, against RemoteCache and a real cache-server."""
import pytest

from tests.kvc.backend_suite import BackendSuite


@pytest.fixture(scope="module")
def _server(tmp_path_factory):
    from .conftest import CacheServer
    s = CacheServer(tmp_path_factory.mktemp("suite")).start()
    yield s
    s.stop()


@pytest.fixture
def backend(_server, client_factory):
    """A fresh, empty cache: the suite's namespaces are cleared before each test."""
    from tests.kvc.conftest import NS
    from kvc.hashing import Namespace, PageSpec
    c = client_factory(_server.url, timeout=5.0)
    for ns in (NS, NS.with_salt("tenant-a"), NS.with_salt("tenant-b"), NS.with_salt("other"),
               Namespace("bf16-arch", PageSpec(2, 1, 8, 4, "bfloat16"))):
        c.delete(ns)
    return c


@pytest.fixture
def make_backend(_server, client_factory):
    return lambda: client_factory(_server.url, timeout=5.0)


class TestRemoteBackend(BackendSuite):
    pass


@pytest.fixture(scope="module")
def _shm_server(tmp_path_factory):
    from .conftest import CacheServer
    s = CacheServer(tmp_path_factory.mktemp("suite-shm"), shared_memory=True).start()
    yield s
    s.stop()


class TestRemoteBackendSharedMemory(BackendSuite):
    @pytest.fixture
    def backend(self, _shm_server, client_factory):
        from tests.kvc.conftest import NS
        from kvc.hashing import Namespace, PageSpec
        c = client_factory(_shm_server.url, timeout=5.0, shared_memory=True)
        for ns in (NS, NS.with_salt("tenant-a"), NS.with_salt("tenant-b"), NS.with_salt("other"),
                   Namespace("bf16-arch", PageSpec(2, 1, 8, 4, "bfloat16"))):
            c.delete(ns)
        return c

    def test_payloads_travel_through_shared_memory(self, backend):
        from tests.kvc.conftest import NS, make_pages
        hashes, pages = make_pages(NS, list(range(8)))
        backend.put_pages(NS, pages)
        assert backend._shm is not None and backend._shm_wanted
        before = backend._shm.array[:pages[0].payload().nbytes].copy()
        got = backend.get_pages(NS, hashes)
        assert (backend._shm.array[:pages[0].payload().nbytes] == pages[0].payload()).all()
        assert len(got) == 2 and (before == pages[0].payload()).all()


def test_shared_memory_refused_falls_back_to_the_stream(_server, client_factory):
    from tests.kvc.conftest import NS, make_pages
    c = client_factory(_server.url, shared_memory=True)  # this service has server.shared_memory off
    hashes, pages = make_pages(NS.with_salt("fallback"), list(range(8)))
    assert c.put_pages(NS.with_salt("fallback"), pages).stored == 2
    assert not c._shm_wanted
    assert len(c.get_pages(NS.with_salt("fallback"), hashes)) == 2
    c.delete(NS.with_salt("fallback"))
