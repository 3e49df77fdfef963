/*
 * store_ops.c - the store client's operations (fastspawn/store.h: set, get, add,
 * compare_set, wait, check, delete_key, num_keys, multi_get, multi_set, append) and the
 * barrier, each one request (or a few) on the connection of store_client.c. Messages
 * name the call and its keys; a timed-out wait names the keys still missing, a
 * timed-out barrier the ranks that did not arrive.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "store_client.h"

#define MISSING_CHECK_MS 2000 /* how long a timeout message may spend finding what is missing */
#define KEY_SHOWN 200         /* room for a key quoted in a message */

static int64_t left_of(int64_t deadline)
{
    if (deadline == INT64_MAX)
        return FS_STORE_NO_TIMEOUT;
    int64_t left = deadline - fs_now_ms();
    return left < 0 ? 0 : left;
}

static int check_key(const fs_store_client_t *c, const char *op, const char *key, fs_error_t *err)
{
    (void)c;
    if (key == NULL)
        return fs_error_set(err, FS_EINVAL, "store %s: key is NULL", op);
    size_t n = strlen(key);
    if (n > FS_STORE_MAX_KEY) {
        char kb[KEY_SHOWN];
        fs__store_fmt_key(kb, sizeof kb, key, n);
        return fs_error_set(err, FS_ETOOBIG, "store %s: key %s is %zu bytes; the limit is %u", op,
                            kb, n, FS_STORE_MAX_KEY);
    }
    return FS_OK;
}

static int check_value(const fs_store_client_t *c, const char *op, const char *key, size_t len,
                       fs_error_t *err)
{
    if (len > c->max_value) {
        char kb[KEY_SHOWN];
        fs__store_fmt_key(kb, sizeof kb, key, strlen(key));
        return fs_error_set(err, FS_ETOOBIG,
                            "store %s(%s): value of %zu bytes exceeds the store's limit of %zu", op,
                            kb, len, c->max_value);
    }
    return FS_OK;
}

static int check_keys(const fs_store_client_t *c, int op, const char *const *keys, size_t n,
                      fs_error_t *err)
{
    if (n > FS_STORE_MAX_KEYS)
        return fs_error_set(err, FS_ETOOBIG, "store %s: %zu keys; at most %u per call",
                            fs__store_op_name(op), n, FS_STORE_MAX_KEYS);
    if (n > 0 && keys == NULL)
        return fs_error_set(err, FS_EINVAL, "store %s: keys is NULL", fs__store_op_name(op));
    for (size_t i = 0; i < n; i++) {
        int rc = check_key(c, fs__store_op_name(op), keys[i], err);
        if (rc < 0)
            return rc;
    }
    return FS_OK;
}

/* Copy a reply argument into a malloc'd, NUL-terminated buffer. */
static int copy_out(const fs__store_arg_t *a, void **out, size_t *len, fs_error_t *err)
{
    char *p = malloc((size_t)a->len + 1);
    if (p == NULL)
        return fs_error_set(err, FS_ENOMEM, "store: out of memory for a %u-byte value", a->len);
    if (a->len > 0)
        memcpy(p, a->p, a->len);
    p[a->len] = '\0';
    *out = p;
    *len = a->len;
    return FS_OK;
}

static int set_locked(fs_store_client_t *c, int op, const char *key, const void *val, size_t len,
                      int64_t timeout_ms, fs_error_t *err)
{
    struct fs__call k = {.w = {op, key, NULL, 0}};
    int rc;
    if ((rc = check_key(c, fs__store_op_name(op), key, err)) < 0 ||
        (rc = check_value(c, fs__store_op_name(op), key, len, err)) < 0 ||
        (rc = fs__call_begin(&k, c, op, timeout_ms, err)) < 0 ||
        (rc = fs__call_arg(&k, key, strlen(key), err)) < 0 ||
        (rc = fs__call_arg(&k, val, len, err)) < 0 || (rc = fs__call_run(&k, err)) < 0)
        return rc;
    return fs__call_reply_shape(&k, 0, -1, err);
}

int fs_store_set(fs_store_client_t *c, const char *key, const void *val, size_t len,
                 int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    fs__lock(&c->lock);
    int rc = set_locked(c, FS__OP_SET, key, val, len, timeout_ms, err);
    fs__unlock(&c->lock);
    return rc;
}

int fs_store_append(fs_store_client_t *c, const char *key, const void *val, size_t len,
                    int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    fs__lock(&c->lock);
    int rc = set_locked(c, FS__OP_APPEND, key, val, len, timeout_ms, err);
    fs__unlock(&c->lock);
    return rc;
}

static int get_view_locked(fs_store_client_t *c, const char *key, const void **val, size_t *len,
                           int64_t timeout_ms, fs_error_t *err)
{
    struct fs__call k = {.w = {FS__OP_GET, key, NULL, 0}};
    int rc;
    if ((rc = check_key(c, "get", key, err)) < 0 ||
        (rc = fs__call_begin(&k, c, FS__OP_GET, timeout_ms, err)) < 0 ||
        (rc = fs__call_arg(&k, key, strlen(key), err)) < 0)
        return rc;
    rc = fs__call_run(&k, err);
    if (rc == FS_ETIMEOUT) {
        char kb[KEY_SHOWN], why[FS_ERRMSG_LEN];
        fs__store_fmt_key(kb, sizeof kb, key, strlen(key));
        memcpy(why, err->msg, sizeof why);
        return fs_error_set(err, FS_ETIMEOUT, "%s: key %s was never set", why, kb);
    }
    if (rc < 0 || (rc = fs__call_reply_shape(&k, 1, -1, err)) < 0)
        return rc;
    *val = k.reply.args[0].p;
    *len = k.reply.args[0].len;
    return FS_OK;
}

int fs_store_get_view(fs_store_client_t *c, const char *key, const void **val, size_t *len,
                      int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    fs__lock(&c->lock);
    int rc = get_view_locked(c, key, val, len, timeout_ms, err);
    fs__unlock(&c->lock);
    return rc;
}

int fs_store_get(fs_store_client_t *c, const char *key, void **val, size_t *len, int64_t timeout_ms,
                 fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    const void *p = NULL;
    size_t n = 0;
    fs__lock(&c->lock);
    int rc = get_view_locked(c, key, &p, &n, timeout_ms, err);
    if (rc == FS_OK) {
        fs__store_arg_t a = {p, (uint32_t)n};
        rc = copy_out(&a, val, len, err);
    }
    fs__unlock(&c->lock);
    return rc;
}

static int add_locked(fs_store_client_t *c, const char *key, int64_t delta, int64_t *result,
                      int64_t timeout_ms, fs_error_t *err)
{
    struct fs__call k = {.w = {FS__OP_ADD, key, NULL, 0}};
    int rc;
    if ((rc = check_key(c, "add", key, err)) < 0 ||
        (rc = fs__call_begin(&k, c, FS__OP_ADD, timeout_ms, err)) < 0 ||
        (rc = fs__call_arg(&k, key, strlen(key), err)) < 0 ||
        (rc = fs__call_i64_arg(&k, delta, err)) < 0 || (rc = fs__call_run(&k, err)) < 0 ||
        (rc = fs__call_reply_shape(&k, 1, 8, err)) < 0)
        return rc;
    if (result != NULL)
        *result = (int64_t)fs__store_get_u64(k.reply.args[0].p);
    return FS_OK;
}

int fs_store_add(fs_store_client_t *c, const char *key, int64_t delta, int64_t *result,
                 int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    fs__lock(&c->lock);
    int rc = add_locked(c, key, delta, result, timeout_ms, err);
    fs__unlock(&c->lock);
    return rc;
}

int fs_store_compare_set(fs_store_client_t *c, const char *key, const void *expected,
                         size_t expected_len, const void *desired, size_t desired_len, void **cur,
                         size_t *cur_len, int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    struct fs__call k = {.w = {FS__OP_CAS, key, NULL, 0}};
    int rc;
    fs__lock(&c->lock);
    if ((rc = check_key(c, "compare_set", key, err)) < 0 ||
        (rc = check_value(c, "compare_set", key, expected_len, err)) < 0 ||
        (rc = check_value(c, "compare_set", key, desired_len, err)) < 0 ||
        (rc = fs__call_begin(&k, c, FS__OP_CAS, timeout_ms, err)) < 0 ||
        (rc = fs__call_arg(&k, key, strlen(key), err)) < 0 ||
        (rc = fs__call_arg(&k, expected, expected_len, err)) < 0 ||
        (rc = fs__call_arg(&k, desired, desired_len, err)) < 0 ||
        (rc = fs__call_run(&k, err)) < 0 || (rc = fs__call_reply_shape(&k, 1, -1, err)) < 0)
        goto out;
    rc = copy_out(&k.reply.args[0], cur, cur_len, err);
out:
    fs__unlock(&c->lock);
    return rc;
}

/* present[i] for up to FS_STORE_MAX_KEYS keys, one request. */
static int check_chunk(fs_store_client_t *c, const char *const *keys, size_t n, uint8_t *present,
                       int64_t timeout_ms, fs_error_t *err)
{
    struct fs__call k = {.w = {FS__OP_CHECK, NULL, keys, n}};
    int rc;
    if ((rc = check_keys(c, FS__OP_CHECK, keys, n, err)) < 0 ||
        (rc = fs__call_begin(&k, c, FS__OP_CHECK, timeout_ms, err)) < 0)
        return rc;
    for (size_t i = 0; i < n; i++)
        if ((rc = fs__call_arg(&k, keys[i], strlen(keys[i]), err)) < 0)
            return rc;
    if ((rc = fs__call_run(&k, err)) < 0 || (rc = fs__call_reply_shape(&k, 1, (int)n, err)) < 0)
        return rc;
    memcpy(present, k.reply.args[0].p, n);
    return FS_OK;
}

static int check_each_locked(fs_store_client_t *c, const char *const *keys, size_t n,
                             uint8_t *present, int64_t timeout_ms, fs_error_t *err)
{
    int64_t deadline = 0, tmo = 0;
    int rc = fs__store_resolve_timeout(c, timeout_ms, &deadline, &tmo, err);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < n; i += FS_STORE_MAX_KEYS) {
        size_t m = n - i < FS_STORE_MAX_KEYS ? n - i : FS_STORE_MAX_KEYS;
        if ((rc = check_chunk(c, keys + i, m, present + i, left_of(deadline), err)) < 0)
            return rc;
    }
    return FS_OK;
}

int fs_store_check_each(fs_store_client_t *c, const char *const *keys, size_t n, uint8_t *present,
                        int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    fs__lock(&c->lock);
    int rc = check_each_locked(c, keys, n, present, timeout_ms, err);
    fs__unlock(&c->lock);
    return rc;
}

int fs_store_check(fs_store_client_t *c, const char *const *keys, size_t n, int *all,
                   int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    uint8_t stack[64];
    uint8_t *present = n <= sizeof stack ? stack : malloc(n);
    if (present == NULL)
        return fs_error_set(err, FS_ENOMEM, "store check: out of memory for %zu keys", n);
    int rc = fs_store_check_each(c, keys, n, present, timeout_ms, err);
    if (rc == FS_OK) {
        *all = 1;
        for (size_t i = 0; i < n; i++)
            if (!present[i])
                *all = 0;
    }
    if (present != stack)
        free(present);
    return rc;
}

/* After a timed-out wait / multi_get: append which keys are still missing to err. */
static void name_missing(fs_store_client_t *c, const char *const *keys, size_t n, fs_error_t *err)
{
    uint8_t *present = malloc(n ? n : 1);
    fs_error_t e;
    if (present == NULL || c->broken ||
        check_each_locked(c, keys, n, present, MISSING_CHECK_MS, &e) < 0) {
        free(present);
        return;
    }
    size_t used = strlen(err->msg), missing = 0;
    for (size_t i = 0; i < n; i++)
        missing += !present[i];
    int w =
        snprintf(err->msg + used, sizeof err->msg - used, "; %zu of %zu keys missing:", missing, n);
    used += w > 0 ? (size_t)w : 0;
    for (size_t i = 0; i < n && used + 16 < sizeof err->msg; i++) {
        if (present[i])
            continue;
        char kb[128];
        fs__store_fmt_key(kb, sizeof kb, keys[i], strlen(keys[i]));
        if (used + strlen(kb) + 8 >= sizeof err->msg) {
            snprintf(err->msg + used, sizeof err->msg - used, " ...");
            break;
        }
        w = snprintf(err->msg + used, sizeof err->msg - used, " %s", kb);
        used += w > 0 ? (size_t)w : 0;
    }
    free(present);
}

/* wait, or multi_get with views of the values (valid until the next call on c). */
static int wait_locked(fs_store_client_t *c, int op, const char *const *keys, size_t n,
                       const void **vals, size_t *lens, int64_t timeout_ms, fs_error_t *err)
{
    struct fs__call k = {.w = {op, NULL, keys, n}};
    int rc;
    if ((rc = check_keys(c, op, keys, n, err)) < 0 ||
        (rc = fs__call_begin(&k, c, op, timeout_ms, err)) < 0)
        return rc;
    for (size_t i = 0; i < n; i++)
        if ((rc = fs__call_arg(&k, keys[i], strlen(keys[i]), err)) < 0)
            return rc;
    rc = fs__call_run(&k, err);
    if (rc == FS_ETIMEOUT) {
        name_missing(c, keys, n, err);
        return FS_ETIMEOUT;
    }
    if (rc < 0)
        return rc;
    if (op == FS__OP_WAIT)
        return fs__call_reply_shape(&k, 0, -1, err);
    if ((rc = fs__call_reply_shape(&k, (unsigned)n, -1, err)) < 0)
        return rc;
    for (size_t i = 0; i < n; i++) {
        vals[i] = k.reply.args[i].p;
        lens[i] = k.reply.args[i].len;
    }
    return FS_OK;
}

int fs_store_wait(fs_store_client_t *c, const char *const *keys, size_t n, int64_t timeout_ms,
                  fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    fs__lock(&c->lock);
    int rc = wait_locked(c, FS__OP_WAIT, keys, n, NULL, NULL, timeout_ms, err);
    fs__unlock(&c->lock);
    return rc;
}

int fs_store_multi_get_view(fs_store_client_t *c, const char *const *keys, size_t n,
                            const void **vals, size_t *lens, int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    fs__lock(&c->lock);
    int rc = wait_locked(c, FS__OP_MULTI_GET, keys, n, vals, lens, timeout_ms, err);
    fs__unlock(&c->lock);
    return rc;
}

int fs_store_multi_get(fs_store_client_t *c, const char *const *keys, size_t n, void **vals,
                       size_t *lens, int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    const void *stack[16];
    const void **views = n <= 16 ? stack : malloc(n * sizeof *views);
    if (views == NULL)
        return fs_error_set(err, FS_ENOMEM, "store multi_get: out of memory for %zu keys", n);
    fs__lock(&c->lock);
    int rc = wait_locked(c, FS__OP_MULTI_GET, keys, n, views, lens, timeout_ms, err);
    for (size_t i = 0; rc == FS_OK && i < n; i++) {
        fs__store_arg_t a = {views[i], (uint32_t)lens[i]};
        if ((rc = copy_out(&a, &vals[i], &lens[i], err)) < 0) {
            for (size_t j = 0; j < i; j++) {
                free(vals[j]);
                vals[j] = NULL;
            }
        }
    }
    fs__unlock(&c->lock);
    if (views != stack)
        free(views);
    return rc;
}

int fs_store_multi_set(fs_store_client_t *c, const char *const *keys, const void *const *vals,
                       const size_t *lens, size_t n, int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    struct fs__call k = {.w = {FS__OP_MULTI_SET, NULL, keys, n}};
    int rc;
    fs__lock(&c->lock);
    if ((rc = check_keys(c, FS__OP_MULTI_SET, keys, n, err)) < 0)
        goto out;
    for (size_t i = 0; i < n; i++)
        if ((rc = check_value(c, "multi_set", keys[i], lens[i], err)) < 0)
            goto out;
    if ((rc = fs__call_begin(&k, c, FS__OP_MULTI_SET, timeout_ms, err)) < 0)
        goto out;
    for (size_t i = 0; i < n; i++)
        if ((rc = fs__call_arg(&k, keys[i], strlen(keys[i]), err)) < 0 ||
            (rc = fs__call_arg(&k, vals[i], lens[i], err)) < 0)
            goto out;
    if ((rc = fs__call_run(&k, err)) < 0)
        goto out;
    rc = fs__call_reply_shape(&k, 0, -1, err);
out:
    fs__unlock(&c->lock);
    return rc;
}

int fs_store_delete(fs_store_client_t *c, const char *key, int *deleted, int64_t timeout_ms,
                    fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    struct fs__call k = {.w = {FS__OP_DELETE, key, NULL, 0}};
    int rc;
    fs__lock(&c->lock);
    if ((rc = check_key(c, "delete_key", key, err)) == FS_OK &&
        (rc = fs__call_begin(&k, c, FS__OP_DELETE, timeout_ms, err)) == FS_OK &&
        (rc = fs__call_arg(&k, key, strlen(key), err)) == FS_OK &&
        (rc = fs__call_run(&k, err)) == FS_OK &&
        (rc = fs__call_reply_shape(&k, 1, 8, err)) == FS_OK && deleted != NULL)
        *deleted = fs__store_get_u64(k.reply.args[0].p) != 0;
    fs__unlock(&c->lock);
    return rc;
}

int fs_store_num_keys(fs_store_client_t *c, int64_t *n, int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    struct fs__call k = {.w = {FS__OP_NUM_KEYS, NULL, NULL, 0}};
    int rc;
    fs__lock(&c->lock);
    if ((rc = fs__call_begin(&k, c, FS__OP_NUM_KEYS, timeout_ms, err)) == FS_OK &&
        (rc = fs__call_run(&k, err)) == FS_OK &&
        (rc = fs__call_reply_shape(&k, 1, 8, err)) == FS_OK)
        *n = (int64_t)fs__store_get_u64(k.reply.args[0].p);
    fs__unlock(&c->lock);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Barrier                                                            */
/* ------------------------------------------------------------------ */

/* Append "missing ranks: 1, 3-5, 9" for the ranks with no arrived key. */
static void name_missing_ranks(fs_store_client_t *c, const char *name, int world_size,
                               fs_error_t *err)
{
    size_t klen = strlen(name) + 32;
    char **keys = calloc((size_t)world_size, sizeof *keys);
    char *kbuf = malloc((size_t)world_size * klen);
    uint8_t *present = malloc((size_t)world_size);
    fs_error_t e;
    if (keys == NULL || kbuf == NULL || present == NULL)
        goto out;
    for (int r = 0; r < world_size; r++) {
        keys[r] = kbuf + (size_t)r * klen;
        snprintf(keys[r], klen, "%s/arrived/%d", name, r);
    }
    if (c->broken || check_each_locked(c, (const char *const *)keys, (size_t)world_size, present,
                                       MISSING_CHECK_MS, &e) < 0)
        goto out;
    int arrived = 0;
    for (int r = 0; r < world_size; r++)
        arrived += present[r] != 0;
    size_t used = strlen(err->msg);
    int w = snprintf(err->msg + used, sizeof err->msg - used,
                     ": %d of %d ranks arrived; missing ranks:", arrived, world_size);
    used += w > 0 ? (size_t)w : 0;
    const char *sep = " ";
    for (int r = 0; r < world_size; r++) {
        if (present[r])
            continue;
        int end = r;
        while (end + 1 < world_size && !present[end + 1])
            end++;
        if (used + 32 >= sizeof err->msg) {
            snprintf(err->msg + used, sizeof err->msg - used, ", ...");
            break;
        }
        if (end == r)
            w = snprintf(err->msg + used, sizeof err->msg - used, "%s%d", sep, r);
        else
            w = snprintf(err->msg + used, sizeof err->msg - used, "%s%d-%d", sep, r, end);
        used += w > 0 ? (size_t)w : 0;
        sep = ", ";
        r = end;
    }
out:
    free(keys);
    free(kbuf);
    free(present);
}

int fs_store_barrier(fs_store_client_t *c, const char *name, int world_size, int rank,
                     int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    if (name == NULL || strlen(name) + 32 > FS_STORE_MAX_KEY)
        return fs_error_set(err, FS_EINVAL, "store barrier: name must be 1..%u bytes",
                            FS_STORE_MAX_KEY - 32);
    if (world_size < 1 || rank < 0 || rank >= world_size)
        return fs_error_set(
            err, FS_EINVAL,
            "store barrier '%s': rank %d is outside 0..world_size-1 (world_size %d)", name, rank,
            world_size);
    int64_t deadline = 0, tmo = 0;
    int rc = fs__store_resolve_timeout(c, timeout_ms, &deadline, &tmo, err);
    if (rc < 0)
        return rc;
    size_t klen = strlen(name) + 32;
    char *arrived = malloc(klen), *count = malloc(klen), *done = malloc(klen);
    if (arrived == NULL || count == NULL || done == NULL) {
        rc = fs_error_set(err, FS_ENOMEM, "store barrier: out of memory");
        goto out;
    }
    snprintf(arrived, klen, "%s/arrived/%d", name, rank);
    snprintf(count, klen, "%s/count", name);
    snprintf(done, klen, "%s/done", name);
    fs__lock(&c->lock);
    /* Counting our arrival key first makes a retry (after FS_EINTR) count us once only. */
    int64_t mine = 0, n = 0;
    if ((rc = add_locked(c, arrived, 1, &mine, left_of(deadline), err)) < 0)
        goto unlock;
    if (mine == 1) {
        if ((rc = add_locked(c, count, 1, &n, left_of(deadline), err)) < 0)
            goto unlock;
        if (n > world_size) {
            rc = fs_error_set(err, FS_EMISMATCH,
                              "store barrier '%s': %lld ranks arrived but world_size is %d (is the "
                              "name reused, or do ranks disagree on world_size?)",
                              name, (long long)n, world_size);
            goto unlock;
        }
        if (n == world_size &&
            (rc = set_locked(c, FS__OP_SET, done, "1", 1, left_of(deadline), err)) < 0)
            goto unlock;
    }
    const char *keys[1] = {done};
    rc = wait_locked(c, FS__OP_WAIT, keys, 1, NULL, NULL, left_of(deadline), err);
    if (rc == FS_ETIMEOUT) {
        fs_error_set(err, FS_ETIMEOUT, "store barrier '%s' (rank %d) timed out after %lld ms", name,
                     rank, (long long)tmo);
        name_missing_ranks(c, name, world_size, err);
    }
unlock:
    fs__unlock(&c->lock);
out:
    free(arrived);
    free(count);
    free(done);
    return rc;
}
