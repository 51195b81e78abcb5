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

/* The same byte work on a thread of its own, for a caller that must not wait for it (an engine's
 * thread drives puts in its waits for the GPU, and polls): *done becomes 1 (a release store) once
 * every sum and copy is in place. The caller keeps every buffer alive until then. Returns 0 when the
 * work runs on its own thread; where no thread can be made it runs here, before the return, and the
 * error is returned (*done is 1 either way). */
#include <pthread.h>
#include <stdlib.h>

typedef struct {
    long n;
    const uint64_t *src, *dst, *len;
    uint64_t *sums; /* NULL: copies only */
    xxh3_64_fn xxh3_64;
    int *done;
} kvc_job;

static void *kvc_run_job(void *arg)
{
    kvc_job *j = (kvc_job *)arg;
    if (j->sums)
        kvc_sum_copy(j->n, j->src, j->dst, j->len, j->sums, j->xxh3_64);
    else
        kvc_copy(j->n, j->src, j->dst, j->len);
    __atomic_store_n(j->done, 1, __ATOMIC_RELEASE);
    free(j);
    return NULL;
}

int kvc_start(long n, const uint64_t *src, const uint64_t *dst, const uint64_t *len, uint64_t *sums,
              xxh3_64_fn xxh3_64, int *done)
{
    kvc_job *j = (kvc_job *)malloc(sizeof *j);
    if (!j) {
        if (sums)
            kvc_sum_copy(n, src, dst, len, sums, xxh3_64);
        else
            kvc_copy(n, src, dst, len);
        __atomic_store_n(done, 1, __ATOMIC_RELEASE);
        return -1;
    }
    kvc_job local = {n, src, dst, len, sums, xxh3_64, done};
    *j = local;
    pthread_attr_t attr;
    pthread_t t;
    int rc = pthread_attr_init(&attr);
    if (!rc) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        rc = pthread_create(&t, &attr, kvc_run_job, j);
        pthread_attr_destroy(&attr);
    }
    if (rc)
        kvc_run_job(j); /* frees j and sets *done */
    return rc;
}

/* *done with an acquire load: once it reads 1, the sums and copies of its job are visible. */
int kvc_done(const int *done)
{
    return __atomic_load_n(done, __ATOMIC_ACQUIRE);
}
