/*
 * shm.c - the shared-memory segment behind a communicator: its layout and header (the
 * file itself is shm_seg.c's), joining, per-rank step counters, waiting (spin, then futex
 * with a deadline, checking the abort word and peer liveness) and the abort record. See
 * shm.h for the step protocol the algorithms (coll_cpu.c) build on; the communicator that
 * owns a segment is comm.c's. Nothing here calls up into those files.
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
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "shm.h"

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
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

static void wake_everyone(fs__shm_t *s)
{
    for (int q = 0; s->lines != NULL && q < s->world; q++)
        futex_wake_all(low_word(&s->lines[q].seq));
    futex_wake_all(&s->hdr->nmapped);
}

/* Copy the segment's abort record into err (code from the record). */
static int read_abort(fs__shm_t *s, fs_error_t *err)
{
    struct fs__shm_hdr *h = s->hdr;
    for (int i = 0; i < 100000 && atomic_load(&h->abort_word) == FS__ABORT_WRITING; i++)
        cpu_relax();
    if (atomic_load(&h->abort_word) != FS__ABORT_SET)
        return fs_error_set(err, FS_EABORTED, "communicator aborted by a peer");
    char msg[FS_ERRMSG_LEN];
    memcpy(msg, h->abort_msg, sizeof msg);
    msg[sizeof msg - 1] = '\0';
    int code = h->abort_code < 0 ? h->abort_code : FS_EABORTED;
    return fs_error_set(err, code, "%s", msg);
}

/* Keep the first error this rank saw. */
static void record_failure(fs__shm_t *s, const fs_error_t *e)
{
    fs__lock(&s->fail_lock);
    if (!atomic_load(&s->failed)) {
        s->fail_err = *e;
        atomic_store(&s->failed, 1);
    }
    fs__unlock(&s->fail_lock);
}

int fs__shm_fail(fs__shm_t *s, const fs_error_t *err)
{
    record_failure(s, err);
    struct fs__shm_hdr *h = s->hdr;
    uint32_t expected = FS__ABORT_NONE;
    if (atomic_compare_exchange_strong(&h->abort_word, &expected, FS__ABORT_WRITING)) {
        h->abort_rank = s->rank;
        h->abort_code = err->code;
        snprintf(h->abort_msg, sizeof h->abort_msg, "%s", err->msg);
        atomic_store(&h->abort_word, FS__ABORT_SET);
    }
    wake_everyone(s);
    return err->code;
}

int fs__shm_check_usable(fs__shm_t *s, fs_error_t *err)
{
    if (atomic_load(&s->failed)) {
        fs__lock(&s->fail_lock);
        fs_error_set(err, FS_EABORTED, "communicator unusable after an earlier error: %s",
                     s->fail_err.msg);
        fs__unlock(&s->fail_lock);
        return FS_EABORTED;
    }
    if (atomic_load(&s->hdr->abort_word) != FS__ABORT_NONE) {
        fs_error_t why;
        read_abort(s, &why);
        record_failure(s, &why);
        return fs_error_set(err, FS_EABORTED, "communicator aborted: %s", why.msg);
    }
    if (atomic_load(&s->local_abort))
        return fs_error_set(err, FS_EABORTED, "communicator aborted");
    return FS_OK;
}

/* During a wait: an abort anywhere ends it with the abort's code. */
static int check_abort(fs__shm_t *s, fs_error_t *err)
{
    if (atomic_load_explicit(&s->hdr->abort_word, memory_order_acquire) != FS__ABORT_NONE)
        return read_abort(s, err);
    if (atomic_load_explicit(&s->local_abort, memory_order_relaxed))
        return fs_error_set(err, FS_EABORTED, "communicator aborted on rank %d", s->rank);
    return FS_OK;
}

void fs__shm_abort(fs__shm_t *s, const char *reason)
{
    fs_error_t e;
    fs_error_set(&e, FS_EABORTED, "rank %d aborted the communicator: %s", s->rank,
                 reason ? reason : "no reason given");
    atomic_store(&s->local_abort, 1);
    fs__shm_fail(s, &e);
}

int fs__shm_status(fs__shm_t *s, fs_error_t *why)
{
    if (atomic_load(&s->failed)) {
        fs__lock(&s->fail_lock);
        *why = s->fail_err;
        fs__unlock(&s->fail_lock);
        return why->code ? why->code : FS_EABORTED;
    }
    if (atomic_load(&s->hdr->abort_word) != FS__ABORT_NONE)
        return read_abort(s, why);
    if (atomic_load(&s->local_abort))
        return fs_error_set(why, FS_EABORTED, "communicator aborted");
    return FS_OK;
}

/* ------------------------------------------------------------------ */
/* Posting and waiting                                                */
/* ------------------------------------------------------------------ */

void fs__shm_post(fs__shm_t *s, uint64_t step)
{
    struct fs__rank_line *l = &s->lines[s->rank];
    s->step = step;
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

static int peer_state(fs__shm_t *s, int q)
{
    if (atomic_load(&s->lines[q].state) == FS__RANK_CLOSED)
        return PEER_CLOSED;
    if (s->pidfds[q] >= 0) {
        struct pollfd p = {.fd = s->pidfds[q], .events = POLLIN};
        int n = poll(&p, 1, 0);
        if (n > 0)
            return PEER_EXITED;
        return PEER_ALIVE; /* n == 0, or EINTR/ENOMEM: look again next slice */
    }
    if (s->pids[q] <= 0)
        return PEER_ALIVE;
    if (kill(s->pids[q], 0) < 0 && errno == ESRCH)
        return PEER_EXITED;
    return zombie_by_proc(s->pids[q]) ? PEER_EXITED : PEER_ALIVE;
}

/* The cheap phases of a wait: spin with pause for spin_ns, then poll with sched_yield
   for yield_ns. 1 when l posted step by then; 0 to go on sleeping (or an abort came). */
static int spin_for(fs__shm_t *s, struct fs__rank_line *l, uint64_t step)
{
    if (s->spin_ns <= 0 && s->yield_ns <= 0)
        return 0;
    int64_t t0 = fs__now_ns(), spin_end = t0 + s->spin_ns, yield_end = spin_end + s->yield_ns;
    for (unsigned i = 1;; i++) {
        cpu_relax();
        if (atomic_load_explicit(&l->seq, memory_order_acquire) >= step)
            return 1;
        if ((i & 63) == 0 || i > 4096) {
            int64_t t = fs__now_ns();
            if (t >= yield_end || atomic_load_explicit(&s->hdr->abort_word, memory_order_relaxed))
                return 0;
            if (t >= spin_end)
                (void)sched_yield(); /* cannot fail on Linux */
        }
    }
}

int fs__shm_wait(fs__shm_t *s, int q, uint64_t step, int64_t deadline, fs_error_t *err)
{
    struct fs__rank_line *l = &s->lines[q];
    if (atomic_load_explicit(&l->seq, memory_order_acquire) >= step || spin_for(s, l, step))
        return FS_OK;
    int64_t start = fs_now_ms(), last_check = start;
    for (;;) {
        /* Data a peer posted before an abort is still good: look at seq first. */
        if (atomic_load(&l->seq) >= step)
            return FS_OK;
        int rc = check_abort(s, err);
        if (rc != FS_OK)
            return rc;
        int64_t now = fs_now_ms();
        if (now - last_check >= s->liveness_ms) {
            last_check = now;
            int st = peer_state(s, q);
            if (st != PEER_ALIVE && atomic_load(&l->seq) < step) {
                return fs_error_set(
                    err, FS_EPEER, "rank %d (pid %d) %s while rank %d waited for it in %s", q,
                    (int)s->pids[q], st == PEER_CLOSED ? "closed the communicator" : "exited",
                    s->rank, s->what);
            }
        }
        if (now >= deadline) {
            if (atomic_load(&l->seq) >= step)
                return FS_OK;
            return fs_error_set(
                err, FS_ETIMEOUT,
                "timed out after %lld ms: rank %d waited for rank %d (pid %d) in %s",
                (long long)(now - start), s->rank, q, (int)s->pids[q], s->what);
        }
        int64_t slice = deadline - now;
        if (slice > s->liveness_ms)
            slice = s->liveness_ms;
        atomic_fetch_add(&l->waiters, 1);
        uint64_t v = atomic_load(&l->seq);
        int frc = 0;
        if (v < step)
            frc = futex_wait(low_word(&l->seq), (uint32_t)v, slice);
        atomic_fetch_sub(&l->waiters, 1);
        if (frc < 0)
            return fs_error_sys(err, "futex wait for rank %d in %s", q, s->what);
    }
}

int fs__shm_wait_all(fs__shm_t *s, uint64_t step, int64_t deadline, fs_error_t *err)
{
    if (s->all_seen >= step)
        return FS_OK;
    for (int q = 0; q < s->world; q++) {
        if (q == s->rank)
            continue;
        int rc = fs__shm_wait(s, q, step, deadline, err);
        if (rc != FS_OK)
            return rc;
    }
    s->all_seen = step;
    return FS_OK;
}

static size_t round_up(size_t x, size_t a)
{
    return (x + a - 1) / a * a;
}

static void layout(int world, size_t slot_bytes, size_t *lines_off, size_t *slots_off,
                   size_t *total)
{
    *lines_off = round_up(sizeof(struct fs__shm_hdr), FS__SHM_ALIGN);
    *slots_off = round_up(*lines_off + (size_t)world * sizeof(struct fs__rank_line), FS__SHM_ALIGN);
    *total = *slots_off + (size_t)world * slot_bytes;
}

static void set_views(fs__shm_t *s, size_t lines_off, size_t slots_off)
{
    unsigned char *base = s->seg.base;
    s->hdr = s->seg.base;
    s->lines = (struct fs__rank_line *)(void *)(base + lines_off);
    s->slots = base + slots_off;
}

/* Rank 0: fill the header, before anyone can know the handle. */
static void write_header(fs__shm_t *s, size_t lines_off, size_t slots_off, size_t total)
{
    struct fs__shm_hdr *h = s->seg.base;
    h->magic = FS__SHM_MAGIC;
    h->version = FS__SHM_VERSION;
    h->world_size = (uint32_t)s->world;
    h->slot_bytes = s->slot_bytes;
    h->total_bytes = total;
    h->lines_off = lines_off;
    h->slots_off = slots_off;
    h->oneshot_max = s->oneshot_max;
    memcpy(h->cookie, s->seg.cookie, sizeof h->cookie);
}

/* The cookie first: until it matches, the file may be anybody's, and stays untouched. */
static int check_identity(fs__shm_t *s, const struct fs__shm_hdr *h, fs_error_t *err)
{
    if (h->magic != FS__SHM_MAGIC || h->version != FS__SHM_VERSION)
        return fs_error_set(err, FS_EPROTO,
                            "rank %d: %s is not a fastspawn segment of this version (%u)", s->rank,
                            s->seg.name, FS__SHM_VERSION);
    if (memcmp(h->cookie, s->seg.cookie, sizeof h->cookie) != 0)
        return fs_error_set(err, FS_EAUTH,
                            "rank %d: %s is not the segment of this handle (cookie mismatch): a "
                            "stale handle, or one from another machine or pid namespace",
                            s->rank, s->seg.name);
    return FS_OK;
}

/* Rank 0's sizes, consistent with its world size and the file. */
static int check_sizes(fs__shm_t *s, const struct fs__shm_hdr *h, fs_error_t *err)
{
    if (h->world_size != (uint32_t)s->world)
        return fs_error_set(err, FS_EMISMATCH,
                            "world size mismatch: rank %d was given %d, rank 0 created %s for %u",
                            s->rank, s->world, s->seg.name, h->world_size);
    size_t lines_off, slots_off, total, unit = (size_t)2 * FS__SHM_ALIGN;
    int ok = h->slot_bytes >= FS__SHM_MIN_SLOT_BYTES && h->slot_bytes % unit == 0 &&
             h->slot_bytes <= s->seg.len / (size_t)s->world; /* layout cannot overflow */
    if (ok) {
        layout(s->world, (size_t)h->slot_bytes, &lines_off, &slots_off, &total);
        ok = h->lines_off == lines_off && h->slots_off == slots_off && h->total_bytes == total &&
             total == s->seg.len;
    }
    if (!ok)
        return fs_error_set(err, FS_EPROTO, "segment %s has an inconsistent size", s->seg.name);
    return FS_OK;
}

/* Announce this rank in its line (rank 0 does at creation, so the peers can watch it). */
static int announce(fs__shm_t *s, fs_error_t *err)
{
    struct fs__rank_line *me = &s->lines[s->rank];
    uint32_t free_state = FS__RANK_FREE;
    if (!atomic_compare_exchange_strong(&me->state, &free_state, FS__RANK_JOINED))
        return fs_error_set(err, FS_EMISMATCH, "rank %d joined %s twice (also pid %d)", s->rank,
                            s->seg.name, (int)atomic_load(&me->pid));
    /* A peer seeing JOINED before the pid skips the liveness check until the next look. */
    atomic_store(&me->pid, (int32_t)getpid());
    atomic_fetch_add(&s->hdr->nmapped, 1);
    futex_wake_all(&s->hdr->nmapped);
    return FS_OK;
}

int fs__shm_create(fs__shm_t *s, int kind, fs_error_t *err)
{
    size_t lines_off, slots_off, total;
    layout(s->world, s->slot_bytes, &lines_off, &slots_off, &total);
    struct fs__seg_size sz = {.total = total, .slot_bytes = s->slot_bytes, .world = s->world};
    int rc = fs__seg_create(&s->seg, kind, &sz, err);
    if (rc != FS_OK)
        return rc;
    write_header(s, lines_off, slots_off, total);
    set_views(s, lines_off, slots_off);
    return announce(s, err);
}

int fs__shm_open(fs__shm_t *s, const char *handle, fs_error_t *err)
{
    int rc = fs__seg_open(&s->seg, handle, s->rank, err);
    if (rc != FS_OK)
        return rc;
    struct fs__shm_hdr *h = s->seg.base;
    if ((rc = check_identity(s, h, err)) != FS_OK)
        return rc;
    /* Ours: a named one's name is now ours to remove too (whoever gets there first). */
    s->seg.linked = s->seg.kind == FS_SHM_NAMED;
    if ((rc = check_sizes(s, h, err)) != FS_OK) {
        if (rc == FS_EMISMATCH)
            s->hdr = h; /* the caller aborts the segment: rank 0 hears of it at once */
        return rc;
    }
    s->slot_bytes = h->slot_bytes;
    s->buf_bytes = s->slot_bytes / 2;
    s->oneshot_max = h->oneshot_max;
    set_views(s, h->lines_off, h->slots_off);
    return FS_OK;
}

/* Start watching rank q once it has written its pid (before that, pids[q] stays 0). */
static int watch_peer(fs__shm_t *s, int q, fs_error_t *err)
{
    pid_t pid = (pid_t)atomic_load(&s->lines[q].pid);
    if (pid <= 0)
        return FS_OK;
    s->pids[q] = pid;
    int fd = fs__pidfd_open(pid);
    if (fd >= 0)
        s->pidfds[q] = fd;
    else if (fd != FS__NO_PIDFD && errno == ESRCH)
        return fs_error_set(err, FS_EPEER, "rank %d (pid %d) exited before rank %d joined", q,
                            (int)pid, s->rank);
    else if (fd != FS__NO_PIDFD) /* FS__NO_PIDFD: peer_state polls the pid instead */
        return fs_error_sys(err, "pidfd_open(%d)", (int)pid);
    return FS_OK;
}

/* The ranks that have not joined yet, as "1, 2". */
static void missing_ranks(fs__shm_t *s, char *buf, size_t len)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int q = 0; q < s->world && used + 16 < len; q++) {
        if (atomic_load(&s->lines[q].state) == FS__RANK_FREE)
            used += (size_t)snprintf(buf + used, len - used, "%s%d", used ? ", " : "", q);
    }
}

/* A rank that joined and then died or left will never make the count: say so now. */
static int check_joined(fs__shm_t *s, fs_error_t *err)
{
    for (int q = 0; q < s->world; q++) {
        if (q == s->rank || atomic_load(&s->lines[q].state) == FS__RANK_FREE)
            continue;
        int rc = s->pids[q] == 0 ? watch_peer(s, q, err) : FS_OK;
        if (rc != FS_OK)
            return rc;
        int st = peer_state(s, q);
        if (st != PEER_ALIVE) {
            char missing[256];
            missing_ranks(s, missing, sizeof missing);
            return fs_error_set(
                err, FS_EPEER, "rank %d (pid %d) %s while rank %d waited for rank(s) %s to join %s",
                q, (int)s->pids[q], st == PEER_CLOSED ? "left" : "exited", s->rank, missing,
                s->seg.name);
        }
    }
    return FS_OK;
}

static int join_timeout(fs__shm_t *s, fs_error_t *err)
{
    char missing[256];
    missing_ranks(s, missing, sizeof missing);
    return fs_error_set(err, FS_ETIMEOUT,
                        "rank %d: timed out after %lld ms waiting for rank(s) %s to join %s",
                        s->rank, (long long)s->connect_timeout_ms, missing, s->seg.name);
}

static int wait_for_all(fs__shm_t *s, int64_t deadline, fs_error_t *err)
{
    struct fs__shm_hdr *h = s->hdr;
    int64_t last_check = fs_now_ms();
    uint32_t n;
    while ((n = atomic_load(&h->nmapped)) < (uint32_t)s->world) {
        if (atomic_load(&h->abort_word) != FS__ABORT_NONE)
            return read_abort(s, err);
        int64_t now = fs_now_ms();
        if (now - last_check >= s->liveness_ms) {
            last_check = now;
            int rc = check_joined(s, err);
            if (rc != FS_OK)
                return rc;
        }
        if (now >= deadline)
            return join_timeout(s, err);
        int64_t slice = deadline - now < s->liveness_ms ? deadline - now : s->liveness_ms;
        if (futex_wait(&h->nmapped, n, slice) < 0)
            return fs_error_sys(err, "futex wait on %s", s->seg.name);
    }
    return FS_OK;
}

/* Every rank's pid and pidfd (watch_peer did those it saw while waiting). */
static int open_peers(fs__shm_t *s, fs_error_t *err)
{
    for (int q = 0; q < s->world; q++) {
        int rc = q != s->rank && s->pids[q] == 0 ? watch_peer(s, q, err) : FS_OK;
        if (rc != FS_OK)
            return rc;
    }
    return FS_OK;
}

int fs__shm_join(fs__shm_t *s, fs_error_t *err)
{
    int64_t deadline = fs__deadline_ms(s->connect_timeout_ms);
    int rc = s->rank == 0 ? FS_OK : announce(s, err);
    if (rc == FS_OK)
        rc = wait_for_all(s, deadline, err);
    if (rc == FS_OK) /* every rank has it mapped: no fd or name is needed any more */
        rc = fs__seg_settle(&s->seg, err);
    if (rc == FS_OK)
        rc = open_peers(s, err);
    if (rc != FS_OK)
        (void)fs__seg_settle(&s->seg, NULL); /* leave no name behind; err says the rest */
    return rc;
}

int fs__shm_init(fs__shm_t *s, int rank, int world, fs_error_t *err)
{
    s->rank = rank;
    s->world = world;
    s->seg.fd = -1;
    snprintf(s->seg.name, sizeof s->seg.name, "the segment");
    snprintf(s->what, sizeof s->what, "fs_comm_join");
    s->pids = calloc((size_t)world, sizeof *s->pids);
    s->pidfds = malloc((size_t)world * sizeof *s->pidfds);
    s->ins = malloc((size_t)world * sizeof *s->ins);
    if (s->pids == NULL || s->pidfds == NULL || s->ins == NULL)
        return fs_error_set(err, FS_ENOMEM, "out of memory");
    for (int q = 0; q < world; q++)
        s->pidfds[q] = -1;
    s->pids[rank] = getpid(); /* for messages before the join */
    int rc = pthread_mutex_init(&s->fail_lock, NULL);
    if (rc != 0) {
        errno = rc;
        return fs_error_sys(err, "pthread_mutex_init");
    }
    s->lock_ready = 1;
    return FS_OK;
}

void fs__shm_release(fs__shm_t *s, int forked)
{
    if (s->lines != NULL) {
        struct fs__rank_line *me = &s->lines[s->rank];
        if (atomic_load(&me->state) == FS__RANK_JOINED && atomic_load(&me->pid) == getpid()) {
            atomic_store(&me->state, FS__RANK_CLOSED);
            futex_wake_all(low_word(&me->seq));
            futex_wake_all(&s->hdr->nmapped); /* a peer still waiting in join sees it at once */
        }
    }
    fs__seg_release(&s->seg, forked);
    for (int q = 0; s->pidfds != NULL && q < s->world; q++)
        (void)fs__close(s->pidfds[q]); /* a pidfd has nothing to flush */
    /* In a forked child the lock may be held by a thread that did not survive the fork. */
    if (s->lock_ready && !forked)
        (void)pthread_mutex_destroy(&s->fail_lock);
    free(s->ins);
    free(s->pids);
    free(s->pidfds);
    s->ins = NULL;
    s->pids = NULL;
    s->pidfds = NULL;
    s->hdr = NULL;
    s->lines = NULL;
}
