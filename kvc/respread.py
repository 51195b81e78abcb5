"""The cluster tier's GET (and GETRANGE) replies read in one native call per node, without the GIL.

redis-py reads a pipeline's replies in Python: a receive, then its parser slices the bulk strings
out, per reply, and every receive hands the GIL over. Beside a thread that always wants it (an
engine's launch-bound thread) each hand-over costs up to the interpreter's switch interval (5 ms):
a 144 MB get of 96 pages took ~2.8x its time alone even with 4 MiB receives
(benchmarks/RESULTS.md, forty-first session). Here the commands are packed (`pack`) and sent on a
connection from redis-py's pool for the node, and each node's replies are read by respread.c's
kvc_resp_bulks straight into rows the caller gives (a payload goes from the socket into its row, no
Python bytes in between), one call per node, which releases the GIL once. A lookup's GETRANGEs of
the records' headers (2,048 for a 32K-token prompt) are read the same way, without redis-py's
parsing of each reply.

Where the native read cannot be used (a TLS connection, hiredis' parser, no compiler or a failed
build: one log line, `library()` is None), and for a put's SET replies, the commands are still sent
per node and `read_parsed` reads the replies through the connection's own parser: slower, but a
node that stops answering fails its own keys within its socket timeout, where redis-py's cluster
pipeline would send each unanswered command again on its own (~3 s for a get of 24 pages against a
paused master with a 0.2 s timeout). Replies that are errors (MOVED, ASK, ...: `ERROR`) are for the
caller to ask again through redis-py, which follows the redirections. A socket error, a timeout or
a malformed reply closes the connection and raises ConnectionError / TimeoutError.
"""
from __future__ import annotations

import ctypes
import logging
import ssl
from pathlib import Path
from typing import Sequence

import numpy as np
import redis

from . import native

log = logging.getLogger("kvc.respread")
SOURCE = Path(__file__).with_name("respread.c")
_libs: dict = {}

MISSING, TOO_LONG, ERROR = -1, -2, -3  # lens[i] other than a reply's length
_STATUS = {-1: "connection closed or failed", -2: "timed out", -4: "malformed reply", -5: "bytes past the replies"}


class NativeResp:
    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))  # CDLL: the GIL is released during the call
        fn = lib.kvc_resp_bulks
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        self._fn = fn

    def bulks(self, fd: int, timeout_ms: int, dsts: np.ndarray, caps: np.ndarray, lens: np.ndarray) -> int:
        """kvc_resp_bulks over len(dsts) replies (dsts uint64 addresses, caps int64, lens int64 out)."""
        n = len(dsts)
        assert dsts.dtype == np.uint64 and caps.dtype == np.int64 and lens.dtype == np.int64
        assert len(caps) == n and len(lens) == n and dsts.flags.c_contiguous and caps.flags.c_contiguous
        return self._fn(fd, timeout_ms, n, dsts.ctypes.data, caps.ctypes.data, lens.ctypes.data)


def library(cc: str | None = None) -> NativeResp | None:
    cc = native.compiler(cc)
    return native.once(_libs, (cc, str(native.cache_dir())),
                       lambda: NativeResp(native.build(SOURCE, "kvc_respread", cc)),
                       log, "respread: native reply reader unavailable", "cluster gets read replies through redis-py")


def _reader(conn) -> str | None:
    """How conn's replies can be read: "native" (a plain socket, redis-py's Python parser with
    nothing received and unread: `read`), "parsed" (TLS, whose bytes only ssl can read, or hiredis:
    `read_parsed` through the connection's parser), or None (no socket, or a Python parser holding
    unread bytes, which would be read as the replies: not used)."""
    parser = getattr(conn, "_parser", None)
    sock = getattr(conn, "_sock", None)
    if sock is None or parser is None:
        return None
    if type(parser).__name__ not in ("_RESP2Parser", "_RESP3Parser"):
        return "parsed"
    buf = getattr(parser, "_buffer", None)
    if buf is not None and buf.unread_bytes():
        return None
    return "parsed" if isinstance(sock, ssl.SSLSocket) else "native"


BIG_ARG = 6000  # an argument longer than this is sent as it is, not copied into the request (redis-py's cutoff)


def pack(commands: Sequence[tuple]) -> list:
    """Commands (tuples of bytes, memoryview, str or int arguments) as a RESP request: a list of
    buffers whose bytes are what redis-py's pack_commands would send, with less work a command (a
    lookup sends 2,048 GETRANGEs); arguments past BIG_ARG bytes (a put's records) are items of
    their own, not copied."""
    out: list = []
    parts: list = []
    add = parts.append
    for cmd in commands:
        add(b"*%d\r\n" % len(cmd))
        for a in cmd:
            if isinstance(a, str):
                a = a.encode()
            elif isinstance(a, int):
                a = b"%d" % a
            if len(a) > BIG_ARG:
                add(b"$%d\r\n" % len(a))
                out.append(b"".join(parts))
                out.append(a)
                parts.clear()
                add(b"\r\n")
            else:
                add(b"$%d\r\n%s\r\n" % (len(a), a))
    out.append(b"".join(parts))
    return out


def send(pool, commands: Sequence[tuple]) -> tuple:
    """Send commands (each a tuple of a command's arguments, e.g. ("GET", key), whose reply is a bulk
    string for `read`; any reply for `read_parsed`) on one connection of `pool` (a node's). Returns
    the connection and whether `read` may read its replies from the socket (else `read_parsed` reads
    them), or (None, False) where neither can (`_reader`: nothing sent, the connection back in the
    pool). Raises what redis-py's send raises (the connection closed and released)."""
    try:
        conn = pool.get_connection()
    except TypeError:  # redis-py before 6 names the command
        conn = pool.get_connection("GET")
    try:
        how = _reader(conn)
        if how is None:
            pool.release(conn)
            return None, False
        conn.send_packed_command(pack(commands), check_health=False)  # a list of buffers
    except BaseException:
        conn.disconnect()
        pool.release(conn)
        raise
    return conn, how == "native"


def read_parsed(pool, conn, n: int, cap: int) -> list:
    """The replies of `send`'s n commands on conn read through conn's own parser (TLS, hiredis, no
    native reader, a put's replies); conn goes back to pool. Each is bytes (a bulk or simple
    string), or MISSING, TOO_LONG (longer than cap) or ERROR (an error reply: MOVED, ASK, OOM, ...),
    as `read`'s lens. Raises redis-py's ConnectionError or TimeoutError (the connection closed) when
    the stream breaks off: every reply of this node's read is lost."""
    try:
        out: list = []
        for _ in range(n):
            try:
                v = conn.read_response(disable_decoding=True)
            except redis.exceptions.ResponseError:  # MOVED, ASK, ...: the reply is read, the stream intact
                out.append(ERROR)
                continue
            out.append(MISSING if v is None else TOO_LONG if len(v) > cap else bytes(v))
        return out
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def read(lib: NativeResp, pool, conn, rows: np.ndarray, timeout_s: float) -> np.ndarray:
    """The replies of `send`'s n commands on conn, reply i into rows[i] (rows [n, cap] uint8,
    C-contiguous); conn goes back to pool. Returns lens [n]: a reply's length, or MISSING, TOO_LONG
    (longer than cap, dropped) or ERROR (an error reply: ask again). Raises redis-py's
    ConnectionError or TimeoutError (the connection closed) when the stream breaks off."""
    try:
        n, cap = rows.shape
        assert rows.dtype == np.uint8 and rows.flags.c_contiguous
        dsts = np.uint64(rows.ctypes.data) + np.arange(n, dtype=np.uint64) * np.uint64(cap)
        lens = np.zeros(n, dtype=np.int64)
        status = lib.bulks(conn._sock.fileno(), max(1, int(timeout_s * 1000)), dsts,
                           np.full(n, cap, dtype=np.int64), lens)
        if status:
            err = redis.exceptions.TimeoutError if status == -2 else redis.exceptions.ConnectionError
            raise err(f"reading {n} replies from {conn.host}:{conn.port}: {_STATUS.get(status, status)}")
        return lens
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
