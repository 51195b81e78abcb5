"""kvc.respread: GET replies read natively from a socket (a socketpair stands in for Redis here;
tests/kvc/test_cluster_tier.py runs the tier's gets against real Redis, standalone and cluster)."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from kvc import respread


@pytest.fixture(scope="module")
def lib():
    lib = respread.library()
    if lib is None:
        pytest.skip("no C compiler")
    return lib


def bulks(lib, data: bytes, n: int, cap: int, timeout_ms: int = 2000, chunk: int | None = None,
          close: bool = False) -> tuple[int, np.ndarray, np.ndarray]:
    """Send data into one end of a socketpair (all at once, or chunk bytes at a time with pauses),
    read n replies from the other (non-blocking, as a Python socket with a timeout is)."""
    a, b = socket.socketpair()
    b.settimeout(1.0)  # O_NONBLOCK underneath: the reader waits in poll()

    def feed():
        step = chunk or len(data) or 1
        for i in range(0, len(data), step):
            a.sendall(data[i:i + step])
            if chunk:
                time.sleep(0.001)
        if close:
            a.shutdown(socket.SHUT_WR)
    th = threading.Thread(target=feed)
    th.start()
    rows = np.full((n, cap), 0xEE, dtype=np.uint8)
    dsts = np.uint64(rows.ctypes.data) + np.arange(n, dtype=np.uint64) * np.uint64(cap)
    lens = np.zeros(n, dtype=np.int64)
    try:
        status = lib.bulks(b.fileno(), timeout_ms, dsts, np.full(n, cap, dtype=np.int64), lens)
    finally:
        th.join()
        a.close()
        b.close()
    return status, lens, rows


def bulk(payload: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(payload), payload)


def test_bulks_nil_errors_and_too_long(lib):
    big = bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8))  # past the 64 KiB buffer
    data = (bulk(b"abc") + b"$-1\r\n" + b"-MOVED 3999 127.0.0.1:7001\r\n" + bulk(big) + bulk(b"x" * 300_000)
            + b"_\r\n" + bulk(b""))
    status, lens, rows = bulks(lib, data, 7, 250_000)
    assert status == 0
    assert lens.tolist() == [3, respread.MISSING, respread.ERROR, 200_000, respread.TOO_LONG, respread.MISSING, 0]
    assert rows[0, :3].tobytes() == b"abc" and rows[0, 3] == 0xEE
    assert rows[3, :200_000].tobytes() == big


def test_bulks_in_small_pieces(lib):
    """Replies that arrive a few bytes at a time (lines and payloads split anywhere) read the same."""
    payloads = [bytes([i]) * (5000 + 37 * i) for i in range(6)]
    data = b"".join(bulk(p) for p in payloads)
    status, lens, rows = bulks(lib, data, 6, 6000, chunk=1777)
    assert status == 0 and lens.tolist() == [len(p) for p in payloads]
    for r, p in zip(rows, payloads):
        assert r[:len(p)].tobytes() == p


@pytest.mark.parametrize("data,n,want", [
    (bulk(b"abc"), 2, -2),                      # the second reply never comes: timeout
    (bulk(b"abc") + b"$5\r\nab", 2, -1),        # the peer closes mid-payload: EOF
    (b"+OK\r\n", 1, -4),                        # not a bulk string
    (b"$12x\r\nabc\r\n", 1, -4),                # malformed length
    (b"$3\r\nabcXY", 1, -4),                    # no CRLF after the payload
    (bulk(b"abc") + bulk(b"def"), 1, -5),       # bytes past the replies asked for
])
def test_bulks_broken_streams(lib, data, n, want):
    status, _, _ = bulks(lib, data, n, 16, timeout_ms=200, close=want == -1)
    assert status == want


def test_only_plain_idle_connections_are_read_directly():
    """A plain socket with redis-py's idle Python parser is read natively; a TLS socket (bytes only
    ssl can read) or hiredis' parser through the connection's parser; no socket, or bytes already
    received and unread (they would be read as the replies), not at all."""
    import ssl
    from types import SimpleNamespace

    from redis._parsers import _RESP2Parser
    plain = socket.socket()
    tls = ssl.create_default_context().wrap_socket(socket.socket(), server_hostname="x",
                                                  do_handshake_on_connect=False)
    try:
        assert respread._reader(SimpleNamespace(_parser=_RESP2Parser(1024), _sock=plain)) == "native"
        assert respread._reader(SimpleNamespace(_parser=_RESP2Parser(1024), _sock=tls)) == "parsed"
        assert respread._reader(SimpleNamespace(_parser=SimpleNamespace(_buffer=None), _sock=plain)) == "parsed"
        assert respread._reader(SimpleNamespace(_parser=_RESP2Parser(1024), _sock=None)) is None
        busy = _RESP2Parser(1024)
        busy._buffer = SimpleNamespace(unread_bytes=lambda: 5)
        assert respread._reader(SimpleNamespace(_parser=busy, _sock=plain)) is None
        assert respread._reader(SimpleNamespace(_parser=busy, _sock=tls)) is None
    finally:
        plain.close()
        tls.close()


def test_pack_is_redis_pys_request():
    from redis.connection import Connection
    big = bytes(range(256)) * 40  # past BIG_ARG: an item of its own, not copied
    cmds = [("GET", b"kvc:\x00\xffkey"), ("GETRANGE", b"k" * 300, 0, 171), ("SET", "s", b""), ("SET", b"b", big),
            ("SET", b"m", memoryview(big)[:7000]), ("GET", b"x")]
    want = b"".join(bytes(x) for x in Connection().pack_commands(cmds))
    got = respread.pack(cmds)
    assert b"".join(bytes(x) for x in got) == want
    assert any(x is big for x in got)
