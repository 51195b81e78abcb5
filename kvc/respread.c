/* Reading a pipeline's GET replies (RESP bulk strings) from a Redis connection's socket in one call
 * without the GIL (kvc/respread.py says why). Built at first use by kvc.native, loaded with ctypes.CDLL.
 *
 * kvc_resp_bulks(fd, timeout_ms, n, dsts, caps, lens) reads n replies from fd:
 *   "$<len>\r\n<len bytes>\r\n"  -> the bytes into dsts[i] when len <= caps[i]; lens[i] = len
 *                                   (longer: drained, lens[i] = -2)
 *   "$-1\r\n" or "_\r\n"         -> lens[i] = -1 (no such key)
 *   "-<error line>\r\n"          -> lens[i] = -3 (MOVED, ASK, CLUSTERDOWN, ...: the caller asks again)
 * Returns 0 when all n were read and no byte past them was received; otherwise the connection is
 * left mid-stream and the caller must close it: -1 EOF or a socket error, -2 no byte within
 * timeout_ms of waiting, -4 a reply of another type or a malformed one, -5 bytes past the n-th reply.
 * The socket may be non-blocking (Python's socket with a timeout is): a read that would block waits
 * in poll() up to timeout_ms.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define BUF 65536

typedef struct {
    int fd;
    int timeout_ms;
    size_t lo, hi;
    char buf[BUF];
} reader;

static int wait_readable(reader *r) {
    for (;;) {
        struct pollfd p = {r->fd, POLLIN, 0};
        int q = poll(&p, 1, r->timeout_ms);
        if (q > 0) return 0;
        if (q == 0) return -2;
        if (errno != EINTR) return -1;
    }
}

/* read() into dst, at most cap bytes, at least one: > 0 bytes, or a negative status */
static long read_some(reader *r, char *dst, size_t cap) {
    for (;;) {
        ssize_t k = read(r->fd, dst, cap);
        if (k > 0) return (long)k;
        if (k == 0) return -1;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int w = wait_readable(r);
            if (w) return w;
            continue;
        }
        return -1;
    }
}

static int fill(reader *r) {
    if (r->lo == r->hi) r->lo = r->hi = 0;
    if (r->hi == BUF) {
        memmove(r->buf, r->buf + r->lo, r->hi - r->lo);
        r->hi -= r->lo;
        r->lo = 0;
    }
    long k = read_some(r, r->buf + r->hi, BUF - r->hi);
    if (k < 0) return (int)k;
    r->hi += (size_t)k;
    return 0;
}

/* one line without its CRLF into line[0..cap); its length, or a negative status */
static long read_line(reader *r, char *line, size_t cap) {
    size_t n = 0;
    for (;;) {
        while (r->lo < r->hi) {
            char c = r->buf[r->lo++];
            if (c == '\n') {
                if (n == 0 || line[n - 1] != '\r') return -4;
                return (long)(n - 1);
            }
            if (n == cap) return -4;
            line[n++] = c;
        }
        int f = fill(r);
        if (f) return f;
    }
}

/* the next n bytes into dst (or dropped when dst is NULL); 0 or a negative status */
static int read_exact(reader *r, char *dst, size_t n) {
    size_t have = r->hi - r->lo;
    size_t take = have < n ? have : n;
    if (dst) memcpy(dst, r->buf + r->lo, take);
    r->lo += take;
    n -= take;
    if (dst) dst += take;
    while (n > 0) {
        long k;
        if (dst && n >= 4096) {  /* a payload: straight from the socket into its row */
            k = read_some(r, dst, n);
            if (k < 0) return (int)k;
            dst += k;
            n -= (size_t)k;
            continue;
        }
        int f = fill(r);
        if (f) return f;
        have = r->hi - r->lo;
        take = have < n ? have : n;
        if (dst) {
            memcpy(dst, r->buf + r->lo, take);
            dst += take;
        }
        r->lo += take;
        n -= take;
    }
    return 0;
}

static int parse_len(const char *s, long n, int64_t *out) {
    int neg = 0;
    int64_t v = 0;
    long i = 0;
    if (n > 0 && s[0] == '-') {
        neg = 1;
        i = 1;
    }
    if (i == n || n - i > 18) return -4;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -4;
        v = v * 10 + (s[i] - '0');
    }
    *out = neg ? -v : v;
    return 0;
}

int kvc_resp_bulks(int fd, int timeout_ms, long n, const uint64_t *dsts, const int64_t *caps, int64_t *lens) {
    static __thread reader r;  /* 64 KiB: per thread, not on the caller's stack */
    char line[512];
    r.fd = fd;
    r.timeout_ms = timeout_ms;
    r.lo = r.hi = 0;
    for (long i = 0; i < n; i++) {
        long k = read_line(&r, line, sizeof(line));
        if (k < 0) return (int)k;
        if (k == 0) return -4;
        if (line[0] == '-') {
            lens[i] = -3;
            continue;
        }
        if (line[0] == '_' && k == 1) {  /* RESP3's null */
            lens[i] = -1;
            continue;
        }
        if (line[0] != '$') return -4;
        int64_t len;
        if (parse_len(line + 1, k - 1, &len)) return -4;
        if (len < 0) {
            if (len != -1) return -4;
            lens[i] = -1;
            continue;
        }
        int fits = len <= caps[i];
        int s = read_exact(&r, fits ? (char *)(uintptr_t)dsts[i] : NULL, (size_t)len);
        if (s) return s;
        char crlf[2];
        s = read_exact(&r, crlf, 2);
        if (s) return s;
        if (crlf[0] != '\r' || crlf[1] != '\n') return -4;
        lens[i] = fits ? len : -2;
    }
    return r.lo == r.hi ? 0 : -5;
}
