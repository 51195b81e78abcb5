"""The cluster tier over TLS (rediss://) against a real redis-server with a TLS port: puts, a
lookup and a get whole, each node's replies read through redis-py's parser (respread reads only
plain sockets), and a server that stops answering mid-get is a miss within the socket timeout."""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import torch

from kvc import respread
from kvc.store import TieredStore
from tests.redis_cluster import _free_ports, redis_missing

from .conftest import NS, SPEC, make_pages
from .test_cluster_tier import cluster_only, paused_get_is_a_timed_out_miss


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    if redis_missing() or not shutil.which("openssl"):
        pytest.skip(redis_missing() or "openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True)
    port = _free_ports(1)[0]
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                             "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(d)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if subprocess.run(["redis-cli", "--tls", "--insecure", "-p", str(port), "ping"],
                              capture_output=True, text=True).stdout.strip() == "PONG":
                break
            time.sleep(0.1)
        else:
            out = proc.stdout.read().decode() if proc.poll() is not None else ""
            pytest.skip(f"redis-server did not serve TLS here: {out[-300:]}")
        yield proc, f"rediss://127.0.0.1:{port}?ssl_cert_reqs=none"
    finally:
        proc.kill()
        proc.wait()


def test_tls_pages_round_trip_through_the_parser(tls_redis, monkeypatch):
    _, url = tls_redis
    calls = []
    real = respread.read_parsed
    monkeypatch.setattr(respread, "read_parsed", lambda pool, conn, n, cap: calls.append(n) or real(pool, conn, n, cap))
    toks = list(range(100, 100 + 8 * SPEC.page_size))
    hashes, pages = make_pages(NS, toks)
    with TieredStore(cluster_only(url)) as s:
        assert s.put_pages(NS, pages).stored == 8
        s.flush()
    assert calls == [8]  # the SETs' replies
    calls.clear()
    with TieredStore(cluster_only(url)) as s:
        assert s.lookup(NS, tokens=toks).located == ["cluster"] * 8
        got = s.get_pages(NS, hashes)
        assert s.cluster.mode == "standalone"
        assert len(got) == 8 and all(torch.equal(x.data, p.data) for x, p in zip(got, pages))
    assert calls == [8, 8]  # the lookup's GETRANGEs, then the GETs: one parsed read each


def test_tls_server_that_stops_answering_is_a_timed_out_miss(tls_redis):
    proc, url = tls_redis
    toks = list(range(900, 900 + 8 * SPEC.page_size))
    hashes, pages = make_pages(NS, toks)
    with TieredStore(cluster_only(url)) as s:
        assert s.put_pages(NS, pages).stored == 8
        s.flush()
        s.cluster._conn()
        paused_get_is_a_timed_out_miss(s, proc, hashes, pages)
