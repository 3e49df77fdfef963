/*
 * fake_nccl.c - a fake NCCL (libnccl.so.2) whose collectives compute real
 * results across PROCESSES, for tests without a GPU.
 *
 * Rendezvous: ncclGetUniqueId binds an abstract Unix socket (no file, gone
 * with the process) served by a thread; each rank's init connects and gets
 * a memfd (passed with SCM_RIGHTS) holding the shared state, so nothing is
 * ever left in /dev/shm or /tmp, whatever kills the test.
 *
 * Data moves through one mailbox per (channel, sender, receiver): a
 * collective is a set of sends and receives followed by local arithmetic
 * in rank order. Channel 0 carries collectives, channel 1 send/recv, so each
 * matches in issue order. A call runs as a host function on its stream, so
 * it completes in stream order and its end event fires only after it.
 *
 * Test hooks (environment, read at each call; "@r" limits a hook to rank r):
 *   FAKE_NCCL_VERSION=code         what ncclGetVersion reports (default 23007)
 *   FAKE_NCCL_STUCK=Name[@r]       calls of that name (AllReduce, Send, ...) never
 *                                  complete, until the communicator is aborted
 *   FAKE_NCCL_ASYNC_ERROR=code[@r] ncclCommGetAsyncError reports code once a call started
 *   FAKE_NCCL_INIT_DELAY_MS=ms[@r] init waits that long first; -1: forever (until abort)
 *   FAKE_NCCL_INPROGRESS=n         a non-blocking call reports ncclInProgress for n
 *                                  polls (default 1); -1: forever
 *   FAKE_NCCL_NO_PEER_CHECK=1      a dead peer is not noticed (calls just wait)
 *
 * The runtime it uses is the fake libcudart.so.13 next to it, opened by path and
 * called through dlsym: never by symbol lookup, which in a process that imported a
 * CUDA build of torch would find the real runtime (torch loads it RTLD_GLOBAL, and
 * under the same soname). Built with -Bsymbolic, so its calls to its own functions
 * (ncclGetVersion) do not land in a real NCCL loaded the same way.
 */
#include <dlfcn.h>
#include <errno.h>
#include <linux/futex.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "fake.h"
#include "nccl_abi.h"

/* ------------------------------------------------------------------ */
/* The fake runtime next to this library                              */
/* ------------------------------------------------------------------ */

static struct {
    fs__cudaError_t (*launch_host_func)(fs__cudaStream_t, fakecuda_host_fn, void *);
    fs__cudaError_t (*get_device)(int *);
    void (*log)(const char *, ...);
} rt;
static pthread_once_t rt_once = PTHREAD_ONCE_INIT;

static void rt_load(void)
{
    Dl_info me;
    char path[4096];
    void *h = NULL;
    if (dladdr((void *)&rt_load, &me) != 0 && me.dli_fname != NULL &&
        strlen(me.dli_fname) < sizeof path - 32) {
        strcpy(path, me.dli_fname);
        char *slash = strrchr(path, '/');
        strcpy(slash != NULL ? slash + 1 : path, "libcudart.so.13");
        h = dlopen(path, RTLD_NOW | RTLD_LOCAL); /* the copy already loaded, if it is */
    }
    void *f = h != NULL ? dlsym(h, "cudaLaunchHostFunc") : NULL;
    void *g = h != NULL ? dlsym(h, "cudaGetDevice") : NULL;
    void *l = h != NULL ? dlsym(h, "fakecuda_log") : NULL;
    if (f == NULL || g == NULL || l == NULL) {
        fprintf(stderr, "fake NCCL: cannot load the fake libcudart.so.13 next to it: %s\n",
                dlerror());
        abort();
    }
    memcpy(&rt.launch_host_func, &f, sizeof f);
    memcpy(&rt.get_device, &g, sizeof g);
    memcpy(&rt.log, &l, sizeof l);
}

static void rt_ready(void)
{
    (void)pthread_once(&rt_once, rt_load);
}

#define cudaLaunchHostFunc(...) (rt_ready(), rt.launch_host_func(__VA_ARGS__))
#define cudaGetDevice(...) (rt_ready(), rt.get_device(__VA_ARGS__))
#define fakecuda_log(...) (rt_ready(), rt.log(__VA_ARGS__))

#define MAX_RANKS 8
#define BOX_BYTES (64 * 1024)
#define SHARED_MAGIC 0x46414b454e43434cULL /* "FAKENCCL" */

/* ------------------------------------------------------------------ */
/* Small helpers                                                      */
/* ------------------------------------------------------------------ */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* An env hook "value[@rank]" that applies to this rank: 1 and *value, else 0. */
static int hook(const char *name, int rank, const char **value)
{
    const char *s = getenv(name);
    if (s == NULL || s[0] == '\0')
        return 0;
    const char *at = strchr(s, '@');
    if (at != NULL && atoi(at + 1) != rank)
        return 0;
    *value = s;
    return 1;
}

static int hook_int(const char *name, int rank, int *out)
{
    const char *v;
    if (!hook(name, rank, &v))
        return 0;
    *out = atoi(v);
    return 1;
}

static void futex_wait(_Atomic uint32_t *word, uint32_t seen, int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

/* Process-wide like NCCL's: the watchdog thread reads what a stream thread wrote. */
static pthread_mutex_t last_error_mu = PTHREAD_MUTEX_INITIALIZER;
static char last_error[256];

static void set_last_error(const char *fmt, const char *arg)
{
    pthread_mutex_lock(&last_error_mu);
    snprintf(last_error, sizeof last_error, fmt, arg);
    pthread_mutex_unlock(&last_error_mu);
}

/* ------------------------------------------------------------------ */
/* Shared state and communicators                                     */
/* ------------------------------------------------------------------ */

struct box {
    _Atomic uint32_t full; /* 0: empty, 1: one chunk waiting */
    uint32_t pad;
    uint64_t total, off, len; /* the whole message's size, this chunk's offset and size */
    unsigned char data[BOX_BYTES];
};

struct shared {
    uint64_t magic;
    int32_t nranks;
    _Atomic uint32_t joined;
    _Atomic int32_t pids[MAX_RANKS];
    _Atomic uint32_t bell[MAX_RANKS]; /* bumped (and futex-woken) when a rank's boxes change */
    struct box box[2][MAX_RANKS][MAX_RANKS]; /* [channel][from][to] */
};

struct redop {
    int used, on_device;
    unsigned char host[8]; /* the scalar, read at creation (ncclScalarHostImmediate) */
    const void *dev;       /* or read when the call runs (ncclScalarDevice) */
};

struct ncclComm {
    atomic_int refs; /* the user's, each queued call's, the init thread's */
    int rank, nranks, device, blocking;
    struct shared *sh;
    int pidfd[MAX_RANKS];
    atomic_int state;   /* ncclSuccess, ncclInProgress (init), or an error */
    atomic_int aborted; /* ncclCommAbort: every wait gives up */
    atomic_int polls;   /* ncclInProgress answers left after a non-blocking call */
    atomic_int finalizing;
    atomic_ulong enqueued, started, executed;
    fs__ncclUniqueId id;
    pthread_t init_thread;
    int init_running;
    struct redop redops[16];
};

static void comm_unref(struct ncclComm *c)
{
    if (atomic_fetch_sub(&c->refs, 1) != 1)
        return;
    for (int i = 0; i < MAX_RANKS; i++)
        if (c->pidfd[i] >= 0)
            close(c->pidfd[i]);
    if (c->sh != NULL)
        munmap(c->sh, sizeof *c->sh);
    free(c);
}

static void ring(struct ncclComm *c, int rank)
{
    atomic_fetch_add(&c->sh->bell[rank], 1);
    futex_wake(&c->sh->bell[rank]);
}

/* ------------------------------------------------------------------ */
/* Unique ids: an abstract socket that hands out the memfd            */
/* ------------------------------------------------------------------ */

struct id_data {
    char magic[8];
    char name[100]; /* abstract socket name, without the leading NUL */
};

struct join_req {
    int32_t rank, nranks;
};

static int id_addr(const struct id_data *id, struct sockaddr_un *sa, socklen_t *len)
{
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    size_t n = strnlen(id->name, sizeof id->name);
    memcpy(sa->sun_path + 1, id->name, n);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
    return 0;
}

static int make_shared(int nranks)
{
    int fd = memfd_create("fake-nccl", MFD_CLOEXEC);
    if (fd < 0)
        return -1;
    struct shared *sh = NULL;
    if (ftruncate(fd, sizeof *sh) == 0)
        sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (sh == NULL || sh == MAP_FAILED) {
        close(fd);
        return -1;
    }
    sh->magic = SHARED_MAGIC;
    sh->nranks = nranks;
    munmap(sh, sizeof *sh);
    return fd;
}

static int send_fd(int sock, int fd, int32_t status)
{
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec iov = {&status, sizeof status};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        m.msg_control = cbuf;
        m.msg_controllen = sizeof cbuf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    }
    return sendmsg(sock, &m, MSG_NOSIGNAL) == (ssize_t)sizeof status ? 0 : -1;
}

/* Serves the ranks of one id: the first request fixes nranks; stops after nranks joins. */
static void *id_server(void *arg)
{
    int lfd = (int)(intptr_t)arg, memfd = -1, nranks = 0, served = 0;
    struct pollfd p = {lfd, POLLIN, 0};
    while (nranks == 0 || served < nranks) {
        if (poll(&p, 1, 120000) <= 0)
            break; /* nobody came: give up, like NCCL's bootstrap root would */
        int s = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (s < 0)
            continue;
        struct join_req req;
        if (recv(s, &req, sizeof req, MSG_WAITALL) == (ssize_t)sizeof req) {
            if (memfd < 0 && req.nranks > 0 && req.nranks <= MAX_RANKS) {
                nranks = req.nranks;
                memfd = make_shared(nranks);
            }
            int ok = memfd >= 0 && req.nranks == nranks;
            served += ok && send_fd(s, memfd, 0) == 0;
            if (!ok)
                send_fd(s, -1, fs__ncclInvalidUsage);
        }
        close(s);
    }
    if (memfd >= 0)
        close(memfd);
    close(lfd);
    return NULL;
}

fs__ncclResult_t ncclGetUniqueId(fs__ncclUniqueId *out)
{
    fakecuda_log("ncclGetUniqueId");
    struct id_data id;
    memset(&id, 0, sizeof id);
    memcpy(id.magic, "FAKEID1", 8);
    uint64_t r = 0;
    if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r)
        r = (uint64_t)now_ms() ^ (uint64_t)getpid() << 32;
    snprintf(id.name, sizeof id.name, "fake-nccl-%d-%016llx", (int)getpid(), (unsigned long long)r);
    struct sockaddr_un sa;
    socklen_t len;
    id_addr(&id, &sa, &len);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, len) != 0 || listen(lfd, MAX_RANKS) != 0) {
        set_last_error("fake ncclGetUniqueId: %s", strerror(errno));
        if (lfd >= 0)
            close(lfd);
        return fs__ncclSystemError;
    }
    pthread_t t;
    if (pthread_create(&t, NULL, id_server, (void *)(intptr_t)lfd) != 0) {
        close(lfd);
        return fs__ncclSystemError;
    }
    pthread_detach(t);
    memset(out, 0, sizeof *out);
    memcpy(out->internal, &id, sizeof id);
    return fs__ncclSuccess;
}

/* Connect to the id's server and map the shared state it sends. */
static fs__ncclResult_t attach(struct ncclComm *c)
{
    struct id_data id;
    memcpy(&id, c->id.internal, sizeof id);
    if (memcmp(id.magic, "FAKEID1", 8) != 0)
        return fs__ncclInvalidArgument;
    struct sockaddr_un sa;
    socklen_t len;
    id_addr(&id, &sa, &len);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&sa, len) != 0) {
        set_last_error("fake init: cannot reach the unique id's owner: %s", strerror(errno));
        if (s >= 0)
            close(s);
        return fs__ncclRemoteError;
    }
    struct join_req req = {c->rank, c->nranks};
    int32_t status = fs__ncclSystemError;
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {&status, sizeof status};
    struct msghdr m = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    int fd = -1;
    if (send(s, &req, sizeof req, MSG_NOSIGNAL) == (ssize_t)sizeof req &&
        recvmsg(s, &m, MSG_CMSG_CLOEXEC) == (ssize_t)sizeof status && status == 0) {
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        if (cm != NULL && cm->cmsg_type == SCM_RIGHTS)
            memcpy(&fd, CMSG_DATA(cm), sizeof fd);
    }
    close(s);
    if (fd < 0)
        return status != 0 ? (fs__ncclResult_t)status : fs__ncclSystemError;
    void *p = mmap(NULL, sizeof *c->sh, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        return fs__ncclSystemError;
    c->sh = p;
    return c->sh->magic == SHARED_MAGIC ? fs__ncclSuccess : fs__ncclInternalError;
}

/* Wait up to ms (forever for -1) unless aborted; 1 if aborted. */
static int wait_or_abort(struct ncclComm *c, int ms)
{
    int64_t until = ms < 0 ? INT64_MAX : now_ms() + ms;
    while (!atomic_load(&c->aborted) && now_ms() < until)
        sleep_ms(1);
    return atomic_load(&c->aborted);
}

static fs__ncclResult_t init_run(struct ncclComm *c)
{
    int delay = 0;
    if (hook_int("FAKE_NCCL_INIT_DELAY_MS", c->rank, &delay) && wait_or_abort(c, delay))
        return fs__ncclInternalError;
    fs__ncclResult_t r = attach(c);
    if (r != fs__ncclSuccess)
        return r;
    struct shared *sh = c->sh;
    atomic_store(&sh->pids[c->rank], (int32_t)getpid());
    atomic_fetch_add(&sh->joined, 1);
    futex_wake(&sh->joined);
    uint32_t seen;
    while ((seen = atomic_load(&sh->joined)) < (uint32_t)c->nranks) {
        if (atomic_load(&c->aborted))
            return fs__ncclInternalError;
        futex_wait(&sh->joined, seen, 10);
    }
    for (int p = 0; p < c->nranks; p++)
        if (p != c->rank)
            c->pidfd[p] = (int)syscall(SYS_pidfd_open, atomic_load(&sh->pids[p]), 0);
    return fs__ncclSuccess;
}

static void *init_main(void *arg)
{
    struct ncclComm *c = arg;
    atomic_store(&c->state, init_run(c));
    return NULL;
}

static fs__ncclResult_t comm_new(struct ncclComm **out, int nranks, fs__ncclUniqueId id, int rank,
                                 int blocking)
{
    *out = NULL;
    if (nranks < 1 || nranks > MAX_RANKS || rank < 0 || rank >= nranks)
        return fs__ncclInvalidArgument;
    struct ncclComm *c = calloc(1, sizeof *c);
    if (c == NULL)
        return fs__ncclSystemError;
    atomic_init(&c->refs, 1);
    c->rank = rank;
    c->nranks = nranks;
    c->blocking = blocking;
    c->id = id;
    for (int i = 0; i < MAX_RANKS; i++)
        c->pidfd[i] = -1;
    if (cudaGetDevice(&c->device) != fs__cudaSuccess) {
        free(c);
        return fs__ncclUnhandledCudaError;
    }
    atomic_init(&c->state, fs__ncclInProgress);
    *out = c;
    return fs__ncclSuccess;
}

fs__ncclResult_t ncclCommInitRank(fs__ncclComm_t *comm, int nranks, fs__ncclUniqueId id, int rank)
{
    struct ncclComm *c;
    fs__ncclResult_t r = comm_new(&c, nranks, id, rank, 1);
    fakecuda_log("ncclCommInitRank rank=%d nranks=%d device=%d", rank, nranks,
                 c != NULL ? c->device : -1);
    if (r != fs__ncclSuccess)
        return r;
    r = init_run(c);
    atomic_store(&c->state, r);
    if (r != fs__ncclSuccess) {
        comm_unref(c);
        c = NULL;
    }
    *comm = c;
    return r;
}

fs__ncclResult_t ncclCommInitRankConfig(fs__ncclComm_t *comm, int nranks, fs__ncclUniqueId id,
                                        int rank, fs__ncclConfig_t *config)
{
    if (config == NULL || config->magic != FS__NCCL_CONFIG_MAGIC ||
        config->size < sizeof(fs__ncclConfig_t))
        return fs__ncclInvalidArgument;
    int blocking = config->blocking != 0; /* NCCL_CONFIG_UNDEF_INT also means blocking */
    struct ncclComm *c;
    fs__ncclResult_t r = comm_new(&c, nranks, id, rank, blocking);
    fakecuda_log("ncclCommInitRankConfig rank=%d nranks=%d device=%d blocking=%d", rank, nranks,
                 c != NULL ? c->device : -1, blocking);
    if (r != fs__ncclSuccess)
        return r;
    *comm = c;
    if (blocking) {
        r = init_run(c);
        atomic_store(&c->state, r);
        return r;
    }
    if (pthread_create(&c->init_thread, NULL, init_main, c) != 0) {
        comm_unref(c);
        *comm = NULL;
        return fs__ncclSystemError;
    }
    c->init_running = 1;
    return fs__ncclInProgress;
}

/* ------------------------------------------------------------------ */
/* Version, errors, queries                                           */
/* ------------------------------------------------------------------ */

fs__ncclResult_t ncclGetVersion(int *version)
{
    const char *v = getenv("FAKE_NCCL_VERSION");
    *version = v != NULL && v[0] != '\0' ? atoi(v) : 23007;
    return fs__ncclSuccess;
}

const char *ncclGetErrorString(fs__ncclResult_t r)
{
    static const char *const text[] = {"no error",
                                       "unhandled cuda error (fake)",
                                       "unhandled system error (fake)",
                                       "internal error (fake)",
                                       "invalid argument (fake)",
                                       "invalid usage (fake)",
                                       "remote process exited or there was a network error (fake)",
                                       "NCCL operation in progress (fake)",
                                       "timeout (fake)"};
    return r < sizeof text / sizeof text[0] ? text[r] : "unknown result (fake)";
}

const char *ncclGetLastError(fs__ncclComm_t comm)
{
    (void)comm;
    return last_error;
}

fs__ncclResult_t ncclCommCount(const fs__ncclComm_t c, int *count)
{
    *count = c->nranks;
    return fs__ncclSuccess;
}

fs__ncclResult_t ncclCommUserRank(const fs__ncclComm_t c, int *rank)
{
    *rank = c->rank;
    return fs__ncclSuccess;
}

fs__ncclResult_t ncclCommGetAsyncError(fs__ncclComm_t c, fs__ncclResult_t *out)
{
    int code = 0;
    int st = atomic_load(&c->state);
    if (hook_int("FAKE_NCCL_ASYNC_ERROR", c->rank, &code) && atomic_load(&c->started) > 0)
        *out = (fs__ncclResult_t)code;
    else if (st != fs__ncclSuccess)
        *out = (fs__ncclResult_t)st;
    else if (atomic_load(&c->polls) != 0) {
        if (atomic_load(&c->polls) > 0) /* < 0: in progress forever */
            atomic_fetch_sub(&c->polls, 1);
        *out = fs__ncclInProgress;
    } else if (atomic_load(&c->finalizing) && atomic_load(&c->executed) < atomic_load(&c->enqueued))
        *out = fs__ncclInProgress;
    else
        *out = fs__ncclSuccess;
    return fs__ncclSuccess;
}

/* ------------------------------------------------------------------ */
/* Calls, groups, launches                                            */
/* ------------------------------------------------------------------ */

enum { F_ALLREDUCE, F_BROADCAST, F_REDUCE, F_ALLGATHER, F_REDUCESCATTER, F_SEND, F_RECV };
static const char *const fn_names[] = {"AllReduce",     "Broadcast", "Reduce", "AllGather",
                                       "ReduceScatter", "Send",      "Recv"};

struct call {
    struct call *next;
    struct ncclComm *comm; /* holds a reference */
    fs__cudaStream_t stream;
    int fn, dtype, root; /* root: also the peer of send / recv */
    fs__ncclRedOp_t op;
    const void *send;
    void *recv;
    size_t count;
    struct redop premul; /* used when op >= 5 */
};

static _Thread_local int group_depth;
static _Thread_local struct call *group_head, *group_tail;

struct launch {
    struct ncclComm *comm;
    struct call *calls;
};

static void exec_launch(void *arg);

static size_t dtype_size(int dt)
{
    static const size_t sizes[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2, 1, 1};
    return dt >= 0 && dt < 12 ? sizes[dt] : 0;
}

/* Launch each communicator's share of calls (in order) as one host function on its stream. */
static fs__ncclResult_t flush(struct call *list)
{
    fs__ncclResult_t result = fs__ncclSuccess;
    while (list != NULL) {
        struct ncclComm *c = list->comm;
        struct launch *l = calloc(1, sizeof *l);
        if (l == NULL)
            return fs__ncclSystemError;
        struct call **mine = &l->calls, **rest = &list, *it = list;
        fs__cudaStream_t stream = list->stream;
        while (it != NULL) { /* move c's calls to the launch, keep the others */
            struct call *next = it->next;
            it->next = NULL;
            if (it->comm == c) {
                *mine = it;
                mine = &it->next;
            } else {
                *rest = it;
                rest = &it->next;
            }
            it = next;
        }
        *rest = NULL;
        l->comm = c;
        atomic_fetch_add(&c->refs, 1);
        atomic_fetch_add(&c->enqueued, 1);
        if (cudaLaunchHostFunc(stream, exec_launch, l) != fs__cudaSuccess)
            result = fs__ncclUnhandledCudaError;
        if (!c->blocking) {
            int n = 1;
            const char *v = getenv("FAKE_NCCL_INPROGRESS");
            if (v != NULL && v[0] != '\0')
                n = atoi(v);
            atomic_store(&c->polls, n);
            if (n != 0 && result == fs__ncclSuccess)
                result = fs__ncclInProgress;
        }
    }
    return result;
}

static fs__ncclResult_t submit(struct call *k)
{
    int state = k->comm != NULL ? atomic_load(&k->comm->state) : fs__ncclInvalidUsage;
    if (state != fs__ncclSuccess) { /* not initialised yet, or failed: refuse like NCCL */
        free(k);
        return state == fs__ncclInProgress ? fs__ncclInvalidUsage : (fs__ncclResult_t)state;
    }
    if (dtype_size(k->dtype) == 0) {
        free(k);
        return fs__ncclInvalidArgument;
    }
    int version = 0;
    ncclGetVersion(&version);
    if ((k->dtype >= 10 && version < 22400) || (k->dtype == 9 && version < 21000) ||
        (k->op == fs__ncclAvg && version < 21000)) {
        free(k);
        return fs__ncclInvalidArgument; /* that NCCL would not know the code */
    }
    atomic_fetch_add(&k->comm->refs, 1);
    if (group_depth > 0) {
        if (group_tail != NULL)
            group_tail->next = k;
        else
            group_head = k;
        group_tail = k;
        return fs__ncclSuccess;
    }
    return flush(k);
}

static struct call *call_new(int fn, const void *send, void *recv, size_t count, int dtype,
                             fs__ncclRedOp_t op, int root, fs__ncclComm_t comm,
                             fs__cudaStream_t stream)
{
    fakecuda_log("nccl%s send=0x%jx recv=0x%jx count=%zu dtype=%d op=%u root=%d comm=0x%jx "
                 "stream=0x%jx",
                 fn_names[fn], (uintmax_t)(uintptr_t)send, (uintmax_t)(uintptr_t)recv, count, dtype,
                 op, root, (uintmax_t)(uintptr_t)comm, (uintmax_t)(uintptr_t)stream);
    struct call *k = calloc(1, sizeof *k);
    if (k == NULL)
        return NULL;
    *k = (struct call){NULL, comm, stream, fn, dtype, root, op, send, recv, count, {0}};
    if (comm != NULL && op >= 5 && op - 5 < 16 && comm->redops[op - 5].used)
        k->premul = comm->redops[op - 5];
    return k;
}

#define SUBMIT(...)                                                                                \
    do {                                                                                           \
        struct call *k_ = call_new(__VA_ARGS__);                                                   \
        return k_ != NULL ? submit(k_) : fs__ncclSystemError;                                      \
    } while (0)

fs__ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, fs__ncclDataType_t dt,
                               fs__ncclRedOp_t op, fs__ncclComm_t comm, fs__cudaStream_t s)
{
    SUBMIT(F_ALLREDUCE, send, recv, count, (int)dt, op, 0, comm, s);
}

fs__ncclResult_t ncclBroadcast(const void *send, void *recv, size_t count, fs__ncclDataType_t dt,
                               int root, fs__ncclComm_t comm, fs__cudaStream_t s)
{
    SUBMIT(F_BROADCAST, send, recv, count, (int)dt, 0, root, comm, s);
}

fs__ncclResult_t ncclReduce(const void *send, void *recv, size_t count, fs__ncclDataType_t dt,
                            fs__ncclRedOp_t op, int root, fs__ncclComm_t comm, fs__cudaStream_t s)
{
    SUBMIT(F_REDUCE, send, recv, count, (int)dt, op, root, comm, s);
}

fs__ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, fs__ncclDataType_t dt,
                               fs__ncclComm_t comm, fs__cudaStream_t s)
{
    SUBMIT(F_ALLGATHER, send, recv, count, (int)dt, 0, 0, comm, s);
}

fs__ncclResult_t ncclReduceScatter(const void *send, void *recv, size_t count,
                                   fs__ncclDataType_t dt, fs__ncclRedOp_t op, fs__ncclComm_t comm,
                                   fs__cudaStream_t s)
{
    SUBMIT(F_REDUCESCATTER, send, recv, count, (int)dt, op, 0, comm, s);
}

fs__ncclResult_t ncclSend(const void *send, size_t count, fs__ncclDataType_t dt, int peer,
                          fs__ncclComm_t comm, fs__cudaStream_t s)
{
    SUBMIT(F_SEND, send, NULL, count, (int)dt, 0, peer, comm, s);
}

fs__ncclResult_t ncclRecv(void *recv, size_t count, fs__ncclDataType_t dt, int peer,
                          fs__ncclComm_t comm, fs__cudaStream_t s)
{
    SUBMIT(F_RECV, NULL, recv, count, (int)dt, 0, peer, comm, s);
}

fs__ncclResult_t ncclGroupStart(void)
{
    fakecuda_log("ncclGroupStart");
    group_depth++;
    return fs__ncclSuccess;
}

fs__ncclResult_t ncclGroupEnd(void)
{
    fakecuda_log("ncclGroupEnd");
    if (group_depth == 0)
        return fs__ncclInvalidUsage;
    if (--group_depth > 0)
        return fs__ncclSuccess;
    struct call *list = group_head;
    group_head = group_tail = NULL;
    return list != NULL ? flush(list) : fs__ncclSuccess;
}

fs__ncclResult_t ncclRedOpCreatePreMulSum(fs__ncclRedOp_t *op, void *scalar, fs__ncclDataType_t dt,
                                          fs__ncclScalarResidence_t residence, fs__ncclComm_t c)
{
    fakecuda_log("ncclRedOpCreatePreMulSum dtype=%u residence=%u", dt, residence);
    for (int i = 0; i < 16; i++) {
        struct redop *r = &c->redops[i];
        if (r->used)
            continue;
        memset(r, 0, sizeof *r);
        r->used = 1;
        r->on_device = residence == fs__ncclScalarDevice;
        if (r->on_device)
            r->dev = scalar;
        else
            memcpy(r->host, scalar, dtype_size((int)dt));
        *op = (fs__ncclRedOp_t)(5 + i);
        return fs__ncclSuccess;
    }
    return fs__ncclInvalidUsage;
}

fs__ncclResult_t ncclRedOpDestroy(fs__ncclRedOp_t op, fs__ncclComm_t c)
{
    fakecuda_log("ncclRedOpDestroy op=%u", op);
    if (op < 5 || op - 5 >= 16 || !c->redops[op - 5].used)
        return fs__ncclInvalidArgument;
    c->redops[op - 5].used = 0;
    return fs__ncclSuccess;
}

/* ------------------------------------------------------------------ */
/* Arithmetic                                                         */
/* ------------------------------------------------------------------ */

/* A small float of ebits/mbits (fn: no infinities, all-ones is NaN: float8_e4m3fn). */
static double mini_decode(unsigned v, int eb, int mb, int fn)
{
    int sign = (v >> (eb + mb)) & 1, e = (v >> mb) & ((1 << eb) - 1), m = v & ((1 << mb) - 1);
    int bias = (1 << (eb - 1)) - 1, top = (1 << eb) - 1;
    if (fn && e == top && m == (1 << mb) - 1)
        return NAN;
    if (!fn && e == top)
        return m ? NAN : (sign ? -INFINITY : INFINITY);
    double x = e == 0 ? ldexp(m, 1 - bias - mb) : ldexp(m + (1 << mb), e - bias - mb);
    return sign ? -x : x;
}

static unsigned mini_encode(double x, int eb, int mb, int fn)
{
    unsigned sign = signbit(x) ? 1u << (eb + mb) : 0;
    int bias = (1 << (eb - 1)) - 1, top = (1 << eb) - 1;
    unsigned nan = fn ? sign | ((1u << (eb + mb)) - 1) : ((unsigned)top << mb) | (1u << (mb - 1));
    if (isnan(x))
        return nan;
    double a = fabs(x);
    double max = fn ? ldexp((1 << (mb + 1)) - 2, top - bias - mb)
                    : ldexp((1 << (mb + 1)) - 1, top - 1 - bias - mb);
    if (a == 0)
        return sign;
    int ex;
    (void)frexp(a, &ex);
    int E = ex - 1 < 1 - bias ? 1 - bias : ex - 1;
    double q = nearbyint(ldexp(a, mb - E)); /* round to nearest even */
    if (ldexp(q, E - mb) > max)
        return fn ? nan : sign | ((unsigned)top << mb);
    if (q >= ldexp(1, mb + 1)) {
        q /= 2;
        E++;
    }
    if (q < ldexp(1, mb))
        return sign | (unsigned)q; /* subnormal */
    return sign | (unsigned)(E + bias) << mb | ((unsigned)q - (1u << mb));
}

static int is_float(int dt)
{
    return dt >= fs__ncclFloat16;
}

static double load_float(const void *p, size_t i, int dt)
{
    const unsigned char *b = p;
    switch (dt) {
    case fs__ncclFloat32: {
        float f;
        memcpy(&f, b + i * 4, 4);
        return f;
    }
    case fs__ncclFloat64: {
        double d;
        memcpy(&d, b + i * 8, 8);
        return d;
    }
    case fs__ncclFloat16:
    case fs__ncclBfloat16: {
        uint16_t h;
        memcpy(&h, b + i * 2, 2);
        return dt == fs__ncclFloat16 ? mini_decode(h, 5, 10, 0) : mini_decode(h, 8, 7, 0);
    }
    case fs__ncclFloat8e4m3: return mini_decode(b[i], 4, 3, 1);
    default: return mini_decode(b[i], 5, 2, 0);
    }
}

static void store_float(void *p, size_t i, int dt, double v)
{
    unsigned char *b = p;
    if (dt == fs__ncclFloat32) {
        float f = (float)v;
        memcpy(b + i * 4, &f, 4);
    } else if (dt == fs__ncclFloat64) {
        memcpy(b + i * 8, &v, 8);
    } else if (dt == fs__ncclFloat16 || dt == fs__ncclBfloat16) {
        uint16_t h =
            (uint16_t)(dt == fs__ncclFloat16 ? mini_encode(v, 5, 10, 0) : mini_encode(v, 8, 7, 0));
        memcpy(b + i * 2, &h, 2);
    } else {
        b[i] = (unsigned char)(dt == fs__ncclFloat8e4m3 ? mini_encode(v, 4, 3, 1)
                                                        : mini_encode(v, 5, 2, 0));
    }
}

/* Integers as uint64 bits (sign-extended for signed types), so wrap-around is defined. */
static uint64_t load_int(const void *p, size_t i, int dt)
{
    const unsigned char *b = p;
    switch (dt) {
    case fs__ncclInt8: return (uint64_t)(int64_t)(int8_t)b[i];
    case fs__ncclUint8: return b[i];
    case fs__ncclInt32:
    case fs__ncclUint32: {
        uint32_t u;
        memcpy(&u, b + i * 4, 4);
        return dt == fs__ncclInt32 ? (uint64_t)(int64_t)(int32_t)u : u;
    }
    default: {
        uint64_t u;
        memcpy(&u, b + i * 8, 8);
        return u;
    }
    }
}

static void store_int(void *p, size_t i, int dt, uint64_t v)
{
    unsigned char *b = p;
    size_t sz = dtype_size(dt);
    uint32_t u32 = (uint32_t)v;
    if (sz == 1)
        b[i] = (unsigned char)v;
    else if (sz == 4)
        memcpy(b + i * 4, &u32, 4);
    else
        memcpy(b + i * 8, &v, 8);
}

static int is_signed(int dt)
{
    return dt == fs__ncclInt8 || dt == fs__ncclInt32 || dt == fs__ncclInt64;
}

static int int_less(uint64_t a, uint64_t b, int dt)
{
    return is_signed(dt) ? (int64_t)a < (int64_t)b : a < b;
}

/* op: 0..4 built-in; >= 5 premul sum with scalar s (as double / integer bits). */
static uint64_t combine_int(uint64_t acc, uint64_t x, unsigned op, int dt)
{
    switch (op) {
    case fs__ncclProd: return acc * x;
    case fs__ncclMax: return int_less(acc, x, dt) ? x : acc;
    case fs__ncclMin: return int_less(x, acc, dt) ? x : acc;
    default: return acc + x; /* sum, avg, premul sum */
    }
}

static double combine_float(double acc, double x, unsigned op)
{
    switch (op) {
    case fs__ncclProd: return acc * x;
    case fs__ncclMax: return isnan(acc) || isnan(x) ? NAN : (x > acc ? x : acc);
    case fs__ncclMin: return isnan(acc) || isnan(x) ? NAN : (x < acc ? x : acc);
    default: return acc + x;
    }
}

static void reduce(void *out, const void *const *in, int n, size_t count, int dt, unsigned op,
                   const struct redop *pm)
{
    double fs = 1;
    uint64_t is = 1;
    if (op >= 5) {
        const void *sp = pm->on_device ? pm->dev : pm->host;
        fs = is_float(dt) ? load_float(sp, 0, dt) : 1;
        is = is_float(dt) ? 1 : load_int(sp, 0, dt);
    }
    for (size_t i = 0; i < count; i++) {
        if (is_float(dt)) {
            double acc = load_float(in[0], i, dt) * fs;
            for (int r = 1; r < n; r++)
                acc = combine_float(acc, load_float(in[r], i, dt) * fs, op);
            store_float(out, i, dt, op == fs__ncclAvg ? acc / n : acc);
        } else {
            uint64_t acc = load_int(in[0], i, dt) * is;
            for (int r = 1; r < n; r++)
                acc = combine_int(acc, load_int(in[r], i, dt) * is, op, dt);
            if (op == fs__ncclAvg)
                acc = is_signed(dt) ? (uint64_t)((int64_t)acc / n) : acc / (uint64_t)n;
            store_int(out, i, dt, acc);
        }
    }
}

/* ------------------------------------------------------------------ */
/* Moving data                                                        */
/* ------------------------------------------------------------------ */

struct xfer {
    int ch, peer, is_send, chunks;
    const unsigned char *src;
    unsigned char *dst;
    size_t bytes, off;
    int done;
};

struct plan {
    struct xfer *x;
    int n, cap;
    unsigned char **tmp; /* per call: the other ranks' inputs, [rank * bytes] */
};

static int plan_add(struct plan *p, int ch, int peer, int is_send, const void *src, void *dst,
                    size_t bytes)
{
    if (p->n == p->cap) {
        int cap = p->cap ? p->cap * 2 : 16;
        struct xfer *x = realloc(p->x, (size_t)cap * sizeof *x);
        if (x == NULL)
            return -1;
        p->x = x;
        p->cap = cap;
    }
    p->x[p->n++] = (struct xfer){ch, peer, is_send, 0, src, dst, bytes, 0, 0};
    return 0;
}

/* The sends and receives of one call; received inputs go to tmp (rank-major). */
static int plan_call(struct plan *p, const struct call *k, int me, int n, unsigned char *tmp)
{
    size_t b = k->count * dtype_size(k->dtype);
    const unsigned char *s = k->send;
    unsigned char *r = k->recv;
    int rc = 0;
    for (int q = 0; q < n && rc == 0; q++) {
        if (q == me)
            continue;
        switch (k->fn) {
        case F_ALLREDUCE:
            rc = plan_add(p, 0, q, 1, s, NULL, b) | plan_add(p, 0, q, 0, NULL, tmp + q * b, b);
            break;
        case F_BROADCAST:
            if (me == k->root)
                rc = plan_add(p, 0, q, 1, s, NULL, b);
            else if (q == k->root)
                rc = plan_add(p, 0, q, 0, NULL, r, b);
            break;
        case F_REDUCE:
            if (me == k->root)
                rc = plan_add(p, 0, q, 0, NULL, tmp + q * b, b);
            else if (q == k->root)
                rc = plan_add(p, 0, q, 1, s, NULL, b);
            break;
        case F_ALLGATHER:
            rc = plan_add(p, 0, q, 1, s, NULL, b) | plan_add(p, 0, q, 0, NULL, r + q * b, b);
            break;
        case F_REDUCESCATTER:
            rc = plan_add(p, 0, q, 1, s + q * b, NULL, b) |
                 plan_add(p, 0, q, 0, NULL, tmp + q * b, b);
            break;
        }
    }
    if (k->fn == F_SEND)
        rc = plan_add(p, 1, k->root, 1, s, NULL, b);
    if (k->fn == F_RECV)
        rc = plan_add(p, 1, k->root, 0, NULL, r, b);
    return rc;
}

/* Only the oldest unfinished transfer of its (channel, peer, direction) may move. */
static int is_head(const struct plan *p, int i)
{
    for (int j = 0; j < i; j++) {
        const struct xfer *a = &p->x[j], *b = &p->x[i];
        if (!a->done && a->ch == b->ch && a->peer == b->peer && a->is_send == b->is_send)
            return 0;
    }
    return 1;
}

/* Move one chunk of x if its mailbox allows; 1 if it moved, -1 on a size mismatch. */
static int step(struct ncclComm *c, struct xfer *x)
{
    int me = c->rank;
    struct box *bx = x->is_send ? &c->sh->box[x->ch][me][x->peer] : &c->sh->box[x->ch][x->peer][me];
    uint32_t full = atomic_load_explicit(&bx->full, memory_order_acquire);
    if (x->is_send == (full != 0))
        return 0;
    size_t len = x->bytes - x->off < BOX_BYTES ? x->bytes - x->off : BOX_BYTES;
    if (x->is_send) {
        bx->total = x->bytes;
        bx->off = x->off;
        bx->len = len;
        memcpy(bx->data, x->src + x->off, len);
    } else {
        if (bx->total != x->bytes || bx->off != x->off)
            return -1;
        len = bx->len;
        memcpy(x->dst + x->off, bx->data, len);
    }
    atomic_store_explicit(&bx->full, x->is_send ? 1 : 0, memory_order_release);
    ring(c, x->peer);
    x->off += len;
    x->chunks++;
    x->done = x->off == x->bytes;
    return 1;
}

/* A peer that exited: the async error NCCL's proxy would report. */
static void check_peers(struct ncclComm *c)
{
    const char *v;
    if (hook("FAKE_NCCL_NO_PEER_CHECK", c->rank, &v) && v[0] == '1')
        return;
    for (int q = 0; q < c->nranks; q++) {
        struct pollfd pf = {c->pidfd[q], POLLIN, 0};
        if (c->pidfd[q] >= 0 && poll(&pf, 1, 0) > 0) {
            char who[16];
            snprintf(who, sizeof who, "%d", q);
            set_last_error("fake NCCL: rank %s exited", who);
            atomic_store(&c->state, fs__ncclRemoteError);
        }
    }
}

/* Move everything in the plan; 0 when done, 1 when aborted, -1 on a mismatch. */
static int progress(struct ncclComm *c, struct plan *p)
{
    int left = p->n;
    int64_t next_check = now_ms() + 50;
    while (left > 0) {
        uint32_t seen = atomic_load(&c->sh->bell[c->rank]);
        int moved = 0;
        for (int i = 0; i < p->n; i++) {
            if (p->x[i].done || !is_head(p, i))
                continue;
            int rc = step(c, &p->x[i]);
            if (rc < 0)
                return -1;
            moved += rc;
            left -= p->x[i].done;
        }
        if (moved)
            continue;
        if (atomic_load(&c->aborted))
            return 1;
        if (now_ms() >= next_check) {
            check_peers(c);
            next_check = now_ms() + 50;
        }
        futex_wait(&c->sh->bell[c->rank], seen, 10);
    }
    return 0;
}

/* The local arithmetic of one call once its data arrived. */
static void finish_call(const struct call *k, int me, int n, const unsigned char *tmp)
{
    size_t b = k->count * dtype_size(k->dtype);
    const unsigned char *s = k->send;
    unsigned char *r = k->recv;
    const void *in[MAX_RANKS];
    int reduces =
        k->fn == F_ALLREDUCE || k->fn == F_REDUCESCATTER || (k->fn == F_REDUCE && me == k->root);
    if (k->fn == F_BROADCAST && me == k->root && r != s)
        memmove(r, s, b);
    if (k->fn == F_ALLGATHER)
        memmove(r + (size_t)me * b, s, b);
    if (!reduces)
        return;
    const unsigned char *mine = k->fn == F_REDUCESCATTER ? s + (size_t)me * b : s;
    for (int q = 0; q < n; q++)
        in[q] = q == me ? mine : tmp + (size_t)q * b;
    unsigned char *out = malloc(b ? b : 1);
    if (out == NULL)
        return;
    reduce(out, in, n, k->count, k->dtype, k->op, &k->premul);
    memcpy(r, out, b);
    free(out);
}

static int stuck(const struct ncclComm *c, const struct call *calls)
{
    const char *v;
    if (!hook("FAKE_NCCL_STUCK", c->rank, &v))
        return 0;
    for (const struct call *k = calls; k != NULL; k = k->next) {
        size_t len = strlen(fn_names[k->fn]);
        if (strncmp(v, fn_names[k->fn], len) == 0 && (v[len] == '\0' || v[len] == '@'))
            return 1;
    }
    return 0;
}

static void run_calls(struct ncclComm *c, struct call *calls)
{
    int me = c->rank, n = c->nranks, ncalls = 0;
    for (struct call *k = calls; k != NULL; k = k->next)
        ncalls++;
    struct plan p = {NULL, 0, 0, calloc((size_t)ncalls + 1, sizeof(unsigned char *))};
    int i = 0, rc = p.tmp == NULL;
    for (struct call *k = calls; k != NULL && rc == 0; k = k->next, i++) {
        p.tmp[i] = malloc((size_t)n * k->count * dtype_size(k->dtype) + 1);
        rc = p.tmp[i] == NULL || plan_call(&p, k, me, n, p.tmp[i]) != 0;
    }
    if (rc == 0)
        rc = progress(c, &p);
    if (rc < 0) {
        set_last_error("fake NCCL: ranks disagree on a message size%s", "");
        atomic_store(&c->state, fs__ncclInvalidUsage);
    }
    i = 0;
    for (struct call *k = calls; k != NULL; k = k->next, i++)
        if (rc == 0)
            finish_call(k, me, n, p.tmp[i]);
    for (i = 0; p.tmp != NULL && i < ncalls; i++)
        free(p.tmp[i]);
    free(p.tmp);
    free(p.x);
}

static void exec_launch(void *arg)
{
    struct launch *l = arg;
    struct ncclComm *c = l->comm;
    atomic_fetch_add(&c->started, 1);
    if (!atomic_load(&c->aborted)) {
        if (stuck(c, l->calls))
            (void)wait_or_abort(c, -1); /* a hung kernel: only an abort ends it */
        else
            run_calls(c, l->calls);
    }
    atomic_fetch_add(&c->executed, 1);
    while (l->calls != NULL) {
        struct call *k = l->calls;
        l->calls = k->next;
        comm_unref(k->comm);
        free(k);
    }
    comm_unref(c);
    free(l);
}

/* ------------------------------------------------------------------ */
/* Ending a communicator                                              */
/* ------------------------------------------------------------------ */

fs__ncclResult_t ncclCommFinalize(fs__ncclComm_t c)
{
    fakecuda_log("ncclCommFinalize comm=0x%jx", (uintmax_t)(uintptr_t)c);
    atomic_store(&c->finalizing, 1);
    if (!c->blocking)
        return fs__ncclInProgress;
    while (atomic_load(&c->executed) < atomic_load(&c->enqueued) && !atomic_load(&c->aborted))
        sleep_ms(1);
    return fs__ncclSuccess;
}

static void comm_end(struct ncclComm *c)
{
    if (c->sh != NULL)
        ring(c, c->rank); /* wake this rank's waits so they see the abort */
    if (c->init_running)
        pthread_join(c->init_thread, NULL);
    c->init_running = 0;
    comm_unref(c);
}

fs__ncclResult_t ncclCommAbort(fs__ncclComm_t c)
{
    fakecuda_log("ncclCommAbort comm=0x%jx", (uintmax_t)(uintptr_t)c);
    if (c == NULL)
        return fs__ncclSuccess;
    atomic_store(&c->aborted, 1);
    comm_end(c);
    return fs__ncclSuccess;
}

fs__ncclResult_t ncclCommDestroy(fs__ncclComm_t c)
{
    fakecuda_log("ncclCommDestroy comm=0x%jx", (uintmax_t)(uintptr_t)c);
    if (c == NULL)
        return fs__ncclSuccess;
    if (c->init_running)
        atomic_store(&c->aborted, 1); /* destroying a comm whose init never finished */
    comm_end(c);
    return fs__ncclSuccess;
}

fs__ncclResult_t ncclCommSplit(fs__ncclComm_t comm, int color, int key, fs__ncclComm_t *newcomm,
                               fs__ncclConfig_t *config)
{
    (void)comm, (void)color, (void)key, (void)config;
    *newcomm = NULL;
    return fs__ncclInvalidUsage; /* fastspawn does not split yet */
}

/* The fake implements each function exactly as fastspawn declares it. */
#define CHECK_SIGNATURE(name, ret, params)                                                         \
    static const fs__pfn_##name check_##name __attribute__((unused)) = name;
#define CHECK_SIGNATURE_OPT(name, since, ret, params) CHECK_SIGNATURE(name, ret, params)
FS__NCCL_REQUIRED(CHECK_SIGNATURE)
FS__NCCL_OPTIONAL(CHECK_SIGNATURE_OPT)
