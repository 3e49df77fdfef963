/*
 * store_server.h - internal to the store server's files: the server's state and the
 * functions they share. The server is one thread running an epoll loop:
 *
 *   store_server.c  the thread: start / stop, the loop, accepting connections
 *   store_conn.c    connections: reading frames, queued replies, flushing, closing
 *   store_handle.c  one handle_* function per request kind; parking blocking requests
 *   store_table.c   the key table (hash table) and the waiters parked on its keys
 *   store_fork.c    the fork registry: a forked child drops the server's sockets
 *
 * All of it belongs to the server thread; the only cross-thread traffic is the stop flag
 * + eventfd and a few atomic counters.
 */
#ifndef FS_STORE_SERVER_H
#define FS_STORE_SERVER_H

#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>

#include "net.h"
#include "store_proto.h"

/*
 * The per-client output limit. A connection with more reply bytes queued than this is not
 * read from, and a request parked for it that wakes is queued (its value not copied)
 * until the client has read its queue down to half: every reply, a parked request's
 * included, is built only while the queue is under the limit, so it never holds more than
 * the limit plus one reply.
 */
#define FS__STORE_WBUF_HIGH ((size_t)8 << 20)
#define FS__STORE_SERVER_BUF_KEEP ((size_t)2 << 20) /* free idle buffers larger than this */
/* Bytes of parked requests one connection may hold (one wait on FS_STORE_MAX_KEYS keys
   of the longest kind fits; our client parks one request at a time). */
#define FS__STORE_PARKED_MAX ((size_t)8 << 20)

enum fs__tag_kind { FS__TAG_LISTEN, FS__TAG_WAKE, FS__TAG_CONN };

/* What an epoll event's data.ptr points at: the first member of each watched object. */
struct fs__tag {
    int kind;
};

struct fs__waiter;

/* One key of the table: its value (if set) and the requests parked on it. */
struct fs__entry {
    struct fs__entry *next; /* hash chain */
    uint64_t hash;
    int has_value;
    uint8_t *val;
    size_t vlen;
    struct fs__waiter *wfirst, *wlast; /* requests parked on this key */
    uint32_t klen;
    uint8_t key[];
};

struct fs__conn;

/*
 * A parked get / wait / multi_get: on the first of its keys that has no value yet, or,
 * woken while its connection's output was over the limit, queued on the connection.
 */
struct fs__waiter {
    struct fs__waiter *kprev, *knext; /* on entry `on` */
    struct fs__entry *on;
    struct fs__waiter *cprev, *cnext; /* on its connection */
    struct fs__waiter *qprev, *qnext; /* on its connection's queue, when `queued` */
    struct fs__conn *conn;
    int queued;
    size_t bytes; /* allocated, counted in conn->parked_bytes */
    uint32_t id;
    int op;
    uint32_t nkeys;
    fs__store_arg_t keys[]; /* key bytes follow the array */
};

struct fs__conn {
    struct fs__tag tag;
    int fd;
    int authed;
    int closing;      /* close once `out` is flushed (after an auth failure) */
    int dead;         /* closed; freed at the end of the event batch */
    int paused;       /* not reading: output over the limit */
    int kill_pending; /* close at the next flush (out of memory) */
    int resume;       /* output under half the limit again: answer `qfirst`, read `in` */
    int in_dirty;
    uint32_t events; /* epoll mask now registered */
    int64_t accepted_ms;
    fs__store_buf_t in, out;
    size_t in_off, out_off;
    size_t out_counted;  /* of out's unsent bytes, those counted in the server's out_bytes */
    size_t parked_bytes; /* sum of its waiters' `bytes` */
    struct fs__waiter *wfirst, *wlast; /* every waiter of this connection */
    struct fs__waiter *qfirst, *qlast; /* woken while the output was full: answer later */
    struct fs__conn *prev, *next;      /* all live connections */
    struct fs__conn *uprev, *unext;    /* not authenticated yet, oldest first */
    struct fs__conn *dirty_next, *dead_next;
};

static inline size_t fs__conn_unsent(const struct fs__conn *c)
{
    return c->out.len - c->out_off;
}

/* Over the output limit: build no more replies for c until it reads. */
static inline int fs__conn_out_full(const struct fs__conn *c)
{
    return fs__conn_unsent(c) > FS__STORE_WBUF_HIGH;
}

struct fs__listener {
    struct fs__tag tag;
    int fd;
    int family;
};

/* The key table (store_table.c). */
struct fs__table {
    struct fs__entry **buckets;
    size_t nbuckets, nentries, nkeys; /* nkeys: entries that hold a value */
    uint64_t seed;
    atomic_size_t nwaiters; /* parked requests (read by fs_store_server_stats) */
};

/* The counters fs_store_server_stats reads: written by the server thread only. */
struct fs__store_counts {
    atomic_size_t nclients; /* every open connection */
    atomic_size_t nunauth;  /* of those, not authenticated yet */
    atomic_size_t out_bytes;
    atomic_uint_least64_t evicted, shed, refused;
};

struct fs_store_server {
    pthread_t thread;
    int thread_started;
    pid_t owner;
    int ep, wakefd, reserve_fd;
    struct fs__listener lis[2];
    int nlis;
    struct fs__tag wake_tag;
    atomic_int stop;
    atomic_int failed;
    struct fs__store_counts counts;
    fs_error_t thread_err;
    uint8_t token[FS_STORE_MAX_TOKEN];
    size_t token_len;
    size_t max_value, max_frame;
    int auth_timeout_ms;
    size_t max_unauth, max_clients;
    int64_t accept_paused_until; /* fs_now_ms clock; 0: accepting */
    char host[64];
    int port;
    struct sockaddr_storage addr;      /* the bound TCP address */
    char unix_path[FS__UNIX_NAME_CAP]; /* "@name" or a path; "" when TCP only */
    int registry_slot;
    struct fs__table table;
    /* connections */
    struct fs__conn *conns;
    struct fs__conn *ufirst, *ulast; /* not authenticated yet, oldest first */
    struct fs__conn *dirty, *dead;
    fs__store_arg_t *args; /* parse scratch, FS__STORE_MAX_ARGS */
};

/* ---- store_table.c ---------------------------------------------------------------- */

int fs__table_init(struct fs__table *t, fs_error_t *err);
/* Free every entry (waiters must be gone already). */
void fs__table_free(struct fs__table *t);
struct fs__entry *fs__table_find(struct fs__table *t, const uint8_t *key, size_t n);
/* NULL when out of memory. */
struct fs__entry *fs__table_get_or_add(struct fs__table *t, const uint8_t *key, size_t n);
/* Free e if it holds neither a value nor parked requests. */
void fs__table_maybe_drop(struct fs__table *t, struct fs__entry *e);
/* Replace e's value with a copy of v[0..n); FS_ENOMEM leaves it as it was. */
int fs__entry_set(struct fs__table *t, struct fs__entry *e, const void *v, size_t n);
/* Append v[0..n) to e's value (created when e has none); FS_ENOMEM leaves it. */
int fs__entry_append(struct fs__table *t, struct fs__entry *e, const void *v, size_t n);
/* Remove e's value (1 if it had one), dropping e unless requests are parked on it. */
int fs__entry_delete(struct fs__table *t, struct fs__entry *e);

/* Bytes a waiter for request m takes (what FS__STORE_PARKED_MAX counts). */
size_t fs__waiter_size(const fs__store_msg_t *m);
/* A waiter for request m of connection c (keys copied), linked on c, on no key yet. */
struct fs__waiter *fs__waiter_new(struct fs__table *t, struct fs__conn *c,
                                  const fs__store_msg_t *m);
/* Park w on entry e (at the end of its list). */
void fs__waiter_park(struct fs__waiter *w, struct fs__entry *e);
/* Take every waiter parked on e off it: returns the list (linked by knext). */
struct fs__waiter *fs__waiter_take_all(struct fs__entry *e);
/* Queue w (on no key) on its connection, to be answered once the client reads. */
void fs__waiter_queue(struct fs__waiter *w);
/* Take the first queued waiter of c off the queue; NULL when none. */
struct fs__waiter *fs__waiter_dequeue(struct fs__conn *c);
/* Unlink w from its key or queue and its connection, and free it. */
void fs__waiter_free(struct fs__table *t, struct fs__waiter *w);
/* Free every waiter c has parked (it is closing). */
void fs__conn_drop_waiters(struct fs__table *t, struct fs__conn *c);

/* ---- store_conn.c ----------------------------------------------------------------- */

/* Queue c for a flush (and a close, if it failed) at the end of the event. */
void fs__conn_mark_dirty(fs_store_server_t *s, struct fs__conn *c);
/* Close c now: out of epoll, its waiters dropped; freed by fs__conn_free_dead. */
void fs__conn_kill(fs_store_server_t *s, struct fs__conn *c);
void fs__conn_free(struct fs__conn *c);
void fs__conn_free_dead(fs_store_server_t *s);
/* Read what c's socket has and handle every complete frame. */
void fs__conn_read(fs_store_server_t *s, struct fs__conn *c);
void fs__conn_flush(fs_store_server_t *s, struct fs__conn *c);
/* Flush every connection that got replies; close the failed ones. */
void fs__conn_run_dirty(fs_store_server_t *s);
/* Accept what l has pending (at most a batch). */
void fs__conn_accept(fs_store_server_t *s, struct fs__listener *l);
/* Accepting was paused (descriptors ran out) and the pause is over: accept again. */
void fs__conn_accept_resume(fs_store_server_t *s);
/* Close connections that did not authenticate within auth_timeout_ms. */
void fs__conn_expire_unauth(fs_store_server_t *s);
/* The next moment the loop must wake for (an unauthenticated connection's deadline, the
   end of an accept pause); INT64_MAX when none. */
int64_t fs__conn_next_deadline(const fs_store_server_t *s);
/* HELLO succeeded: c counts as authenticated (off the unauthenticated list). */
void fs__conn_authed(fs_store_server_t *s, struct fs__conn *c);

/* Replies, built on c->out. A failure (out of memory) queues c to be closed. */
struct fs__reply {
    struct fs__conn *c;
    size_t start;
    int ok;
};
struct fs__reply fs__reply_begin(fs_store_server_t *s, struct fs__conn *c, uint32_t id, int code);
void fs__reply_arg(fs_store_server_t *s, struct fs__reply *r, const void *p, size_t n);
void fs__reply_i64(fs_store_server_t *s, struct fs__reply *r, int64_t v);
void fs__reply_end(fs_store_server_t *s, struct fs__reply *r);
void fs__reply_ok(fs_store_server_t *s, struct fs__conn *c, uint32_t id);
void fs__reply_err(fs_store_server_t *s, struct fs__conn *c, uint32_t id, int code, const char *fmt,
                   ...) __attribute__((format(printf, 5, 6)));

/* ---- store_handle.c --------------------------------------------------------------- */

/* Handle one well-formed request (the connection's first must be HELLO). */
void fs__store_handle(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m);
/* Answer c's queued waiters (woken while its output was full) while the output has room. */
void fs__store_answer_queued(fs_store_server_t *s, struct fs__conn *c);

/* ---- store_fork.c ----------------------------------------------------------------- */

/* Register the server's sockets so a forked child closes them (pthread_atfork). */
int fs__store_fork_register(fs_store_server_t *s, fs_error_t *err);
void fs__store_fork_unregister(fs_store_server_t *s);

#endif /* FS_STORE_SERVER_H */
