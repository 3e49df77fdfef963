/*
 * fake_cudart.c - a fake CUDA runtime (libcudart.so.13) for tests without a
 * GPU; see fake.h. Like the real one, it refuses to work in a child forked
 * after the parent initialised it (cudaErrorInitializationError).
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fake.h"

/* ------------------------------------------------------------------ */
/* The log                                                            */
/* ------------------------------------------------------------------ */

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static char *log_buf;
static size_t log_len, log_cap;

void fakecuda_log(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    size_t len = strlen(line);
    line[len++] = '\n';
    pthread_mutex_lock(&log_mu);
    if (log_len + len + 1 > log_cap) {
        size_t cap = log_cap ? log_cap * 2 : 65536;
        while (cap < log_len + len + 1)
            cap *= 2;
        char *p = realloc(log_buf, cap);
        if (p == NULL) {
            pthread_mutex_unlock(&log_mu);
            return;
        }
        log_buf = p;
        log_cap = cap;
    }
    memcpy(log_buf + log_len, line, len);
    log_len += len;
    log_buf[log_len] = '\0';
    pthread_mutex_unlock(&log_mu);
    const char *echo = getenv("FAKE_CUDA_LOG_STDERR");
    if (echo != NULL && echo[0] == '1')
        fprintf(stderr, "[fake %d] %.*s", (int)getpid(), (int)len, line);
}

size_t fakecuda_log_read(char *buf, size_t cap)
{
    pthread_mutex_lock(&log_mu);
    size_t n = log_len;
    if (cap > 0) {
        size_t k = n < cap - 1 ? n : cap - 1;
        if (k > 0)
            memcpy(buf, log_buf, k);
        buf[k] = '\0';
    }
    pthread_mutex_unlock(&log_mu);
    return n;
}

void fakecuda_log_clear(void)
{
    pthread_mutex_lock(&log_mu);
    log_len = 0;
    if (log_buf != NULL)
        log_buf[0] = '\0';
    pthread_mutex_unlock(&log_mu);
}

/* ------------------------------------------------------------------ */
/* Devices and initialisation                                         */
/* ------------------------------------------------------------------ */

static atomic_int init_pid; /* the process that initialised "CUDA" */
static _Thread_local int current_device;

static int device_count(void)
{
    const char *s = getenv("FAKE_CUDA_DEVICES");
    return s != NULL ? atoi(s) : 1;
}

/* Like CUDA: the first device call initialises; a forked child cannot use it afterwards. */
static fs__cudaError_t touch(void)
{
    int me = (int)getpid(), expected = 0;
    if (atomic_compare_exchange_strong(&init_pid, &expected, me) || expected == me)
        return device_count() > 0 ? fs__cudaSuccess : fs__cudaErrorNoDevice;
    return fs__cudaErrorInitializationError;
}

const char *cudaGetErrorName(fs__cudaError_t e)
{
    switch (e) {
    case fs__cudaSuccess: return "cudaSuccess";
    case fs__cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case fs__cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case fs__cudaErrorInitializationError: return "cudaErrorInitializationError";
    case fs__cudaErrorNoDevice: return "cudaErrorNoDevice";
    case fs__cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case fs__cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case fs__cudaErrorNotReady: return "cudaErrorNotReady";
    default: return "cudaErrorUnknown";
    }
}

const char *cudaGetErrorString(fs__cudaError_t e)
{
    switch (e) {
    case fs__cudaSuccess: return "no error";
    case fs__cudaErrorNoDevice: return "no CUDA-capable device is detected (fake)";
    case fs__cudaErrorInitializationError: return "initialization error (fake: forked child?)";
    case fs__cudaErrorNotReady: return "device not ready";
    default: return "fake CUDA error";
    }
}

fs__cudaError_t cudaRuntimeGetVersion(int *v)
{
    *v = 13000;
    return fs__cudaSuccess;
}

fs__cudaError_t cudaDriverGetVersion(int *v)
{
    *v = 13000;
    return fs__cudaSuccess;
}

fs__cudaError_t cudaGetDeviceCount(int *count)
{
    *count = 0;
    fs__cudaError_t e = touch();
    if (e == fs__cudaSuccess)
        *count = device_count();
    return e;
}

fs__cudaError_t cudaGetDevice(int *device)
{
    fs__cudaError_t e = touch();
    *device = current_device;
    return e;
}

fs__cudaError_t cudaSetDevice(int device)
{
    fs__cudaError_t e = touch();
    if (e != fs__cudaSuccess)
        return e;
    if (device < 0 || device >= device_count())
        return fs__cudaErrorInvalidDevice;
    fakecuda_log("cudaSetDevice %d", device);
    current_device = device;
    return fs__cudaSuccess;
}

fs__cudaError_t cudaMalloc(void **ptr, size_t size)
{
    fs__cudaError_t e = touch();
    if (e != fs__cudaSuccess)
        return e;
    *ptr = calloc(1, size ? size : 1);
    fakecuda_log("cudaMalloc %zu device=%d", size, current_device);
    return *ptr != NULL ? fs__cudaSuccess : fs__cudaErrorMemoryAllocation;
}

fs__cudaError_t cudaFree(void *ptr)
{
    free(ptr);
    return fs__cudaSuccess;
}

/* ------------------------------------------------------------------ */
/* Events and streams                                                 */
/* ------------------------------------------------------------------ */

/* One lock and condition for every event: tests are small, simplicity wins. */
static pthread_mutex_t ev_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ev_cv = PTHREAD_COND_INITIALIZER;

struct CUevent_st {
    int refs; /* the creator's and one per queued op (ev_mu) */
    uint64_t recorded, completed;
};

enum { OP_RECORD, OP_WAIT, OP_HOST };
struct op {
    int kind;
    struct CUevent_st *ev;
    uint64_t gen;
    fakecuda_host_fn fn;
    void *arg;
    struct op *next;
};

struct CUstream_st {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct op *head, *tail;
    int destroyed;
};

static void event_unref_locked(struct CUevent_st *ev)
{
    if (--ev->refs == 0)
        free(ev);
}

static void run_op(struct op *op)
{
    if (op->kind == OP_HOST) {
        op->fn(op->arg);
        return;
    }
    pthread_mutex_lock(&ev_mu);
    if (op->kind == OP_RECORD) {
        if (op->gen > op->ev->completed)
            op->ev->completed = op->gen;
        pthread_cond_broadcast(&ev_cv);
    } else {
        while (op->ev->completed < op->gen)
            pthread_cond_wait(&ev_cv, &ev_mu); /* a GPU waits forever too */
    }
    event_unref_locked(op->ev);
    pthread_mutex_unlock(&ev_mu);
}

static void *stream_main(void *arg)
{
    struct CUstream_st *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->head == NULL && !s->destroyed)
            pthread_cond_wait(&s->cv, &s->mu);
        if (s->head == NULL)
            break;
        struct op *op = s->head;
        s->head = op->next;
        if (s->head == NULL)
            s->tail = NULL;
        pthread_mutex_unlock(&s->mu);
        run_op(op);
        free(op);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
    return NULL;
}

static struct CUstream_st *stream_new(void)
{
    struct CUstream_st *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_t t;
    if (pthread_create(&t, NULL, stream_main, s) != 0) {
        free(s);
        return NULL;
    }
    pthread_detach(t);
    return s;
}

static pthread_mutex_t default_mu = PTHREAD_MUTEX_INITIALIZER;
static struct CUstream_st *default_stream;

/* 0, cudaStreamLegacy (1) and cudaStreamPerThread (2) all mean one default stream here. */
static struct CUstream_st *resolve(fs__cudaStream_t s)
{
    if ((uintptr_t)s > 2)
        return s;
    pthread_mutex_lock(&default_mu);
    if (default_stream == NULL)
        default_stream = stream_new();
    struct CUstream_st *d = default_stream;
    pthread_mutex_unlock(&default_mu);
    return d;
}

static fs__cudaError_t enqueue(fs__cudaStream_t handle, struct op *op)
{
    struct CUstream_st *s = resolve(handle);
    if (s == NULL) {
        free(op);
        return fs__cudaErrorMemoryAllocation;
    }
    pthread_mutex_lock(&s->mu);
    if (s->tail != NULL)
        s->tail->next = op;
    else
        s->head = op;
    s->tail = op;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return fs__cudaSuccess;
}

fs__cudaError_t cudaDeviceGetStreamPriorityRange(int *least, int *greatest)
{
    *least = 0;
    *greatest = -5;
    return touch();
}

fs__cudaError_t cudaStreamCreateWithPriority(fs__cudaStream_t *stream, unsigned int flags,
                                             int priority)
{
    fs__cudaError_t e = touch();
    if (e != fs__cudaSuccess)
        return e;
    *stream = stream_new();
    if (*stream == NULL)
        return fs__cudaErrorMemoryAllocation;
    fakecuda_log("cudaStreamCreateWithPriority stream=0x%jx flags=%u priority=%d device=%d",
                 (uintmax_t)(uintptr_t)*stream, flags, priority, current_device);
    return fs__cudaSuccess;
}

fs__cudaError_t cudaStreamDestroy(fs__cudaStream_t s)
{
    if ((uintptr_t)s <= 2)
        return fs__cudaErrorInvalidResourceHandle;
    fakecuda_log("cudaStreamDestroy stream=0x%jx", (uintmax_t)(uintptr_t)s);
    pthread_mutex_lock(&s->mu);
    s->destroyed = 1; /* its thread finishes the queue, then frees it */
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return fs__cudaSuccess;
}

fs__cudaError_t cudaEventCreateWithFlags(fs__cudaEvent_t *event, unsigned int flags)
{
    fs__cudaError_t e = touch();
    if (e != fs__cudaSuccess)
        return e;
    (void)flags;
    *event = calloc(1, sizeof **event);
    if (*event == NULL)
        return fs__cudaErrorMemoryAllocation;
    (*event)->refs = 1;
    return fs__cudaSuccess;
}

fs__cudaError_t cudaEventDestroy(fs__cudaEvent_t ev)
{
    if (ev == NULL)
        return fs__cudaErrorInvalidResourceHandle;
    pthread_mutex_lock(&ev_mu);
    event_unref_locked(ev); /* queued ops still hold it */
    pthread_mutex_unlock(&ev_mu);
    return fs__cudaSuccess;
}

static struct op *op_new(int kind, struct CUevent_st *ev, uint64_t gen)
{
    struct op *op = calloc(1, sizeof *op);
    if (op != NULL) {
        op->kind = kind;
        op->ev = ev;
        op->gen = gen;
    }
    return op;
}

fs__cudaError_t cudaEventRecord(fs__cudaEvent_t ev, fs__cudaStream_t stream)
{
    fs__cudaError_t e = touch();
    if (e != fs__cudaSuccess)
        return e;
    if (ev == NULL)
        return fs__cudaErrorInvalidResourceHandle;
    pthread_mutex_lock(&ev_mu);
    uint64_t gen = ++ev->recorded;
    ev->refs++;
    pthread_mutex_unlock(&ev_mu);
    fakecuda_log("cudaEventRecord event=0x%jx stream=0x%jx", (uintmax_t)(uintptr_t)ev,
                 (uintmax_t)(uintptr_t)stream);
    struct op *op = op_new(OP_RECORD, ev, gen);
    return op != NULL ? enqueue(stream, op) : fs__cudaErrorMemoryAllocation;
}

fs__cudaError_t cudaStreamWaitEvent(fs__cudaStream_t stream, fs__cudaEvent_t ev, unsigned int flags)
{
    fs__cudaError_t e = touch();
    if (e != fs__cudaSuccess)
        return e;
    if (ev == NULL)
        return fs__cudaErrorInvalidResourceHandle;
    (void)flags;
    pthread_mutex_lock(&ev_mu);
    uint64_t gen = ev->recorded; /* the record current at the call, as CUDA does */
    ev->refs++;
    pthread_mutex_unlock(&ev_mu);
    fakecuda_log("cudaStreamWaitEvent stream=0x%jx event=0x%jx", (uintmax_t)(uintptr_t)stream,
                 (uintmax_t)(uintptr_t)ev);
    struct op *op = op_new(OP_WAIT, ev, gen);
    return op != NULL ? enqueue(stream, op) : fs__cudaErrorMemoryAllocation;
}

fs__cudaError_t cudaEventQuery(fs__cudaEvent_t ev)
{
    fs__cudaError_t e = touch();
    if (e != fs__cudaSuccess)
        return e;
    pthread_mutex_lock(&ev_mu);
    int done = ev->completed >= ev->recorded;
    pthread_mutex_unlock(&ev_mu);
    return done ? fs__cudaSuccess : fs__cudaErrorNotReady;
}

fs__cudaError_t cudaLaunchHostFunc(fs__cudaStream_t stream, fakecuda_host_fn fn, void *arg)
{
    fs__cudaError_t e = touch();
    if (e != fs__cudaSuccess)
        return e;
    struct op *op = op_new(OP_HOST, NULL, 0);
    if (op == NULL)
        return fs__cudaErrorMemoryAllocation;
    op->fn = fn;
    op->arg = arg;
    return enqueue(stream, op);
}

/* The fake implements each function exactly as fastspawn declares it. */
#define CHECK_SIGNATURE(name, ret, params)                                                         \
    static const fs__pfn_##name check_##name __attribute__((unused)) = name;
FS__CUDA_FUNCTIONS(CHECK_SIGNATURE)
