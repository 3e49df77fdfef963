/*
 * test_coll.c - shared-memory CPU collectives (shm.c, coll_cpu.c, comm.c, reduce.c).
 *
 * Each multi-rank test forks its ranks inside the test process; every rank
 * checks its own results against a scalar reference computed in the same rank
 * order (so "equal to the reference" also means "bit-identical across ranks").
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>

#include "fastspawn.h"
#include "fs_test.h"
#include "shm.h" /* the handle format, to forge bad ones */

/* ------------------------------------------------------------------ */
/* Helpers: random data, reference reduction                          */
/* ------------------------------------------------------------------ */

static uint64_t rng(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double rng_unit(uint64_t *s)
{
    return (double)(rng(s) >> 11) / 9007199254740992.0;
}

/* Independent of reduce.c's bit tricks: plain arithmetic with ldexp/nearbyint (RNE). */
static float h2f_ref(uint16_t h)
{
    int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 0)
        v = ldexpf((float)m, -24);
    else if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = ldexpf((float)(1024 + m), e - 25);
    return sign ? -v : v;
}

/* Round f to a 16-bit float with `mbits` mantissa and `ebits` exponent bits, RNE. */
static uint16_t round16_ref(float f, int mbits, int ebits, uint16_t nan)
{
    int bias = (1 << (ebits - 1)) - 1, emax = (1 << ebits) - 1;
    uint16_t sign = signbit(f) ? 0x8000u : 0, inf = (uint16_t)(emax << mbits);
    if (isnan(f))
        return nan;
    double a = fabs((double)f);
    if (isinf(f))
        return sign | inf;
    if (a < ldexp(1.0, 1 - bias)) /* subnormal (may round up to the smallest normal) */
        return sign | (uint16_t)nearbyint(ldexp(a, bias - 1 + mbits));
    int ex;
    (void)frexp(a, &ex);
    int E = ex - 1;
    double mant = nearbyint(ldexp(a, mbits - E));
    if (mant >= ldexp(1.0, mbits + 1)) {
        mant = ldexp(1.0, mbits);
        E++;
    }
    if (E + bias >= emax)
        return sign | inf;
    return sign | (uint16_t)(((E + bias) << mbits) | ((int)mant - (1 << mbits)));
}

static uint16_t f2h_ref(float f)
{
    return round16_ref(f, 10, 5, signbit(f) ? 0xfe00u : 0x7e00u);
}

static float bf2f_ref(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t f2bf_ref(float f)
{
    return round16_ref(f, 7, 8, 0x7fc0u);
}

static const int all_dtypes[] = {FS_FLOAT32, FS_FLOAT64, FS_FLOAT16, FS_BFLOAT16, FS_INT8,
                                 FS_UINT8,   FS_INT32,   FS_INT64,   FS_BOOL};
#define NDTYPES ((int)(sizeof all_dtypes / sizeof all_dtypes[0]))

static void fill(void *buf, int dtype, size_t count, uint64_t seed)
{
    uint64_t s = seed * 7919 + (uint64_t)dtype;
    unsigned char *p = buf;
    for (size_t i = 0; i < count; i++) {
        double v = (rng_unit(&s) - 0.5) * 8.0;
        uint64_t r = rng(&s);
        switch (dtype) {
        case FS_FLOAT32: {
            float f = (float)v;
            memcpy(p + i * 4, &f, 4);
            break;
        }
        case FS_FLOAT64: memcpy(p + i * 8, &v, 8); break;
        case FS_FLOAT16: {
            uint16_t h = f2h_ref((float)v);
            memcpy(p + i * 2, &h, 2);
            break;
        }
        case FS_BFLOAT16: {
            uint16_t h = f2bf_ref((float)v);
            memcpy(p + i * 2, &h, 2);
            break;
        }
        case FS_INT8:
        case FS_UINT8: p[i] = (unsigned char)r; break;
        case FS_INT32: {
            uint32_t x = (uint32_t)r;
            memcpy(p + i * 4, &x, 4);
            break;
        }
        case FS_INT64: memcpy(p + i * 8, &r, 8); break;
        case FS_BOOL: p[i] = (unsigned char)(r & 1); break;
        default: break;
        }
    }
}

/*
 * One step of a floating reduction, in double. For float32 operands the result cast
 * back to float is the float32 result: double has more than 2 * 24 + 2 bits, so the
 * double rounding is harmless for + and *.
 */
static double combine_f(double a, double b, int op)
{
    switch (op) {
    case FS_SUM:
    case FS_AVG: return a + b;
    case FS_PRODUCT: return a * b;
    case FS_MIN: return (a < b || a != a) ? a : b;
    case FS_MAX: return (a > b || a != a) ? a : b;
    default: return 0;
    }
}

static uint64_t combine_u(uint64_t a, uint64_t b, int64_t sa, int64_t sb, int op, int is_signed)
{
    switch (op) {
    case FS_SUM: return a + b;
    case FS_PRODUCT: return a * b;
    case FS_MIN: return is_signed ? (sa < sb ? a : b) : (a < b ? a : b);
    case FS_MAX: return is_signed ? (sa > sb ? a : b) : (a > b ? a : b);
    case FS_BAND: return a & b;
    case FS_BOR: return a | b;
    case FS_BXOR: return a ^ b;
    default: return 0;
    }
}

#define REF_FLOAT(T)                                                                               \
    do {                                                                                           \
        T acc, x;                                                                                  \
        memcpy(&acc, e0, sizeof acc);                                                              \
        for (int q = 1; q < nin; q++) {                                                            \
            memcpy(&x, (const unsigned char *)in[q] + i * sizeof x, sizeof x);                     \
            acc = (T)combine_f(acc, x, op);                                                        \
        }                                                                                          \
        if (op == FS_AVG)                                                                          \
            acc = acc / (T)nin;                                                                    \
        memcpy(o, &acc, sizeof acc);                                                               \
    } while (0)

/* Reference: element i = in[0][i] op in[1][i] op ... in this order. */
static void ref_reduce(void *out, const void *const *in, int nin, size_t count, int dtype, int op)
{
    size_t esz = fs_dtype_size(dtype);
    for (size_t i = 0; i < count; i++) {
        const unsigned char *e0 = (const unsigned char *)in[0] + i * esz;
        unsigned char *o = (unsigned char *)out + i * esz;
        switch (dtype) {
        case FS_FLOAT32: REF_FLOAT(float); break;
        case FS_FLOAT64: REF_FLOAT(double); break;
        case FS_FLOAT16:
        case FS_BFLOAT16: {
            uint16_t h;
            memcpy(&h, e0, 2);
            float acc = dtype == FS_FLOAT16 ? h2f_ref(h) : bf2f_ref(h);
            for (int q = 1; q < nin; q++) {
                memcpy(&h, (const unsigned char *)in[q] + i * 2, 2);
                acc = (float)combine_f(acc, dtype == FS_FLOAT16 ? h2f_ref(h) : bf2f_ref(h), op);
            }
            if (op == FS_AVG)
                acc = acc / (float)nin;
            h = dtype == FS_FLOAT16 ? f2h_ref(acc) : f2bf_ref(acc);
            memcpy(o, &h, 2);
            break;
        }
        case FS_BOOL: {
            int acc = e0[0] != 0;
            for (int q = 1; q < nin; q++) {
                int x = ((const unsigned char *)in[q])[i] != 0;
                if (op == FS_SUM || op == FS_MAX || op == FS_BOR)
                    acc = acc | x;
                else if (op == FS_BXOR)
                    acc = acc ^ x;
                else
                    acc = acc & x;
            }
            o[0] = (unsigned char)acc;
            break;
        }
        default: {
            int sgn = dtype != FS_UINT8;
            uint64_t mask = esz == 8 ? ~0ULL : ((1ULL << (esz * 8)) - 1);
            uint64_t acc = 0;
            memcpy(&acc, e0, esz); /* little-endian */
            for (int q = 1; q < nin; q++) {
                uint64_t x = 0;
                memcpy(&x, (const unsigned char *)in[q] + i * esz, esz);
                int64_t sa, sx;
                if (esz == 1) {
                    sa = (int8_t)(uint8_t)acc;
                    sx = (int8_t)(uint8_t)x;
                } else if (esz == 4) {
                    sa = (int32_t)(uint32_t)acc;
                    sx = (int32_t)(uint32_t)x;
                } else {
                    sa = (int64_t)acc;
                    sx = (int64_t)x;
                }
                acc = combine_u(acc, x, sa, sx, op, sgn) & mask;
            }
            memcpy(o, &acc, esz);
            break;
        }
        }
    }
}

/* ------------------------------------------------------------------ */
/* Rank runner                                                        */
/* ------------------------------------------------------------------ */

typedef int (*rank_fn)(fs_comm_t *c, int rank, int world, void *arg);

/* A page shared by the test process and its ranks (created before the forks). */
static void *shared_page(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    memset(p, 0, bytes);
    return p;
}

/* ------------------------------------------------------------------ */
/* What a test may leave: /dev/shm entries, fds, memfds                */
/* ------------------------------------------------------------------ */

#define SHM_LIST_MAX 512
struct shm_list {
    int n;
    char names[SHM_LIST_MAX][256];
};

/* A name this library makes: "fastspawn-" and 32 hex digits. Other jobs on the machine
   (older builds named theirs "fastspawn-<pid>-<hex>") may come and go meanwhile. */
static int our_shm_name(const char *n)
{
    return strncmp(n, "fastspawn-", 10) == 0 && strlen(n) == 10 + 32 &&
           strspn(n + 10, "0123456789abcdef") == 32;
}

/* The entries of /dev/shm this library may have made. */
static void shm_snapshot(struct shm_list *l)
{
    l->n = 0;
    DIR *d = opendir("/dev/shm");
    struct dirent *e;
    while (d != NULL && (e = readdir(d)) != NULL && l->n < SHM_LIST_MAX) {
        if (our_shm_name(e->d_name))
            snprintf(l->names[l->n++], sizeof l->names[0], "%s", e->d_name);
    }
    if (d != NULL)
        closedir(d);
}

/* How many such entries of /dev/shm were not there in `before` (each printed). */
static int shm_new_entries(const struct shm_list *before)
{
    static struct shm_list now; /* 128 KB: not on a rank's stack */
    shm_snapshot(&now);
    int fresh = 0;
    for (int i = 0; i < now.n; i++) {
        int seen = 0;
        for (int j = 0; j < before->n && !seen; j++)
            seen = strcmp(now.names[i], before->names[j]) == 0;
        if (!seen) {
            fprintf(stderr, "  new in /dev/shm: %s\n", now.names[i]);
            fresh++;
        }
    }
    return fresh;
}

static int open_fd_count(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    while (d != NULL && readdir(d) != NULL)
        n++;
    if (d != NULL)
        closedir(d);
    return n;
}

/* fds of this process that are a fastspawn memfd. */
static int memfd_fds(void)
{
    char path[300], link[128];
    int found = 0;
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    while (d != NULL && (e = readdir(d)) != NULL) {
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, link, sizeof link - 1);
        if (n > 0) {
            link[n] = '\0';
            found += strncmp(link, "/memfd:fastspawn", 16) == 0;
        }
    }
    if (d != NULL)
        closedir(d);
    return found;
}

/* 1 if this process still maps a fastspawn memfd. */
static int maps_memfd(void)
{
    char line[512];
    int found = 0;
    FILE *maps = fopen("/proc/self/maps", "r");
    while (maps != NULL && fgets(line, sizeof line, maps) != NULL)
        found |= strstr(line, "/memfd:fastspawn") != NULL;
    if (maps != NULL)
        fclose(maps);
    return found;
}

/* ------------------------------------------------------------------ */
/* Communicators of forked ranks                                      */
/* ------------------------------------------------------------------ */

/* Rank 0's handle, passed to the other ranks through a shared page (as a store would). */
struct rendezvous {
    _Atomic int state;  /* 0: not yet, 1: handle valid, -1: rank 0 failed */
    _Atomic int opened; /* ranks past fs_comm_open */
    char handle[FS_COMM_HANDLE_MAX];
};

static int wait_handle(struct rendezvous *rv, fs_error_t *err)
{
    int64_t until = fs_now_ms() + 20000;
    while (atomic_load(&rv->state) == 0 && fs_now_ms() < until)
        usleep(200);
    if (atomic_load(&rv->state) != 1)
        return fs_error_set(err, FS_ETIMEOUT, "no handle from rank 0");
    return FS_OK;
}

/* Rank r's communicator, attached but not joined: rank 0 creates it and posts the handle,
   the others open it. */
static int attach_comm(struct rendezvous *rv, int r, int world, const fs_comm_opts_t *opts,
                       fs_comm_t **c, fs_error_t *err)
{
    int rc;
    if (r == 0) {
        rc = fs_comm_create(world, opts, c, err);
        if (rc == FS_OK)
            snprintf(rv->handle, sizeof rv->handle, "%s", fs_comm_handle(*c));
        atomic_store(&rv->state, rc == FS_OK ? 1 : -1);
        return rc;
    }
    rc = wait_handle(rv, err);
    if (rc == FS_OK)
        rc = fs_comm_open(rv->handle, r, world, opts, c, err);
    atomic_fetch_add(&rv->opened, 1);
    return rc;
}

/* attach_comm, then join; no rank holds an fd of the segment once joined. */
static int make_comm(struct rendezvous *rv, int r, int world, const fs_comm_opts_t *opts,
                     fs_comm_t **c, fs_error_t *err)
{
    int rc = attach_comm(rv, r, world, opts, c, err);
    if (rc == FS_OK && (rc = fs_comm_join(*c, err)) != FS_OK) {
        fs_comm_destroy(*c);
        *c = NULL;
    }
    if (rc == FS_OK)
        FS_CHECK_EQ(memfd_fds(), 0);
    return rc;
}

/* Fork `world` ranks that each make the communicator and run fn; returns failed ranks.
   Every rank checks that destroying left it no fd and no memfd; nothing may be left in
   /dev/shm. */
static int run_ranks(int world, const fs_comm_opts_t *opts, rank_fn fn, void *arg)
{
    static struct shm_list before;
    shm_snapshot(&before);
    struct rendezvous *rv = shared_page(sizeof *rv);
    pid_t pids[16];
    fflush(NULL);
    for (int r = 0; r < world; r++) {
        pids[r] = fork();
        if (pids[r] < 0) {
            perror("fork");
            exit(2);
        }
        if (pids[r] == 0) {
            fs_error_t err;
            fs_comm_t *c = NULL;
            int fds = open_fd_count();
            int rc = make_comm(rv, r, world, opts, &c, &err);
            if (rc != FS_OK) {
                fprintf(stderr, "  rank %d: making the communicator: %s\n", r, err.msg);
                exit(3);
            }
            int bad = fn(c, r, world, arg);
            fs_comm_destroy(c);
            FS_CHECK_EQ(open_fd_count(), fds);
            FS_CHECK(!maps_memfd());
            fflush(NULL);
            exit(bad != 0 || fs_test_failed_checks != 0 ? 1 : 0);
        }
    }
    int failed = 0;
    for (int r = 0; r < world; r++) {
        int st = 0;
        while (waitpid(pids[r], &st, 0) < 0 && errno == EINTR) {
        }
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "  rank %d failed (%s %d)\n", r, WIFSIGNALED(st) ? "signal" : "exit",
                    WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
            failed++;
        }
    }
    FS_CHECK_EQ(shm_new_entries(&before), 0);
    munmap(rv, sizeof *rv);
    return failed;
}

/* Defaults, with this kind of segment and connect timeout. */
static void kind_opts(fs_comm_opts_t *o, int kind, int64_t connect_timeout_ms)
{
    fs_comm_opts_init(o);
    o->shm = kind;
    o->connect_timeout_ms = connect_timeout_ms;
}

static void small_opts(fs_comm_opts_t *o)
{
    fs_comm_opts_init(o);
    o->slot_bytes = 16 << 10; /* chunking and multi-step paths with small data */
    o->timeout_ms = 20000;
    o->connect_timeout_ms = 10000;
}

/* ------------------------------------------------------------------ */
/* Reduction kernels                                                  */
/* ------------------------------------------------------------------ */

FS_TEST(reduce_kernels_match_reference)
{
    static const size_t sizes[] = {0, 1, 7, 15, 16, 17, 63, 64, 65, 1023, 1025, 3001};
    fs_error_t err;
    for (int di = 0; di < NDTYPES; di++) {
        int dt = all_dtypes[di];
        size_t esz = fs_dtype_size(dt);
        for (int op = 0; op < FS_REDOP_COUNT; op++) {
            if (!fs_reduce_supported(dt, op))
                continue;
            for (int nin = 1; nin <= 5; nin++) {
                for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
                    size_t n = sizes[si];
                    unsigned char *in[5], *out = malloc(n * esz + 1), *ref = malloc(n * esz + 1);
                    for (int q = 0; q < nin; q++) {
                        in[q] = malloc(n * esz + 1);
                        fill(in[q], dt, n, (uint64_t)(q * 131 + si));
                    }
                    ref_reduce(ref, (const void *const *)in, nin, n, dt, op);
                    FS_CHECK_OK(fs_reduce(out, (const void *const *)in, nin, n, dt, op, &err),
                                &err);
                    if (memcmp(out, ref, n * esz) != 0) {
                        fprintf(stderr, "  %s %s nin=%d n=%zu differs\n", fs_dtype_name(dt),
                                fs_redop_name(op), nin, n);
                        FS_CHECK(0);
                    }
                    /* out may be any of the inputs */
                    int alias = (int)(si % (size_t)nin);
                    FS_CHECK_OK(fs_reduce(in[alias], (const void *const *)in, nin, n, dt, op, &err),
                                &err);
                    FS_CHECK(memcmp(in[alias], ref, n * esz) == 0);
                    for (int q = 0; q < nin; q++)
                        free(in[q]);
                    free(out);
                    free(ref);
                }
            }
        }
    }
}

FS_TEST(reduce_half_all_values)
{
    /* Every float16 / bfloat16 bit pattern through widen + op + round. */
    enum { N = 65536 };
    uint16_t *a = malloc(N * 2), *b = malloc(N * 2), *out = malloc(N * 2), *ref = malloc(N * 2);
    fs_error_t err;
    uint64_t s = 5;
    for (int i = 0; i < N; i++) {
        a[i] = (uint16_t)i;
        b[i] = (uint16_t)rng(&s);
    }
    for (int dt = FS_FLOAT16; dt <= FS_BFLOAT16; dt++) {
        for (int op = FS_SUM; op <= FS_PRODUCT; op++) {
            const void *in[2] = {a, b};
            ref_reduce(ref, in, 2, N, dt, op);
            FS_CHECK_OK(fs_reduce(out, in, 2, N, dt, op, &err), &err);
            int bad = 0;
            for (int i = 0; i < N && bad < 5; i++) {
                if (out[i] != ref[i]) {
                    fprintf(stderr, "  %s %s: %04x op %04x = %04x, want %04x\n", fs_dtype_name(dt),
                            fs_redop_name(op), a[i], b[i], out[i], ref[i]);
                    bad++;
                }
            }
            FS_CHECK_EQ(bad, 0);
        }
    }
    free(a);
    free(b);
    free(out);
    free(ref);
}

FS_TEST(reduce_float_specials)
{
    float a[8] = {NAN, 1.0f, -0.0f, INFINITY, -INFINITY, 2.0f, NAN, 3.0f};
    float b[8] = {1.0f, NAN, 0.0f, -INFINITY, 5.0f, INFINITY, NAN, 3.0f};
    float out[8];
    const void *in[2] = {a, b};
    fs_error_t err;
    FS_CHECK_OK(fs_reduce(out, in, 2, 8, FS_FLOAT32, FS_MIN, &err), &err);
    FS_CHECK(isnan(out[0]) && isnan(out[1]) && isnan(out[6]));
    FS_CHECK(out[3] == -INFINITY && out[4] == -INFINITY && out[5] == 2.0f && out[7] == 3.0f);
    FS_CHECK_OK(fs_reduce(out, in, 2, 8, FS_FLOAT32, FS_MAX, &err), &err);
    FS_CHECK(isnan(out[0]) && isnan(out[1]) && out[3] == INFINITY && out[5] == INFINITY);
    FS_CHECK_OK(fs_reduce(out, in, 2, 8, FS_FLOAT32, FS_SUM, &err), &err);
    FS_CHECK(isnan(out[3]) && out[2] == 0.0f && !signbit(out[2]));
}

FS_TEST(reduce_rejects_unsupported)
{
    int32_t x[4] = {0};
    float f[4] = {0};
    const void *in[2] = {x, x};
    const void *fin[2] = {f, f};
    fs_error_t err;
    FS_CHECK_EQ(fs_reduce(x, in, 2, 4, FS_INT32, FS_AVG, &err), FS_EINVAL);
    FS_CHECK(strstr(err.msg, "AVG") != NULL);
    FS_CHECK_EQ(fs_reduce(f, fin, 2, 4, FS_FLOAT32, FS_BXOR, &err), FS_EINVAL);
    FS_CHECK_EQ(fs_reduce(f, fin, 2, 4, 99, FS_SUM, &err), FS_EINVAL);
    printf("  reduce kernels: %s\n", fs_reduce_isa());
}

/* ------------------------------------------------------------------ */
/* Every collective x dtype x op x size                              */
/* ------------------------------------------------------------------ */

static uint64_t seed_of(int rank, int iter)
{
    return (uint64_t)rank * 1000003u + (uint64_t)iter;
}

/* Run one collective on this rank and compare with what it must produce. */
static int check_one(fs_comm_t *c, int me, int N, int kind, int dt, int op, int root, size_t n,
                     int iter)
{
    size_t esz = fs_dtype_size(dt);
    size_t in_elems = n, out_elems = n;
    switch (kind) {
    case FS_COLL_ALLGATHER:
    case FS_COLL_GATHER: out_elems = n * (size_t)N; break;
    case FS_COLL_REDUCE_SCATTER:
    case FS_COLL_SCATTER: in_elems = n * (size_t)N; break;
    case FS_COLL_ALLTOALL: in_elems = out_elems = n * (size_t)N; break;
    default: break;
    }
    unsigned char **ins = malloc((size_t)N * sizeof *ins);
    for (int q = 0; q < N; q++) {
        ins[q] = malloc(in_elems * esz + 1);
        fill(ins[q], dt, in_elems, seed_of(q, iter));
    }
    unsigned char *send = malloc(in_elems * esz + 1), *recv = malloc(out_elems * esz + 1);
    unsigned char *want = malloc(out_elems * esz + 1);
    memcpy(send, ins[me], in_elems * esz);
    memset(recv, 0xa5, out_elems * esz);
    memcpy(want, recv, out_elems * esz);
    int check = 1;
    switch (kind) {
    case FS_COLL_ALLREDUCE: ref_reduce(want, (const void *const *)ins, N, n, dt, op); break;
    case FS_COLL_REDUCE:
        if (me == root)
            ref_reduce(want, (const void *const *)ins, N, n, dt, op);
        break;
    case FS_COLL_BROADCAST:
        if (me == root)
            memcpy(recv, ins[me], n * esz);
        memcpy(want, ins[root], n * esz);
        break;
    case FS_COLL_ALLGATHER:
    case FS_COLL_GATHER:
        if (kind == FS_COLL_ALLGATHER || me == root)
            for (int q = 0; q < N; q++)
                memcpy(want + (size_t)q * n * esz, ins[q], n * esz);
        break;
    case FS_COLL_REDUCE_SCATTER: {
        const void **blk = malloc((size_t)N * sizeof *blk);
        for (int q = 0; q < N; q++)
            blk[q] = ins[q] + (size_t)me * n * esz;
        ref_reduce(want, blk, N, n, dt, op);
        free(blk);
        break;
    }
    case FS_COLL_SCATTER: memcpy(want, ins[root] + (size_t)me * n * esz, n * esz); break;
    case FS_COLL_ALLTOALL:
        for (int q = 0; q < N; q++)
            memcpy(want + (size_t)q * n * esz, ins[q] + (size_t)me * n * esz, n * esz);
        break;
    default: check = 0; break;
    }
    fs_coll_args_t a = {.kind = kind,
                        .dtype = dt,
                        .op = op,
                        .root = root,
                        .send = kind == FS_COLL_BROADCAST ? NULL : send,
                        .recv = recv,
                        .count = n};
    fs_error_t err;
    int rc = fs_comm_run(c, &a, &err);
    int bad = 0;
    if (rc != FS_OK) {
        fprintf(stderr, "  rank %d: %s failed: %s\n", me, fs_coll_name(kind), err.msg);
        bad = 1;
    } else if (check && memcmp(recv, want, out_elems * esz) != 0) {
        size_t i = 0;
        while (i < out_elems * esz && recv[i] == want[i])
            i++;
        fprintf(stderr, "  rank %d/%d: %s %s %s root %d n=%zu: wrong byte %zu\n", me, N,
                fs_coll_name(kind), fs_dtype_name(dt), fs_redop_name(op), root, n, i);
        bad = 1;
    }
    for (int q = 0; q < N; q++)
        free(ins[q]);
    free(ins);
    free(send);
    free(recv);
    free(want);
    return bad;
}

static int all_kinds_rank(fs_comm_t *c, int me, int N, void *arg)
{
    (void)arg;
    const size_t sizes[] = {0, 1, 7, 1023, 4099, 100003};
    int iter = 0, bad = 0;
    for (int kind = 0; kind < FS_COLL_KIND_COUNT && !bad; kind++) {
        int reduces =
            kind == FS_COLL_ALLREDUCE || kind == FS_COLL_REDUCE || kind == FS_COLL_REDUCE_SCATTER;
        int rooted = kind == FS_COLL_BROADCAST || kind == FS_COLL_REDUCE ||
                     kind == FS_COLL_GATHER || kind == FS_COLL_SCATTER;
        for (int di = 0; di < NDTYPES && !bad; di++) {
            int dt = all_dtypes[di];
            for (int op = 0; op < (reduces ? FS_REDOP_COUNT : 1) && !bad; op++) {
                if (reduces && !fs_reduce_supported(dt, op))
                    continue;
                for (size_t si = 0; si < sizeof sizes / sizeof sizes[0] && !bad; si++) {
                    size_t n = sizes[si];
                    /* Keep the big size to a few representative cases. */
                    if (n > 5000 && (op > FS_AVG || (di % 3) != kind % 3))
                        continue;
                    if (kind == FS_COLL_BARRIER && (di > 0 || si > 0))
                        continue;
                    int root = rooted ? (int)(si + (size_t)di) % N : 0;
                    bad |= check_one(c, me, N, kind, dt, op, root, n, iter++);
                }
            }
        }
    }
    return bad;
}

#define ALL_KINDS_TEST(NRANKS)                                                                     \
    FS_TEST(coll_all_kinds_world_##NRANKS)                                                         \
    {                                                                                              \
        fs_comm_opts_t o;                                                                          \
        small_opts(&o);                                                                            \
        FS_CHECK_EQ(run_ranks(NRANKS, &o, all_kinds_rank, NULL), 0);                               \
    }
ALL_KINDS_TEST(1)
ALL_KINDS_TEST(2)
ALL_KINDS_TEST(3)
ALL_KINDS_TEST(4)
ALL_KINDS_TEST(5)

/* Default segment: the large-message path (chunked reduce-scatter + all-gather). */
static int big_allreduce_rank(fs_comm_t *c, int me, int N, void *arg)
{
    (void)arg;
    const size_t sizes[] = {(64 << 10) / 4, (64 << 10) / 4 + 1, (3 << 20) + 5, (5 << 20) + 3};
    int bad = 0, iter = 0;
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        bad |= check_one(c, me, N, FS_COLL_ALLREDUCE, FS_FLOAT32, FS_SUM, 0, sizes[si], iter++);
        bad |= check_one(c, me, N, FS_COLL_ALLREDUCE, FS_BFLOAT16, FS_AVG, 0, sizes[si], iter++);
        bad |=
            check_one(c, me, N, FS_COLL_REDUCE, FS_FLOAT64, FS_MAX, N - 1, sizes[si] / 2, iter++);
    }
    bad |= check_one(c, me, N, FS_COLL_BROADCAST, FS_INT64, 0, 1, (2 << 20) + 1, iter++);
    bad |= check_one(c, me, N, FS_COLL_ALLGATHER, FS_INT32, 0, 0, (1 << 20) + 1, iter++);
    return bad;
}

FS_TEST(coll_large_messages_default_segment)
{
    fs_comm_opts_t o;
    fs_comm_opts_init(&o);
    o.timeout_ms = 30000;
    FS_CHECK_EQ(run_ranks(2, &o, big_allreduce_rank, NULL), 0);
    FS_CHECK_EQ(run_ranks(3, &o, big_allreduce_rank, NULL), 0);
}

/* ------------------------------------------------------------------ */
/* In place, bit-identical, async                                     */
/* ------------------------------------------------------------------ */

static int in_place_rank(fs_comm_t *c, int me, int N, void *arg)
{
    (void)arg;
    fs_error_t err;
    int bad = 0;
    for (size_t n = 1; n < 20000; n = n * 7 + 3) {
        float *buf = malloc(n * (size_t)N * sizeof *buf), *want = malloc(n * (size_t)N * 4);
        /* all_reduce in place */
        for (size_t i = 0; i < n; i++)
            buf[i] = (float)(me + 1) * (float)i;
        FS_CHECK_OK(fs_allreduce(c, buf, buf, n, FS_FLOAT32, FS_SUM, &err), &err);
        for (size_t i = 0; i < n; i++)
            bad |= buf[i] != (float)(N * (N + 1) / 2) * (float)i;
        /* all_gather in place: my block already sits at its place in recv */
        for (size_t i = 0; i < n * (size_t)N; i++)
            buf[i] = (size_t)me == i / n ? (float)i : -1.0f;
        FS_CHECK_OK(fs_allgather(c, buf + (size_t)me * n, buf, n, FS_FLOAT32, &err), &err);
        for (size_t i = 0; i < n * (size_t)N; i++)
            bad |= buf[i] != (float)i;
        /* all_to_all in place: block q goes to rank q */
        for (size_t i = 0; i < n * (size_t)N; i++) {
            buf[i] = (float)(me * 1000000 + (int)i);
            size_t q = i / n, j = i % n;
            want[i] = (float)((int)q * 1000000 + me * (int)n + (int)j);
        }
        FS_CHECK_OK(fs_alltoall(c, buf, buf, n, FS_FLOAT32, &err), &err);
        bad |= memcmp(buf, want, n * (size_t)N * 4) != 0;
        /* reduce_scatter with recv being my block of send */
        for (size_t i = 0; i < n * (size_t)N; i++)
            buf[i] = (float)i;
        FS_CHECK_OK(fs_reduce_scatter(c, buf, buf + (size_t)me * n, n, FS_FLOAT32, FS_SUM, &err),
                    &err);
        for (size_t j = 0; j < n; j++)
            bad |= buf[(size_t)me * n + j] != (float)N * (float)((size_t)me * n + j);
        free(buf);
        free(want);
    }
    if (bad)
        fprintf(stderr, "  rank %d: in-place results wrong\n", me);
    return bad;
}

FS_TEST(coll_in_place)
{
    fs_comm_opts_t o;
    small_opts(&o);
    FS_CHECK_EQ(run_ranks(3, &o, in_place_rank, NULL), 0);
}

static uint64_t hash_bytes(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ULL;
    return h;
}

struct hashes {
    uint64_t h[8][8];
};

static int identical_rank(fs_comm_t *c, int me, int N, void *arg)
{
    struct hashes *hs = arg;
    fs_error_t err;
    const size_t sizes[] = {1000, 100000, 3000001};
    for (int t = 0; t < 6; t++) {
        size_t n = sizes[t % 3];
        int dt = t < 3 ? FS_FLOAT32 : FS_BFLOAT16;
        size_t esz = fs_dtype_size(dt);
        void *buf = malloc(n * esz);
        /* values of very different magnitudes: order matters for the rounding */
        uint64_t s = (uint64_t)me * 77 + (uint64_t)t;
        for (size_t i = 0; i < n; i++) {
            float v = (float)((rng_unit(&s) - 0.5) * pow(10.0, (double)(rng(&s) % 12) - 6));
            if (dt == FS_FLOAT32) {
                memcpy((char *)buf + i * 4, &v, 4);
            } else {
                uint16_t h = f2bf_ref(v);
                memcpy((char *)buf + i * 2, &h, 2);
            }
        }
        FS_CHECK_OK(fs_allreduce(c, buf, buf, n, dt, t % 2 ? FS_AVG : FS_SUM, &err), &err);
        hs->h[t][me] = hash_bytes(buf, n * esz);
        free(buf);
    }
    (void)N;
    return 0;
}

FS_TEST(coll_bit_identical_across_ranks)
{
    fs_comm_opts_t o;
    fs_comm_opts_init(&o);
    o.slot_bytes = 256 << 10;
    struct hashes *hs = shared_page(sizeof *hs);
    FS_CHECK_EQ(run_ranks(4, &o, identical_rank, hs), 0);
    for (int t = 0; t < 6; t++)
        for (int r = 1; r < 4; r++)
            FS_CHECK(hs->h[t][r] == hs->h[t][0] && hs->h[t][0] != 0);
}

static int async_rank(fs_comm_t *c, int me, int N, void *arg)
{
    (void)arg;
    enum { OPS = 40, LEN = 3000 };
    static int64_t bufs[OPS][LEN];
    uint64_t tickets[OPS], last = 0;
    fs_error_t err;
    for (int i = 0; i < OPS; i++) {
        for (int j = 0; j < LEN; j++)
            bufs[i][j] = (int64_t)(me + 1) * (i * LEN + j);
        fs_coll_args_t a = {.kind = FS_COLL_ALLREDUCE,
                            .dtype = FS_INT64,
                            .op = FS_SUM,
                            .send = bufs[i],
                            .recv = bufs[i],
                            .count = LEN};
        FS_CHECK_OK(fs_comm_submit(c, &a, &tickets[i], &err), &err);
        FS_CHECK_EQ(tickets[i], last + 1);
        last = tickets[i];
        if (i == OPS / 2) {
            /* a synchronous call queues behind the pending ones (and takes a ticket) */
            FS_CHECK_OK(fs_barrier(c, &err), &err);
            FS_CHECK(fs_comm_completed(c) >= last + 1);
            last++;
        }
    }
    FS_CHECK_OK(fs_comm_wait(c, tickets[OPS - 1], 20000, &err), &err);
    FS_CHECK_EQ(fs_comm_completed(c), last);
    for (int i = 0; i < OPS; i++) {
        FS_CHECK_OK(fs_comm_wait(c, tickets[i], 0, &err), &err);
        for (int j = 0; j < LEN; j++)
            if (bufs[i][j] != (int64_t)(N * (N + 1) / 2) * (i * LEN + j)) {
                FS_CHECK(0);
                break;
            }
    }
    /* A ticket nobody submitted yet: times out, then ECLOSED after shutdown. */
    FS_CHECK_EQ(fs_comm_wait(c, last + 1, 50, &err), FS_ETIMEOUT);
    fs_comm_shutdown_waiters(c);
    FS_CHECK_EQ(fs_comm_wait(c, last + 1, -1, &err), FS_ECLOSED);
    return 0;
}

FS_TEST(coll_async_in_order)
{
    fs_comm_opts_t o;
    small_opts(&o);
    FS_CHECK_EQ(run_ranks(3, &o, async_rank, NULL), 0);
}

/* ------------------------------------------------------------------ */
/* Mismatches                                                         */
/* ------------------------------------------------------------------ */

struct mismatch_case {
    int kind1, dtype1, op1, root1;
    size_t count1;
    const char *expect; /* substring of the error message */
};

static int mismatch_rank(fs_comm_t *c, int me, int N, void *arg)
{
    const struct mismatch_case *m = arg;
    (void)N;
    float *buf = calloc(100000 * 4, sizeof *buf), *out = calloc(100000 * 4, sizeof *out);
    fs_error_t err;
    FS_CHECK_OK(fs_barrier(c, &err), &err);
    fs_coll_args_t a = {.kind = FS_COLL_ALLREDUCE,
                        .dtype = FS_FLOAT32,
                        .op = FS_SUM,
                        .send = buf,
                        .recv = out,
                        .count = 10};
    if (me == 1) {
        a.kind = m->kind1;
        a.dtype = m->dtype1;
        a.op = m->op1;
        a.root = m->root1;
        a.count = m->count1;
    }
    int64_t t0 = fs_now_ms();
    int rc = fs_comm_run(c, &a, &err);
    FS_CHECK_EQ(rc, FS_EMISMATCH);
    FS_CHECK(fs_now_ms() - t0 < 2000);
    FS_CHECK(strstr(err.msg, "rank 1 called") != NULL);
    FS_CHECK(strstr(err.msg, m->expect) != NULL);
    if (me == 0)
        printf("  %s\n", err.msg);
    /* the communicator is aborted: later calls fail at once */
    FS_CHECK_EQ(fs_barrier(c, &err), FS_EABORTED);
    FS_CHECK(fs_comm_status(c, NULL) != FS_OK);
    /* and nothing was written to the output */
    for (int i = 0; i < 100000 * 4; i++)
        if (out[i] != 0.0f) {
            FS_CHECK(0);
            break;
        }
    free(buf);
    free(out);
    return 0;
}

FS_TEST(coll_mismatch_is_an_error_on_every_rank)
{
    static const struct mismatch_case cases[] = {
        {FS_COLL_ALLREDUCE, FS_FLOAT32, FS_SUM, 0, 12, "12 elements"},
        {FS_COLL_ALLREDUCE, FS_INT32, FS_SUM, 0, 10, "int32"},
        {FS_COLL_ALLREDUCE, FS_FLOAT32, FS_MAX, 0, 10, "MAX"},
        {FS_COLL_BROADCAST, FS_FLOAT32, 0, 1, 10, "broadcast"},
        {FS_COLL_BARRIER, 0, 0, 0, 0, "barrier"},
        {FS_COLL_ALLREDUCE, FS_FLOAT32, FS_SUM, 0, 100000, "100000 elements"},
    };
    fs_comm_opts_t o;
    small_opts(&o);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        FS_CHECK_EQ(run_ranks(3, &o, mismatch_rank, (void *)&cases[i]), 0);
}

static int root_mismatch_rank(fs_comm_t *c, int me, int N, void *arg)
{
    (void)arg;
    (void)N;
    int32_t buf[8] = {0};
    fs_error_t err;
    FS_CHECK_EQ(fs_broadcast(c, buf, 8, FS_INT32, me == 0 ? 0 : 1, &err), FS_EMISMATCH);
    FS_CHECK(strstr(err.msg, "root 1") != NULL);
    return 0;
}

FS_TEST(coll_root_mismatch)
{
    fs_comm_opts_t o;
    small_opts(&o);
    FS_CHECK_EQ(run_ranks(2, &o, root_mismatch_rank, NULL), 0);
}

/* ------------------------------------------------------------------ */
/* Dead, exited, closed and stuck peers                               */
/* ------------------------------------------------------------------ */

enum { PEER_KILL = 1, PEER_EXIT0 = 2, PEER_CLOSE = 3, PEER_STUCK = 4, PEER_ABORT = 5 };

static int peer_rank(fs_comm_t *c, int me, int N, void *arg)
{
    int how = *(int *)arg;
    fs_error_t err;
    float buf[1000] = {0};
    FS_CHECK_OK(fs_barrier(c, &err), &err);
    int victim = N - 1;
    if (me == victim) {
        switch (how) {
        case PEER_KILL: raise(SIGKILL); break;
        case PEER_EXIT0: _exit(0); /* no destroy, status 0 */
        case PEER_CLOSE:
            fs_comm_destroy(c);
            sleep(2); /* alive, but gone from the communicator */
            exit(0);
        case PEER_STUCK: {
            sleep(2);
            int rc = fs_allreduce(c, buf, buf, 1000, FS_FLOAT32, FS_SUM, &err);
            FS_CHECK(rc != FS_OK); /* the others gave up on it */
            return 0;
        }
        case PEER_ABORT:
            usleep(200 * 1000);
            fs_comm_abort(c, "test asked for it");
            return 0;
        default: break;
        }
    }
    int64_t t0 = fs_now_ms();
    int rc = fs_allreduce(c, buf, buf, 1000, FS_FLOAT32, FS_SUM, &err);
    int64_t dt = fs_now_ms() - t0;
    if (me == 0)
        printf("  after %lld ms: %s: %s\n", (long long)dt, fs_status_name(rc), err.msg);
    char name[32];
    snprintf(name, sizeof name, "rank %d", victim);
    switch (how) {
    case PEER_KILL:
    case PEER_EXIT0:
    case PEER_CLOSE:
        FS_CHECK_EQ(rc, FS_EPEER);
        FS_CHECK(strstr(err.msg, name) != NULL);
        FS_CHECK(dt < 1000);
        break;
    case PEER_STUCK:
        FS_CHECK_EQ(rc, FS_ETIMEOUT);
        FS_CHECK(strstr(err.msg, name) != NULL);
        FS_CHECK(dt >= 250 && dt < 1500);
        break;
    case PEER_ABORT:
        FS_CHECK_EQ(rc, FS_EABORTED);
        FS_CHECK(strstr(err.msg, "test asked for it") != NULL);
        break;
    default: break;
    }
    /* aborted now: later calls fail fast */
    t0 = fs_now_ms();
    FS_CHECK(fs_barrier(c, &err) != FS_OK);
    FS_CHECK(fs_now_ms() - t0 < 100);
    return 0;
}

static int run_peer_case(int how, int world, int expect_failed)
{
    fs_comm_opts_t o;
    small_opts(&o);
    o.timeout_ms = 300;
    int failed = run_ranks(world, &o, peer_rank, &how);
    /* the killed rank counts as failed */
    return failed == expect_failed;
}

FS_TEST(coll_peer_killed)
{
    FS_CHECK(run_peer_case(PEER_KILL, 3, 1));
}
FS_TEST(coll_peer_exits_with_status_0)
{
    FS_CHECK(run_peer_case(PEER_EXIT0, 2, 0));
}
FS_TEST(coll_peer_closed_communicator)
{
    FS_CHECK(run_peer_case(PEER_CLOSE, 3, 0));
}
FS_TEST(coll_peer_stuck_times_out)
{
    FS_CHECK(run_peer_case(PEER_STUCK, 2, 0));
}
FS_TEST(coll_abort_reaches_peers)
{
    FS_CHECK(run_peer_case(PEER_ABORT, 3, 0));
}

static void *killer(void *arg)
{
    usleep((useconds_t)(*(int *)arg) * 1000);
    raise(SIGKILL);
    return NULL;
}

static int dies_mid_stream_rank(fs_comm_t *c, int me, int N, void *arg)
{
    (void)arg;
    size_t n = 4 << 20;
    float *buf = calloc(n, sizeof *buf);
    fs_error_t err;
    if (me == N - 1) {
        static int delay = 150;
        pthread_t t;
        pthread_create(&t, NULL, killer, &delay);
    }
    int rc = FS_OK;
    int64_t t_last = fs_now_ms();
    for (int i = 0; i < 100000 && rc == FS_OK; i++) {
        t_last = fs_now_ms();
        rc = fs_allreduce(c, buf, buf, n, FS_FLOAT32, FS_SUM, &err);
    }
    FS_CHECK_EQ(rc, FS_EPEER);
    FS_CHECK(fs_now_ms() - t_last < 1500);
    free(buf);
    return 0;
}

FS_TEST(coll_peer_dies_during_large_messages)
{
    fs_comm_opts_t o;
    fs_comm_opts_init(&o);
    o.timeout_ms = 10000;
    FS_CHECK_EQ(run_ranks(3, &o, dies_mid_stream_rank, NULL), 1);
}

/* ------------------------------------------------------------------ */
/* Creation                                                           */
/* ------------------------------------------------------------------ */

FS_TEST(comm_join_missing_rank_times_out_and_leaves_nothing)
{
    static struct shm_list before;
    for (int kind = FS_SHM_MEMFD; kind <= FS_SHM_NAMED; kind++) {
        shm_snapshot(&before);
        int fds = open_fd_count();
        fs_error_t err;
        fs_comm_opts_t o;
        kind_opts(&o, kind, 300);
        fs_comm_t *c = NULL, *p = NULL;
        FS_CHECK_OK(fs_comm_create(3, &o, &c, &err), &err);
        if (c == NULL)
            return;
        char handle[FS_COMM_HANDLE_MAX];
        snprintf(handle, sizeof handle, "%s", fs_comm_handle(c));
        int64_t t0 = fs_now_ms();
        FS_CHECK_EQ(fs_comm_join(c, &err), FS_ETIMEOUT);
        FS_CHECK(fs_now_ms() - t0 < 1000);
        FS_CHECK(strstr(err.msg, "1, 2") != NULL);
        FS_CHECK_EQ(fs_comm_join(c, &err), FS_EABORTED); /* only destroying it is left */
        fs_comm_destroy(c);
        FS_CHECK_EQ(open_fd_count(), fds);
        FS_CHECK_EQ(shm_new_entries(&before), 0);
        /* a rank with the handle of a rank 0 that is gone */
        FS_CHECK_EQ(fs_comm_open(handle, 1, 3, &o, &p, &err), FS_EPEER);
        FS_CHECK(p == NULL && strstr(err.msg, "rank 0") != NULL);
        FS_CHECK_EQ(open_fd_count(), fds);
    }
}

FS_TEST(comm_open_world_size_mismatch)
{
    fs_error_t err;
    fs_comm_opts_t o;
    fs_comm_opts_init(&o);
    o.connect_timeout_ms = 2000;
    fs_comm_t *c = NULL;
    FS_CHECK_OK(fs_comm_create(2, &o, &c, &err), &err);
    if (c == NULL)
        return;
    fflush(NULL);
    pid_t p = fork();
    if (p == 0) {
        fs_comm_t *d = NULL;
        int rc = fs_comm_open(fs_comm_handle(c), 1, 3, &o, &d, &err);
        printf("  %s\n", err.msg);
        fflush(NULL);
        _exit(rc == FS_EMISMATCH && d == NULL ? 0 : 1);
    }
    int64_t t0 = fs_now_ms();
    FS_CHECK_EQ(fs_comm_join(c, &err), FS_EMISMATCH); /* rank 0 hears of it at once */
    FS_CHECK(fs_now_ms() - t0 < 1500);
    int st = 0;
    FS_CHECK(waitpid(p, &st, 0) == p && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    fs_comm_destroy(c);
}

/* Flip the first hex digit of the handle's cookie (its last field). */
static void flip_cookie(char *handle)
{
    char *c = strrchr(handle, ':') + 1;
    *c = *c == '0' ? '1' : '0';
}

/* Rank 1 of a 2-rank job with rank 0 in the parent: open, join, one barrier. */
static void barrier_child(const char *handle, const fs_comm_opts_t *o)
{
    fs_error_t err;
    fs_comm_t *c = NULL;
    int ok = fs_comm_open(handle, 1, 2, o, &c, &err) == FS_OK && fs_comm_join(c, &err) == FS_OK &&
             fs_barrier(c, &err) == FS_OK;
    if (!ok)
        fprintf(stderr, "  rank 1: %s\n", err.msg);
    fs_comm_destroy(c);
    fflush(NULL);
    _exit(ok ? 0 : 1);
}

FS_TEST(comm_open_cookie_mismatch_is_refused_and_touches_nothing)
{
    static struct shm_list before;
    for (int kind = FS_SHM_MEMFD; kind <= FS_SHM_NAMED; kind++) {
        shm_snapshot(&before);
        fs_error_t err;
        fs_comm_opts_t o;
        kind_opts(&o, kind, 10000);
        fs_comm_t *c = NULL, *p = NULL;
        FS_CHECK_OK(fs_comm_create(2, &o, &c, &err), &err);
        if (c == NULL)
            return;
        char bad[FS_COMM_HANDLE_MAX];
        snprintf(bad, sizeof bad, "%s", fs_comm_handle(c));
        flip_cookie(bad);
        FS_CHECK_EQ(fs_comm_open(bad, 1, 2, &o, &p, &err), FS_EAUTH);
        FS_CHECK(p == NULL && strstr(err.msg, "cookie mismatch") != NULL);
        printf("  %s\n", err.msg);
        FS_CHECK_EQ(fs_comm_status(c, &err), FS_OK); /* no abort written, no name removed */
        fflush(NULL);
        pid_t child = fork();
        if (child == 0)
            barrier_child(fs_comm_handle(c), &o);
        FS_CHECK_OK(fs_comm_join(c, &err), &err);
        FS_CHECK_OK(fs_barrier(c, &err), &err);
        int st = 0;
        FS_CHECK(waitpid(child, &st, 0) == child && WIFEXITED(st) && WEXITSTATUS(st) == 0);
        fs_comm_destroy(c);
        FS_CHECK_EQ(shm_new_entries(&before), 0);
    }
}

/* A memfd handle of this process naming fd, with the cookie of `real`. */
static void forge_memfd_handle(char *out, size_t len, const char *real, int fd)
{
    snprintf(out, len, FS__SEG_MEMFD_PREFIX "%d:%d:%s", (int)getpid(), fd, strrchr(real, ':') + 1);
}

FS_TEST(comm_open_refuses_a_file_that_is_not_a_segment_memfd)
{
    fs_error_t err;
    fs_comm_t *c = NULL, *p = NULL;
    fs_comm_opts_t o;
    kind_opts(&o, FS_SHM_MEMFD, 0);
    FS_CHECK_OK(fs_comm_create(2, &o, &c, &err), &err);
    if (c == NULL)
        return;
    char path[] = "/tmp/fs-test-XXXXXX";
    int file = mkstemp(path), pipe_fds[2] = {-1, -1};
    FS_CHECK(file >= 0 && unlink(path) == 0 && ftruncate(file, 1 << 20) == 0);
    FS_CHECK(pipe(pipe_fds) == 0);
    int zero = open("/dev/zero", O_RDWR);
    int unsealed = memfd_create("fastspawn", MFD_CLOEXEC); /* our name, no seals */
    FS_CHECK(unsealed >= 0 && ftruncate(unsealed, 1 << 20) == 0);
    int targets[] = {file, pipe_fds[0], zero, unsealed};
    for (size_t i = 0; i < sizeof targets / sizeof targets[0]; i++) {
        char forged[FS_COMM_HANDLE_MAX];
        forge_memfd_handle(forged, sizeof forged, fs_comm_handle(c), targets[i]);
        FS_CHECK_EQ(fs_comm_open(forged, 1, 2, &o, &p, &err), FS_EPROTO);
        FS_CHECK(p == NULL && (strstr(err.msg, "not a fastspawn segment") != NULL ||
                               strstr(err.msg, "without fastspawn's seals") != NULL));
        printf("  %s\n", err.msg);
    }
    FS_CHECK_EQ(fs_comm_status(c, &err), FS_OK);
    close(file);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    close(zero);
    close(unsealed);
    fs_comm_destroy(c);
}

/* Rank 1 of 3, in a job whose rank 0 is killed while rank 1 waits in fs_comm_join:
   FS_EPEER at once, and rank 1 keeps no fd or mapping of the segment. */
static int orphan_rank(struct rendezvous *rv, const fs_comm_opts_t *o)
{
    fs_error_t err;
    fs_comm_t *c = NULL;
    int fds = open_fd_count();
    if (attach_comm(rv, 1, 3, o, &c, &err) != FS_OK) {
        fprintf(stderr, "  rank 1: %s\n", err.msg);
        return 1;
    }
    int rc = fs_comm_join(c, &err);
    printf("  rank 1: %s\n", err.msg);
    fflush(NULL);
    fs_comm_destroy(c);
    return rc == FS_EPEER && strstr(err.msg, "rank 0") != NULL && open_fd_count() == fds &&
                   !maps_memfd()
               ? 0
               : 1;
}

/* Rank 0 of 3: create, post the handle, wait in join for a rank 2 that never comes. */
static void waiting_rank0(struct rendezvous *rv, const fs_comm_opts_t *o)
{
    fs_error_t err;
    fs_comm_t *c = NULL;
    if (attach_comm(rv, 0, 3, o, &c, &err) == FS_OK)
        (void)fs_comm_join(c, &err);
    _exit(5);
}

static int wait_opened(struct rendezvous *rv, int n)
{
    int64_t until = fs_now_ms() + 10000;
    while (atomic_load(&rv->opened) < n && fs_now_ms() < until)
        usleep(1000);
    usleep(150000); /* the openers are waiting in fs_comm_join by now */
    return atomic_load(&rv->opened) >= n;
}

FS_TEST(comm_rank0_killed_during_setup_leaves_nothing)
{
    static struct shm_list before;
    for (int kind = FS_SHM_MEMFD; kind <= FS_SHM_NAMED; kind++) {
        shm_snapshot(&before);
        struct rendezvous *rv = shared_page(sizeof *rv);
        fs_comm_opts_t o;
        kind_opts(&o, kind, 20000); /* a wait for the deadline would fail the 2 s check */
        fflush(NULL);
        pid_t r0 = fork();
        if (r0 == 0)
            waiting_rank0(rv, &o);
        pid_t r1 = fork();
        if (r1 == 0) {
            fflush(NULL);
            _exit(orphan_rank(rv, &o));
        }
        FS_CHECK(wait_opened(rv, 1));
        FS_CHECK(kill(r0, SIGKILL) == 0);
        int64_t t0 = fs_now_ms();
        int st = 0;
        FS_CHECK(waitpid(r0, &st, 0) == r0 && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
        FS_CHECK(waitpid(r1, &st, 0) == r1 && WIFEXITED(st) && WEXITSTATUS(st) == 0);
        FS_CHECK(fs_now_ms() - t0 < 2000);
        FS_CHECK_EQ(shm_new_entries(&before), 0);
        munmap(rv, sizeof *rv);
    }
}

/* The launcher: fork ranks 0 and 1 of 3 that die with it (PR_SET_PDEATHSIG), then idle. */
static void launcher(struct rendezvous *rv, const fs_comm_opts_t *o)
{
    pid_t me = getpid();
    for (int r = 0; r < 2; r++) {
        if (fork() != 0)
            continue;
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != me)
            _exit(9);
        if (r == 0)
            waiting_rank0(rv, o);
        fs_error_t err;
        fs_comm_t *c = NULL;
        if (attach_comm(rv, 1, 3, o, &c, &err) == FS_OK)
            (void)fs_comm_join(c, &err);
        _exit(5);
    }
    for (;;)
        pause();
}

FS_TEST(comm_launcher_killed_during_setup_leaves_nothing)
{
    /* Only the memfd: a named segment is left behind when every rank dies before joining. */
    static struct shm_list before;
    shm_snapshot(&before);
    FS_CHECK(prctl(PR_SET_CHILD_SUBREAPER, 1) == 0); /* the orphaned ranks become ours */
    struct rendezvous *rv = shared_page(sizeof *rv);
    fs_comm_opts_t o;
    kind_opts(&o, FS_SHM_MEMFD, 20000);
    fflush(NULL);
    pid_t l = fork();
    if (l == 0)
        launcher(rv, &o);
    FS_CHECK(wait_opened(rv, 1));
    FS_CHECK(kill(l, SIGKILL) == 0);
    int st = 0, killed = 0;
    FS_CHECK(waitpid(l, &st, 0) == l);
    pid_t p;
    while ((p = waitpid(-1, &st, 0)) > 0) /* both ranks, SIGKILLed by their death signal */
        killed += WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL;
    FS_CHECK_EQ(killed, 2);
    FS_CHECK_EQ(shm_new_entries(&before), 0);
}

/* Make memfd_create fail with ENOSYS here, as in a sandbox without it (native syscalls
   only: the filter does not look at the architecture). */
static int refuse_memfd_create(void)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_memfd_create, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof f / sizeof f[0], .filter = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0 ? 0 : -1;
}

/* World size 1: create and join; the handle's kind, what /dev/shm held meanwhile. */
static void one_rank(const fs_comm_opts_t *o, const char *prefix, int shm_entries)
{
    static struct shm_list before;
    shm_snapshot(&before);
    fs_error_t err;
    fs_comm_t *c = NULL;
    FS_CHECK_OK(fs_comm_create(1, o, &c, &err), &err);
    if (c == NULL)
        return;
    FS_CHECK(strncmp(fs_comm_handle(c), prefix, strlen(prefix)) == 0);
    FS_CHECK_EQ(shm_new_entries(&before), shm_entries);
    FS_CHECK_OK(fs_comm_join(c, &err), &err);
    FS_CHECK_EQ(shm_new_entries(&before), 0);
    FS_CHECK_EQ(memfd_fds(), 0);
    FS_CHECK_OK(fs_barrier(c, &err), &err);
    fs_comm_destroy(c);
}

FS_TEST(comm_segment_kinds_and_the_environment)
{
    fs_comm_opts_t o;
    fs_comm_opts_init(&o);
    one_rank(&o, FS__SEG_MEMFD_PREFIX, 0); /* the default: nothing in /dev/shm ever */
    o.shm = FS_SHM_NAMED;
    one_rank(&o, FS__SEG_NAMED_PREFIX, 1); /* until every rank joined */
    o.shm = FS_SHM_AUTO;
    setenv("FASTSPAWN_SHM", "named", 1);
    one_rank(&o, FS__SEG_NAMED_PREFIX, 1);
    setenv("FASTSPAWN_SHM", "memfd", 1);
    one_rank(&o, FS__SEG_MEMFD_PREFIX, 0);
    setenv("FASTSPAWN_SHM", "tmpfs", 1);
    fs_error_t err;
    fs_comm_t *c = NULL;
    FS_CHECK_EQ(fs_comm_create(1, &o, &c, &err), FS_EINVAL);
    FS_CHECK(c == NULL && strstr(err.msg, "FASTSPAWN_SHM=tmpfs") != NULL);
    unsetenv("FASTSPAWN_SHM");
    o.shm = 7;
    FS_CHECK_EQ(fs_comm_create(1, &o, &c, &err), FS_EINVAL);
}

FS_TEST(comm_named_segment_says_nothing_and_is_private)
{
    fs_error_t err;
    fs_comm_opts_t o;
    fs_comm_opts_init(&o);
    o.shm = FS_SHM_NAMED;
    mode_t old = umask(0277); /* the owner could not even write: the segment must not care */
    fs_comm_t *c = NULL;
    FS_CHECK_OK(fs_comm_create(1, &o, &c, &err), &err);
    umask(old);
    if (c == NULL)
        return;
    char name[FS_COMM_HANDLE_MAX], path[FS_COMM_HANDLE_MAX + 16];
    snprintf(name, sizeof name, "%s", fs_comm_handle(c) + strlen(FS__SEG_NAMED_PREFIX));
    *strrchr(name, ':') = '\0';
    /* "/fastspawn-" and 32 random hex digits: no pid, and not the cookie */
    FS_CHECK(strncmp(name, "/fastspawn-", 11) == 0 && strlen(name) == 11 + 32 &&
             strspn(name + 11, "0123456789abcdef") == 32);
    FS_CHECK(strcmp(name + 11, strrchr(fs_comm_handle(c), ':') + 1) != 0);
    snprintf(path, sizeof path, "/dev/shm%s", name);
    struct stat st;
    FS_CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600);
    FS_CHECK_OK(fs_comm_join(c, &err), &err);
    FS_CHECK(stat(path, &st) < 0 && errno == ENOENT);
    fs_comm_destroy(c);
}

FS_TEST(comm_named_fallback_where_memfd_create_is_refused)
{
    if (refuse_memfd_create() != 0) {
        printf("  (no seccomp here: skipped)\n");
        return;
    }
    fs_comm_opts_t o;
    fs_comm_opts_init(&o);
    one_rank(&o, FS__SEG_NAMED_PREFIX, 1);
    fs_error_t err;
    fs_comm_t *c = NULL;
    o.shm = FS_SHM_MEMFD; /* asked for explicitly: no fallback */
    FS_CHECK_EQ(fs_comm_create(1, &o, &c, &err), FS_ESYS);
    FS_CHECK(c == NULL && strstr(err.msg, "memfd_create") != NULL &&
             strstr(err.msg, "FASTSPAWN_SHM=named") != NULL);
    printf("  %s\n", err.msg);
}

/* A 1 MiB /dev/shm of this test process's own (Docker's is 64 MB): 0, or -1 where that
   takes more than this process may (root, mount namespaces). */
static int small_dev_shm(void)
{
    if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        return -1;
    return mount("tmpfs", "/dev/shm", "tmpfs", 0, "size=1m");
}

FS_TEST(comm_reserves_its_memory_so_a_full_dev_shm_is_an_error_not_sigbus)
{
    if (small_dev_shm() != 0) {
        printf("  (needs root and a mount namespace: skipped)\n");
        return;
    }
    static struct shm_list empty;
    fs_error_t err;
    fs_comm_opts_t o;
    kind_opts(&o, FS_SHM_NAMED, 0);
    o.slot_bytes = 4 << 20;
    fs_comm_t *c = NULL;
    FS_CHECK_EQ(fs_comm_create(2, &o, &c, &err), FS_ENOMEM);
    printf("  %s\n", err.msg);
    FS_CHECK(c == NULL && strstr(err.msg, "8.0 MiB") != NULL && strstr(err.msg, "/dev/shm") &&
             strstr(err.msg, "--shm-size") != NULL && strstr(err.msg, "FASTSPAWN_SLOT_BYTES"));
    FS_CHECK_EQ(shm_new_entries(&empty), 0);
    o.shm = FS_SHM_MEMFD; /* not /dev/shm's memory */
    FS_CHECK_OK(fs_comm_create(2, &o, &c, &err), &err);
    fs_comm_destroy(c);
}

static int nothing_rank(fs_comm_t *c, int me, int N, void *arg)
{
    (void)c;
    (void)me;
    (void)N;
    (void)arg;
    return 0;
}

FS_TEST(comm_create_validates_arguments)
{
    static const char *bad[] = {
        "",
        "noslash",
        "memfd:",
        "memfd:12:3:",
        "memfd:12:3:zz",
        "memfd:0:3:00112233445566778899aabbccddeeff",
        "memfd:-1:3:00112233445566778899aabbccddeeff",
        "memfd: 12:3:00112233445566778899aabbccddeeff",
        "memfd:12:3:00112233445566778899aabbccddeef",
        "memfd:12:3:00112233445566778899aabbccddeeff0",
        "memfd:12:3:00112233445566778899AABBCCDDEEFF",
        "memfd:99999999999:3:00112233445566778899aabbccddeeff",
        "named:fastspawn-x:00112233445566778899aabbccddeeff",
        "named:/a/b:00112233445566778899aabbccddeeff",
        "named:/:00112233445566778899aabbccddeeff",
        "shm:/x:00112233445566778899aabbccddeeff",
    };
    fs_comm_t *c = NULL;
    fs_error_t err;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        FS_CHECK_EQ(fs_comm_open(bad[i], 1, 2, NULL, &c, &err), FS_EINVAL);
        FS_CHECK(c == NULL);
    }
    char longer[300];
    memset(longer, 'a', sizeof longer - 1);
    longer[sizeof longer - 1] = '\0';
    FS_CHECK_EQ(fs_comm_open(longer, 1, 2, NULL, &c, &err), FS_EINVAL);
    const char *ok = "memfd:12:3:00112233445566778899aabbccddeeff";
    FS_CHECK_EQ(fs_comm_open(ok, 0, 2, NULL, &c, &err), FS_EINVAL); /* rank 0 creates */
    FS_CHECK_EQ(fs_comm_open(ok, 2, 2, NULL, &c, &err), FS_EINVAL);
    FS_CHECK_EQ(fs_comm_open(NULL, 1, 2, NULL, &c, &err), FS_EINVAL);
    FS_CHECK_EQ(fs_comm_create(0, NULL, &c, &err), FS_EINVAL);
    FS_CHECK_EQ(fs_comm_create(2, NULL, NULL, &err), FS_EINVAL);
    /* collectives wait for the join, and there is one join */
    FS_CHECK_OK(fs_comm_create(2, NULL, &c, &err), &err);
    int32_t x[4] = {0};
    FS_CHECK_EQ(fs_allreduce(c, x, x, 4, FS_INT32, FS_SUM, &err), FS_EINVAL);
    FS_CHECK(strstr(err.msg, "fs_comm_join") != NULL);
    fs_comm_destroy(c);
    FS_CHECK_OK(fs_comm_create(1, NULL, &c, &err), &err);
    FS_CHECK_OK(fs_comm_join(c, &err), &err);
    FS_CHECK_EQ(fs_comm_join(c, &err), FS_EINVAL);
    FS_CHECK_OK(fs_allreduce(c, x, x, 4, FS_INT32, FS_SUM, &err), &err);
    fs_comm_destroy(c);
    FS_CHECK_EQ(run_ranks(4, NULL, nothing_rank, NULL), 0);
}

static int validate_rank(fs_comm_t *c, int me, int N, void *arg)
{
    (void)me;
    (void)arg;
    fs_error_t err;
    int32_t x[4] = {0};
    FS_CHECK_EQ(fs_allreduce(c, x, x, 4, FS_INT32, FS_AVG, &err), FS_EINVAL);
    FS_CHECK_EQ(fs_allreduce(c, x, x, 4, 42, FS_SUM, &err), FS_EINVAL);
    FS_CHECK_EQ(fs_broadcast(c, x, 4, FS_INT32, N, &err), FS_EINVAL);
    FS_CHECK_EQ(fs_allreduce(c, NULL, x, 4, FS_INT32, FS_SUM, &err), FS_EINVAL);
    /* invalid calls did not touch the communicator */
    FS_CHECK_OK(fs_allreduce(c, x, x, 4, FS_INT32, FS_SUM, &err), &err);
    return 0;
}

/* err may be NULL everywhere (fastspawn/error.h): the status alone, even on the paths
   that build long messages (a header mismatch, an abort). */
static int null_err_rank(fs_comm_t *c, int me, int N, void *arg)
{
    (void)N;
    (void)arg;
    int32_t x[4] = {0};
    uint64_t t = 0;
    FS_CHECK_EQ(fs_allreduce(c, x, x, 4, FS_INT32, FS_AVG, NULL), FS_EINVAL);
    FS_CHECK_EQ(fs_allreduce(c, x, x, 4, FS_INT32, FS_SUM, NULL), FS_OK);
    FS_CHECK_EQ(fs_comm_submit(c, NULL, &t, NULL), FS_EINVAL);
    FS_CHECK_EQ(fs_allreduce(c, x, x, me == 0 ? 4 : 3, FS_INT32, FS_SUM, NULL), FS_EMISMATCH);
    FS_CHECK_EQ(fs_comm_status(c, NULL), FS_EMISMATCH);
    FS_CHECK_EQ(fs_barrier(c, NULL), FS_EABORTED);
    return 0;
}

FS_TEST(coll_null_error_pointers_are_accepted)
{
    fs_comm_t *c = NULL;
    FS_CHECK_EQ(fs_comm_open("noslash", 1, 2, NULL, &c, NULL), FS_EINVAL);
    FS_CHECK_EQ(fs_comm_create(0, NULL, &c, NULL), FS_EINVAL);
    FS_CHECK_EQ(run_ranks(2, NULL, null_err_rank, NULL), 0);
}

FS_TEST(coll_invalid_arguments_do_not_break_the_communicator)
{
    FS_CHECK_EQ(run_ranks(2, NULL, validate_rank, NULL), 0);
}

FS_TEST(coll_on_a_named_segment)
{
    fs_comm_opts_t o;
    small_opts(&o);
    o.shm = FS_SHM_NAMED;
    FS_CHECK_EQ(run_ranks(3, &o, validate_rank, NULL), 0);
}

/* ------------------------------------------------------------------ */
/* More ranks than cores                                              */
/* ------------------------------------------------------------------ */

static int latency_rank(fs_comm_t *c, int me, int N, void *arg)
{
    (void)arg;
    fs_error_t err;
    float buf[16] = {0};
    enum { ITERS = 2000 };
    FS_CHECK_OK(fs_barrier(c, &err), &err);
    int64_t t0 = fs_now_ms();
    for (int i = 0; i < ITERS; i++)
        FS_CHECK_OK(fs_allreduce(c, buf, buf, 16, FS_FLOAT32, FS_SUM, &err), &err);
    int64_t dt = fs_now_ms() - t0;
    if (me == 0)
        printf("  world %d: %.1f us per 64-byte all_reduce\n", N, 1000.0 * (double)dt / ITERS);
    FS_CHECK(dt < ITERS * 2); /* < 2 ms each even with 2 cores for 4+ ranks */
    return 0;
}

FS_TEST(coll_more_ranks_than_cores)
{
    for (int n = 2; n <= 6; n += 2)
        FS_CHECK_EQ(run_ranks(n, NULL, latency_rank, NULL), 0);
}

/* ------------------------------------------------------------------ */
/* fork() after create                                                */
/* ------------------------------------------------------------------ */

static int fork_child_rank(fs_comm_t *c, int me, int N, void *arg)
{
    (void)arg;
    fs_error_t err;
    float x[4] = {1, 1, 1, 1};
    if (me == 0) {
        /* A child (think: a DataLoader worker) inherits the communicator but no worker
         * thread: using it fails cleanly, destroying it leaves the parent's rank alone. */
        fs_coll_args_t a = {.kind = FS_COLL_ALLREDUCE,
                            .dtype = FS_FLOAT32,
                            .op = FS_SUM,
                            .send = x,
                            .recv = x,
                            .count = 4};
        uint64_t t = 0;
        FS_CHECK_OK(fs_comm_submit(c, &a, &t, &err), &err);
        fflush(NULL);
        pid_t p = fork();
        if (p == 0) {
            int ok = fs_allreduce(c, x, x, 4, FS_FLOAT32, FS_SUM, &err) == FS_EINVAL &&
                     strstr(err.msg, "forked") != NULL &&
                     fs_comm_submit(c, &a, &t, &err) == FS_EINVAL &&
                     fs_comm_status(c, NULL) == FS_EINVAL;
            fs_comm_abort(c, "a child must not be able to do this");
            fs_comm_destroy(c);
            _exit(ok ? 0 : 1);
        }
        int st = 0;
        FS_CHECK(waitpid(p, &st, 0) == p && WIFEXITED(st) && WEXITSTATUS(st) == 0);
        FS_CHECK_OK(fs_comm_wait(c, t, 10000, &err), &err);
    } else {
        FS_CHECK_OK(fs_allreduce(c, x, x, 4, FS_FLOAT32, FS_SUM, &err), &err);
    }
    /* the parent's communicator still works, and nobody was told rank 0 left */
    for (int i = 0; i < 3; i++)
        FS_CHECK_OK(fs_allreduce(c, x, x, 4, FS_FLOAT32, FS_SUM, &err), &err);
    FS_CHECK(x[0] == (float)(N * N * N * N));
    return 0;
}

FS_TEST(coll_forked_child_cannot_use_or_close_the_parents_communicator)
{
    FS_CHECK_EQ(run_ranks(2, NULL, fork_child_rank, NULL), 0);
}

int main(void)
{
    return fs_test_main();
}
