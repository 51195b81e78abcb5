/* The cpu tier's byte work for one put_pages call, in one call that runs without the GIL.
 *
 * For each page i: sums[i] = xxh3_64(src[i], len[i]) (the page checksum, from the source bytes),
 * then, where dst[i] is not 0, the bytes are copied to dst[i] (a slot of the slab). Hashing first
 * and copying right after reads the source a second time from cache (a page of a few hundred KiB
 * fits in L2). xxh3_64 is xxhash's own XXH3_64bits, passed in by address from the Python package's
 * extension module, so this file carries no hash code of its own.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef uint64_t (*xxh3_64_fn)(const void *data, size_t len);

void kvc_sum_copy(long n, const uint64_t *src, const uint64_t *dst, const uint64_t *len, uint64_t *sums,
                  xxh3_64_fn xxh3_64)
{
    for (long i = 0; i < n; i++) {
        const void *s = (const void *)(uintptr_t)src[i];
        sums[i] = xxh3_64(s, (size_t)len[i]);
        if (dst[i] && len[i])
            memcpy((void *)(uintptr_t)dst[i], s, (size_t)len[i]);
    }
}

/* Plain copies for a batch (the cpu tier's demoted pages into their disk records), in one call
 * that runs without the GIL. */
void kvc_copy(long n, const uint64_t *src, const uint64_t *dst, const uint64_t *len)
{
    for (long i = 0; i < n; i++)
        if (len[i])
            memcpy((void *)(uintptr_t)dst[i], (const void *)(uintptr_t)src[i], (size_t)len[i]);
}
