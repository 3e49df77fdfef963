/*
 * shm.c - the shared-memory segment behind a communicator: create / open / map /
 * unlink, layout, per-rank step counters, and waiting (spin, then futex with a
 * deadline, checking the abort word and peer liveness). See shm.h for the step
 * protocol the collectives (coll_cpu.c) build on.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "shm.h"

#define DEFAULT_TIMEOUT_MS (30LL * 60 * 1000)
#define DEFAULT_CONNECT_TIMEOUT_MS 60000LL
/* Measured on a 2-core VM (bench/allreduce.py): 4 MiB slots (2 MiB chunks) while every
 * rank has a core, smaller steps when ranks share cores; one-shot all_reduce pays while
 * reading N inputs costs less than a second step: up to 1 MiB for 2 ranks, a quarter of
 * that per extra rank, at least 16 KiB. */
#define SLOT_BYTES_ENOUGH_CORES ((size_t)4 << 20)
#define SLOT_BYTES_OVERSUBSCRIBED ((size_t)2 << 20)
#define ONESHOT_MAX_2_RANKS ((size_t)1 << 20)
#define ONESHOT_MAX_MIN ((size_t)16 << 10)
#define MIN_SLOT_BYTES ((size_t)2 * FS_SHM_ALIGN)
#define MAX_WORLD 4096
#define DEFAULT_LIVENESS_MS 100
/*
 * Waiting: spin with pause (cheapest wake-up, but it holds the core), then poll with
 * sched_yield (other runnable threads - a co-located rank, the rank's own training
 * thread - get the core at once), then sleep on the futex. Sleeping is the last resort:
 * waking an idle (virtual) CPU can take longer than a whole small collective, and two
 * ranks that both sleep keep missing each other.
 */
#define SPIN_NS_ENOUGH_CORES 2000
#define SPIN_NS_OVERSUBSCRIBED 0
#define YIELD_NS_ENOUGH_CORES 1000000
#define YIELD_NS_OVERSUBSCRIBED 100000

/* Bumped in every forked child (pthread_atfork), so a communicator can tell. */
static _Atomic unsigned fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
    atomic_fetch_add(&fork_generation, 1);
}

static void register_atfork(void)
{
    /* Fails only with ENOMEM; fs_comm_create then reports the fork guard as unavailable. */
    if (pthread_atfork(NULL, NULL, on_fork_child) != 0)
        atomic_store(&fork_generation, ~0u);
}

int fs_shm_forked(const fs_comm_t *c)
{
    return c->fork_gen != atomic_load(&fork_generation);
}

int fs_shm_forked_error(const fs_comm_t *c, fs_error_t *err)
{
    return fs_error_set(err, FS_EINVAL,
                        "the communicator of rank %d was created in process %d; a forked child "
                        "cannot use it (create one in the child instead)",
                        c->rank, (int)c->pids[c->rank]);
}

void fs_comm_opts_init(fs_comm_opts_t *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->timeout_ms = DEFAULT_TIMEOUT_MS;
    opts->connect_timeout_ms = DEFAULT_CONNECT_TIMEOUT_MS;
    opts->spin_ns = -1;
    opts->yield_ns = -1;
    opts->liveness_ms = DEFAULT_LIVENESS_MS;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static int64_t now_ns(void)
{
    struct timespec ts;
    (void)clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail for this clock */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    /* An early return (EINTR) only shortens one poll interval. */
    (void)nanosleep(&ts, NULL);
}

/* The futex word of a 64-bit counter: its low 32 bits. */
static uint32_t *low_word(_Atomic uint64_t *p)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return (uint32_t *)(void *)p;
#else
    return (uint32_t *)(void *)p + 1;
#endif
}

/* FUTEX_WAIT (shared, not private: the word lives in a segment of several processes). */
static int futex_wait(void *word, uint32_t expected, int64_t timeout_ms)
{
    struct timespec ts = {(time_t)(timeout_ms / 1000), (long)(timeout_ms % 1000) * 1000000};
    if (syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0) < 0) {
        if (errno == EAGAIN || errno == ETIMEDOUT || errno == EINTR)
            return 0;
        return -1;
    }
    return 0;
}

static void futex_wake_all(void *word)
{
    /* Fails only for a bad address (EFAULT) or op (EINVAL): nothing to recover;
     * sleepers still wake at the end of their slice. */
    if (syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0) < 0)
        return;
}

static void wake_everyone(fs_comm_t *c)
{
    for (int q = 0; c->lines != NULL && q < c->world; q++)
        futex_wake_all(low_word(&c->lines[q].seq));
    futex_wake_all(&c->hdr->nmapped);
}

int fs_comm_make_name(char *buf, size_t len, fs_error_t *err)
{
    unsigned char rnd[16];
    size_t got = 0;
    if (buf == NULL || len < FS_COMM_NAME_MAX)
        return fs_error_set(err, FS_EINVAL, "name buffer needs %d bytes", FS_COMM_NAME_MAX);
    while (got < sizeof rnd) {
        ssize_t n = getrandom(rnd + got, sizeof rnd - got, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fs_error_sys(err, "getrandom");
        }
        got += (size_t)n;
    }
    int n = snprintf(buf, len, "/fastspawn-%d-", (int)getpid());
    for (size_t i = 0; i < sizeof rnd && n >= 0 && (size_t)n + 3 <= len; i++)
        n += snprintf(buf + n, len - (size_t)n, "%02x", rnd[i]);
    return FS_OK;
}

/* ------------------------------------------------------------------ */
/* Abort and failure                                                  */
/* ------------------------------------------------------------------ */

/* Copy the segment's abort record into err (code from the record). */
static int read_abort(fs_comm_t *c, fs_error_t *err)
{
    struct fs_shm_hdr *h = c->hdr;
    for (int i = 0; i < 100000 && atomic_load(&h->abort_word) == FS_ABORT_WRITING; i++)
        cpu_relax();
    if (atomic_load(&h->abort_word) != FS_ABORT_SET)
        return fs_error_set(err, FS_EABORTED, "communicator aborted by a peer");
    char msg[FS_ERRMSG_LEN];
    memcpy(msg, h->abort_msg, sizeof msg);
    msg[sizeof msg - 1] = '\0';
    int code = h->abort_code < 0 ? h->abort_code : FS_EABORTED;
    return fs_error_set(err, code, "%s", msg);
}

int fs_shm_fail(fs_comm_t *c, fs_error_t *err)
{
    if (pthread_mutex_lock(&c->fail_lock) == 0) {
        if (!atomic_load(&c->failed)) {
            c->fail_err = *err;
            atomic_store(&c->failed, 1);
        }
        (void)pthread_mutex_unlock(&c->fail_lock);
    }
    struct fs_shm_hdr *h = c->hdr;
    uint32_t expected = FS_ABORT_NONE;
    if (atomic_compare_exchange_strong(&h->abort_word, &expected, FS_ABORT_WRITING)) {
        h->abort_rank = c->rank;
        h->abort_code = err->code;
        snprintf(h->abort_msg, sizeof h->abort_msg, "%s", err->msg);
        atomic_store(&h->abort_word, FS_ABORT_SET);
    }
    wake_everyone(c);
    return err->code;
}

int fs_shm_check_usable(fs_comm_t *c, fs_error_t *err)
{
    if (atomic_load(&c->failed)) {
        int rc = pthread_mutex_lock(&c->fail_lock);
        fs_error_set(err, FS_EABORTED, "communicator unusable after an earlier error: %s",
                     c->fail_err.msg);
        if (rc == 0)
            (void)pthread_mutex_unlock(&c->fail_lock);
        return FS_EABORTED;
    }
    if (atomic_load(&c->hdr->abort_word) != FS_ABORT_NONE) {
        fs_error_t why;
        read_abort(c, &why);
        if (pthread_mutex_lock(&c->fail_lock) == 0) {
            if (!atomic_load(&c->failed)) {
                c->fail_err = why;
                atomic_store(&c->failed, 1);
            }
            (void)pthread_mutex_unlock(&c->fail_lock);
        }
        return fs_error_set(err, FS_EABORTED, "communicator aborted: %s", why.msg);
    }
    if (atomic_load(&c->local_abort))
        return fs_error_set(err, FS_EABORTED, "communicator aborted");
    return FS_OK;
}

/* During a wait: an abort anywhere ends it with the abort's code. */
static int check_abort(fs_comm_t *c, fs_error_t *err)
{
    if (atomic_load_explicit(&c->hdr->abort_word, memory_order_acquire) != FS_ABORT_NONE)
        return read_abort(c, err);
    if (atomic_load_explicit(&c->local_abort, memory_order_relaxed))
        return fs_error_set(err, FS_EABORTED, "communicator aborted on rank %d", c->rank);
    return FS_OK;
}

void fs_comm_abort(fs_comm_t *c, const char *reason)
{
    if (c == NULL || fs_shm_forked(c)) /* a forked child must not abort its parent's */
        return;
    fs_error_t e;
    fs_error_set(&e, FS_EABORTED, "rank %d aborted the communicator: %s", c->rank,
                 reason ? reason : "no reason given");
    atomic_store(&c->local_abort, 1);
    fs_shm_fail(c, &e);
}

int fs_comm_status(fs_comm_t *c, fs_error_t *why)
{
    fs_error_t tmp;
    if (why == NULL)
        why = &tmp;
    fs_error_clear(why);
    if (fs_shm_forked(c))
        return fs_shm_forked_error(c, why);
    if (atomic_load(&c->failed)) {
        if (pthread_mutex_lock(&c->fail_lock) == 0) {
            *why = c->fail_err;
            (void)pthread_mutex_unlock(&c->fail_lock);
        }
        return why->code ? why->code : FS_EABORTED;
    }
    if (atomic_load(&c->hdr->abort_word) != FS_ABORT_NONE)
        return read_abort(c, why);
    if (atomic_load(&c->local_abort))
        return fs_error_set(why, FS_EABORTED, "communicator aborted");
    return FS_OK;
}

int fs_comm_rank(const fs_comm_t *c)
{
    return c->rank;
}
int fs_comm_world_size(const fs_comm_t *c)
{
    return c->world;
}

/* ------------------------------------------------------------------ */
/* Posting and waiting                                                */
/* ------------------------------------------------------------------ */

void fs_shm_post(fs_comm_t *c, uint64_t step)
{
    struct fs_rank_line *l = &c->lines[c->rank];
    c->step = step;
    /* seq_cst store then seq_cst load: either we see the waiter, or it sees step. */
    atomic_store(&l->seq, step);
    if (atomic_load(&l->waiters) != 0)
        futex_wake_all(low_word(&l->seq));
}

enum { PEER_ALIVE = 0, PEER_EXITED = 1, PEER_CLOSED = 2 };

static int zombie_by_proc(pid_t pid)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return errno == ENOENT;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    (void)fclose(f); /* read-only stream: nothing to flush */
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');
    return p != NULL && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
}

static int peer_state(fs_comm_t *c, int q)
{
    if (atomic_load(&c->lines[q].state) == FS_RANK_CLOSED)
        return PEER_CLOSED;
    if (c->pidfds[q] >= 0) {
        struct pollfd p = {.fd = c->pidfds[q], .events = POLLIN};
        int n = poll(&p, 1, 0);
        if (n > 0)
            return PEER_EXITED;
        return PEER_ALIVE; /* n == 0, or EINTR/ENOMEM: look again next slice */
    }
    if (c->pids[q] <= 0)
        return PEER_ALIVE;
    if (kill(c->pids[q], 0) < 0 && errno == ESRCH)
        return PEER_EXITED;
    return zombie_by_proc(c->pids[q]) ? PEER_EXITED : PEER_ALIVE;
}

int fs_shm_wait(fs_comm_t *c, int q, uint64_t step, int64_t deadline, fs_error_t *err)
{
    struct fs_rank_line *l = &c->lines[q];
    if (atomic_load_explicit(&l->seq, memory_order_acquire) >= step)
        return FS_OK;
    if (c->spin_ns > 0 || c->yield_ns > 0) {
        int64_t t0 = now_ns(), spin_end = t0 + c->spin_ns, yield_end = spin_end + c->yield_ns;
        for (unsigned i = 1;; i++) {
            cpu_relax();
            if (atomic_load_explicit(&l->seq, memory_order_acquire) >= step)
                return FS_OK;
            if ((i & 63) == 0 || i > 4096) {
                int64_t t = now_ns();
                if (t >= yield_end ||
                    atomic_load_explicit(&c->hdr->abort_word, memory_order_relaxed))
                    break;
                if (t >= spin_end)
                    (void)sched_yield(); /* cannot fail on Linux */
            }
        }
    }
    int64_t start = fs_now_ms(), last_check = start;
    for (;;) {
        /* Data a peer posted before an abort is still good: look at seq first. */
        if (atomic_load(&l->seq) >= step)
            return FS_OK;
        int rc = check_abort(c, err);
        if (rc != FS_OK)
            return rc;
        int64_t now = fs_now_ms();
        if (now - last_check >= c->opts.liveness_ms) {
            last_check = now;
            int st = peer_state(c, q);
            if (st != PEER_ALIVE && atomic_load(&l->seq) < step) {
                return fs_error_set(
                    err, FS_EPEER, "rank %d (pid %d) %s while rank %d waited for it in %s", q,
                    (int)c->pids[q], st == PEER_CLOSED ? "closed the communicator" : "exited",
                    c->rank, c->what);
            }
        }
        if (now >= deadline) {
            if (atomic_load(&l->seq) >= step)
                return FS_OK;
            return fs_error_set(
                err, FS_ETIMEOUT,
                "timed out after %lld ms: rank %d waited for rank %d (pid %d) in %s",
                (long long)(now - start), c->rank, q, (int)c->pids[q], c->what);
        }
        int64_t slice = deadline - now;
        if (slice > c->opts.liveness_ms)
            slice = c->opts.liveness_ms;
        atomic_fetch_add(&l->waiters, 1);
        uint64_t v = atomic_load(&l->seq);
        int frc = 0;
        if (v < step)
            frc = futex_wait(low_word(&l->seq), (uint32_t)v, slice);
        atomic_fetch_sub(&l->waiters, 1);
        if (frc < 0)
            return fs_error_sys(err, "futex wait for rank %d in %s", q, c->what);
    }
}

int fs_shm_wait_all(fs_comm_t *c, uint64_t step, int64_t deadline, fs_error_t *err)
{
    if (c->all_seen >= step)
        return FS_OK;
    for (int q = 0; q < c->world; q++) {
        if (q == c->rank)
            continue;
        int rc = fs_shm_wait(c, q, step, deadline, err);
        if (rc != FS_OK)
            return rc;
    }
    c->all_seen = step;
    return FS_OK;
}

/* ------------------------------------------------------------------ */
/* Create / destroy                                                   */
/* ------------------------------------------------------------------ */

static size_t round_up(size_t x, size_t a)
{
    return (x + a - 1) / a * a;
}

static int cpu_count(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static int create_segment(fs_comm_t *c, int *fd_out, size_t total, fs_error_t *err)
{
    int fd = shm_open(c->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return fs_error_sys(err, "shm_open(%s, O_CREAT|O_EXCL)", c->name);
    if (ftruncate(fd, (off_t)total) < 0) {
        fs_error_sys(err, "ftruncate(%s, %zu)", c->name, total);
        (void)close(fd);
        (void)shm_unlink(c->name);
        return FS_ESYS;
    }
    *fd_out = fd;
    return FS_OK;
}

/* Open the segment rank 0 creates, waiting for it to appear and get its size. */
static int open_segment(fs_comm_t *c, int *fd_out, size_t *size_out, int64_t deadline,
                        fs_error_t *err)
{
    long pause = 100;
    int fd = -1;
    for (;;) {
        if (fd < 0) {
            fd = shm_open(c->name, O_RDWR | O_CLOEXEC, 0);
            if (fd < 0 && errno != ENOENT)
                return fs_error_sys(err, "shm_open(%s)", c->name);
        }
        if (fd >= 0) {
            struct stat st;
            if (fstat(fd, &st) < 0) {
                fs_error_sys(err, "fstat(%s)", c->name);
                (void)close(fd);
                return FS_ESYS;
            }
            if ((size_t)st.st_size >= sizeof(struct fs_shm_hdr)) {
                *fd_out = fd;
                *size_out = (size_t)st.st_size;
                return FS_OK;
            }
        }
        if (fs_now_ms() >= deadline) {
            if (fd >= 0)
                (void)close(fd);
            return fs_error_set(err, FS_ETIMEOUT,
                                "rank %d: shared-memory segment %s did not appear within %lld ms "
                                "(did rank 0 start?)",
                                c->rank, c->name, (long long)c->opts.connect_timeout_ms);
        }
        sleep_us(pause);
        if (pause < 5000)
            pause *= 2;
    }
}

static void layout(fs_comm_t *c, size_t *lines_off, size_t *slots_off, size_t *total)
{
    *lines_off = round_up(sizeof(struct fs_shm_hdr), FS_SHM_ALIGN);
    *slots_off =
        round_up(*lines_off + (size_t)c->world * sizeof(struct fs_rank_line), FS_SHM_ALIGN);
    *total = *slots_off + (size_t)c->world * c->slot_bytes;
}

/* Announce this rank in the segment and wait until every rank did; unlink the name. */
static int join_segment(fs_comm_t *c, int64_t deadline, fs_error_t *err)
{
    struct fs_shm_hdr *h = c->hdr;
    struct fs_rank_line *me = &c->lines[c->rank];
    uint32_t free_state = FS_RANK_FREE;
    atomic_store(&me->pid, (int32_t)getpid());
    if (!atomic_compare_exchange_strong(&me->state, &free_state, FS_RANK_JOINED)) {
        return fs_error_set(err, FS_EMISMATCH, "rank %d joined %s twice (also pid %d)", c->rank,
                            c->name, (int)atomic_load(&me->pid));
    }
    uint32_t n = atomic_fetch_add(&h->nmapped, 1) + 1;
    futex_wake_all(&h->nmapped);
    if (n == (uint32_t)c->world) {
        if (shm_unlink(c->name) < 0 && errno != ENOENT)
            return fs_error_sys(err, "shm_unlink(%s)", c->name);
    }
    while ((n = atomic_load(&h->nmapped)) < (uint32_t)c->world) {
        if (atomic_load(&h->abort_word) != FS_ABORT_NONE)
            return read_abort(c, err);
        int64_t now = fs_now_ms();
        if (now >= deadline) {
            char missing[256] = "";
            size_t used = 0;
            for (int q = 0; q < c->world && used + 16 < sizeof missing; q++) {
                if (atomic_load(&c->lines[q].state) == FS_RANK_FREE)
                    used += (size_t)snprintf(missing + used, sizeof missing - used, "%s%d",
                                             used ? ", " : "", q);
            }
            (void)shm_unlink(c->name); /* leave nothing behind; ENOENT is fine */
            fs_error_set(err, FS_ETIMEOUT,
                         "rank %d: timed out after %lld ms waiting for rank(s) %s to join %s",
                         c->rank, (long long)c->opts.connect_timeout_ms, missing, c->name);
            return fs_shm_fail(c, err);
        }
        int64_t slice = deadline - now < 50 ? deadline - now : 50;
        if (futex_wait(&h->nmapped, n, slice) < 0)
            return fs_error_sys(err, "futex wait on %s", c->name);
    }
    return FS_OK;
}

static int open_peers(fs_comm_t *c, fs_error_t *err)
{
    for (int q = 0; q < c->world; q++) {
        c->pids[q] = (pid_t)atomic_load(&c->lines[q].pid);
        if (q == c->rank)
            continue;
#ifdef SYS_pidfd_open
        long fd = syscall(SYS_pidfd_open, c->pids[q], 0);
        if (fd >= 0) {
            c->pidfds[q] = (int)fd;
            continue;
        }
        if (errno == ESRCH)
            return fs_error_set(err, FS_EPEER, "rank %d (pid %d) exited before rank %d joined", q,
                                (int)c->pids[q], c->rank);
        if (errno != ENOSYS && errno != EPERM && errno != EINVAL)
            return fs_error_sys(err, "pidfd_open(%d)", (int)c->pids[q]);
#endif
    }
    return FS_OK;
}

static int check_header(fs_comm_t *c, size_t size, int64_t deadline, fs_error_t *err)
{
    struct fs_shm_hdr *h = c->hdr;
    while (atomic_load_explicit(&h->ready, memory_order_acquire) == 0) {
        if (fs_now_ms() >= deadline)
            return fs_error_set(err, FS_ETIMEOUT, "rank %d: segment %s never became ready", c->rank,
                                c->name);
        sleep_us(200);
    }
    if (h->magic != FS_SHM_MAGIC || h->version != FS_SHM_VERSION)
        return fs_error_set(err, FS_EPROTO, "%s is not a fastspawn communicator segment", c->name);
    if (h->world_size != (uint32_t)c->world)
        return fs_error_set(err, FS_EMISMATCH,
                            "world size mismatch: rank %d was given %d, rank 0 created %s for %u",
                            c->rank, c->world, c->name, h->world_size);
    if (h->total_bytes != size || h->slot_bytes < MIN_SLOT_BYTES)
        return fs_error_set(err, FS_EPROTO, "segment %s has an inconsistent size", c->name);
    return FS_OK;
}

static int map_and_join(fs_comm_t *c, fs_error_t *err)
{
    int64_t deadline = fs_now_ms() + c->opts.connect_timeout_ms;
    size_t lines_off, slots_off, total, size = 0;
    int fd = -1, rc;
    layout(c, &lines_off, &slots_off, &total);
    if (c->rank == 0) {
        rc = create_segment(c, &fd, total, err);
        size = total;
    } else {
        rc = open_segment(c, &fd, &size, deadline, err);
    }
    if (rc != FS_OK)
        return rc;
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int map_errno = errno;
    if (close(fd) < 0 && base != MAP_FAILED) {
        fs_error_sys(err, "close(%s)", c->name);
        (void)munmap(base, size);
        return FS_ESYS;
    }
    if (base == MAP_FAILED) {
        errno = map_errno;
        fs_error_sys(err, "mmap(%s, %zu bytes)", c->name, size);
        if (c->rank == 0)
            (void)shm_unlink(c->name);
        return FS_ESYS;
    }
    c->base = base;
    c->map_len = size;
    c->hdr = base;
    if (c->rank == 0) {
        struct fs_shm_hdr *h = c->hdr;
        h->magic = FS_SHM_MAGIC;
        h->version = FS_SHM_VERSION;
        h->world_size = (uint32_t)c->world;
        h->slot_bytes = c->slot_bytes;
        h->total_bytes = total;
        h->lines_off = lines_off;
        h->slots_off = slots_off;
        h->oneshot_max = c->opts.oneshot_max;
        atomic_store_explicit(&h->ready, 1, memory_order_release);
    } else {
        rc = check_header(c, size, deadline, err);
        if (rc != FS_OK) {
            if (rc != FS_EMISMATCH)
                c->hdr = NULL; /* do not touch a segment we do not understand */
            return rc;         /* a world size mismatch aborts it for rank 0 too */
        }
        c->slot_bytes = c->hdr->slot_bytes;
        c->buf_bytes = c->slot_bytes / 2;
        c->opts.oneshot_max = c->hdr->oneshot_max;
        lines_off = c->hdr->lines_off;
        slots_off = c->hdr->slots_off;
    }
    c->lines = (struct fs_rank_line *)(void *)((unsigned char *)base + lines_off);
    c->slots = (unsigned char *)base + slots_off;
    rc = join_segment(c, deadline, err);
    if (rc != FS_OK) {
        if (c->rank == 0 || rc == FS_ETIMEOUT)
            (void)shm_unlink(c->name);
        return rc;
    }
    return open_peers(c, err);
}

int fs_comm_create(const char *name, int rank, int world_size, const fs_comm_opts_t *opts,
                   fs_comm_t **out, fs_error_t *err)
{
    if (out == NULL)
        return fs_error_set(err, FS_EINVAL, "fs_comm_create: out is NULL");
    *out = NULL;
    if (name == NULL || name[0] != '/' || strlen(name) >= FS_COMM_NAME_MAX ||
        strchr(name + 1, '/') != NULL)
        return fs_error_set(err, FS_EINVAL,
                            "segment name must be \"/name\" (no other '/') under %d bytes",
                            FS_COMM_NAME_MAX);
    if (world_size < 1 || world_size > MAX_WORLD)
        return fs_error_set(err, FS_EINVAL, "world_size %d is not in 1..%d", world_size, MAX_WORLD);
    if (rank < 0 || rank >= world_size)
        return fs_error_set(err, FS_EINVAL, "rank %d is not in 0..%d", rank, world_size - 1);

    if (pthread_once(&atfork_once, register_atfork) != 0 || atomic_load(&fork_generation) == ~0u)
        return fs_error_set(err, FS_ENOMEM, "pthread_atfork failed");
    fs_comm_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return fs_error_set(err, FS_ENOMEM, "out of memory");
    c->fork_gen = atomic_load(&fork_generation);
    if (opts != NULL)
        c->opts = *opts;
    else
        fs_comm_opts_init(&c->opts);
    if (c->opts.timeout_ms <= 0)
        c->opts.timeout_ms = DEFAULT_TIMEOUT_MS;
    if (c->opts.connect_timeout_ms <= 0)
        c->opts.connect_timeout_ms = DEFAULT_CONNECT_TIMEOUT_MS;
    if (c->opts.liveness_ms <= 0)
        c->opts.liveness_ms = DEFAULT_LIVENESS_MS;
    int enough_cores = world_size <= cpu_count();
    size_t slot = c->opts.slot_bytes ? c->opts.slot_bytes
                  : enough_cores     ? SLOT_BYTES_ENOUGH_CORES
                                     : SLOT_BYTES_OVERSUBSCRIBED;
    if (slot < MIN_SLOT_BYTES)
        slot = MIN_SLOT_BYTES;
    if (slot < (size_t)world_size * 1024) /* >= 64 float64 per rank and half-buffer */
        slot = (size_t)world_size * 1024;
    if (slot > ((size_t)1 << 40) / (size_t)world_size) {
        free(c);
        return fs_error_set(err, FS_ETOOBIG, "slot_bytes %zu is too large", slot);
    }
    c->slot_bytes = round_up(slot, (size_t)2 * FS_SHM_ALIGN);
    c->buf_bytes = c->slot_bytes / 2;
    if (c->opts.oneshot_max == 0) {
        int shift = world_size <= 2 ? 0 : 2 * (world_size - 2);
        c->opts.oneshot_max = shift >= 20 ? 0 : ONESHOT_MAX_2_RANKS >> shift;
        if (c->opts.oneshot_max < ONESHOT_MAX_MIN)
            c->opts.oneshot_max = ONESHOT_MAX_MIN;
    }
    c->rank = rank;
    c->world = world_size;
    snprintf(c->name, sizeof c->name, "%s", name);
    snprintf(c->what, sizeof c->what, "fs_comm_create");
    c->pids = calloc((size_t)world_size, sizeof *c->pids);
    c->pidfds = malloc((size_t)world_size * sizeof *c->pidfds);
    c->ins = malloc((size_t)world_size * sizeof *c->ins);
    if (c->pids == NULL || c->pidfds == NULL || c->ins == NULL) {
        free(c->ins);
        free(c->pids);
        free(c->pidfds);
        free(c);
        return fs_error_set(err, FS_ENOMEM, "out of memory");
    }
    for (int q = 0; q < world_size; q++)
        c->pidfds[q] = -1;
    pthread_condattr_t ca;
    int prc = pthread_condattr_init(&ca);
    if (prc == 0)
        prc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    if (prc == 0)
        prc = pthread_mutex_init(&c->exec_lock, NULL);
    if (prc == 0)
        prc = pthread_mutex_init(&c->fail_lock, NULL);
    if (prc == 0)
        prc = pthread_mutex_init(&c->qlock, NULL);
    if (prc == 0)
        prc = pthread_cond_init(&c->q_cv, NULL);
    if (prc == 0)
        prc = pthread_cond_init(&c->done_cv, &ca);
    (void)pthread_condattr_destroy(&ca);
    if (prc != 0) {
        /* Only glibc's EAGAIN/ENOMEM; none of these own resources on Linux. */
        free(c->ins);
        free(c->pids);
        free(c->pidfds);
        free(c);
        errno = prc;
        return fs_error_sys(err, "pthread init");
    }

    int rc = map_and_join(c, err);
    if (rc == FS_OK) {
        c->spin_ns = c->opts.spin_ns >= 0 ? c->opts.spin_ns
                     : enough_cores       ? SPIN_NS_ENOUGH_CORES
                                          : SPIN_NS_OVERSUBSCRIBED;
        c->yield_ns = c->opts.yield_ns >= 0 ? c->opts.yield_ns
                      : enough_cores        ? YIELD_NS_ENOUGH_CORES
                                            : YIELD_NS_OVERSUBSCRIBED;
        if (!c->opts.no_worker)
            rc = fs_coll_worker_start(c, err);
    }
    if (rc != FS_OK) {
        if (c->hdr != NULL)
            fs_shm_fail(c, err);
        fs_comm_destroy(c);
        return rc;
    }
    snprintf(c->what, sizeof c->what, "idle");
    *out = c;
    return FS_OK;
}

void fs_comm_destroy(fs_comm_t *c)
{
    if (c == NULL)
        return;
    int forked = fs_shm_forked(c);
    if (!forked)
        fs_coll_worker_stop(c);
    if (c->lines != NULL) {
        struct fs_rank_line *me = &c->lines[c->rank];
        if (atomic_load(&me->state) == FS_RANK_JOINED && atomic_load(&me->pid) == getpid()) {
            atomic_store(&me->state, FS_RANK_CLOSED);
            futex_wake_all(low_word(&me->seq));
        }
    }
    if (c->base != NULL && munmap(c->base, c->map_len) < 0) {
        /* EINVAL only for a bad range: nothing left to do. */
    }
    for (int q = 0; q < c->world; q++) {
        if (c->pidfds[q] >= 0)
            (void)close(c->pidfds[q]); /* a pidfd has nothing to flush */
    }
    if (!forked) { /* in a forked child they may be held by threads that are gone */
        (void)pthread_cond_destroy(&c->done_cv);
        (void)pthread_cond_destroy(&c->q_cv);
        (void)pthread_mutex_destroy(&c->qlock);
        (void)pthread_mutex_destroy(&c->fail_lock);
        (void)pthread_mutex_destroy(&c->exec_lock);
    }
    free(c->queue);
    free(c->ins);
    free(c->pids);
    free(c->pidfds);
    free(c);
}
