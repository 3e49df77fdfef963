/*
 * fastspawn/store.h - the rendezvous key-value store, with torch c10d Store semantics:
 * a server thread (store_server.c and friends) and a client (store_client.c, store_ops.c).
 * Part of the public C API; include "fastspawn.h" for all of it.
 */
#ifndef FASTSPAWN_STORE_H
#define FASTSPAWN_STORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "fastspawn/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define FS_STORE_MAX_KEY 4096u   /* bytes in one key */
#define FS_STORE_MAX_KEYS 1024u  /* keys in one request (wait, check, multi_*) */
#define FS_STORE_MAX_TOKEN 1024u /* bytes in a token */
#define FS_STORE_DEFAULT_MAX_VALUE ((size_t)64 << 20) /* bytes in one value */
#define FS_STORE_TOKEN_LEN 64         /* hex characters made by fs_store_make_token */
#define FS_STORE_DEFAULT_TIMEOUT (-1) /* timeout_ms: the client's default */
#define FS_STORE_NO_TIMEOUT INT64_MAX /* timeout_ms: wait without limit */

/* Defaults for the options below that are left 0. */
#define FS_STORE_DEFAULT_CALL_TIMEOUT_MS 300000   /* a client's per-call timeout: 5 min */
#define FS_STORE_DEFAULT_CONNECT_TIMEOUT_MS 60000 /* connecting, with retries: 60 s */
/* The server waits this long for a connection's HELLO: our client sends it as soon as it
   is connected, and retries a connection the server dropped. */
#define FS_STORE_DEFAULT_AUTH_TIMEOUT_MS 5000
#define FS_STORE_DEFAULT_MAX_UNAUTH 64 /* connections not authenticated yet, held at once */
/* Authenticated connections held at once: half of RLIMIT_NOFILE's soft limit when the
   server starts (the launcher keeps the other half), and at most this. */
#define FS_STORE_DEFAULT_MAX_CLIENTS 65536

typedef struct fs_store_server fs_store_server_t;

typedef struct fs_store_server_opts {
    const char *host;      /* address or name to bind; NULL: "127.0.0.1"; "": every address */
    int port;              /* 0: an ephemeral port (read it back with fs_store_server_port) */
    const char *token;     /* required: what every connection must present first */
    const char *unix_path; /* also listen on a Unix socket: "@name" (abstract), "@" (abstract,
                              named for you) or a path; NULL: TCP only */
    size_t max_value_size; /* 0: FS_STORE_DEFAULT_MAX_VALUE */
    int auth_timeout_ms;   /* close a connection that has not authenticated this long after
                              it was accepted; 0: FS_STORE_DEFAULT_AUTH_TIMEOUT_MS */
    int max_unauth;        /* connections not authenticated yet: at this many, a new one
                              closes the oldest; 0: FS_STORE_DEFAULT_MAX_UNAUTH */
    int max_clients;       /* authenticated connections: at this many, a HELLO is refused
                              (FS_ETOOBIG); 0: see FS_STORE_DEFAULT_MAX_CLIENTS */
} fs_store_server_opts_t;

/*
 * What the server holds, for monitoring and tests. The server's descriptors are at most
 * 5 (listeners, epoll, eventfd, a reserve) + max_unauth + max_clients. Queued reply bytes
 * per connection stay under an 8 MiB output limit plus one reply: a client over it is
 * not read from, and requests parked for it that wake wait (values not copied) until it
 * reads.
 */
typedef struct fs_store_server_stats {
    size_t clients;   /* authenticated connections */
    size_t unauth;    /* connections that have not authenticated yet */
    size_t parked;    /* get / wait / multi_get requests waiting for keys or for room */
    size_t out_bytes; /* reply bytes queued in the server, not yet taken by the kernel */
    uint64_t evicted; /* unauthenticated connections closed: the cap, or the hello deadline */
    uint64_t shed;    /* connections closed as they were accepted: no descriptor left */
    uint64_t refused; /* HELLOs refused at max_clients */
} fs_store_server_stats_t;

/*
 * Start the server thread. Keys live as long as the server. A process forked
 * while it runs has the server's sockets closed in the child (pthread_atfork),
 * so a rank never holds the launcher's port or another rank's connection open.
 */
int fs_store_server_start(const fs_store_server_opts_t *opts, fs_store_server_t **out,
                          fs_error_t *err);
/* Wake and join the thread, close every socket, free. In a forked child: no-op. */
void fs_store_server_stop(fs_store_server_t *s);
/* The bound numeric address ("127.0.0.1", "::1") and port. */
const char *fs_store_server_host(const fs_store_server_t *s);
int fs_store_server_port(const fs_store_server_t *s);
/* The Unix socket ("@name" or a path), or NULL when TCP only. */
const char *fs_store_server_unix_path(const fs_store_server_t *s);
/* Connections now open (authenticated or not). */
size_t fs_store_server_num_clients(const fs_store_server_t *s);
/* A snapshot of the counters above; thread-safe. */
void fs_store_server_stats(const fs_store_server_t *s, fs_store_server_stats_t *out);
/* FS_OK while the server thread runs; else the error that stopped it. */
int fs_store_server_check(const fs_store_server_t *s, fs_error_t *err);
/* FS_STORE_TOKEN_LEN hex characters from getrandom() + NUL into out (cap >= 65). */
int fs_store_make_token(char *out, size_t cap, fs_error_t *err);

typedef struct fs_store_client fs_store_client_t;

typedef struct fs_store_client_opts {
    const char *host; /* address or name; or "unix:PATH" / "unix:@NAME" (port unused) */
    int port;
    const char *token;
    int64_t connect_timeout_ms; /* keep retrying (backoff) this long; <= 0:
                                   FS_STORE_DEFAULT_CONNECT_TIMEOUT_MS */
    int64_t timeout_ms; /* default per-call timeout; <= 0: FS_STORE_DEFAULT_CALL_TIMEOUT_MS */
    int interruptible;  /* 1: a signal makes blocking calls return FS_EINTR (request
                           cancelled; retry with what is left of the deadline) */
} fs_store_client_opts_t;

/* Connect (retrying with exponential backoff until the deadline) and authenticate. */
int fs_store_connect(const fs_store_client_opts_t *opts, fs_store_client_t **out, fs_error_t *err);
/* Close and free. Not concurrent with other calls on c (see fs_store_client_shutdown). */
void fs_store_close(fs_store_client_t *c);
/* Thread-safe: make a blocked call return (FS_ECLOSED) and every later call fail. */
void fs_store_client_shutdown(fs_store_client_t *c);
void fs_store_client_set_timeout(fs_store_client_t *c, int64_t timeout_ms);
int64_t fs_store_client_timeout(const fs_store_client_t *c);

/*
 * Operations (torch c10d semantics). Keys are NUL-terminated, at most
 * FS_STORE_MAX_KEY bytes. timeout_ms: >= 0, FS_STORE_DEFAULT_TIMEOUT or
 * FS_STORE_NO_TIMEOUT. A client is thread-safe (calls are serialised).
 * Values returned through void ** are malloc'd (a NUL follows the bytes, not
 * counted in the length) and the caller frees them.
 */
int fs_store_set(fs_store_client_t *c, const char *key, const void *val, size_t len,
                 int64_t timeout_ms, fs_error_t *err);
/* Blocks until key exists; FS_ETIMEOUT names it. */
int fs_store_get(fs_store_client_t *c, const char *key, void **val, size_t *len, int64_t timeout_ms,
                 fs_error_t *err);
/*
 * Like fs_store_get without the copy: *val points into the client's receive
 * buffer, valid until the next call on c (threads sharing c must serialise the
 * call and the use of the view).
 */
int fs_store_get_view(fs_store_client_t *c, const char *key, const void **val, size_t *len,
                      int64_t timeout_ms, fs_error_t *err);
/* Atomic counter stored as decimal text ("3"); a missing key counts as 0. */
int fs_store_add(fs_store_client_t *c, const char *key, int64_t delta, int64_t *result,
                 int64_t timeout_ms, fs_error_t *err);
/*
 * If the key holds `expected` (or is missing and expected is empty), store
 * `desired`. Returns in *cur the value now stored (torch: when the key is
 * missing and expected is not empty, `expected` itself).
 */
int fs_store_compare_set(fs_store_client_t *c, const char *key, const void *expected,
                         size_t expected_len, const void *desired, size_t desired_len, void **cur,
                         size_t *cur_len, int64_t timeout_ms, fs_error_t *err);
/* Blocks until every key exists; FS_ETIMEOUT names the missing ones. */
int fs_store_wait(fs_store_client_t *c, const char *const *keys, size_t n, int64_t timeout_ms,
                  fs_error_t *err);
/* *all = 1 when every key exists (no waiting). */
int fs_store_check(fs_store_client_t *c, const char *const *keys, size_t n, int *all,
                   int64_t timeout_ms, fs_error_t *err);
/* present[i] = 1 when keys[i] exists; n may exceed FS_STORE_MAX_KEYS (batched). */
int fs_store_check_each(fs_store_client_t *c, const char *const *keys, size_t n, uint8_t *present,
                        int64_t timeout_ms, fs_error_t *err);
/* *deleted = 1 when the key existed. */
int fs_store_delete(fs_store_client_t *c, const char *key, int *deleted, int64_t timeout_ms,
                    fs_error_t *err);
int fs_store_num_keys(fs_store_client_t *c, int64_t *n, int64_t timeout_ms, fs_error_t *err);
/* Blocks until every key exists; vals[i] / lens[i] as for fs_store_get. */
int fs_store_multi_get(fs_store_client_t *c, const char *const *keys, size_t n, void **vals,
                       size_t *lens, int64_t timeout_ms, fs_error_t *err);
/* multi_get with views, as fs_store_get_view. */
int fs_store_multi_get_view(fs_store_client_t *c, const char *const *keys, size_t n,
                            const void **vals, size_t *lens, int64_t timeout_ms, fs_error_t *err);
/* Sets every key in one request (applied together). */
int fs_store_multi_set(fs_store_client_t *c, const char *const *keys, const void *const *vals,
                       const size_t *lens, size_t n, int64_t timeout_ms, fs_error_t *err);
/* Append bytes to the key's value (created when missing). */
int fs_store_append(fs_store_client_t *c, const char *key, const void *val, size_t len,
                    int64_t timeout_ms, fs_error_t *err);
/*
 * Barrier of world_size ranks under a single-use name: each rank sets
 * "<name>/arrived/<rank>", adds 1 to "<name>/count"; the last sets
 * "<name>/done"; all wait for it. On timeout FS_ETIMEOUT names the ranks that
 * did not arrive.
 */
int fs_store_barrier(fs_store_client_t *c, const char *name, int world_size, int rank,
                     int64_t timeout_ms, fs_error_t *err);

#ifdef __cplusplus
}
#endif
#endif /* FASTSPAWN_STORE_H */
