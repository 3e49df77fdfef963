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

#define FS__STORE_WBUF_HIGH ((size_t)8 << 20) /* stop reading a client whose replies pile up */
#define FS__STORE_SERVER_BUF_KEEP ((size_t)2 << 20) /* free idle buffers larger than this */

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

/* A parked get / wait / multi_get: on the first of its keys that has no value yet. */
struct fs__waiter {
    struct fs__waiter *kprev, *knext; /* on entry `on` */
    struct fs__entry *on;
    struct fs__waiter *cprev, *cnext; /* on its connection */
    struct fs__conn *conn;
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
    int paused;       /* not reading: too many unsent replies */
    int kill_pending; /* close at the next flush (out of memory) */
    int resume;       /* unpaused: handle the frames that waited in `in` */
    int in_dirty;
    uint32_t events; /* epoll mask now registered */
    int64_t accepted_ms;
    fs__store_buf_t in, out;
    size_t in_off, out_off;
    struct fs__waiter *wfirst, *wlast;
    struct fs__conn *prev, *next;   /* all live connections */
    struct fs__conn *uprev, *unext; /* not authenticated yet, oldest first */
    struct fs__conn *dirty_next, *dead_next;
};

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
};

/* The counters fs_store_server_stats reads: written by the server thread only. */
struct fs__store_counts {
    atomic_size_t nclients; /* every open connection */
    atomic_size_t nunauth;  /* of those, not authenticated yet */
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

/* A waiter for request m of connection c (keys copied), linked on c, on no key yet. */
struct fs__waiter *fs__waiter_new(struct fs__conn *c, const fs__store_msg_t *m);
/* Park w on entry e (at the end of its list). */
void fs__waiter_park(struct fs__waiter *w, struct fs__entry *e);
/* Take every waiter parked on e off it: returns the list (linked by knext). */
struct fs__waiter *fs__waiter_take_all(struct fs__entry *e);
/* Unlink w from its key and its connection, and free it. */
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

/* ---- store_fork.c ----------------------------------------------------------------- */

/* Register the server's sockets so a forked child closes them (pthread_atfork). */
int fs__store_fork_register(fs_store_server_t *s, fs_error_t *err);
void fs__store_fork_unregister(fs_store_server_t *s);

#endif /* FS_STORE_SERVER_H */
