/* The native kernel's thread pool: persistent pthreads that claim tasks from an atomic counter; the
 * caller takes part. Included once, by experts.c (one translation unit). */
/* ---------------------------------------------------------------- thread pool */
typedef void (*task_fn)(void *ctx, int task);

typedef struct {
    int n; /* threads including the caller */
    pthread_t *th;
    pthread_mutex_t mu, call_mu;
    pthread_cond_t go, done;
    atomic_int gen, next, busy;
    int ntasks, stop;
    task_fn fn;
    void *ctx;
    /* seconds spent per phase of kvc_moe calls (setup, x, gu, q, down) and the call count, summed
     * under call_mu until kvc_pool_phases reads and resets them: where a decode step's time goes */
    double phase[5];
    long calls;
} pool_t;

/* How long a thread spins for the next round before it sleeps (and the caller for the last worker
 * before it waits on the condition): a decode step's layer calls come ~0.1-0.2 ms apart. Timed by the
 * clock, not by a count of pause instructions, whose latency differs ~10x between CPU models (a
 * count that spins 1 ms on one host lets the threads fall asleep between a call's phases on another,
 * and every phase then waits for the slowest thread to wake). */
#ifndef SPIN_NS
#define SPIN_NS 2000000L
#endif

static long mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Spin while *a == v (eq) or *a != v (!eq), for at most SPIN_NS; the caller then sleeps if needed. */
static void spin_while(atomic_int *a, int v, int eq) {
    long until = 0;
    for (int spins = 0; (atomic_load(a) == v) == eq; spins++) {
#if SIMD
        _mm_pause();
#endif
        if ((spins & 63) == 0) {
            long t = mono_ns();
            if (!until) until = t + SPIN_NS;
            else if (t > until) return;
        }
    }
}

static void claim(pool_t *p) {
    for (int t; (t = atomic_fetch_add(&p->next, 1)) < p->ntasks;) p->fn(p->ctx, t);
}

static void *pool_main(void *arg) {
    pool_t *p = arg;
    int seen = 0;
    for (;;) {
        spin_while(&p->gen, seen, 1); /* short spin: calls come per layer */
        if (atomic_load(&p->gen) == seen) {
            pthread_mutex_lock(&p->mu);
            while (atomic_load(&p->gen) == seen && !p->stop) pthread_cond_wait(&p->go, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (p->stop) return NULL;
        seen = atomic_load(&p->gen);
        claim(p);
        if (atomic_fetch_sub(&p->busy, 1) == 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

/* 1: each worker thread is bound to its own CPU of the caller's allowed set (worker i to the
 * (i+1)-th, the caller's thread left free), so the scheduler does not move or stack them. A setting
 * the benchmark compares; no faster than the free threads on the H200 host (run CL): off. */
#ifndef PIN
#define PIN 0
#endif

static void pin_workers(pool_t *p) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return;
    int cpus[CPU_SETSIZE], count = 0;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &allowed)) cpus[count++] = c;
    if (count < 2) return;
    for (int i = 0; i < p->n - 1; i++) {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpus[(i + 1) % count], &one);
        pthread_setaffinity_np(p->th[i], sizeof one, &one); /* best effort: a refusal leaves it free */
    }
}

void *kvc_pool_new(int n) {
    pool_t *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n < 1 ? 1 : n;
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->call_mu, NULL);
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
    p->th = calloc(p->n, sizeof(pthread_t));
    for (int i = 0; i < p->n - 1; i++) pthread_create(&p->th[i], NULL, pool_main, p);
    if (PIN) pin_workers(p);
    return p;
}

void kvc_pool_free(void *h) {
    pool_t *p = h;
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n - 1; i++) pthread_join(p->th[i], NULL);
    free(p->th);
    free(p);
}

/* Run fn(ctx, 0..ntasks-1) on the pool and the calling thread; returns when all are done. */
static void pool_run(pool_t *p, task_fn fn, void *ctx, int ntasks) {
    if (ntasks <= 0) return;
    if (p->n == 1 || ntasks == 1) {
        for (int t = 0; t < ntasks; t++) fn(ctx, t);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->ntasks = ntasks;
    atomic_store(&p->next, 0);
    atomic_store(&p->busy, p->n - 1);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    claim(p);
    spin_while(&p->busy, 0, 0); /* busy only counts down to 0 */
    if (atomic_load(&p->busy) > 0) {
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->busy) > 0) pthread_cond_wait(&p->done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}
