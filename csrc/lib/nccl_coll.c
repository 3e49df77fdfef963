/*
 * nccl_coll.c - collectives on device pointers: argument checks, the dtype
 * and op mapping onto the loaded NCCL, stream ordering (caller's stream ->
 * communication stream -> end event), the NCCL calls, and groups.
 *
 * all_to_all (even and uneven), gather and scatter are grouped
 * ncclSend/ncclRecv, as torch does: they work on every NCCL from 2.7.
 */
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "nccl_internal.h"

/* ------------------------------------------------------------------ */
/* Codes                                                              */
/* ------------------------------------------------------------------ */

struct dtype_info {
    int code;
    fs__ncclDataType_t nccl;
    size_t size;
    unsigned need; /* capability the loaded NCCL must have, 0 for none */
    const char *name;
};

static const struct dtype_info dtypes[] = {
    {FS_FLOAT32, fs__ncclFloat32, 4, 0, "float32"},
    {FS_FLOAT64, fs__ncclFloat64, 8, 0, "float64"},
    {FS_FLOAT16, fs__ncclFloat16, 2, 0, "float16"},
    {FS_BFLOAT16, fs__ncclBfloat16, 2, FS_NCCL_CAP_BFLOAT16, "bfloat16"},
    {FS_INT8, fs__ncclInt8, 1, 0, "int8"},
    {FS_UINT8, fs__ncclUint8, 1, 0, "uint8"},
    {FS_INT32, fs__ncclInt32, 4, 0, "int32"},
    {FS_INT64, fs__ncclInt64, 8, 0, "int64"},
    {FS_BOOL, fs__ncclUint8, 1, 0, "bool"}, /* torch sends bool as uint8 too */
    {FS_NCCL_UINT32, fs__ncclUint32, 4, 0, "uint32"},
    {FS_NCCL_UINT64, fs__ncclUint64, 8, 0, "uint64"},
    {FS_NCCL_FLOAT8_E4M3, fs__ncclFloat8e4m3, 1, FS_NCCL_CAP_FLOAT8, "float8_e4m3fn"},
    {FS_NCCL_FLOAT8_E5M2, fs__ncclFloat8e5m2, 1, FS_NCCL_CAP_FLOAT8, "float8_e5m2"},
};

static const struct dtype_info *dtype_find(int code)
{
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (dtypes[i].code == code)
            return &dtypes[i];
    return NULL;
}

size_t fs_nccl_dtype_size(int dtype)
{
    const struct dtype_info *d = dtype_find(dtype);
    return d != NULL ? d->size : 0;
}

const char *fs_nccl_dtype_name(int dtype)
{
    const struct dtype_info *d = dtype_find(dtype);
    return d != NULL ? d->name : "?";
}

const char *fs_nccl_kind_name(int kind)
{
    switch (kind) {
    case FS_NCCL_SEND: return "send";
    case FS_NCCL_RECV: return "recv";
    case FS_NCCL_ALLTOALLV: return "all_to_all (uneven)";
    default: return fs_coll_name(kind);
    }
}

static int has_op(int kind)
{
    return kind == FS_COLL_ALLREDUCE || kind == FS_COLL_REDUCE_SCATTER || kind == FS_COLL_REDUCE;
}

static int has_root(int kind)
{
    return kind == FS_COLL_BROADCAST || kind == FS_COLL_REDUCE || kind == FS_COLL_GATHER ||
           kind == FS_COLL_SCATTER || kind == FS_NCCL_SEND || kind == FS_NCCL_RECV;
}

static int known_kind(int kind)
{
    return (kind >= 0 && kind < FS_COLL_KIND_COUNT) || kind == FS_NCCL_SEND ||
           kind == FS_NCCL_RECV || kind == FS_NCCL_ALLTOALLV;
}

static int version_error(fs_error_t *err, const char *what, const char *since)
{
    int v = fs_nccl_version();
    return fs_error_set(err, FS_EINVAL, "%s needs NCCL >= %s; the loaded one is %d.%d.%d", what,
                        since, v / 10000, v / 100 % 100, v % 100);
}

/* The NCCL op for (dtype, op); bool follows torch: SUM is MAX, PRODUCT is MIN. */
static int map_op(unsigned caps, int dtype, int op, fs__ncclRedOp_t *out, fs_error_t *err)
{
    switch (op) {
    case FS_SUM: *out = dtype == FS_BOOL ? fs__ncclMax : fs__ncclSum; return FS_OK;
    case FS_PRODUCT: *out = dtype == FS_BOOL ? fs__ncclMin : fs__ncclProd; return FS_OK;
    case FS_MIN: *out = fs__ncclMin; return FS_OK;
    case FS_MAX: *out = fs__ncclMax; return FS_OK;
    case FS_AVG:
        if (dtype == FS_BOOL)
            return fs_error_set(err, FS_EINVAL, "AVG is not defined for bool");
        if (!(caps & FS_NCCL_CAP_AVG))
            return version_error(err, "AVG", "2.10");
        *out = fs__ncclAvg;
        return FS_OK;
    case FS_NCCL_PREMUL_SUM:
        if (dtype == FS_BOOL)
            return fs_error_set(err, FS_EINVAL, "PREMUL_SUM is not defined for bool");
        if (!(caps & FS_NCCL_CAP_PREMUL_SUM))
            return version_error(err, "PREMUL_SUM", "2.11");
        *out = fs__ncclSum; /* replaced by the op ncclRedOpCreatePreMulSum makes */
        return FS_OK;
    case FS_BAND:
    case FS_BOR:
    case FS_BXOR:
        return fs_error_set(err, FS_EINVAL, "NCCL has no bitwise reductions (%s)",
                            fs_redop_name(op));
    default: return fs_error_set(err, FS_EINVAL, "unknown reduce op %d", op);
    }
}

/* ------------------------------------------------------------------ */
/* Argument checks                                                    */
/* ------------------------------------------------------------------ */

/* fs_error_set(FS_EINVAL, ...) whose value a reader (and the analyzer) sees is non-zero. */
#define REFUSE(err, ...) (fs_error_set((err), FS_EINVAL, __VA_ARGS__), FS_EINVAL)

/* Elements each side of the call touches, for the NULL-pointer and overflow checks. */
static int check_sizes(const fs_nccl_args_t *a, int world, size_t esize, fs_error_t *err)
{
    size_t per_rank = a->count;
    if (a->kind == FS_NCCL_ALLTOALLV) {
        if (!a->send_counts || !a->send_displs || !a->recv_counts || !a->recv_displs)
            return fs_error_set(err, FS_EINVAL, "all_to_all (uneven) needs counts and displs");
        return FS_OK;
    }
    if ((size_t)world > SIZE_MAX / esize || per_rank > SIZE_MAX / esize / (size_t)world)
        return fs_error_set(err, FS_ETOOBIG, "%zu elements x %d ranks overflow", per_rank, world);
    int needs_send = a->kind != FS_NCCL_RECV && a->kind != FS_COLL_BROADCAST;
    int needs_recv = a->kind != FS_NCCL_SEND;
    if (per_rank > 0 && ((needs_send && a->send == NULL) || (needs_recv && a->recv == NULL)))
        return fs_error_set(err, FS_EINVAL, "%s of %zu elements: a buffer is NULL",
                            fs_nccl_kind_name(a->kind), per_rank);
    return FS_OK;
}

static int check_args(const struct fs_nccl_comm *c, const fs_nccl_args_t *a,
                      const struct dtype_info **dt, fs__ncclRedOp_t *op, fs_error_t *err)
{
    /* Literal FS_EINVAL before *dt is set: callers use *dt whenever this returns FS_OK. */
    if (!known_kind(a->kind))
        return REFUSE(err, "unknown collective kind %d", a->kind);
    *dt = dtype_find(a->kind == FS_COLL_BARRIER ? FS_UINT8 : a->dtype);
    if (*dt == NULL)
        return REFUSE(err, "unknown dtype code %d", a->dtype);
    if ((*dt)->need != 0 && !(c->nc->caps & (*dt)->need))
        return version_error(err, (*dt)->name, (*dt)->need == FS_NCCL_CAP_FLOAT8 ? "2.24" : "2.10");
    *op = fs__ncclSum;
    if (has_op(a->kind)) {
        int rc = map_op(c->nc->caps, a->dtype, a->op, op, err);
        if (rc != FS_OK)
            return rc;
        if (a->op == FS_NCCL_PREMUL_SUM && a->premul_scalar == NULL)
            return fs_error_set(err, FS_EINVAL, "PREMUL_SUM needs its scalar");
    }
    if (a->kind == FS_COLL_BARRIER)
        return FS_OK; /* no buffers of the caller's */
    if (has_root(a->kind) && (a->root < 0 || a->root >= c->world))
        return fs_error_set(err, FS_EINVAL, "%s: rank %d is not in a world of %d",
                            fs_nccl_kind_name(a->kind), a->root, c->world);
    return check_sizes(a, c->world, (*dt)->size, err);
}

/* ------------------------------------------------------------------ */
/* NCCL calls                                                         */
/* ------------------------------------------------------------------ */

/* First failure of a run of calls inside a group; ncclInProgress there is normal. */
static fs__ncclResult_t first_error(fs__ncclResult_t so_far, fs__ncclResult_t r)
{
    if (so_far != fs__ncclSuccess)
        return so_far;
    return r == fs__ncclInProgress ? fs__ncclSuccess : r;
}

/* The grouped send/recv behind all_to_all, gather and scatter. */
static fs__ncclResult_t enqueue_p2p(struct fs_nccl_comm *c, const fs_nccl_args_t *a,
                                    fs__ncclDataType_t dt, size_t es)
{
    const fs__nccl_api_t *nc = c->nc;
    const char *send = a->send;
    char *recv = a->recv;
    size_t n = a->count;
    fs__ncclResult_t r = first_error(fs__ncclSuccess, nc->ncclGroupStart());
    for (int p = 0; p < c->world && r == fs__ncclSuccess; p++) {
        size_t so = (size_t)p * n * es, sn = n, ro = so, rn = n;
        int do_send = 1, do_recv = 1;
        if (a->kind == FS_NCCL_ALLTOALLV) {
            so = a->send_displs[p] * es, sn = a->send_counts[p];
            ro = a->recv_displs[p] * es, rn = a->recv_counts[p];
        } else if (a->kind == FS_COLL_GATHER) {
            so = 0, do_send = p == a->root, do_recv = c->rank == a->root;
        } else if (a->kind == FS_COLL_SCATTER) {
            ro = 0, do_send = c->rank == a->root, do_recv = p == a->root;
        }
        if (do_send)
            r = first_error(r, nc->ncclSend(send + so, sn, dt, p, c->nccl, c->stream));
        if (do_recv)
            r = first_error(r, nc->ncclRecv(recv + ro, rn, dt, p, c->nccl, c->stream));
    }
    fs__ncclResult_t end = nc->ncclGroupEnd(); /* always: the group must close */
    return r != fs__ncclSuccess ? r : end;
}

static fs__ncclResult_t enqueue(struct fs_nccl_comm *c, const fs_nccl_args_t *a,
                                const struct dtype_info *d, fs__ncclRedOp_t op)
{
    const fs__nccl_api_t *nc = c->nc;
    fs__ncclComm_t n = c->nccl;
    fs__cudaStream_t s = c->stream;
    fs__ncclDataType_t dt = d->nccl;
    switch (a->kind) {
    case FS_COLL_ALLREDUCE: return nc->ncclAllReduce(a->send, a->recv, a->count, dt, op, n, s);
    case FS_COLL_BROADCAST:
        return nc->ncclBroadcast(a->send != NULL ? a->send : a->recv, a->recv, a->count, dt,
                                 a->root, n, s);
    case FS_COLL_REDUCE: return nc->ncclReduce(a->send, a->recv, a->count, dt, op, a->root, n, s);
    case FS_COLL_ALLGATHER: return nc->ncclAllGather(a->send, a->recv, a->count, dt, n, s);
    case FS_COLL_REDUCE_SCATTER:
        return nc->ncclReduceScatter(a->send, a->recv, a->count, dt, op, n, s);
    case FS_NCCL_SEND: return nc->ncclSend(a->send, a->count, dt, a->root, n, s);
    case FS_NCCL_RECV: return nc->ncclRecv(a->recv, a->count, dt, a->root, n, s);
    case FS_COLL_BARRIER:
        return nc->ncclAllReduce(c->scratch, c->scratch, 1, fs__ncclUint8, fs__ncclSum, n, s);
    default: return enqueue_p2p(c, a, dt, d->size);
    }
}

/* Order the communication stream after everything already on the caller's stream. */
static int wait_for_caller(struct fs_nccl_comm *c, uintptr_t stream, fs_error_t *err)
{
    fs__cudaError_t e = c->cu->cudaEventRecord(c->ready, (fs__cudaStream_t)(void *)stream);
    if (e != fs__cudaSuccess) /* a bad stream handle: the caller's, the communicator is fine */
        return fs__cuda_fail(err, c->cu, e, "cudaEventRecord on the caller's stream 0x%jx",
                             (uintmax_t)stream);
    e = c->cu->cudaStreamWaitEvent(c->stream, c->ready, 0);
    if (e != fs__cudaSuccess) {
        fs_error_t why;
        fs__cuda_fail(&why, c->cu, e, "cudaStreamWaitEvent on the communication stream");
        fs__comm_fail(c, why.code, "rank %d: %s", c->rank, why.msg);
        return fs__comm_error(c, err);
    }
    return FS_OK;
}

static int premul_create(struct fs_nccl_comm *c, const fs_nccl_args_t *a, fs__ncclDataType_t dt,
                         fs__ncclRedOp_t *op, fs_error_t *err)
{
    if (c->group_depth > 0 && c->group_nredops == FS__MAX_GROUP_REDOPS)
        return fs_error_set(err, FS_EINVAL, "more than %d PREMUL_SUM calls in one group",
                            FS__MAX_GROUP_REDOPS);
    fs__ncclScalarResidence_t where =
        a->premul_scalar_on_device ? fs__ncclScalarDevice : fs__ncclScalarHostImmediate;
    fs__ncclResult_t r = c->nc->ncclRedOpCreatePreMulSum(op, (void *)(uintptr_t)a->premul_scalar,
                                                         dt, where, c->nccl);
    if (r == fs__ncclSuccess)
        return FS_OK;
    char why[400];
    fs__nccl_describe(c->nc, r, why, sizeof why);
    return fs_error_set(err, fs__nccl_code(r), "ncclRedOpCreatePreMulSum: %s", why);
}

/* An NCCL call failed: bad arguments leave the communicator usable, anything else fails it. */
static int call_failed(struct fs_nccl_comm *c, const fs_nccl_args_t *a, fs__ncclResult_t r,
                       int settled, uint64_t seq, fs_error_t *err)
{
    char why[400];
    fs__nccl_describe(c->nc, r, why, sizeof why);
    if (r == fs__ncclTimeout && settled) {
        fs__comm_fail(c, FS_ETIMEOUT,
                      "rank %d: enqueuing %s (seq %llu) did not finish within the timeout of "
                      "%lld ms; the NCCL communicator was aborted",
                      c->rank, fs_nccl_kind_name(a->kind), (unsigned long long)seq,
                      (long long)c->timeout_ms);
        return fs__comm_error(c, err);
    }
    if (fs__nccl_code(r) == FS_EINVAL && !settled && c->group_depth == 0)
        return fs_error_set(err, FS_EINVAL, "rank %d: %s: %s", c->rank, fs_nccl_kind_name(a->kind),
                            why);
    fs__comm_fail(c, fs__nccl_code(r),
                  "rank %d: %s (seq %llu) failed: %s; the NCCL communicator "
                  "was aborted",
                  c->rank, fs_nccl_kind_name(a->kind), (unsigned long long)seq, why);
    return fs__comm_error(c, err);
}

/* The NCCL side of one call, stream ordering included (mu held, device current). */
static int issue(struct fs_nccl_comm *c, const fs_nccl_args_t *a, const struct dtype_info *d,
                 fs__ncclRedOp_t op, uint64_t seq, fs_error_t *err)
{
    int rc = wait_for_caller(c, a->stream, err);
    int premul = has_op(a->kind) && a->op == FS_NCCL_PREMUL_SUM;
    if (rc == FS_OK && premul)
        rc = premul_create(c, a, d->nccl, &op, err);
    if (rc != FS_OK)
        return rc;
    fs__ncclResult_t r = enqueue(c, a, d, op);
    int settled = r == fs__ncclInProgress && c->group_depth == 0;
    if (settled)
        r = fs__nccl_settle(c, r, fs__deadline_ms(c->timeout_ms));
    else if (r == fs__ncclInProgress)
        r = fs__ncclSuccess; /* inside a group: settled at its end */
    if (premul && c->group_depth > 0)
        c->group_redops[c->group_nredops++] = op;
    else if (premul && c->nccl != NULL)
        (void)c->nc->ncclRedOpDestroy(op, c->nccl); /* allowed once the call returned */
    return r == fs__ncclSuccess ? FS_OK : call_failed(c, a, r, settled, seq, err);
}

/* Usable, and no group of another thread open (mu held). */
static int check_comm(struct fs_nccl_comm *c, fs_error_t *err)
{
    int rc = fs__comm_usable(c, err);
    if (rc == FS_OK && c->group_depth > 0 && !pthread_equal(c->group_thread, pthread_self()))
        rc = fs_error_set(err, FS_EINVAL, "another thread has a group open on this communicator");
    return rc;
}

/* One call outside a group: a work around it. */
static int run_alone(struct fs_nccl_comm *c, const fs_nccl_args_t *a, const struct dtype_info *d,
                     fs__ncclRedOp_t op, fs_nccl_work_t **work, fs_error_t *err)
{
    struct fs_nccl_work *w = NULL;
    int rc = fs__work_new(c, work != NULL, &w, err);
    if (rc != FS_OK)
        return rc;
    w->seq = c->seq + 1; /* taken only once enqueued: a refusal uses no number */
    w->kind = a->kind;
    w->dtype = a->dtype;
    w->count = a->count;
    rc = issue(c, a, d, op, w->seq, err);
    if (rc != FS_OK) {
        fs__work_discard(w);
        return rc;
    }
    c->seq = w->seq;
    rc = fs__work_launch(w, err);
    if (rc == FS_OK && work != NULL)
        *work = w;
    return rc;
}

int fs_nccl_run(fs_nccl_comm_t *c, const fs_nccl_args_t *a, fs_nccl_work_t **work, fs_error_t *err)
{
    if (work != NULL)
        *work = NULL;
    const struct dtype_info *d = NULL;
    fs__ncclRedOp_t op = fs__ncclSum;
    int rc = fs__comm_enter(c, err);
    if (rc != FS_OK)
        return rc;
    rc = check_comm(c, err);
    if (rc == FS_OK)
        rc = check_args(c, a, &d, &op, err);
    int prev = -1;
    if (rc == FS_OK)
        rc = fs__device_enter(c, err, &prev);
    if (rc != FS_OK)
        goto out;
    if (c->group_depth == 0) {
        rc = run_alone(c, a, d, op, work, err);
    } else if ((rc = issue(c, a, d, op, c->seq, err)) == FS_OK && c->group_nops++ == 0) {
        c->group_kind = a->kind;
        c->group_dtype = a->dtype;
        c->group_count = a->count;
    }
    fs__device_leave(c, prev);
out:
    fs__unlock(&c->mu);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Groups                                                             */
/* ------------------------------------------------------------------ */

int fs_nccl_group_start(fs_nccl_comm_t *c, fs_error_t *err)
{
    int rc = fs__comm_enter(c, err);
    if (rc != FS_OK)
        return rc;
    rc = check_comm(c, err);
    if (rc == FS_OK) {
        fs__ncclResult_t r = c->nc->ncclGroupStart();
        if (r != fs__ncclSuccess && r != fs__ncclInProgress) {
            char why[400];
            fs__nccl_describe(c->nc, r, why, sizeof why);
            rc = fs_error_set(err, fs__nccl_code(r), "ncclGroupStart: %s", why);
        } else if (c->group_depth++ == 0) {
            c->group_thread = pthread_self();
            c->group_nops = 0;
            c->group_nredops = 0;
            c->seq++; /* the whole group is one sequence number */
        }
    }
    fs__unlock(&c->mu);
    return rc;
}

/* ncclGroupEnd of the outermost group: launch, settle, free the premul ops (mu held). */
static fs__ncclResult_t end_outermost(struct fs_nccl_comm *c, int *settled)
{
    fs__ncclResult_t r = c->nc->ncclGroupEnd();
    *settled = r == fs__ncclInProgress;
    if (*settled)
        r = fs__nccl_settle(c, r, fs__deadline_ms(c->timeout_ms));
    for (int i = 0; i < c->group_nredops && c->nccl != NULL; i++)
        (void)c->nc->ncclRedOpDestroy(c->group_redops[i], c->nccl);
    c->group_nredops = 0;
    return r;
}

/* The group's work: its end event on the communication stream (mu held). */
static int group_work(struct fs_nccl_comm *c, fs_nccl_work_t **work, fs_error_t *err)
{
    struct fs_nccl_work *w = NULL;
    int prev = -1;
    int rc = fs__device_enter(c, err, &prev);
    if (rc == FS_OK)
        rc = fs__work_new(c, work != NULL, &w, err);
    if (rc == FS_OK) {
        w->seq = c->seq;
        w->kind = c->group_kind;
        w->dtype = c->group_dtype;
        w->count = c->group_count;
        w->nops = c->group_nops;
        rc = fs__work_launch(w, err);
        if (rc == FS_OK && work != NULL)
            *work = w;
    }
    fs__device_leave(c, prev);
    return rc;
}

int fs_nccl_group_end(fs_nccl_comm_t *c, fs_nccl_work_t **work, fs_error_t *err)
{
    if (work != NULL)
        *work = NULL;
    int rc = fs__comm_enter(c, err);
    if (rc != FS_OK)
        return rc;
    if (c->group_depth == 0 || !pthread_equal(c->group_thread, pthread_self())) {
        rc = fs_error_set(err, FS_EINVAL, "no group of this thread is open");
        goto out;
    }
    if (--c->group_depth > 0) {
        (void)c->nc->ncclGroupEnd(); /* nested: NCCL launches at the outermost end only */
        goto out;
    }
    int settled = 0;
    fs__ncclResult_t r = end_outermost(c, &settled);
    if (c->status != FS_OK) { /* failed while the group was open: abort now (fs__comm_fail) */
        fs__comm_fail(c, c->status, "%s", c->error.msg);
        rc = fs__comm_error(c, err);
    } else if (r != fs__ncclSuccess)
        rc = call_failed(c, &(fs_nccl_args_t){.kind = c->group_kind}, r, settled, c->seq, err);
    else if (c->group_nops > 0)
        rc = group_work(c, work, err);
out:
    fs__unlock(&c->mu);
    return rc;
}
