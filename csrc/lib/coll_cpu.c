/*
 * coll_cpu.c - the collective algorithms on top of the shared segment's steps (shm.c).
 * Only algorithms: the communicator, its worker thread and queue, and the public entry
 * points are comm.c's.
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

#include "coll.h"
#include "internal.h"

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

int fs__coll_validate(const fs__shm_t *s, const fs_coll_args_t *a, fs_error_t *err)
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
    if (has_root(a->kind) && (a->root < 0 || a->root >= s->world))
        return fs_error_set(err, FS_EINVAL, "%s: root %d is not in 0..%d", name, a->root,
                            s->world - 1);
    size_t n = (size_t)s->world;
    if (a->count > SIZE_MAX / esz / n)
        return fs_error_set(err, FS_ETOOBIG, "%s: %zu elements is too many", name, a->count);
    if (a->count == 0)
        return FS_OK;
    int is_root = has_root(a->kind) && a->root == s->rank;
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

static void make_header(const fs__shm_t *s, const fs_coll_args_t *a, struct fs__coll_hdr *h)
{
    memset(h, 0, sizeof *h);
    h->coll_seq = s->coll_seq;
    h->kind = a->kind;
    if (a->kind == FS_COLL_BARRIER)
        return;
    h->count = a->count;
    h->dtype = a->dtype;
    h->op = has_op(a->kind) ? a->op : 0;
    h->root = has_root(a->kind) ? a->root : 0;
}

static int describe(char *buf, size_t len, const struct fs__coll_hdr *h)
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
    fs__shm_t *s;
    const fs_coll_args_t *a;
    struct fs__coll_hdr hdr;
    size_t esz;
    int64_t deadline;
    int first; /* the next step is the collective's first */
    fs_error_t *err;
};

/* Start the next step: wait until this rank's buffer for it is free. */
static int step_begin(struct run *r, uint64_t *step)
{
    fs__shm_t *s = r->s;
    uint64_t k = s->step + 1;
    int rc = fs__shm_wait_all(s, k - 1, r->deadline, r->err);
    if (rc != FS_OK)
        return rc;
    if (r->first)
        *fs__shm_hdr_of(s, s->rank, k) = r->hdr;
    *step = k;
    return FS_OK;
}

static int check_headers(struct run *r, uint64_t k)
{
    fs__shm_t *s = r->s;
    int bad = 0;
    for (int q = 0; q < s->world && !bad; q++)
        bad = memcmp(fs__shm_hdr_of(s, q, k), &r->hdr, sizeof r->hdr) != 0;
    if (!bad)
        return FS_OK;
    char *msg = r->err->msg;
    size_t len = sizeof r->err->msg;
    int n = snprintf(msg, len, "ranks disagree on the collective:");
    for (int q = 0; q < s->world && n >= 0 && (size_t)n + 16 < len; q++) {
        struct fs__coll_hdr h = *fs__shm_hdr_of(s, q, k);
        if (q > 0 && memcmp(&h, fs__shm_hdr_of(s, 0, k), sizeof h) == 0)
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
    fs__shm_post(r->s, k);
    if (!r->first)
        return FS_OK;
    r->first = 0;
    int rc = fs__shm_wait_all(r->s, k, r->deadline, r->err);
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
    size_t m = r->s->buf_bytes / (per * r->esz);
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

/* all_reduce / reduce, small: one step; every rank reduces all N buffers in rank order. */
static int allreduce_oneshot(struct run *r, int gets_result)
{
    fs__shm_t *s = r->s;
    const fs_coll_args_t *a = r->a;
    const size_t esz = r->esz, n = a->count;
    const int N = s->world, me = s->rank;
    uint64_t k;
    int rc;
    if ((rc = step_begin(r, &k)) != FS_OK)
        return rc;
    if (n)
        memcpy(fs__shm_buf(s, me, k), a->send, n * esz);
    if ((rc = step_post(r, k)) != FS_OK)
        return rc;
    if (!gets_result || n == 0)
        return FS_OK;
    for (int q = 0; q < N; q++)
        s->ins[q] = q == me ? a->send : fs__shm_buf(s, q, k);
    return fs_reduce(a->recv, s->ins, N, n, a->dtype, a->op, r->err);
}

/*
 * One chunk [off, off + m) of a large all_reduce / reduce, two steps. A (reduce-scatter):
 * publish the parts the others reduce; reduce my part from every buffer. B (all-gather):
 * publish my reduced part; collect everyone's (only ranks that get the result).
 */
static int allreduce_chunk(struct run *r, size_t off, size_t m, int gets_result)
{
    fs__shm_t *s = r->s;
    const fs_coll_args_t *a = r->a;
    const size_t esz = r->esz;
    const int N = s->world, me = s->rank;
    const size_t ps = part_start(m, me, N, esz), pe = part_start(m, me + 1, N, esz);
    uint64_t k, kb;
    int rc;
    if ((rc = step_begin(r, &k)) != FS_OK)
        return rc;
    unsigned char *mine = fs__shm_buf(s, me, k);
    for (int p = 0; p < N; p++) {
        if (p == me)
            continue;
        size_t ss = part_start(m, p, N, esz), e = part_start(m, p + 1, N, esz);
        if (e > ss)
            memcpy(AT(mine, ss), CAT(a->send, off + ss), (e - ss) * esz);
    }
    if ((rc = step_post(r, k)) != FS_OK ||
        (rc = fs__shm_wait_all(s, k, r->deadline, r->err)) != FS_OK)
        return rc;
    if ((rc = step_begin(r, &kb)) != FS_OK) /* free at once: all posted k */
        return rc;
    unsigned char *res = AT(fs__shm_buf(s, me, kb), ps);
    /* Reduce into my output (or straight into the buffer when I get no output) in
     * blocks small enough to copy to the buffer while they are still in cache. */
    for (size_t ss = ps; ss < pe; ss += SUB_ELEMS(esz)) {
        size_t len = pe - ss < SUB_ELEMS(esz) ? pe - ss : SUB_ELEMS(esz);
        unsigned char *dst = gets_result ? AT(a->recv, off + ss) : AT(res, ss - ps);
        for (int q = 0; q < N; q++)
            s->ins[q] = q == me ? CAT(a->send, off + ss) : CAT(fs__shm_buf(s, q, k), ss);
        if ((rc = fs_reduce(dst, s->ins, N, len, a->dtype, a->op, r->err)) != FS_OK)
            return rc;
        if (gets_result)
            memcpy(AT(res, ss - ps), dst, len * esz);
    }
    if ((rc = step_post(r, kb)) != FS_OK || !gets_result)
        return rc;
    if ((rc = fs__shm_wait_all(s, kb, r->deadline, r->err)) != FS_OK)
        return rc;
    for (int q = 0; q < N; q++) {
        size_t ss = part_start(m, q, N, esz), e = part_start(m, q + 1, N, esz);
        if (q != me && e > ss)
            memcpy(AT(a->recv, off + ss), CAT(fs__shm_buf(s, q, kb), ss), (e - ss) * esz);
    }
    return FS_OK;
}

/* all_reduce (root < 0) or reduce to root: one-shot when small, else chunk by chunk. */
static int do_allreduce(struct run *r, int root)
{
    fs__shm_t *s = r->s;
    const size_t bytes = r->a->count * r->esz, n = r->a->count, chunk = chunk_elems(r, 1);
    const int gets_result = root < 0 || root == s->rank;
    if (bytes <= s->oneshot_max && bytes <= s->buf_bytes)
        return allreduce_oneshot(r, gets_result);
    for (size_t off = 0; off < n; off += chunk) {
        int rc = allreduce_chunk(r, off, n - off < chunk ? n - off : chunk, gets_result);
        if (rc != FS_OK)
            return rc;
    }
    uint64_t k;
    return n == 0 ? step_empty(r, &k) : FS_OK; /* still one step, for the header check */
}

/*
 * broadcast, all_gather, gather: per chunk of `count` elements, the writers (the root
 * for broadcast, every rank otherwise) publish it and the readers copy it.
 */
static int do_whole(struct run *r)
{
    fs__shm_t *s = r->s;
    const fs_coll_args_t *a = r->a;
    const size_t esz = r->esz, n = a->count, chunk = chunk_elems(r, 1);
    const int N = s->world, me = s->rank, root = a->root;
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
            memcpy(fs__shm_buf(s, me, k), CAT(src, off), m * esz);
        if ((rc = step_post(r, k)) != FS_OK)
            return rc;
        if (bcast && me == root) {
            copy(AT(a->recv, off), CAT(src, off), m * esz);
        } else if (bcast && m) {
            if ((rc = fs__shm_wait(s, root, k, r->deadline, r->err)) != FS_OK)
                return rc;
            memcpy(AT(a->recv, off), fs__shm_buf(s, root, k), m * esz);
        } else if (gathers && m) {
            if ((rc = fs__shm_wait_all(s, k, r->deadline, r->err)) != FS_OK)
                return rc;
            for (int q = 0; q < N; q++) {
                const void *from = q == me ? CAT(src, off) : fs__shm_buf(s, q, k);
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
    fs__shm_t *s = r->s;
    const fs_coll_args_t *a = r->a;
    const int N = s->world, me = s->rank, root = a->root;
    const int scatter = a->kind == FS_COLL_SCATTER;
    const size_t esz = r->esz, n = a->count, chunk = chunk_elems(r, (size_t)N);
    size_t off = 0;
    do {
        const size_t m = n - off < chunk ? n - off : chunk;
        uint64_t k;
        int rc = step_begin(r, &k);
        if (rc != FS_OK)
            return rc;
        unsigned char *mine = fs__shm_buf(s, me, k);
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
            rc = fs__shm_wait(s, root, k, r->deadline, r->err);
        else if (!scatter)
            rc = fs__shm_wait_all(s, k, r->deadline, r->err);
        if (rc != FS_OK)
            return rc;
        for (int q = 0; q < N; q++) /* rank q's chunk of my block */
            s->ins[q] = q == me ? CAT(a->send, (size_t)me * n + off)
                                : CAT(fs__shm_buf(s, q, k), (size_t)me * m);
        if (a->kind == FS_COLL_REDUCE_SCATTER) {
            rc = fs_reduce(AT(a->recv, off), s->ins, N, m, a->dtype, a->op, r->err);
            if (rc != FS_OK)
                return rc;
        } else if (scatter) {
            copy(AT(a->recv, off), s->ins[root], m * esz);
        } else {
            for (int q = 0; q < N; q++)
                copy(AT(a->recv, (size_t)q * n + off), s->ins[q], m * esz);
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

int fs__coll_execute(fs__shm_t *s, const fs_coll_args_t *a, int64_t timeout_ms, fs_error_t *err)
{
    int rc = fs__shm_check_usable(s, err);
    if (rc != FS_OK)
        return rc;
    s->coll_seq++;
    struct run r = {.s = s, .a = a, .esz = fs_dtype_size(a->dtype), .first = 1, .err = err};
    if (r.esz == 0)
        r.esz = 1; /* barrier */
    make_header(s, a, &r.hdr);
    describe(s->what, sizeof s->what, &r.hdr);
    r.deadline = fs__deadline_ms(timeout_ms);
    if (s->world == 1)
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
        fs__shm_fail(s, err);
    return rc;
}
