/* Hash spec v1's page chain for a run of pages in one call (kvc.hashing.page_hashes):
 *
 *     h[i] = xxh3_128(h[i-1] || tokens of page i),  h[-1] = root,
 *
 * each digest written as xxhash's canonical 16 bytes (high 64 bits big-endian, then low 64 bits
 * big-endian: the Python package's digest()). xxh3_128 is xxhash's own XXH3_128bits, passed in by
 * address from the Python package's extension module, so this file carries no hash code of its own.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { uint64_t low64, high64; } xxh128_t;  /* XXH128_hash_t's layout */
typedef xxh128_t (*xxh3_128_fn)(const void *data, size_t len);

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

/* root: 16 bytes; tokens: n * page_bytes bytes; out: n * 16 bytes. Returns 0, or -1 when a page
 * larger than the stack buffer could not be given a heap one. */
int kvc_chain_hash(const uint8_t *root, const uint8_t *tokens, long n, long page_bytes, uint8_t *out,
                   xxh3_128_fn xxh3_128)
{
    uint8_t stack[16 + 4096];
    uint8_t *buf = stack;
    if (page_bytes > 4096) {
        buf = malloc(16 + (size_t)page_bytes);
        if (!buf)
            return -1;
    }
    memcpy(buf, root, 16);
    for (long i = 0; i < n; i++) {
        memcpy(buf + 16, tokens + i * page_bytes, (size_t)page_bytes);
        xxh128_t h = xxh3_128(buf, 16 + (size_t)page_bytes);
        put_be64(out + 16 * i, h.high64);
        put_be64(out + 16 * i + 8, h.low64);
        memcpy(buf, out + 16 * i, 16);
    }
    if (buf != stack)
        free(buf);
    return 0;
}
