/*
 * test_nccl.c - the CUDA/NCCL layer (csrc/lib/cuda_loader.c, nccl_*.c)
 * against the fake CUDA runtime and NCCL of tests/c/fake_cuda/, which the
 * Makefile builds into tests/c/bin/fake/. Multi-rank tests fork one process
 * per rank; the fake NCCL computes real results across them.
 */
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cuda_abi.h"
#include "fastspawn.h"
#include "fastspawn/nccl.h"
#include "fs_test.h"
#include "nccl_internal.h" /* rank_fork holds the communicator's lock across a fork */

/* ------------------------------------------------------------------ */
/* Set-up helpers                                                     */
/* ------------------------------------------------------------------ */

static const char *fake_dir(void)
{
    static char dir[PATH_MAX];
    if (dir[0] == '\0') {
        ssize_t n = readlink("/proc/self/exe", dir, sizeof dir - 8);
        if (n <= 0)
            return "tests/c/bin/fake";
        dir[n] = '\0';
        strcpy(strrchr(dir, '/'), "/fake");
    }
    return dir;
}

static void load_fakes(void)
{
    const char *dirs[] = {fake_dir()};
    fs_error_t err;
    FS_CHECK_OK(fs_cuda_load(dirs, 1, &err), &err);
    FS_CHECK_OK(fs_nccl_load(dirs, 1, &err), &err);
}

/* The fake runtime's log, through its own exports. */
static size_t (*log_read)(char *, size_t);
static void (*log_clear)(void);

static void log_bind(void)
{
    void *h = dlopen("libcudart.so.13", RTLD_NOW | RTLD_NOLOAD);
    FS_CHECK(h != NULL);
    if (h == NULL)
        return;
    void *r = dlsym(h, "fakecuda_log_read"), *c = dlsym(h, "fakecuda_log_clear");
    FS_CHECK(r != NULL && c != NULL);
    memcpy(&log_read, &r, sizeof r); /* POSIX: a dlsym result is a function pointer */
    memcpy(&log_clear, &c, sizeof c);
    dlclose(h);
}

static char *log_text(void)
{
    size_t n = log_read(NULL, 0);
    char *buf = malloc(n + 1);
    log_read(buf, n + 1);
    return buf;
}

/* The first log line at or after `from` that starts with prefix and contains needle. */
static const char *log_line(const char *from, const char *prefix, const char *needle)
{
    for (const char *line = from; line != NULL && *line != '\0';) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        char buf[600];
        snprintf(buf, sizeof buf, "%.*s", (int)len, line);
        if (strncmp(buf, prefix, strlen(prefix)) == 0 && (needle == NULL || strstr(buf, needle)))
            return line;
        line = end ? end + 1 : NULL;
    }
    return NULL;
}

/* The line after p (NULL stays NULL). */
static const char *after(const char *p)
{
    const char *end = p != NULL ? strchr(p, '\n') : NULL;
    return end != NULL ? end + 1 : NULL;
}

/* Like log_line, from the line after p. */
static const char *log_find(const char *p, const char *prefix, const char *needle)
{
    return p != NULL ? log_line(p, prefix, needle) : NULL;
}

/* "event=0x..." of a log line into buf. */
static void event_of(const char *line, char *buf, size_t cap)
{
    const char *e = line != NULL ? strstr(line, "event=") : NULL;
    size_t n = e != NULL ? strcspn(e, " \n") : 0;
    snprintf(buf, cap, "%.*s", (int)n, e != NULL ? e : "");
}

static fs__cudaStream_t new_stream(void)
{
    fs__cudaStream_t s = NULL;
    FS_CHECK_EQ(fs__cuda()->cudaStreamCreateWithPriority(&s, fs__cudaStreamNonBlocking, 0),
                fs__cudaSuccess);
    return s;
}

typedef void (*rank_fn)(int rank, int world, const unsigned char *id, void *arg);

/*
 * Fork `world` ranks, then hand each the unique id the parent takes: after
 * the forks, so no thread of the fake NCCL runs in the parent while it forks
 * (GCC's ASan can deadlock a child forked while another thread allocates).
 * Run fn in each and wait for all. Returns how many ranks failed; with
 * `signals`, ranks killed by a signal are counted there instead.
 */
static int run_ranks_sig(int world, rank_fn fn, void *arg, int *signals)
{
    int fds[2];
    FS_CHECK(pipe(fds) == 0);
    pid_t pids[8];
    for (int r = 0; r < world; r++) {
        fflush(NULL);
        pids[r] = fork();
        if (pids[r] == 0) {
            alarm(30);
            unsigned char id[FS_NCCL_UNIQUE_ID_BYTES];
            FS_CHECK(read(fds[0], id, sizeof id) == (ssize_t)sizeof id); /* atomic: < PIPE_BUF */
            close(fds[0]);
            close(fds[1]);
            fn(r, world, id, arg);
            fflush(NULL);
            _exit(fs_test_failed_checks == 0 ? 0 : 1);
        }
    }
    unsigned char id[FS_NCCL_UNIQUE_ID_BYTES];
    fs_error_t err;
    FS_CHECK_OK(fs_nccl_get_unique_id(id, &err), &err);
    for (int r = 0; r < world; r++)
        FS_CHECK(write(fds[1], id, sizeof id) == (ssize_t)sizeof id);
    close(fds[0]);
    close(fds[1]);
    int failed = 0, killed = 0;
    for (int r = 0; r < world; r++) {
        int st = 0;
        while (waitpid(pids[r], &st, 0) < 0 && errno == EINTR) {
        }
        if (WIFSIGNALED(st) && signals != NULL) {
            killed++;
        } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "  rank %d of %d: %s %d\n", r, world,
                    WIFSIGNALED(st) ? "killed by signal" : "exit status",
                    WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
            failed++;
        }
    }
    if (signals != NULL)
        *signals = killed;
    return failed;
}

static int run_ranks(int world, rank_fn fn, void *arg)
{
    return run_ranks_sig(world, fn, arg, NULL);
}

static fs_nccl_comm_t *join(int rank, int world, const unsigned char *id,
                            const fs_nccl_comm_opts_t *opts)
{
    fs_nccl_comm_t *c = NULL;
    fs_error_t err;
    FS_CHECK_OK(fs_nccl_comm_create(id, rank, world, rank, opts, &c, &err), &err);
    return c;
}

static void leave(fs_nccl_comm_t *c)
{
    fs_error_t err;
    FS_CHECK_OK(fs_nccl_comm_destroy(c, 5000, &err), &err);
}

/* A float32 SUM all_reduce of x[2] into y[2]. */
static fs_nccl_args_t sum2(float *x, float *y)
{
    return (fs_nccl_args_t){.kind = FS_COLL_ALLREDUCE,
                            .dtype = FS_FLOAT32,
                            .op = FS_SUM,
                            .send = x,
                            .recv = y,
                            .count = 2};
}

/* Enqueue, wait, check: the common case. */
static void run_ok(fs_nccl_comm_t *c, fs_nccl_args_t a)
{
    fs_nccl_work_t *w = NULL;
    fs_error_t err;
    FS_CHECK_OK(fs_nccl_run(c, &a, &w, &err), &err);
    if (w == NULL)
        return;
    FS_CHECK_OK(fs_nccl_work_synchronize(w, 10000, &err), &err);
    fs_nccl_work_release(w);
}

static void prepare(void)
{
    setenv("FAKE_CUDA_DEVICES", "4", 1);
    load_fakes();
    log_bind();
}

/* A test that runs fn on `world` ranks. */
#define RANKS_TEST(name, world, fn)                                                                \
    FS_TEST(name)                                                                                  \
    {                                                                                              \
        prepare();                                                                                 \
        FS_CHECK_EQ(run_ranks(world, fn, NULL), 0);                                                \
    }

/* ------------------------------------------------------------------ */
/* Values every dtype holds exactly                                   */
/* ------------------------------------------------------------------ */

/* Bits of a small integer v in a float of eb/mb bits (exact for the values the tests use). */
static unsigned small_float_bits(long v, int eb, int mb)
{
    unsigned sign = v < 0 ? 1u << (eb + mb) : 0;
    unsigned long a = (unsigned long)labs(v);
    if (a == 0)
        return sign;
    int e = 0;
    while ((2ul << e) <= a)
        e++;
    unsigned m = (unsigned)(((a - (1ul << e)) << mb) >> e);
    return sign | (unsigned)(e + (1 << (eb - 1)) - 1) << mb | m;
}

static void put(void *buf, size_t i, int dtype, long v)
{
    unsigned char *b = buf;
    size_t sz = fs_nccl_dtype_size(dtype);
    float f = (float)v;
    double d = (double)v;
    uint16_t h = 0;
    int64_t q = v;
    switch (dtype) {
    case FS_FLOAT32: memcpy(b + i * 4, &f, 4); return;
    case FS_FLOAT64: memcpy(b + i * 8, &d, 8); return;
    case FS_FLOAT16: h = (uint16_t)small_float_bits(v, 5, 10); break;
    case FS_BFLOAT16: h = (uint16_t)small_float_bits(v, 8, 7); break;
    case FS_NCCL_FLOAT8_E4M3: b[i] = (unsigned char)small_float_bits(v, 4, 3); return;
    case FS_NCCL_FLOAT8_E5M2: b[i] = (unsigned char)small_float_bits(v, 5, 2); return;
    default: memcpy(b + i * sz, &q, sz); return; /* little-endian: the low bytes */
    }
    memcpy(b + i * 2, &h, 2);
}

static const int all_dtypes[] = {FS_FLOAT32,
                                 FS_FLOAT64,
                                 FS_FLOAT16,
                                 FS_BFLOAT16,
                                 FS_INT8,
                                 FS_UINT8,
                                 FS_INT32,
                                 FS_INT64,
                                 FS_NCCL_UINT32,
                                 FS_NCCL_UINT64,
                                 FS_NCCL_FLOAT8_E4M3,
                                 FS_NCCL_FLOAT8_E5M2};
#define NDTYPES (int)(sizeof all_dtypes / sizeof all_dtypes[0])

/* Rank r's element i: 1 or 2; every reduction of up to 4 ranks stays exact. */
static long input_of(int r, size_t i)
{
    return 1 + (long)((i + (size_t)r) % 2);
}

static long expected_of(int op, int world, size_t i, long scale)
{
    long acc = input_of(0, i) * scale;
    for (int r = 1; r < world; r++) {
        long x = input_of(r, i) * scale;
        acc = op == FS_PRODUCT ? acc * x
              : op == FS_MIN   ? (x < acc ? x : acc)
              : op == FS_MAX   ? (x > acc ? x : acc)
                               : acc + x;
    }
    return acc;
}

/* ------------------------------------------------------------------ */
/* Loading                                                            */
/* ------------------------------------------------------------------ */

FS_TEST(loader_finds_the_fakes_in_a_passed_dir_and_reports_version_and_caps)
{
    FS_CHECK_EQ(fs_nccl_version(), 0);
    FS_CHECK(fs_nccl_library_path() == NULL);
    load_fakes();
    FS_CHECK_EQ(fs_nccl_version(), 23007);
    FS_CHECK_EQ(fs_cuda_runtime_version(), 13000);
    unsigned all = FS_NCCL_CAP_ABORT | FS_NCCL_CAP_ASYNC_ERROR | FS_NCCL_CAP_NONBLOCKING |
                   FS_NCCL_CAP_FINALIZE | FS_NCCL_CAP_SPLIT | FS_NCCL_CAP_PREMUL_SUM |
                   FS_NCCL_CAP_AVG | FS_NCCL_CAP_BFLOAT16 | FS_NCCL_CAP_FLOAT8 |
                   FS_NCCL_CAP_LAST_ERROR;
    FS_CHECK_EQ(fs_nccl_caps(), all);
    FS_CHECK(strstr(fs_nccl_library_path(), "/fake/libnccl.so.2") != NULL);
    FS_CHECK(strstr(fs_cuda_library_path(), "/fake/libcudart.so.13") != NULL);
    FS_CHECK(strstr(fs_nccl_search_report(), "FASTSPAWN_NCCL_LIBRARY: not set") != NULL);
    fs_error_t err;
    FS_CHECK_OK(fs_nccl_load(NULL, 0, &err), &err); /* loaded: no search again */
}

FS_TEST(loader_error_names_the_variable_and_every_place_searched)
{
    const char *dirs[] = {"/nonexistent/one", "/nonexistent/two"};
    fs_error_t err;
    FS_CHECK_EQ(fs_nccl_load(dirs, 2, &err), FS_ENOTFOUND);
    FS_CHECK(strstr(err.msg, "set FASTSPAWN_NCCL_LIBRARY") != NULL);
    const char *rep = fs_nccl_search_report();
    FS_CHECK(strstr(rep, "already loaded in this process: no libnccl.so.2") != NULL);
    FS_CHECK(strstr(rep, "/nonexistent/one/libnccl.so.2: cannot open shared object file") != NULL);
    FS_CHECK(strstr(rep, "/nonexistent/two/libnccl.so.2: cannot open shared object file") != NULL);
    FS_CHECK(strstr(rep, "system (dlopen \"libnccl.so.2\"): libnccl.so.2: cannot open") != NULL);
    FS_CHECK_EQ(fs_nccl_version(), 0);
    /* Not cached: a later search that can succeed does. */
    load_fakes();
    FS_CHECK_EQ(fs_nccl_version(), 23007);
}

FS_TEST(loader_tries_every_cudart_soname_in_every_dir_then_the_system)
{
    const char *dirs[] = {"/nonexistent/one", "/nonexistent/two"};
    fs_error_t err;
    int rc = fs_cuda_load(dirs, 2, &err);
    const char *rep = fs_cuda_search_report();
    FS_CHECK(strstr(rep, "/nonexistent/one/libcudart.so.13") != NULL);
    FS_CHECK(strstr(rep, "/nonexistent/two/libcudart.so.11.0") != NULL);
    if (rc == FS_OK) { /* this machine has a system CUDA runtime: found last */
        FS_CHECK(strstr(rep, "=> loaded ") != NULL);
        FS_CHECK(strstr(fs_cuda_library_path(), "/nonexistent/") == NULL);
    } else {
        FS_CHECK_EQ(rc, FS_ENOTFOUND);
        FS_CHECK(strstr(err.msg, "set FASTSPAWN_CUDART_LIBRARY") != NULL);
        FS_CHECK(strstr(rep, "system (dlopen \"libcudart.so.12\")") != NULL);
    }
}

FS_TEST(loader_forced_path_is_the_only_place_tried)
{
    const char *dirs[] = {fake_dir()};
    fs_error_t err;
    setenv("FASTSPAWN_NCCL_LIBRARY", "/nonexistent/libnccl.so.2", 1);
    FS_CHECK_EQ(fs_nccl_load(dirs, 1, &err), FS_ENOTFOUND);
    FS_CHECK(strstr(err.msg, "FASTSPAWN_NCCL_LIBRARY=/nonexistent/libnccl.so.2 (forced") != NULL);
    FS_CHECK(strstr(fs_nccl_search_report(), fake_dir()) == NULL);
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/libnccl.so.2", fake_dir());
    setenv("FASTSPAWN_NCCL_LIBRARY", path, 1);
    FS_CHECK_OK(fs_nccl_load(NULL, 0, &err), &err);
    FS_CHECK(strcmp(fs_nccl_library_path(), path) == 0);
}

FS_TEST(loader_takes_the_copy_already_loaded_first)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/libnccl.so.2", fake_dir());
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL); /* as torch would have */
    FS_CHECK(h != NULL);
    const char *dirs[] = {"/nonexistent/one"};
    fs_error_t err;
    FS_CHECK_OK(fs_nccl_load(dirs, 1, &err), &err);
    FS_CHECK(strstr(fs_nccl_search_report(), "/nonexistent/one") == NULL);
    FS_CHECK(strcmp(fs_nccl_library_path(), path) == 0);
}

FS_TEST(optional_symbols_are_gated_on_the_version)
{
    setenv("FAKE_NCCL_VERSION", "21000", 1); /* 2.10.0 */
    load_fakes();
    FS_CHECK_EQ(fs_nccl_version(), 21000);
    FS_CHECK_EQ(fs_nccl_caps(), FS_NCCL_CAP_ABORT | FS_NCCL_CAP_ASYNC_ERROR | FS_NCCL_CAP_AVG |
                                    FS_NCCL_CAP_BFLOAT16);
}

FS_TEST(old_version_codes_are_normalised_and_too_old_is_refused)
{
    setenv("FAKE_NCCL_VERSION", "2708", 1); /* 2.7.8, NCCL's pre-2.9 scheme */
    load_fakes();
    FS_CHECK_EQ(fs_nccl_version(), 20708);
    FS_CHECK_EQ(fs_nccl_caps(), FS_NCCL_CAP_ABORT | FS_NCCL_CAP_ASYNC_ERROR);
}

FS_TEST(nccl_before_2_7_is_refused)
{
    setenv("FAKE_NCCL_VERSION", "2603", 1);
    const char *dirs[] = {fake_dir()};
    fs_error_t err;
    FS_CHECK_EQ(fs_nccl_load(dirs, 1, &err), FS_ENOTFOUND);
    FS_CHECK(strstr(err.msg, "is NCCL 2.6.3; fastspawn needs 2.7 or later") != NULL);
    FS_CHECK_EQ(fs_nccl_version(), 0);
}

FS_TEST(no_device_and_not_loaded_are_clean_errors)
{
    unsigned char id[FS_NCCL_UNIQUE_ID_BYTES] = {0};
    fs_nccl_comm_t *c = NULL;
    fs_error_t err;
    FS_CHECK_EQ(fs_nccl_comm_create(id, 0, 1, 0, NULL, &c, &err), FS_ENOTFOUND);
    FS_CHECK(strstr(err.msg, "NCCL is not loaded") != NULL);
    setenv("FAKE_CUDA_DEVICES", "0", 1);
    load_fakes();
    FS_CHECK_EQ(fs_nccl_comm_create(id, 0, 1, 0, NULL, &c, &err), FS_ENOTFOUND);
    FS_CHECK(strstr(err.msg, "no usable CUDA device") != NULL);
    FS_CHECK(strstr(err.msg, "cudaErrorNoDevice") != NULL);
    FS_CHECK(c == NULL);
    setenv("FAKE_CUDA_DEVICES", "1", 1);
    FS_CHECK_EQ(fs_nccl_comm_create(id, 0, 1, 3, NULL, &c, &err), FS_EINVAL);
    FS_CHECK(strstr(err.msg, "CUDA device 3 does not exist (1 visible)") != NULL);
}

/* ------------------------------------------------------------------ */
/* Every dtype and op                                                 */
/* ------------------------------------------------------------------ */

static void check_reduction(fs_nccl_comm_t *c, int dtype, int op, int world)
{
    enum { N = 5 };
    size_t sz = fs_nccl_dtype_size(dtype);
    unsigned char in[N * 8], out[N * 8], want[N * 8];
    int rank = fs_nccl_comm_rank(c);
    long scale = op == FS_NCCL_PREMUL_SUM ? 2 : 1;
    for (size_t i = 0; i < N; i++) {
        long avg_in = 2; /* AVG: equal inputs keep the mean exact */
        put(in, i, dtype, op == FS_AVG ? avg_in : input_of(rank, i));
        put(want, i, dtype, op == FS_AVG ? avg_in : expected_of(op, world, i, scale));
    }
    unsigned char two[8];
    put(two, 0, dtype, 2);
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_ALLREDUCE,
                               .dtype = dtype,
                               .op = op,
                               .send = in,
                               .recv = out,
                               .count = N,
                               .premul_scalar = two});
    if (memcmp(out, want, N * sz) != 0) {
        fprintf(stderr, "  rank %d: all_reduce %s %s (world %d) wrong\n", rank,
                fs_nccl_dtype_name(dtype), fs_redop_name(op), world);
        fs_test_failed_checks++;
    }
}

static void rank_every_dtype_and_op(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    const int ops[] = {FS_SUM, FS_AVG, FS_MIN, FS_MAX, FS_PRODUCT, FS_NCCL_PREMUL_SUM};
    for (int d = 0; d < NDTYPES && c != NULL; d++)
        for (size_t o = 0; o < sizeof ops / sizeof ops[0]; o++)
            check_reduction(c, all_dtypes[d], ops[o], world);
    leave(c);
}

FS_TEST(all_reduce_every_dtype_and_op_world_1_to_4)
{
    prepare();
    for (int world = 1; world <= 4; world++)
        FS_CHECK_EQ(run_ranks(world, rank_every_dtype_and_op, NULL), 0);
}

static void rank_bool(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    unsigned char in[4] = {0, 1, (unsigned char)(rank == 0), 1}, any[4], all[4];
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_ALLREDUCE,
                               .dtype = FS_BOOL,
                               .op = FS_SUM,
                               .send = in,
                               .recv = any,
                               .count = 4});
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_ALLREDUCE,
                               .dtype = FS_BOOL,
                               .op = FS_PRODUCT,
                               .send = in,
                               .recv = all,
                               .count = 4});
    /* Like torch: SUM of bools is "any" (MAX), PRODUCT is "all" (MIN); never above 1. */
    FS_CHECK(any[0] == 0 && any[1] == 1 && any[2] == 1 && any[3] == 1);
    FS_CHECK(all[0] == 0 && all[1] == 1 && all[2] == (world == 1) && all[3] == 1);
    fs_error_t err;
    fs_nccl_args_t avg = {.kind = FS_COLL_ALLREDUCE,
                          .dtype = FS_BOOL,
                          .op = FS_AVG,
                          .send = in,
                          .recv = any,
                          .count = 4};
    FS_CHECK_EQ(fs_nccl_run(c, &avg, NULL, &err), FS_EINVAL);
    leave(c);
}

RANKS_TEST(bool_reduces_like_torch, 3, rank_bool)

static void rank_avg_and_device_scalar(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    float in[2] = {(float)(rank + 1), (float)(2 * rank)}, out[2];
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_ALLREDUCE,
                               .dtype = FS_FLOAT32,
                               .op = FS_AVG,
                               .send = in,
                               .recv = out,
                               .count = 2});
    FS_CHECK(out[0] == 2.5f && out[1] == 3.0f); /* world 4: (1+2+3+4)/4, (0+2+4+6)/4 */
    float *scalar = NULL;                       /* "device" memory: read when the collective runs */
    FS_CHECK_EQ(fs__cuda()->cudaMalloc((void **)&scalar, sizeof *scalar), fs__cudaSuccess);
    *scalar = 0.5f;
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_ALLREDUCE,
                               .dtype = FS_FLOAT32,
                               .op = FS_NCCL_PREMUL_SUM,
                               .send = in,
                               .recv = out,
                               .count = 2,
                               .premul_scalar = scalar,
                               .premul_scalar_on_device = 1});
    FS_CHECK(out[0] == 5.0f && out[1] == 6.0f);
    char *log = log_text();
    const char *p = log_line(log, "ncclRedOpCreatePreMulSum", "residence=0");
    p = log_find(after(p), "ncclAllReduce", "op=5");
    FS_CHECK(log_find(after(p), "ncclRedOpDestroy", "op=5") != NULL);
    free(log);
    fs__cuda()->cudaFree(scalar);
    leave(c);
}

RANKS_TEST(avg_is_exact_and_premul_sum_reads_a_device_scalar, 4, rank_avg_and_device_scalar)

/* ------------------------------------------------------------------ */
/* Every collective                                                   */
/* ------------------------------------------------------------------ */

static void check_floats(const float *got, const float *want, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++) {
        if (got[i] != want[i]) {
            fprintf(stderr, "  %s: [%zu] = %g, want %g\n", what, i, got[i], want[i]);
            fs_test_failed_checks++;
            return;
        }
    }
}

/* Rank r's element i of a collective's input: distinct across ranks and positions. */
static float val(int r, size_t i)
{
    return (float)(100 * r + (int)i);
}

static void rank_rooted(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    enum { N = 3 };
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    float in[4 * N], out[4 * N], want[4 * N];
    int root = world - 1;
    for (size_t i = 0; i < 4 * N; i++)
        in[i] = val(rank, i);
    /* broadcast, in place (send NULL) */
    memcpy(out, in, sizeof out);
    run_ok(
        c,
        (fs_nccl_args_t){
            .kind = FS_COLL_BROADCAST, .dtype = FS_FLOAT32, .root = root, .recv = out, .count = N});
    for (size_t i = 0; i < N; i++)
        want[i] = val(root, i);
    check_floats(out, want, N, "broadcast");
    /* reduce to rank 0 */
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_REDUCE,
                               .dtype = FS_FLOAT32,
                               .op = FS_SUM,
                               .root = 0,
                               .send = in,
                               .recv = out,
                               .count = N});
    for (size_t i = 0; i < N; i++) {
        want[i] = 0;
        for (int r = 0; r < world; r++)
            want[i] += val(r, i);
    }
    if (rank == 0)
        check_floats(out, want, N, "reduce");
    /* gather to the last rank */
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_GATHER,
                               .dtype = FS_FLOAT32,
                               .root = root,
                               .send = in,
                               .recv = out,
                               .count = N});
    for (int r = 0; r < world; r++)
        for (size_t i = 0; i < N; i++)
            want[r * N + i] = val(r, i);
    if (rank == root)
        check_floats(out, want, world * N, "gather");
    /* scatter from rank 0 */
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_SCATTER,
                               .dtype = FS_FLOAT32,
                               .root = 0,
                               .send = in,
                               .recv = out,
                               .count = N});
    for (size_t i = 0; i < N; i++)
        want[i] = val(0, (size_t)rank * N + i);
    check_floats(out, want, N, "scatter");
    leave(c);
}

FS_TEST(broadcast_reduce_gather_scatter_world_1_to_4)
{
    prepare();
    for (int world = 1; world <= 4; world++)
        FS_CHECK_EQ(run_ranks(world, rank_rooted, NULL), 0);
}

static void rank_all(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    enum { N = 2 };
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    float in[4 * N], out[4 * N], want[4 * N];
    for (size_t i = 0; i < 4 * N; i++)
        in[i] = val(rank, i);
    run_ok(
        c,
        (fs_nccl_args_t){
            .kind = FS_COLL_ALLGATHER, .dtype = FS_FLOAT32, .send = in, .recv = out, .count = N});
    for (int r = 0; r < world; r++)
        for (size_t i = 0; i < N; i++)
            want[r * N + i] = val(r, i);
    check_floats(out, want, world * N, "all_gather");
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_REDUCE_SCATTER,
                               .dtype = FS_FLOAT32,
                               .op = FS_MAX,
                               .send = in,
                               .recv = out,
                               .count = N});
    for (size_t i = 0; i < N; i++)
        want[i] = val(world - 1, (size_t)rank * N + i);
    check_floats(out, want, N, "reduce_scatter");
    run_ok(c,
           (fs_nccl_args_t){
               .kind = FS_COLL_ALLTOALL, .dtype = FS_FLOAT32, .send = in, .recv = out, .count = N});
    for (int r = 0; r < world; r++)
        for (size_t i = 0; i < N; i++)
            want[r * N + i] = val(r, (size_t)rank * N + i);
    check_floats(out, want, world * N, "all_to_all");
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_BARRIER});
    leave(c);
}

FS_TEST(all_gather_reduce_scatter_all_to_all_barrier_world_1_to_4)
{
    prepare();
    for (int world = 1; world <= 4; world++)
        FS_CHECK_EQ(run_ranks(world, rank_all, NULL), 0);
}

/* Uneven all_to_all: rank r sends r + 2p + 1 elements to p. */
static size_t uneven(int from, int to)
{
    return (size_t)(from + 2 * to + 1);
}

static void rank_alltoallv(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    size_t sc[4], sd[4], rc[4], rd[4], so = 0, ro = 0;
    float in[64], out[64], want[64];
    for (int p = 0; p < world; p++) {
        sc[p] = uneven(rank, p), sd[p] = so, so += sc[p];
        rc[p] = uneven(p, rank), rd[p] = ro, ro += rc[p];
    }
    for (size_t i = 0; i < so; i++)
        in[i] = val(rank, i);
    for (int p = 0; p < world; p++) /* what p sends me: its block for rank `rank` */
        for (size_t i = 0; i < rc[p]; i++) {
            size_t off = 0;
            for (int q = 0; q < rank; q++)
                off += uneven(p, q);
            want[rd[p] + i] = val(p, off + i);
        }
    run_ok(c, (fs_nccl_args_t){.kind = FS_NCCL_ALLTOALLV,
                               .dtype = FS_FLOAT32,
                               .send = in,
                               .recv = out,
                               .send_counts = sc,
                               .send_displs = sd,
                               .recv_counts = rc,
                               .recv_displs = rd});
    check_floats(out, want, ro, "all_to_all (uneven)");
    leave(c);
}

FS_TEST(uneven_all_to_all_world_1_to_4)
{
    prepare();
    for (int world = 1; world <= 4; world++)
        FS_CHECK_EQ(run_ranks(world, rank_alltoallv, NULL), 0);
}

static void rank_send_recv(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    enum { N = 20000 }; /* larger than one fake mailbox: chunked */
    float *buf = malloc(N * sizeof *buf), *got = malloc(N * sizeof *got);
    for (size_t i = 0; i < N; i++)
        buf[i] = val(rank, i);
    if (rank == 0)
        run_ok(c,
               (fs_nccl_args_t){
                   .kind = FS_NCCL_SEND, .dtype = FS_FLOAT32, .root = 1, .send = buf, .count = N});
    else if (rank == 1)
        run_ok(c,
               (fs_nccl_args_t){
                   .kind = FS_NCCL_RECV, .dtype = FS_FLOAT32, .root = 0, .recv = got, .count = N});
    if (rank == 1)
        FS_CHECK(got[0] == val(0, 0) && got[N - 1] == val(0, N - 1));
    leave(c);
    free(buf);
    free(got);
}

RANKS_TEST(send_recv_between_two_ranks, 3, rank_send_recv)

/* ------------------------------------------------------------------ */
/* Groups, streams                                                    */
/* ------------------------------------------------------------------ */

static void rank_group(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    float a[2] = {1, (float)rank}, b[2], ring_in[2] = {(float)rank, 7}, ring_out[2];
    fs__cudaStream_t s = new_stream();
    fs_error_t err;
    log_clear();
    FS_CHECK_OK(fs_nccl_group_start(c, &err), &err);
    fs_nccl_work_t *inside = (fs_nccl_work_t *)1;
    fs_nccl_args_t ar = {.kind = FS_COLL_ALLREDUCE,
                         .dtype = FS_FLOAT32,
                         .op = FS_SUM,
                         .send = a,
                         .recv = b,
                         .count = 2,
                         .stream = (uintptr_t)s};
    FS_CHECK_OK(fs_nccl_run(c, &ar, &inside, &err), &err);
    FS_CHECK(inside == NULL); /* the group's work comes from group_end */
    fs_nccl_args_t snd = {.kind = FS_NCCL_SEND,
                          .dtype = FS_FLOAT32,
                          .root = (rank + 1) % world,
                          .send = ring_in,
                          .count = 2,
                          .stream = (uintptr_t)s};
    fs_nccl_args_t rcv = {.kind = FS_NCCL_RECV,
                          .dtype = FS_FLOAT32,
                          .root = (rank + world - 1) % world,
                          .recv = ring_out,
                          .count = 2,
                          .stream = (uintptr_t)s};
    FS_CHECK_OK(fs_nccl_run(c, &snd, NULL, &err), &err);
    FS_CHECK_OK(fs_nccl_run(c, &rcv, NULL, &err), &err);
    fs_nccl_work_t *w = NULL;
    FS_CHECK_OK(fs_nccl_group_end(c, &w, &err), &err);
    FS_CHECK(w != NULL);
    FS_CHECK_EQ(fs_nccl_work_seq(w), 1);
    FS_CHECK_OK(fs_nccl_work_synchronize(w, 5000, &err), &err);
    FS_CHECK(b[0] == (float)world && b[1] == (float)(world * (world - 1) / 2));
    FS_CHECK(ring_out[0] == (float)((rank + world - 1) % world) && ring_out[1] == 7);
    char *log = log_text();
    const char *p = log_line(log, "ncclGroupStart", NULL);
    p = log_find(after(p), "ncclAllReduce", NULL);
    p = log_find(after(p), "ncclSend", NULL);
    p = log_find(after(p), "ncclRecv", NULL);
    p = log_find(after(p), "ncclGroupEnd", NULL);
    FS_CHECK(log_find(after(p), "cudaEventRecord", NULL) != NULL); /* the end event follows */
    free(log);
    fs_nccl_work_release(w);
    FS_CHECK_EQ(fs_nccl_comm_seq(c), 1);
    fs__cuda()->cudaStreamDestroy(s);
    leave(c);
}

RANKS_TEST(grouped_calls_complete_as_one_work, 3, rank_group)

static void rank_stream_order(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    fs__cudaStream_t s = new_stream(), later = new_stream();
    float x[4] = {1, 2, 3, 4}, y[4];
    char cs[40], cc[40], cl[40];
    snprintf(cs, sizeof cs, "stream=0x%jx", (uintmax_t)(uintptr_t)s);
    snprintf(cc, sizeof cc, "stream=0x%jx", (uintmax_t)fs_nccl_comm_stream(c));
    snprintf(cl, sizeof cl, "stream=0x%jx", (uintmax_t)(uintptr_t)later);
    log_clear();
    fs_nccl_args_t a = {.kind = FS_COLL_ALLREDUCE,
                        .dtype = FS_FLOAT32,
                        .op = FS_SUM,
                        .send = x,
                        .recv = y,
                        .count = 4,
                        .stream = (uintptr_t)s};
    fs_nccl_work_t *w = NULL;
    fs_error_t err;
    FS_CHECK_OK(fs_nccl_run(c, &a, &w, &err), &err);
    FS_CHECK_OK(fs_nccl_work_wait_stream(w, (uintptr_t)later, &err), &err);
    FS_CHECK_OK(fs_nccl_work_synchronize(w, 5000, &err), &err);
    int done = 0;
    FS_CHECK_OK(fs_nccl_work_query(w, &done, &err), &err);
    FS_CHECK_EQ(done, 1);
    char *log = log_text();
    /* caller's stream: record E; comm stream: wait E, the NCCL call, record F; later: wait F */
    char e[48], f[48], needle[96];
    const char *p = log_line(log, "cudaEventRecord", cs);
    event_of(p, e, sizeof e);
    snprintf(needle, sizeof needle, "%s %s", cc, e);
    p = log_find(after(p), "cudaStreamWaitEvent", needle);
    p = log_find(after(p), "ncclAllReduce", cc);
    p = log_find(after(p), "cudaEventRecord", cc);
    event_of(p, f, sizeof f);
    FS_CHECK(p != NULL && strcmp(e, f) != 0 && e[0] != '\0');
    snprintf(needle, sizeof needle, "%s %s", cl, f);
    FS_CHECK(log_find(after(p), "cudaStreamWaitEvent", needle) != NULL);
    free(log);
    fs_nccl_work_release(w);
    fs__cuda()->cudaStreamDestroy(s);
    fs__cuda()->cudaStreamDestroy(later);
    leave(c);
}

RANKS_TEST(each_collective_orders_caller_stream_comm_stream_and_end_event, 2, rank_stream_order)

static void rank_device_and_init(int rank, int world, const unsigned char *id, void *arg)
{
    const int *blocking = arg;
    fs_nccl_comm_opts_t o;
    fs_nccl_comm_opts_init(&o);
    o.blocking_init = *blocking;
    FS_CHECK_EQ(fs__cuda()->cudaSetDevice(0), fs__cudaSuccess);
    log_clear();
    fs_nccl_comm_t *c = join(rank, world, id, &o);
    int dev = -1;
    fs__cuda()->cudaGetDevice(&dev);
    FS_CHECK_EQ(dev, 0); /* the caller's device is back */
    FS_CHECK_EQ(fs_nccl_comm_device(c), rank);
    char *log = log_text();
    char want[64];
    snprintf(want, sizeof want, "rank=%d nranks=%d device=%d", rank, world, rank);
    FS_CHECK(log_line(log, *blocking ? "ncclCommInitRank " : "ncclCommInitRankConfig", want));
    free(log);
    FS_CHECK_EQ(fs_nccl_comm_nonblocking(c), !*blocking);
    leave(c);
}

FS_TEST(init_runs_on_the_given_device_non_blocking_or_blocking)
{
    prepare();
    int blocking = 0;
    FS_CHECK_EQ(run_ranks(3, rank_device_and_init, &blocking), 0);
    blocking = 1;
    FS_CHECK_EQ(run_ranks(3, rank_device_and_init, &blocking), 0);
}

static void rank_old_nccl(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    log_clear();
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    char *log = log_text();
    FS_CHECK(log_line(log, "ncclCommInitRank ", NULL) != NULL); /* no Config before 2.14 */
    free(log);
    float x[2] = {1, 2}, y[2];
    fs_error_t err;
    fs_nccl_args_t a = {.kind = FS_COLL_ALLREDUCE,
                        .dtype = FS_FLOAT32,
                        .op = FS_AVG,
                        .send = x,
                        .recv = y,
                        .count = 2};
    FS_CHECK_EQ(fs_nccl_run(c, &a, NULL, &err), FS_EINVAL);
    FS_CHECK(strstr(err.msg, "AVG needs NCCL >= 2.10; the loaded one is 2.9.0") != NULL);
    a.op = FS_NCCL_PREMUL_SUM;
    a.premul_scalar = x;
    FS_CHECK_EQ(fs_nccl_run(c, &a, NULL, &err), FS_EINVAL);
    FS_CHECK(strstr(err.msg, "PREMUL_SUM needs NCCL >= 2.11") != NULL);
    a.op = FS_SUM;
    a.dtype = FS_BFLOAT16;
    FS_CHECK_EQ(fs_nccl_run(c, &a, NULL, &err), FS_EINVAL);
    a.dtype = FS_NCCL_FLOAT8_E4M3;
    FS_CHECK_EQ(fs_nccl_run(c, &a, NULL, &err), FS_EINVAL);
    FS_CHECK(strstr(err.msg, "float8_e4m3fn needs NCCL >= 2.24") != NULL);
    a.dtype = FS_FLOAT32;
    run_ok(c, a); /* refusals leave the communicator usable */
    FS_CHECK(y[0] == (float)world && y[1] == (float)(2 * world));
    leave(c);
}

FS_TEST(an_older_nccl_gets_blocking_init_and_refuses_what_it_lacks)
{
    setenv("FAKE_NCCL_VERSION", "20900", 1);
    prepare();
    FS_CHECK_EQ(run_ranks(2, rank_old_nccl, NULL), 0);
}

static void rank_bad_args(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    float x[2] = {1, 2}, y[2];
    fs_error_t err;
    fs_nccl_args_t a = {.kind = FS_COLL_ALLREDUCE,
                        .dtype = FS_INT32,
                        .op = FS_BXOR,
                        .send = x,
                        .recv = y,
                        .count = 2};
    FS_CHECK_EQ(fs_nccl_run(c, &a, NULL, &err), FS_EINVAL);
    FS_CHECK(strstr(err.msg, "no bitwise reductions") != NULL);
    a = (fs_nccl_args_t){
        .kind = FS_COLL_BROADCAST, .dtype = FS_FLOAT32, .root = world, .recv = y, .count = 2};
    FS_CHECK_EQ(fs_nccl_run(c, &a, NULL, &err), FS_EINVAL);
    a = (fs_nccl_args_t){.kind = FS_COLL_ALLREDUCE, .dtype = 99, .send = x, .recv = y, .count = 2};
    FS_CHECK_EQ(fs_nccl_run(c, &a, NULL, &err), FS_EINVAL);
    a = (fs_nccl_args_t){.kind = FS_COLL_ALLREDUCE, .dtype = FS_FLOAT32, .recv = y, .count = 2};
    FS_CHECK_EQ(fs_nccl_run(c, &a, NULL, &err), FS_EINVAL); /* NULL send */
    a = sum2(x, y);
    fs_nccl_work_t *w = NULL;
    FS_CHECK_OK(fs_nccl_run(c, &a, &w, &err), &err);
    FS_CHECK_EQ(fs_nccl_work_seq(w), 1); /* refusals took no sequence number */
    fs_nccl_work_release(w);
    FS_CHECK_EQ(fs_nccl_comm_status(c, NULL), FS_OK);
    leave(c);
}

RANKS_TEST(invalid_arguments_are_refused_and_the_communicator_stays_usable, 1, rank_bad_args)

/* ------------------------------------------------------------------ */
/* Failures: timeouts, async errors, dead peers, stuck init           */
/* ------------------------------------------------------------------ */

static fs_nccl_comm_opts_t short_timeouts(int64_t timeout_ms)
{
    fs_nccl_comm_opts_t o;
    fs_nccl_comm_opts_init(&o);
    o.timeout_ms = timeout_ms;
    o.watchdog_poll_ms = 20;
    o.init_timeout_ms = 10000;
    return o;
}

static fs_nccl_comm_t *join_with_timeout(int rank, int world, const unsigned char *id,
                                         int64_t timeout_ms)
{
    fs_nccl_comm_opts_t o = short_timeouts(timeout_ms);
    return join(rank, world, id, &o);
}

/* Wait (bounded) until the communicator reports an error; returns its code. */
static int wait_failed(fs_nccl_comm_t *c, int64_t max_ms, fs_error_t *why)
{
    int64_t until = fs_now_ms() + max_ms;
    int rc;
    while ((rc = fs_nccl_comm_status(c, why)) == FS_OK && fs_now_ms() < until)
        usleep(5000);
    return rc;
}

static void rank_watchdog_timeout(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join_with_timeout(rank, world, id, 300);
    float x[2] = {1, 2}, y[2];
    fs_nccl_args_t a = sum2(x, y);
    run_ok(c, a); /* seq 1 completes */
    log_clear();
    fs_nccl_work_t *w = NULL;
    fs_error_t err, why;
    setenv("FAKE_NCCL_STUCK", "AllReduce@1", 1); /* rank 1's next one hangs, so rank 0's too */
    setenv("FAKE_NCCL_NO_PEER_CHECK", "1", 1);   /* rank 1 leaving must not be the error */
    FS_CHECK_OK(fs_nccl_run(c, &a, &w, &err), &err);
    /* Nobody waits: the watchdog alone must notice. */
    FS_CHECK_EQ(wait_failed(c, 5000, &why), FS_ETIMEOUT);
    FS_CHECK(strstr(why.msg, "all_reduce (seq 2, 2 x float32) did not complete") != NULL);
    FS_CHECK(strstr(why.msg, "timeout of 300 ms") != NULL);
    char *log = log_text();
    FS_CHECK(log_line(log, "ncclCommAbort", NULL) != NULL);
    free(log);
    /* Every wait and every later call returns that error. */
    FS_CHECK_EQ(fs_nccl_work_synchronize(w, -1, &err), FS_ETIMEOUT);
    FS_CHECK(strcmp(err.msg, why.msg) == 0);
    int done = 1;
    FS_CHECK_EQ(fs_nccl_work_query(w, &done, &err), FS_ETIMEOUT);
    FS_CHECK_EQ(done, 0);
    FS_CHECK_EQ(fs_nccl_work_wait_stream(w, 0, &err), FS_ETIMEOUT);
    FS_CHECK_EQ(fs_nccl_run(c, &a, NULL, &err), FS_ETIMEOUT);
    FS_CHECK(strcmp(err.msg, why.msg) == 0);
    FS_CHECK_EQ(fs_nccl_group_start(c, &err), FS_ETIMEOUT);
    fs_nccl_work_release(w);
    FS_CHECK_OK(fs_nccl_comm_destroy(c, 1000, &err), &err); /* already failed: ends quietly */
}

RANKS_TEST(watchdog_aborts_a_work_past_its_timeout_naming_collective_seq_timeout, 2,
           rank_watchdog_timeout)

static void rank_async_error(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join_with_timeout(rank, world, id, 60000);
    float x[2] = {1, 2}, y[2];
    fs_nccl_args_t a = sum2(x, y);
    setenv("FAKE_NCCL_STUCK", "AllReduce", 1);
    setenv("FAKE_NCCL_ASYNC_ERROR", "6", 1); /* ncclRemoteError once a call started */
    setenv("FAKE_NCCL_INPROGRESS", "0", 1);  /* so it shows up after the enqueue, not in it */
    fs_nccl_work_t *w = NULL;
    fs_error_t err;
    FS_CHECK_OK(fs_nccl_run(c, &a, &w, &err), &err);
    int64_t t0 = fs_now_ms();
    FS_CHECK_EQ(fs_nccl_work_synchronize(w, -1, &err), FS_EPEER);
    FS_CHECK(fs_now_ms() - t0 < 5000); /* the error, not the 60 s timeout */
    FS_CHECK(strstr(err.msg, "ncclRemoteError") != NULL);
    FS_CHECK(strstr(err.msg, "while all_reduce (seq 1, 2 x float32) was pending") != NULL);
    FS_CHECK_EQ(fs_nccl_run(c, &a, NULL, &err), FS_EPEER);
    fs_nccl_work_release(w);
    FS_CHECK_OK(fs_nccl_comm_destroy(c, 1000, &err), &err);
}

RANKS_TEST(an_async_nccl_error_aborts_and_names_the_pending_work, 2, rank_async_error)

static void rank_peer_dies(int rank, int world, const unsigned char *id, void *arg)
{
    const int64_t *timeout = arg;
    fs_nccl_comm_opts_t o = short_timeouts(*timeout);
    fs_nccl_comm_t *c = join(rank, world, id, &o);
    float x[2] = {1, 2}, y[2];
    fs_nccl_args_t a = sum2(x, y);
    run_ok(c, a);
    fs_nccl_work_t *w = NULL;
    fs_error_t err;
    if (rank == 1) { /* the peer: starts the collective, then is killed inside it */
        setenv("FAKE_NCCL_STUCK", "AllReduce", 1);
        FS_CHECK_OK(fs_nccl_run(c, &a, &w, &err), &err);
        usleep(100000);
        raise(SIGKILL);
    }
    FS_CHECK_OK(fs_nccl_run(c, &a, &w, &err), &err);
    int64_t t0 = fs_now_ms();
    int rc = fs_nccl_work_synchronize(w, -1, &err);
    FS_CHECK(fs_now_ms() - t0 < 8000); /* an error, never a hang */
    if (*timeout > 10000) {
        FS_CHECK_EQ(rc, FS_EPEER); /* noticed through NCCL's async error */
        FS_CHECK(strstr(err.msg, "rank 1 exited") != NULL);
    } else {
        FS_CHECK_EQ(rc, FS_ETIMEOUT); /* not noticed: the watchdog's timeout ends it */
    }
    fs_nccl_work_release(w);
    FS_CHECK_OK(fs_nccl_comm_destroy(c, 1000, &err), &err);
}

FS_TEST(a_peer_killed_mid_collective_is_an_error_not_a_hang)
{
    prepare();
    int64_t timeout = 60000;
    int killed = 0;
    FS_CHECK_EQ(run_ranks_sig(2, rank_peer_dies, &timeout, &killed), 0);
    FS_CHECK_EQ(killed, 1);
    setenv("FAKE_NCCL_NO_PEER_CHECK", "1", 1);
    timeout = 500;
    FS_CHECK_EQ(run_ranks_sig(2, rank_peer_dies, &timeout, &killed), 0);
    FS_CHECK_EQ(killed, 1);
}

static void rank_init_timeout(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_opts_t o = short_timeouts(1000);
    o.init_timeout_ms = 300;
    log_clear();
    fs_nccl_comm_t *c = NULL;
    fs_error_t err;
    int64_t t0 = fs_now_ms();
    FS_CHECK_EQ(fs_nccl_comm_create(id, rank, world, rank, &o, &c, &err), FS_ETIMEOUT);
    FS_CHECK(fs_now_ms() - t0 < 3000);
    char want[80];
    snprintf(want, sizeof want, "rank %d of 2: NCCL communicator init (device %d)", rank, rank);
    FS_CHECK(strstr(err.msg, want) != NULL);
    FS_CHECK(strstr(err.msg, "within its 300 ms deadline") != NULL);
    char *log = log_text();
    FS_CHECK(log_line(log, "ncclCommAbort", NULL) != NULL);
    free(log);
    FS_CHECK(c == NULL);
}

FS_TEST(non_blocking_init_past_its_deadline_is_aborted)
{
    prepare();
    setenv("FAKE_NCCL_INIT_DELAY_MS", "-1@1", 1); /* rank 1 never finishes; rank 0 waits for it */
    FS_CHECK_EQ(run_ranks(2, rank_init_timeout, NULL), 0);
}

static void rank_slow_init(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    FS_CHECK(c != NULL);
    leave(c);
}

FS_TEST(slow_non_blocking_init_is_polled_to_success)
{
    prepare();
    setenv("FAKE_NCCL_INIT_DELAY_MS", "200", 1);
    FS_CHECK_EQ(run_ranks(2, rank_slow_init, NULL), 0);
}

static void rank_stuck_enqueue(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join_with_timeout(rank, world, id, 300);
    setenv("FAKE_NCCL_INPROGRESS", "-1", 1);
    float x[2] = {1, 2}, y[2];
    fs_nccl_args_t a = sum2(x, y);
    fs_error_t err;
    FS_CHECK_EQ(fs_nccl_run(c, &a, NULL, &err), FS_ETIMEOUT);
    FS_CHECK(strstr(err.msg, "enqueuing all_reduce (seq 1) did not finish") != NULL);
    FS_CHECK_EQ(fs_nccl_comm_status(c, NULL), FS_ETIMEOUT);
    FS_CHECK_OK(fs_nccl_comm_destroy(c, 1000, &err), &err);
}

RANKS_TEST(a_non_blocking_enqueue_that_never_settles_times_out, 1, rank_stuck_enqueue)

static void rank_abort_destroy(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join_with_timeout(rank, world, id, 60000);
    float x[2] = {1, 2}, y[2];
    fs_nccl_args_t a = sum2(x, y);
    fs_error_t err;
    /* destroy with a work that never completes: bounded by its timeout, then aborted */
    setenv("FAKE_NCCL_STUCK", "AllReduce", 1);
    fs_nccl_work_t *w = NULL;
    FS_CHECK_OK(fs_nccl_run(c, &a, &w, &err), &err);
    int64_t t0 = fs_now_ms();
    FS_CHECK_EQ(fs_nccl_comm_destroy(c, 200, &err), FS_ETIMEOUT);
    FS_CHECK(fs_now_ms() - t0 < 3000);
    FS_CHECK(strstr(err.msg, "works still pending when the communicator was destroyed") != NULL);
    FS_CHECK_EQ(fs_nccl_work_synchronize(w, 100, &err), FS_ETIMEOUT); /* failed, not pending */
    FS_CHECK(strstr(err.msg, "destroyed") != NULL);
    fs_nccl_work_release(w); /* after destroy: still valid */
}

static void rank_abort(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    fs_error_t err;
    fs_nccl_comm_abort(c, "test abort");
    FS_CHECK_EQ(fs_nccl_run(c, &(fs_nccl_args_t){.kind = FS_COLL_BARRIER}, NULL, &err),
                FS_EABORTED);
    FS_CHECK(strstr(err.msg, "test abort") != NULL);
    FS_CHECK_OK(fs_nccl_comm_destroy(c, 1000, &err), &err);
}

FS_TEST(abort_and_destroy_with_pending_work_are_bounded)
{
    prepare();
    FS_CHECK_EQ(run_ranks(1, rank_abort, NULL), 0);
    FS_CHECK_EQ(run_ranks(1, rank_abort_destroy, NULL), 0);
}

static void rank_fork(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    fs_nccl_work_t *w = NULL;
    fs_error_t err;
    FS_CHECK_OK(fs_nccl_run(c, &(fs_nccl_args_t){.kind = FS_COLL_BARRIER}, &w, &err), &err);
    /* Fork while the lock is held, as a parent thread may hold it: the child must not wait. */
    pthread_mutex_lock(&((struct fs_nccl_comm *)c)->mu);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(10); /* fs_test's limit does not reach a grandchild */
        int rc = fs_nccl_run(c, &(fs_nccl_args_t){.kind = FS_COLL_BARRIER}, NULL, &err);
        int ok = rc == FS_EINVAL && strstr(err.msg, "a forked child cannot use it") != NULL;
        int done = 0;
        ok = ok && fs_nccl_work_query(w, &done, &err) == FS_EINVAL;
        ok = ok && fs_nccl_work_synchronize(w, -1, &err) == FS_EINVAL;
        ok = ok && fs_nccl_comm_status(c, &err) == FS_EINVAL;
        ok = ok && fs_nccl_group_start(c, &err) == FS_EINVAL;
        fs_nccl_work_release(w);
        ok = ok && fs_nccl_comm_destroy(c, 0, &err) == FS_OK;
        _exit(ok ? 0 : 1);
    }
    pthread_mutex_unlock(&((struct fs_nccl_comm *)c)->mu);
    int st = 0;
    FS_CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    FS_CHECK_OK(fs_nccl_work_synchronize(w, 5000, &err), &err); /* the parent's is untouched */
    fs_nccl_work_release(w);
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_BARRIER});
    leave(c);
}

RANKS_TEST(a_forked_child_cannot_use_the_communicator, 1, rank_fork)

/* The fake's shared state is a memfd mapping: no name in /dev/shm or /tmp to leave behind. */
static void rank_nothing_named(int rank, int world, const unsigned char *id, void *arg)
{
    (void)arg;
    fs_nccl_comm_t *c = join(rank, world, id, NULL);
    FILE *f = fopen("/proc/self/maps", "r");
    FS_CHECK(f != NULL);
    char line[512];
    int memfd = 0, named = 0;
    while (f != NULL && fgets(line, sizeof line, f) != NULL) {
        memfd += strstr(line, "/memfd:fake-nccl (deleted)") != NULL;
        /* a shared mapping ("rw-s") of a file with a name (libraries are private mappings,
         * and the checkout itself may live in /tmp) */
        const char *perms = strchr(line, ' ');
        int shared = perms != NULL && strlen(perms) > 4 && perms[4] == 's';
        named += shared && (strstr(line, "/dev/shm/") != NULL || strstr(line, " /tmp/") != NULL);
    }
    if (f != NULL)
        fclose(f);
    FS_CHECK_EQ(memfd, 1);
    FS_CHECK_EQ(named, 0);
    leave(c);
}

RANKS_TEST(the_fake_shares_memory_through_a_memfd_not_a_file, 2, rank_nothing_named)

static void rank_unique_id_from_rank0(int rank, int world, const unsigned char *id, void *arg)
{
    (void)id;
    int *fds = arg; /* rank 0 makes the id and writes it to the others through a pipe */
    unsigned char mine[FS_NCCL_UNIQUE_ID_BYTES];
    fs_error_t err;
    if (rank == 0) {
        FS_CHECK_OK(fs_nccl_get_unique_id(mine, &err), &err);
        for (int r = 1; r < world; r++)
            FS_CHECK(write(fds[1], mine, sizeof mine) == (ssize_t)sizeof mine);
    } else {
        FS_CHECK(read(fds[0], mine, sizeof mine) == (ssize_t)sizeof mine);
    }
    fs_nccl_comm_t *c = join(rank, world, mine, NULL);
    int32_t v = rank + 1, sum = 0;
    run_ok(c, (fs_nccl_args_t){.kind = FS_COLL_ALLREDUCE,
                               .dtype = FS_INT32,
                               .op = FS_SUM,
                               .send = &v,
                               .recv = &sum,
                               .count = 1});
    FS_CHECK_EQ(sum, world * (world + 1) / 2);
    leave(c);
}

FS_TEST(a_unique_id_made_by_rank_0_after_the_fork)
{
    prepare();
    int fds[2];
    FS_CHECK(pipe(fds) == 0);
    FS_CHECK_EQ(run_ranks(4, rank_unique_id_from_rank0, fds), 0);
}

int main(void)
{
    /* The hooks a test sets must not leak in from the caller's environment. */
    unsetenv("FASTSPAWN_NCCL_LIBRARY");
    unsetenv("FASTSPAWN_CUDART_LIBRARY");
    return fs_test_main();
}
