/*
 * store_client.h - internal to the store client's two files:
 *
 *   store_client.c  the connection: connect with retry and backoff, HELLO, one request
 *                   at a time (struct fs__call), deadlines, cancel, close
 *   store_ops.c     the operations of fastspawn/store.h on top of it, and the barrier
 */
#ifndef FS_STORE_CLIENT_H
#define FS_STORE_CLIENT_H

#include <pthread.h>
#include <stdatomic.h>

#include "store_proto.h"

struct fs_store_client {
    int fd;
    pid_t owner;
    pthread_mutex_t lock; /* serialises calls: one request at a time per connection */
    atomic_int shut;
    atomic_llong timeout_ms;
    int interruptible;
    int broken; /* the stream is unusable (why in broken_msg) */
    char broken_msg[FS_ERRMSG_LEN];
    uint32_t next_id;
    size_t max_value, max_frame;
    char addr[300];
    fs__store_buf_t out, in;
    size_t in_off, last_len; /* last_len: the reply frame handed out by the last rpc */
    fs__store_arg_t *args;
};

/* What a call is doing, for messages: "get('key')", "wait(['a', 'b'])". */
struct fs__what {
    int op;
    const char *key;
    const char *const *keys;
    size_t n;
};

/* One request, between fs__call_begin and the reply (c->lock held throughout). */
struct fs__call {
    fs_store_client_t *c;
    struct fs__what w;
    int64_t deadline, tmo;
    uint32_t id;
    size_t start;
    fs__store_msg_t reply; /* its args point into c->in until the next call */
};

/* Resolve timeout_ms (FS_STORE_DEFAULT_TIMEOUT: the client's) into an absolute deadline
   (INT64_MAX: none) and the effective value, for messages. */
int fs__store_resolve_timeout(const fs_store_client_t *c, int64_t timeout_ms, int64_t *deadline,
                              int64_t *effective, fs_error_t *err);
/* Start request op on c (usable, deadline resolved); k->w names it for messages. */
int fs__call_begin(struct fs__call *k, fs_store_client_t *c, int op, int64_t timeout_ms,
                   fs_error_t *err);
int fs__call_arg(struct fs__call *k, const void *p, size_t n, fs_error_t *err);
int fs__call_i64_arg(struct fs__call *k, int64_t v, fs_error_t *err);
/* Send the request and wait for its reply (an error reply: its code and message). */
int fs__call_run(struct fs__call *k, fs_error_t *err);
/* The reply must carry n arguments, the first want_len0 bytes long (< 0: any length);
   else the stream is broken (FS_EPROTO). */
int fs__call_reply_shape(struct fs__call *k, unsigned n, int want_len0, fs_error_t *err);

#endif /* FS_STORE_CLIENT_H */
