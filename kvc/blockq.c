/* The device block pool's reference counts and free queue (kvc.device_pool.BlockPool) in C.
 *
 * The free queue is a doubly linked list over block ids with a sentinel at index n: next[n] is the
 * queue's front (handed out first), prev[n] its end. A block is in the queue exactly when its
 * reference count is 0. `cached` mirrors whether the block holds a registered page (the Python
 * side's dict of records is the truth; it sets and clears the flag alongside). The order rules are
 * BlockPool's: a block freed to ref 0 that holds a page joins the end, tail-first over a request's
 * table; one that holds none goes to the front, in table order. The flags of newly registered
 * pages come in with the next call that reads flags (`marks`: a commit of a step's pages then costs
 * no call of its own; a first call after other work costs ~10-20 us on the 2-core VM).
 *
 * Every function takes block ids as uint32 (array('I') from Python: the cheapest conversion of a
 * list of ints) and checks them against n; the state lives in arrays the caller owns (numpy).
 * Loaded with ctypes.PyDLL (the GIL stays held: a call is microseconds, and the pool has one owner).
 */
#include <stdint.h>

typedef struct {
    int32_t *rc;       /* [n] reference counts */
    int32_t *prev;     /* [n + 1] */
    int32_t *next;     /* [n + 1] */
    uint8_t *cached;   /* [n] holds a registered page */
    int64_t n;
    int64_t num_free;
} blockq_t;

static void unlink_block(blockq_t *q, int32_t b)
{
    int32_t p = q->prev[b], x = q->next[b];
    q->next[p] = x;
    q->prev[x] = p;
}

/* Link b in right after a (the sentinel n: at the front). */
static void insert_after(blockq_t *q, int32_t a, int32_t b)
{
    int32_t x = q->next[a];
    q->next[a] = b;
    q->prev[b] = a;
    q->next[b] = x;
    q->prev[x] = b;
}

static void push_back(blockq_t *q, int32_t b)
{
    insert_after(q, q->prev[q->n], b);
}

static void push_front(blockq_t *q, int32_t b)
{
    insert_after(q, (int32_t)q->n, b);
}

/* All free, in ascending order. */
void kvc_bq_init(blockq_t *q)
{
    int32_t n = (int32_t)q->n;
    for (int32_t b = 0; b <= n; b++) {
        q->next[b] = b == n ? 0 : b + 1;
        q->prev[b] = b == 0 ? n : b - 1;
    }
    q->num_free = n;
    for (int32_t b = 0; b < n; b++) {
        q->rc[b] = 0;
        q->cached[b] = 0;
    }
}

/* Returns -1, or the index of the first id out of range (nothing changed then). */
static int64_t check(const blockq_t *q, const uint32_t *blocks, int64_t k)
{
    for (int64_t i = 0; i < k; i++)
        if ((int64_t)blocks[i] >= q->n)
            return i;
    return -1;
}

/* Take a reference on each block; one at ref 0 leaves the queue. Returns -1 or a bad id's index. */
int64_t kvc_bq_touch(blockq_t *q, const uint32_t *blocks, int64_t k)
{
    int64_t bad = check(q, blocks, k);
    if (bad >= 0)
        return bad;
    for (int64_t i = 0; i < k; i++) {
        int32_t b = (int32_t)blocks[i];
        if (q->rc[b] == 0) {
            unlink_block(q, b);
            q->num_free--;
        }
        q->rc[b]++;
    }
    return -1;
}

/* Set the cached flag of newly registered blocks (ids out of range are skipped: the Python side
 * registered them, and its own lookups will fail on them). */
static void apply_marks(blockq_t *q, const uint32_t *marks, int64_t m)
{
    for (int64_t i = 0; i < m; i++)
        if ((int64_t)marks[i] < q->n)
            q->cached[marks[i]] = 1;
}

/* Drop a reference on each block, the last one first (BlockPool.free). Returns -1, or the index of
 * a bad id (nothing changed), or k + the index of a block at ref 0 (the ones after it in the
 * reverse walk were freed, as the Python loop leaves them before it raises). */
int64_t kvc_bq_free(blockq_t *q, const uint32_t *blocks, int64_t k, const uint32_t *marks, int64_t m)
{
    apply_marks(q, marks, m);  /* first: they hold whatever this call's ids are */
    int64_t bad = check(q, blocks, k);
    if (bad >= 0)
        return bad;
    for (int64_t i = k - 1; i >= 0; i--) {
        int32_t b = (int32_t)blocks[i];
        if (q->rc[b] <= 0)
            return k + i;
        if (--q->rc[b] == 0) {
            if (q->cached[b])
                push_back(q, b);
            else
                push_front(q, b);
            q->num_free++;
        }
    }
    return -1;
}

/* The queue's first k blocks, in order, each now at ref 1; those that held a page are also listed
 * in `evicted` (in order) and lose the flag. Returns how many were evicted, -1 if fewer than k are
 * free, -2 if k < 0 (nothing changed then). */
int64_t kvc_bq_take(blockq_t *q, int64_t k, uint32_t *out, uint32_t *evicted, const uint32_t *marks,
                    int64_t m)
{
    apply_marks(q, marks, m);  /* first: they stand whatever this call answers */
    if (k < 0)
        return -2;
    if (k > q->num_free)
        return -1;
    int32_t s = (int32_t)q->n;
    int64_t e = 0;
    for (int64_t i = 0; i < k; i++) {
        int32_t b = q->next[s];
        unlink_block(q, b);
        q->rc[b] = 1;
        out[i] = (uint32_t)b;
        if (q->cached[b]) {
            q->cached[b] = 0;
            evicted[e++] = (uint32_t)b;
        }
    }
    q->num_free -= k;
    return e;
}

/* Forget the pages of free blocks and move them to the front, each in front of the one before it
 * (reset_cache passes them in descending order, so they end up ascending). A block not in the
 * queue is skipped. */
int64_t kvc_bq_to_front(blockq_t *q, const uint32_t *blocks, int64_t k, const uint32_t *marks, int64_t m)
{
    apply_marks(q, marks, m);  /* first: they hold whatever this call's ids are */
    int64_t bad = check(q, blocks, k);
    if (bad >= 0)
        return bad;
    for (int64_t i = 0; i < k; i++) {
        int32_t b = (int32_t)blocks[i];
        if (q->rc[b] != 0)
            continue;
        q->cached[b] = 0;
        unlink_block(q, b);
        push_front(q, b);
    }
    return -1;
}

/* The queue front to end into out (num_free entries). */
void kvc_bq_order(const blockq_t *q, uint32_t *out)
{
    int32_t s = (int32_t)q->n;
    int64_t i = 0;
    for (int32_t b = q->next[s]; b != s; b = q->next[b])
        out[i++] = (uint32_t)b;
}
