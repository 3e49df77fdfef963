/*
 * coll_cpu.c - the collective algorithms on top of the shared segment (shm.c),
 * the per-communicator worker thread that runs queued collectives in order,
 * and the public fs_* collective entry points.
 *
 * Every algorithm is a sequence of steps (see shm.h). The number of steps
 * depends only on the collective's header (kind, dtype, count, root), the world
 * size and the slot size, so ranks that agree on the header agree on the steps;
 * the first step compares the headers of all ranks.
 *
 *   all_reduce, small : one step; every rank copies its input into its buffer and
 *                       reduces all N buffers in rank order ("one-shot").
 *   all_reduce, large : per chunk, two steps: reduce-scatter (rank r reduces part r
 *                       of the chunk from all buffers into its other buffer) then
 *                       all-gather (every rank copies every part). The two
 *                       buffers alternate, so a rank writes the next chunk while
 *                       the peers still read the last one.
 *   reduce            : the same, but only the root reads the result.
 *   broadcast, scatter: the root writes, the others copy, chunk by chunk.
 *   all_gather, gather, reduce_scatter, all_to_all: one step per chunk.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "shm.h"

static const char *const coll_names[FS_COLL_KIND_COUNT] = {
    "all_reduce", "broadcast", "all_gather", "reduce_scatter", "reduce",
    "gather",     "scatter",   "all_to_all", "barrier"};

const char *fs_coll_name(int kind)
{
    return kind >= 0 && kind < FS_COLL_KIND_COUNT ? coll_names[kind] : "?";
}

static int has_op(int kind)
{
    return kind == FS_COLL_ALLREDUCE || kind == FS_COLL_REDUCE_SCATTER || kind == FS_COLL_REDUCE;
}

static int has_root(int kind)
{
    return kind == FS_COLL_BROADCAST || kind == FS_COLL_REDUCE || kind == FS_COLL_GATHER ||
           kind == FS_COLL_SCATTER;
}

/* ------------------------------------------------------------------ */
/* Validation and headers                                             */
/* ------------------------------------------------------------------ */

int fs_coll_validate(const fs_comm_t *c, const fs_coll_args_t *a, fs_error_t *err)
{
    if (a == NULL)
        return fs_error_set(err, FS_EINVAL, "collective arguments are NULL");
    if (a->kind < 0 || a->kind >= FS_COLL_KIND_COUNT)
        return fs_error_set(err, FS_EINVAL, "unknown collective kind %d", a->kind);
    if (a->kind == FS_COLL_BARRIER)
        return FS_OK;
    const char *name = fs_coll_name(a->kind);
    size_t esz = fs_dtype_size(a->dtype);
    if (esz == 0)
        return fs_error_set(err, FS_EINVAL, "%s: unknown dtype code %d", name, a->dtype);
    if (has_op(a->kind) && !fs_reduce_supported(a->dtype, a->op)) {
        if (a->op < 0 || a->op >= FS_REDOP_COUNT)
            return fs_error_set(err, FS_EINVAL, "%s: unknown reduce op code %d", name, a->op);
        return fs_error_set(err, FS_EINVAL, "%s: reduce op %s is not supported for %s", name,
                            fs_redop_name(a->op), fs_dtype_name(a->dtype));
    }
    if (has_root(a->kind) && (a->root < 0 || a->root >= c->world))
        return fs_error_set(err, FS_EINVAL, "%s: root %d is not in 0..%d", name, a->root,
                            c->world - 1);
    size_t n = (size_t)c->world;
    if (a->count > SIZE_MAX / esz / n)
        return fs_error_set(err, FS_ETOOBIG, "%s: %zu elements is too many", name, a->count);
    if (a->count == 0)
        return FS_OK;
    int is_root = has_root(a->kind) && a->root == c->rank;
    int needs_send, needs_recv;
    switch (a->kind) {
    case FS_COLL_BROADCAST: needs_send = 0, needs_recv = 1; break;
    case FS_COLL_REDUCE:
    case FS_COLL_GATHER: needs_send = 1, needs_recv = is_root; break;
    case FS_COLL_SCATTER: needs_send = is_root, needs_recv = 1; break;
    default: needs_send = 1, needs_recv = 1; break;
    }
    if (needs_send && a->send == NULL)
        return fs_error_set(err, FS_EINVAL, "%s: send buffer is NULL", name);
    if (needs_recv && a->recv == NULL)
        return fs_error_set(err, FS_EINVAL, "%s: recv buffer is NULL", name);
    return FS_OK;
}

static void make_header(const fs_comm_t *c, const fs_coll_args_t *a, struct fs_coll_hdr *h)
{
    memset(h, 0, sizeof *h);
    h->coll_seq = c->coll_seq;
    h->kind = a->kind;
    if (a->kind == FS_COLL_BARRIER)
        return;
    h->count = a->count;
    h->dtype = a->dtype;
    h->op = has_op(a->kind) ? a->op : 0;
    h->root = has_root(a->kind) ? a->root : 0;
}

static int describe(char *buf, size_t len, const struct fs_coll_hdr *h)
{
    if (h->kind == FS_COLL_BARRIER)
        return snprintf(buf, len, "barrier #%llu", (unsigned long long)h->coll_seq);
    int n = snprintf(buf, len, "%s #%llu (%s, %llu elements", fs_coll_name(h->kind),
                     (unsigned long long)h->coll_seq, fs_dtype_name(h->dtype),
                     (unsigned long long)h->count);
    if (n >= 0 && (size_t)n < len && has_op(h->kind))
        n += snprintf(buf + n, len - (size_t)n, ", %s", fs_redop_name(h->op));
    if (n >= 0 && (size_t)n < len && has_root(h->kind))
        n += snprintf(buf + n, len - (size_t)n, ", root %d", h->root);
    if (n >= 0 && (size_t)n < len)
        n += snprintf(buf + n, len - (size_t)n, ")");
    return n;
}

/* ------------------------------------------------------------------ */
/* Steps                                                              */
/* ------------------------------------------------------------------ */

struct run {
    fs_comm_t *c;
    const fs_coll_args_t *a;
    struct fs_coll_hdr hdr;
    size_t esz;
    int64_t deadline;
    int first; /* the next step is the collective's first */
    fs_error_t *err;
};

/* Start the next step: wait until this rank's buffer for it is free. */
static int step_begin(struct run *r, uint64_t *step)
{
    fs_comm_t *c = r->c;
    uint64_t k = c->step + 1;
    int rc = fs_shm_wait_all(c, k - 1, r->deadline, r->err);
    if (rc != FS_OK)
        return rc;
    if (r->first)
        *fs_shm_hdr_of(c, c->rank, k) = r->hdr;
    *step = k;
    return FS_OK;
}

static int check_headers(struct run *r, uint64_t k)
{
    fs_comm_t *c = r->c;
    int bad = 0;
    for (int q = 0; q < c->world && !bad; q++)
        bad = memcmp(fs_shm_hdr_of(c, q, k), &r->hdr, sizeof r->hdr) != 0;
    if (!bad)
        return FS_OK;
    char *msg = r->err->msg;
    size_t len = sizeof r->err->msg;
    int n = snprintf(msg, len, "ranks disagree on the collective:");
    for (int q = 0; q < c->world && n >= 0 && (size_t)n + 16 < len; q++) {
        struct fs_coll_hdr h = *fs_shm_hdr_of(c, q, k);
        if (q > 0 && memcmp(&h, fs_shm_hdr_of(c, 0, k), sizeof h) == 0)
            continue; /* list rank 0 and the ranks that differ from it */
        n += snprintf(msg + n, len - (size_t)n, " rank %d called ", q);
        if (n >= 0 && (size_t)n < len)
            n += describe(msg + n, len - (size_t)n, &h);
        if (n >= 0 && (size_t)n < len)
            n += snprintf(msg + n, len - (size_t)n, ";");
    }
    r->err->code = FS_EMISMATCH;
    r->err->sys_errno = 0;
    return FS_EMISMATCH;
}

/* Post step k; after the collective's first step, wait for all and compare headers. */
static int step_post(struct run *r, uint64_t k)
{
    fs_shm_post(r->c, k);
    if (!r->first)
        return FS_OK;
    r->first = 0;
    int rc = fs_shm_wait_all(r->c, k, r->deadline, r->err);
    return rc != FS_OK ? rc : check_headers(r, k);
}

/* A step in which this rank writes nothing. */
static int step_empty(struct run *r, uint64_t *k)
{
    int rc = step_begin(r, k);
    return rc != FS_OK ? rc : step_post(r, *k);
}

#define AT(p, elems) ((unsigned char *)(p) + (size_t)(elems)*esz)
#define CAT(p, elems) ((const unsigned char *)(p) + (size_t)(elems)*esz)

static void copy(void *dst, const void *src, size_t bytes)
{
    if (dst != src && bytes != 0)
        memmove(dst, src, bytes);
}

/* Elements per step when each rank packs `per` equal parts into its buffer. */
static size_t chunk_elems(const struct run *r, size_t per)
{
    size_t m = r->c->buf_bytes / (per * r->esz);
    return m > 0 ? m : 1;
}

/* Elements per cache-sized block when a reduction also publishes its result. */
#define SUB_ELEMS(esz) (((size_t)64 << 10) / (esz))

/* Start of part p of m elements split in `parts`, on 64-byte boundaries where possible. */
static size_t part_start(size_t m, int p, int parts, size_t esz)
{
    if (p >= parts)
        return m;
    size_t align = esz < 64 ? 64 / esz : 1;
    size_t s = m * (size_t)p / (size_t)parts;
    return s / align * align;
}

/* ------------------------------------------------------------------ */
/* Algorithms                                                         */
/* ------------------------------------------------------------------ */

/* all_reduce (root < 0) or reduce to root. */
static int do_allreduce(struct run *r, int root)
{
    fs_comm_t *c = r->c;
    const fs_coll_args_t *a = r->a;
    const size_t esz = r->esz, n = a->count;
    const int N = c->world, me = c->rank;
    const int gets_result = root < 0 || root == me;
    uint64_t k;
    int rc;

    if (n * esz <= c->opts.oneshot_max && n * esz <= c->buf_bytes) {
        if ((rc = step_begin(r, &k)) != FS_OK)
            return rc;
        if (n)
            memcpy(fs_shm_buf(c, me, k), a->send, n * esz);
        if ((rc = step_post(r, k)) != FS_OK)
            return rc;
        if (!gets_result || n == 0)
            return FS_OK;
        for (int q = 0; q < N; q++)
            c->ins[q] = q == me ? a->send : fs_shm_buf(c, q, k);
        return fs_reduce(a->recv, c->ins, N, n, a->dtype, a->op, r->err);
    }

    const size_t chunk = chunk_elems(r, 1);
    for (size_t off = 0; off < n; off += chunk) {
        const size_t m = n - off < chunk ? n - off : chunk;
        const size_t ps = part_start(m, me, N, esz), pe = part_start(m, me + 1, N, esz);
        /* Step A: publish the parts the others reduce; reduce my part. */
        if ((rc = step_begin(r, &k)) != FS_OK)
            return rc;
        unsigned char *mine = fs_shm_buf(c, me, k);
        for (int p = 0; p < N; p++) {
            if (p == me)
                continue;
            size_t s = part_start(m, p, N, esz), e = part_start(m, p + 1, N, esz);
            if (e > s)
                memcpy(AT(mine, s), CAT(a->send, off + s), (e - s) * esz);
        }
        if ((rc = step_post(r, k)) != FS_OK)
            return rc;
        if ((rc = fs_shm_wait_all(c, k, r->deadline, r->err)) != FS_OK)
            return rc;
        uint64_t kb;
        if ((rc = step_begin(r, &kb)) != FS_OK) /* free at once: all posted k */
            return rc;
        unsigned char *res = AT(fs_shm_buf(c, me, kb), ps);
        /* Reduce into my output (or straight into the buffer when I get no output) in
         * blocks small enough to copy to the buffer while they are still in cache. */
        for (size_t s = ps; s < pe; s += SUB_ELEMS(esz)) {
            size_t len = pe - s < SUB_ELEMS(esz) ? pe - s : SUB_ELEMS(esz);
            unsigned char *dst = gets_result ? AT(a->recv, off + s) : AT(res, s - ps);
            for (int q = 0; q < N; q++)
                c->ins[q] = q == me ? CAT(a->send, off + s) : CAT(fs_shm_buf(c, q, k), s);
            if ((rc = fs_reduce(dst, c->ins, N, len, a->dtype, a->op, r->err)) != FS_OK)
                return rc;
            if (gets_result)
                memcpy(AT(res, s - ps), dst, len * esz);
        }
        /* Step B: publish my reduced part; collect everyone's. */
        if ((rc = step_post(r, kb)) != FS_OK)
            return rc;
        if (!gets_result)
            continue;
        if ((rc = fs_shm_wait_all(c, kb, r->deadline, r->err)) != FS_OK)
            return rc;
        for (int q = 0; q < N; q++) {
            size_t s = part_start(m, q, N, esz), e = part_start(m, q + 1, N, esz);
            if (q != me && e > s)
                memcpy(AT(a->recv, off + s), CAT(fs_shm_buf(c, q, kb), s), (e - s) * esz);
        }
    }
    if (n == 0) /* still one step, for the header check */
        return step_empty(r, &k);
    return FS_OK;
}

/*
 * broadcast, all_gather, gather: per chunk of `count` elements, the writers (the root
 * for broadcast, every rank otherwise) publish it and the readers copy it.
 */
static int do_whole(struct run *r)
{
    fs_comm_t *c = r->c;
    const fs_coll_args_t *a = r->a;
    const size_t esz = r->esz, n = a->count, chunk = chunk_elems(r, 1);
    const int N = c->world, me = c->rank, root = a->root;
    const int bcast = a->kind == FS_COLL_BROADCAST;
    const void *src = bcast && a->send == NULL ? a->recv : a->send;
    const int writes = !bcast || me == root;
    const int gathers = a->kind == FS_COLL_ALLGATHER || (a->kind == FS_COLL_GATHER && me == root);
    size_t off = 0;
    do {
        const size_t m = n - off < chunk ? n - off : chunk;
        uint64_t k;
        int rc = step_begin(r, &k);
        if (rc != FS_OK)
            return rc;
        if (writes && m)
            memcpy(fs_shm_buf(c, me, k), CAT(src, off), m * esz);
        if ((rc = step_post(r, k)) != FS_OK)
            return rc;
        if (bcast && me == root) {
            copy(AT(a->recv, off), CAT(src, off), m * esz);
        } else if (bcast && m) {
            if ((rc = fs_shm_wait(c, root, k, r->deadline, r->err)) != FS_OK)
                return rc;
            memcpy(AT(a->recv, off), fs_shm_buf(c, root, k), m * esz);
        } else if (gathers && m) {
            if ((rc = fs_shm_wait_all(c, k, r->deadline, r->err)) != FS_OK)
                return rc;
            for (int q = 0; q < N; q++) {
                const void *from = q == me ? CAT(src, off) : fs_shm_buf(c, q, k);
                copy(AT(a->recv, (size_t)q * n + off), from, m * esz);
            }
        }
        off += m;
    } while (off < n);
    return FS_OK;
}

/*
 * reduce_scatter, scatter, all_to_all: send holds N blocks of `count` elements, block p
 * for rank p. Per chunk [off, off + m) of every block, each sender (only the root for
 * scatter) packs that chunk of block p at p * m in its buffer, skipping its own block;
 * then every rank takes its chunk from each sender.
 */
static int do_blocks(struct run *r)
{
    fs_comm_t *c = r->c;
    const fs_coll_args_t *a = r->a;
    const int N = c->world, me = c->rank, root = a->root;
    const int scatter = a->kind == FS_COLL_SCATTER;
    const size_t esz = r->esz, n = a->count, chunk = chunk_elems(r, (size_t)N);
    size_t off = 0;
    do {
        const size_t m = n - off < chunk ? n - off : chunk;
        uint64_t k;
        int rc = step_begin(r, &k);
        if (rc != FS_OK)
            return rc;
        unsigned char *mine = fs_shm_buf(c, me, k);
        for (int p = 0; p < N && m && (!scatter || me == root); p++) {
            if (p != me)
                memcpy(AT(mine, (size_t)p * m), CAT(a->send, (size_t)p * n + off), m * esz);
        }
        if ((rc = step_post(r, k)) != FS_OK)
            return rc;
        if (m == 0) {
            off += m;
            continue;
        }
        if (scatter && me != root)
            rc = fs_shm_wait(c, root, k, r->deadline, r->err);
        else if (!scatter)
            rc = fs_shm_wait_all(c, k, r->deadline, r->err);
        if (rc != FS_OK)
            return rc;
        for (int q = 0; q < N; q++) /* rank q's chunk of my block */
            c->ins[q] = q == me ? CAT(a->send, (size_t)me * n + off)
                                : CAT(fs_shm_buf(c, q, k), (size_t)me * m);
        if (a->kind == FS_COLL_REDUCE_SCATTER) {
            rc = fs_reduce(AT(a->recv, off), c->ins, N, m, a->dtype, a->op, r->err);
            if (rc != FS_OK)
                return rc;
        } else if (scatter) {
            copy(AT(a->recv, off), c->ins[root], m * esz);
        } else {
            for (int q = 0; q < N; q++)
                copy(AT(a->recv, (size_t)q * n + off), c->ins[q], m * esz);
        }
        off += m;
    } while (off < n);
    return FS_OK;
}

/* World size 1: no peers, only the local copy. */
static int run_alone(struct run *r)
{
    const fs_coll_args_t *a = r->a;
    size_t bytes = a->count * r->esz;
    switch (a->kind) {
    case FS_COLL_ALLREDUCE:
    case FS_COLL_REDUCE:
    case FS_COLL_REDUCE_SCATTER: {
        const void *in[1] = {a->send};
        return fs_reduce(a->recv, in, 1, a->count, a->dtype, a->op, r->err);
    }
    case FS_COLL_BROADCAST:
        if (a->send != NULL)
            copy(a->recv, a->send, bytes);
        return FS_OK;
    case FS_COLL_ALLGATHER:
    case FS_COLL_GATHER:
    case FS_COLL_SCATTER:
    case FS_COLL_ALLTOALL: copy(a->recv, a->send, bytes); return FS_OK;
    default: return FS_OK;
    }
}

int fs_coll_execute(fs_comm_t *c, const fs_coll_args_t *a, fs_error_t *err)
{
    int rc = fs_shm_check_usable(c, err);
    if (rc != FS_OK)
        return rc;
    c->coll_seq++;
    struct run r = {.c = c, .a = a, .esz = fs_dtype_size(a->dtype), .first = 1, .err = err};
    if (r.esz == 0)
        r.esz = 1; /* barrier */
    make_header(c, a, &r.hdr);
    describe(c->what, sizeof c->what, &r.hdr);
    r.deadline = fs_now_ms() + c->opts.timeout_ms;
    if (c->world == 1)
        return run_alone(&r);
    uint64_t k;
    switch (a->kind) {
    case FS_COLL_ALLREDUCE: rc = do_allreduce(&r, -1); break;
    case FS_COLL_REDUCE: rc = do_allreduce(&r, a->root); break;
    case FS_COLL_BROADCAST:
    case FS_COLL_ALLGATHER:
    case FS_COLL_GATHER: rc = do_whole(&r); break;
    case FS_COLL_REDUCE_SCATTER:
    case FS_COLL_SCATTER:
    case FS_COLL_ALLTOALL: rc = do_blocks(&r); break;
    default: rc = step_empty(&r, &k); break;
    }
    if (rc != FS_OK)
        fs_shm_fail(c, err);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Worker thread and queue                                            */
/* ------------------------------------------------------------------ */

static void lock(pthread_mutex_t *m)
{
    /* Fails only on a corrupted or wrongly-typed mutex: a bug, not a runtime case. */
    if (pthread_mutex_lock(m) != 0)
        abort();
}

static void unlock(pthread_mutex_t *m)
{
    if (pthread_mutex_unlock(m) != 0)
        abort();
}

static void *worker_main(void *arg)
{
    fs_comm_t *c = arg;
    lock(&c->qlock);
    for (;;) {
        while (c->q_len == 0 && !c->stopping) {
            if (pthread_cond_wait(&c->q_cv, &c->qlock) != 0)
                abort();
        }
        if (c->q_len == 0)
            break; /* stopping and drained */
        struct fs_coll_item item = c->queue[c->q_head];
        c->q_head = (c->q_head + 1) % c->q_cap;
        c->q_len--;
        unlock(&c->qlock);

        fs_error_t e;
        fs_error_clear(&e);
        lock(&c->exec_lock);
        int rc = fs_coll_execute(c, &item.args, &e);
        unlock(&c->exec_lock);

        lock(&c->qlock);
        if (rc != FS_OK && c->fail_ticket == 0) {
            c->fail_ticket = item.ticket;
            c->ticket_err = e;
        }
        c->completed = item.ticket;
        if (pthread_cond_broadcast(&c->done_cv) != 0)
            abort();
    }
    unlock(&c->qlock);
    return NULL;
}

int fs_coll_worker_start(fs_comm_t *c, fs_error_t *err)
{
    c->q_cap = 64;
    c->queue = calloc(c->q_cap, sizeof *c->queue);
    if (c->queue == NULL)
        return fs_error_set(err, FS_ENOMEM, "out of memory");
    /* The worker takes no signals: they stay with the application's threads. */
    sigset_t all, old;
    sigfillset(&all);
    int rc = pthread_sigmask(SIG_SETMASK, &all, &old);
    if (rc != 0) {
        errno = rc;
        return fs_error_sys(err, "pthread_sigmask");
    }
    rc = pthread_create(&c->worker, NULL, worker_main, c);
    int rc2 = pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        errno = rc;
        return fs_error_sys(err, "pthread_create (collectives worker)");
    }
    c->has_worker = 1;
    if (rc2 != 0) {
        errno = rc2;
        return fs_error_sys(err, "pthread_sigmask");
    }
    return FS_OK;
}

void fs_coll_worker_stop(fs_comm_t *c)
{
    if (!c->has_worker)
        return;
    lock(&c->qlock);
    c->stopping = 1;
    c->waiters_shutdown = 1;
    if (pthread_cond_broadcast(&c->q_cv) != 0 || pthread_cond_broadcast(&c->done_cv) != 0)
        abort();
    unlock(&c->qlock);
    int rc = pthread_join(c->worker, NULL);
    (void)rc; /* EDEADLK/EINVAL would mean destroy ran on the worker itself: a caller bug */
    c->has_worker = 0;
}

static int enqueue(fs_comm_t *c, const fs_coll_args_t *a, uint64_t *ticket, fs_error_t *err)
{
    if (c->stopping)
        return fs_error_set(err, FS_ECLOSED, "communicator is being destroyed");
    if (c->q_len == c->q_cap) {
        size_t cap = c->q_cap ? c->q_cap * 2 : 64;
        struct fs_coll_item *q = malloc(cap * sizeof *q);
        if (q == NULL)
            return fs_error_set(err, FS_ENOMEM, "out of memory (collective queue)");
        for (size_t i = 0; i < c->q_len; i++)
            q[i] = c->queue[(c->q_head + i) % c->q_cap];
        free(c->queue);
        c->queue = q;
        c->q_cap = cap;
        c->q_head = 0;
    }
    struct fs_coll_item *it = &c->queue[(c->q_head + c->q_len) % c->q_cap];
    it->args = *a;
    it->ticket = ++c->submitted;
    c->q_len++;
    *ticket = it->ticket;
    if (pthread_cond_signal(&c->q_cv) != 0)
        abort();
    return FS_OK;
}

int fs_comm_submit(fs_comm_t *c, const fs_coll_args_t *a, uint64_t *ticket, fs_error_t *err)
{
    if (fs_shm_forked(c))
        return fs_shm_forked_error(c, err);
    int rc = fs_coll_validate(c, a, err);
    if (rc != FS_OK)
        return rc;
    if (!c->has_worker)
        return fs_error_set(err, FS_EINVAL, "communicator was created without a worker thread");
    lock(&c->qlock);
    rc = enqueue(c, a, ticket, err);
    unlock(&c->qlock);
    return rc;
}

/* Status of a completed ticket (qlock held). */
static int ticket_status(fs_comm_t *c, uint64_t t, fs_error_t *err)
{
    if (c->fail_ticket == 0 || t < c->fail_ticket)
        return FS_OK;
    if (t == c->fail_ticket) {
        if (err != NULL)
            *err = c->ticket_err;
        return c->ticket_err.code;
    }
    return fs_error_set(err, FS_EABORTED, "communicator unusable after an earlier error: %s",
                        c->ticket_err.msg);
}

int fs_comm_wait(fs_comm_t *c, uint64_t t, int64_t timeout_ms, fs_error_t *err)
{
    struct timespec until = {0, 0};
    if (timeout_ms > 0) {
        (void)clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += (time_t)(timeout_ms / 1000);
        until.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
        if (until.tv_nsec >= 1000000000) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000;
        }
    }
    if (fs_shm_forked(c))
        return fs_shm_forked_error(c, err);
    lock(&c->qlock);
    int rc = FS_OK;
    while (c->completed < t) {
        if (t > c->submitted && (c->waiters_shutdown || c->stopping)) {
            rc = fs_error_set(err, FS_ECLOSED, "communicator is shutting down");
            break;
        }
        if (timeout_ms == 0) {
            rc = fs_error_set(err, FS_ETIMEOUT, "collective %llu is still running",
                              (unsigned long long)t);
            break;
        }
        int w = timeout_ms < 0 ? pthread_cond_wait(&c->done_cv, &c->qlock)
                               : pthread_cond_timedwait(&c->done_cv, &c->qlock, &until);
        if (w == ETIMEDOUT && c->completed < t) {
            rc = fs_error_set(err, FS_ETIMEOUT, "collective %llu did not finish in %lld ms",
                              (unsigned long long)t, (long long)timeout_ms);
            break;
        }
        if (w != 0 && w != ETIMEDOUT)
            abort();
    }
    if (rc == FS_OK)
        rc = ticket_status(c, t, err);
    unlock(&c->qlock);
    return rc;
}

uint64_t fs_comm_completed(fs_comm_t *c)
{
    if (fs_shm_forked(c))
        return 0;
    lock(&c->qlock);
    uint64_t done = c->completed;
    unlock(&c->qlock);
    return done;
}

void fs_comm_shutdown_waiters(fs_comm_t *c)
{
    if (fs_shm_forked(c))
        return;
    lock(&c->qlock);
    c->waiters_shutdown = 1;
    if (pthread_cond_broadcast(&c->done_cv) != 0)
        abort();
    unlock(&c->qlock);
}

int fs_comm_run(fs_comm_t *c, const fs_coll_args_t *a, fs_error_t *err)
{
    if (fs_shm_forked(c))
        return fs_shm_forked_error(c, err);
    int rc = fs_coll_validate(c, a, err);
    if (rc != FS_OK)
        return rc;
    lock(&c->qlock);
    if (c->q_len == 0 && c->submitted == c->completed) {
        /* Idle: run here (no thread hand-off); the worker waits on exec_lock if needed. */
        lock(&c->exec_lock);
        unlock(&c->qlock);
        rc = fs_coll_execute(c, a, err);
        unlock(&c->exec_lock);
        return rc;
    }
    uint64_t t = 0;
    rc = enqueue(c, a, &t, err);
    unlock(&c->qlock);
    return rc != FS_OK ? rc : fs_comm_wait(c, t, -1, err);
}

/* ------------------------------------------------------------------ */
/* Convenience wrappers                                               */
/* ------------------------------------------------------------------ */

static int run_kind(fs_comm_t *c, int kind, const void *send, void *recv, size_t count, int dtype,
                    int op, int root, fs_error_t *err)
{
    fs_coll_args_t a = {.kind = kind,
                        .dtype = dtype,
                        .op = op,
                        .root = root,
                        .send = send,
                        .recv = recv,
                        .count = count};
    return fs_comm_run(c, &a, err);
}

int fs_allreduce(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int op,
                 fs_error_t *err)
{
    return run_kind(c, FS_COLL_ALLREDUCE, send, recv, count, dtype, op, 0, err);
}

int fs_broadcast(fs_comm_t *c, void *buf, size_t count, int dtype, int root, fs_error_t *err)
{
    return run_kind(c, FS_COLL_BROADCAST, NULL, buf, count, dtype, 0, root, err);
}

int fs_allgather(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype,
                 fs_error_t *err)
{
    return run_kind(c, FS_COLL_ALLGATHER, send, recv, count, dtype, 0, 0, err);
}

int fs_reduce_scatter(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int op,
                      fs_error_t *err)
{
    return run_kind(c, FS_COLL_REDUCE_SCATTER, send, recv, count, dtype, op, 0, err);
}

int fs_reduce_root(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int op,
                   int root, fs_error_t *err)
{
    return run_kind(c, FS_COLL_REDUCE, send, recv, count, dtype, op, root, err);
}

int fs_gather(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int root,
              fs_error_t *err)
{
    return run_kind(c, FS_COLL_GATHER, send, recv, count, dtype, 0, root, err);
}

int fs_scatter(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int root,
               fs_error_t *err)
{
    return run_kind(c, FS_COLL_SCATTER, send, recv, count, dtype, 0, root, err);
}

int fs_alltoall(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype,
                fs_error_t *err)
{
    return run_kind(c, FS_COLL_ALLTOALL, send, recv, count, dtype, 0, 0, err);
}

int fs_barrier(fs_comm_t *c, fs_error_t *err)
{
    return run_kind(c, FS_COLL_BARRIER, NULL, NULL, 0, 0, 0, 0, err);
}
