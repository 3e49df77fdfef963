/*
 * store_proto.c - the store's wire format: frame parsing and validation (pure,
 * fuzzed by tests/fuzz/fuzz_store_frame.c), frame building, small helpers
 * shared by the server (store_conn.c, store_handle.c) and the client
 * (store_client.c, store_ops.c).
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_proto.h"

const char *fs__store_op_name(int op)
{
    switch (op) {
    case FS__OP_HELLO: return "hello";
    case FS__OP_SET: return "set";
    case FS__OP_GET: return "get";
    case FS__OP_ADD: return "add";
    case FS__OP_CAS: return "compare_set";
    case FS__OP_WAIT: return "wait";
    case FS__OP_CHECK: return "check";
    case FS__OP_DELETE: return "delete_key";
    case FS__OP_NUM_KEYS: return "num_keys";
    case FS__OP_MULTI_GET: return "multi_get";
    case FS__OP_MULTI_SET: return "multi_set";
    case FS__OP_APPEND: return "append";
    case FS__OP_CANCEL: return "cancel";
    default: return "unknown-op";
    }
}

size_t fs__store_max_frame(size_t max_value)
{
    if (max_value > SIZE_MAX / 2)
        max_value = SIZE_MAX / 2;
    size_t f = max_value + FS__STORE_FRAME_SLACK;
    /* The length field is 32 bits. */
    return f > (size_t)UINT32_MAX ? (size_t)UINT32_MAX : f;
}

int64_t fs__store_parse_frame(const uint8_t *buf, size_t len, size_t max_frame,
                              fs__store_arg_t *args, size_t args_cap, fs__store_msg_t *msg,
                              fs_error_t *err)
{
    if (len < 4)
        return 0;
    uint32_t body = fs__store_get_u32(buf);
    if (body < FS__STORE_HDR - 4)
        return fs_error_set(err, FS_EPROTO, "store frame too short: %u bytes", body);
    if ((size_t)body + 4 > max_frame)
        return fs_error_set(err, FS_ETOOBIG, "store frame of %zu bytes exceeds the limit of %zu",
                            (size_t)body + 4, max_frame);
    if (len - 4 < body)
        return 0;
    const uint8_t *p = buf + 4, *end = buf + 4 + body;
    msg->id = fs__store_get_u32(p);
    msg->code = (int)(int8_t)p[4];
    if (p[5] != 0)
        return fs_error_set(err, FS_EPROTO, "store frame has unknown flags 0x%02x", p[5]);
    msg->nargs = (uint16_t)(p[6] | p[7] << 8);
    msg->args = args;
    if (msg->nargs > args_cap)
        return fs_error_set(err, FS_ETOOBIG, "store frame has %u arguments; the limit is %zu",
                            (unsigned)msg->nargs, args_cap);
    p += 8;
    for (unsigned i = 0; i < msg->nargs; i++) {
        if ((size_t)(end - p) < 4)
            return fs_error_set(err, FS_EPROTO, "store frame truncated in argument %u", i);
        uint32_t alen = fs__store_get_u32(p);
        p += 4;
        if ((size_t)(end - p) < alen)
            return fs_error_set(err, FS_EPROTO,
                                "store frame argument %u claims %u bytes; %zu remain", i, alen,
                                (size_t)(end - p));
        args[i].p = p;
        args[i].len = alen;
        p += alen;
    }
    if (p != end)
        return fs_error_set(err, FS_EPROTO, "store frame has %zu trailing bytes",
                            (size_t)(end - p));
    return (int64_t)body + 4;
}

static int check_keys(const fs__store_msg_t *m, unsigned first, unsigned step, fs_error_t *err)
{
    const char *op = fs__store_op_name(m->code);
    for (unsigned i = first; i < m->nargs; i += step) {
        if (m->args[i].len > FS_STORE_MAX_KEY)
            return fs_error_set(err, FS_ETOOBIG, "store %s: key of %u bytes exceeds %u", op,
                                m->args[i].len, FS_STORE_MAX_KEY);
    }
    return FS_OK;
}

static int check_values(const fs__store_msg_t *m, unsigned first, unsigned step, size_t max_value,
                        fs_error_t *err)
{
    const char *op = fs__store_op_name(m->code);
    for (unsigned i = first; i < m->nargs; i += step) {
        if (m->args[i].len > max_value)
            return fs_error_set(err, FS_ETOOBIG, "store %s: value of %u bytes exceeds %zu", op,
                                m->args[i].len, max_value);
    }
    return FS_OK;
}

static int want_args(const fs__store_msg_t *m, unsigned n, fs_error_t *err)
{
    if (m->nargs != n)
        return fs_error_set(err, FS_EPROTO, "store %s takes %u arguments, got %u",
                            fs__store_op_name(m->code), n, (unsigned)m->nargs);
    return FS_OK;
}

int fs__store_check_request(const fs__store_msg_t *m, size_t max_value, fs_error_t *err)
{
    int rc;
    switch (m->code) {
    case FS__OP_HELLO:
        if ((rc = want_args(m, 2, err)) < 0)
            return rc;
        if (m->args[1].len > FS_STORE_MAX_TOKEN)
            return fs_error_set(err, FS_ETOOBIG, "store hello: token of %u bytes exceeds %u",
                                m->args[1].len, FS_STORE_MAX_TOKEN);
        return FS_OK;
    case FS__OP_SET:
    case FS__OP_APPEND:
        if ((rc = want_args(m, 2, err)) < 0 || (rc = check_keys(m, 0, 2, err)) < 0)
            return rc;
        return check_values(m, 1, 2, max_value, err);
    case FS__OP_GET:
    case FS__OP_DELETE:
        if ((rc = want_args(m, 1, err)) < 0)
            return rc;
        return check_keys(m, 0, 1, err);
    case FS__OP_ADD:
        if ((rc = want_args(m, 2, err)) < 0 || (rc = check_keys(m, 0, 2, err)) < 0)
            return rc;
        if (m->args[1].len != 8)
            return fs_error_set(err, FS_EPROTO, "store add: delta must be 8 bytes, got %u",
                                m->args[1].len);
        return FS_OK;
    case FS__OP_CAS:
        if ((rc = want_args(m, 3, err)) < 0 || (rc = check_keys(m, 0, 3, err)) < 0)
            return rc;
        return check_values(m, 1, 1, max_value, err);
    case FS__OP_WAIT:
    case FS__OP_CHECK:
    case FS__OP_MULTI_GET:
        if (m->nargs > FS_STORE_MAX_KEYS)
            return fs_error_set(err, FS_ETOOBIG, "store %s: %u keys exceed the limit of %u",
                                fs__store_op_name(m->code), (unsigned)m->nargs, FS_STORE_MAX_KEYS);
        return check_keys(m, 0, 1, err);
    case FS__OP_NUM_KEYS: return want_args(m, 0, err);
    case FS__OP_MULTI_SET:
        if (m->nargs % 2 != 0)
            return fs_error_set(err, FS_EPROTO, "store multi_set: odd argument count %u",
                                (unsigned)m->nargs);
        if (m->nargs / 2 > FS_STORE_MAX_KEYS)
            return fs_error_set(err, FS_ETOOBIG, "store multi_set: %u keys exceed the limit of %u",
                                (unsigned)m->nargs / 2, FS_STORE_MAX_KEYS);
        if ((rc = check_keys(m, 0, 2, err)) < 0)
            return rc;
        return check_values(m, 1, 2, max_value, err);
    case FS__OP_CANCEL:
        if ((rc = want_args(m, 1, err)) < 0)
            return rc;
        if (m->args[0].len != 4)
            return fs_error_set(err, FS_EPROTO, "store cancel: id must be 4 bytes, got %u",
                                m->args[0].len);
        return FS_OK;
    default: return fs_error_set(err, FS_EPROTO, "store: unknown op %d", m->code);
    }
}

int fs__store_parse_i64(const uint8_t *p, size_t len, int64_t *out)
{
    size_t i = 0;
    int neg = 0;
    if (len > 0 && (p[0] == '-' || p[0] == '+')) {
        neg = p[0] == '-';
        i = 1;
    }
    if (i == len)
        return -1;
    /* Accumulate as a negative number so INT64_MIN parses too. */
    int64_t v = 0;
    for (; i < len; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        int d = p[i] - '0';
        if (v < (INT64_MIN + d) / 10)
            return -1;
        v = v * 10 - d;
    }
    if (!neg) {
        if (v == INT64_MIN)
            return -1;
        v = -v;
    }
    *out = v;
    return 0;
}

void fs__store_fmt_key(char *out, size_t cap, const void *key, size_t len)
{
    const unsigned char *k = key;
    const size_t shown = 160;
    size_t o = 0;
    if (cap < 8) {
        if (cap > 0)
            out[0] = '\0';
        return;
    }
    out[o++] = '\'';
    for (size_t i = 0; i < len && i < shown; i++) {
        unsigned char c = k[i];
        if (o + 8 >= cap)
            break;
        if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
            out[o++] = (char)c;
        } else {
            int n = snprintf(out + o, cap - o, "\\x%02x", c);
            if (n < 0)
                break;
            o += (size_t)n;
        }
    }
    if (len > shown && o + 5 < cap) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o++] = '\'';
    out[o] = '\0';
}

int fs__store_buf_reserve(fs__store_buf_t *b, size_t extra, fs_error_t *err)
{
    if (extra <= b->cap - b->len)
        return FS_OK;
    if (extra > SIZE_MAX / 2 - b->len)
        return fs_error_set(err, FS_ENOMEM, "store buffer of %zu bytes is too large", extra);
    size_t need = b->len + extra;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (p == NULL)
        return fs_error_set(err, FS_ENOMEM, "store: out of memory growing a buffer to %zu bytes",
                            cap);
    b->p = p;
    b->cap = cap;
    return FS_OK;
}

void fs__store_buf_free(fs__store_buf_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

int fs__store_frame_begin(fs__store_buf_t *b, uint32_t id, int code, size_t *start, fs_error_t *err)
{
    int rc = fs__store_buf_reserve(b, FS__STORE_HDR, err);
    if (rc < 0)
        return rc;
    uint8_t *h = b->p + b->len;
    fs__store_put_u32(h, FS__STORE_HDR - 4);
    fs__store_put_u32(h + 4, id);
    h[8] = (uint8_t)(int8_t)code;
    h[9] = 0;
    h[10] = h[11] = 0;
    *start = b->len;
    b->len += FS__STORE_HDR;
    return FS_OK;
}

int fs__store_frame_arg(fs__store_buf_t *b, size_t start, const void *p, size_t len,
                        fs_error_t *err)
{
    if (len > UINT32_MAX)
        return fs_error_set(err, FS_ETOOBIG, "store argument of %zu bytes is too large", len);
    uint8_t *h = b->p + start;
    unsigned nargs = (unsigned)(h[10] | h[11] << 8);
    if (nargs >= 0xffffu)
        return fs_error_set(err, FS_ETOOBIG, "store frame has too many arguments");
    int rc = fs__store_buf_reserve(b, 4 + len, err);
    if (rc < 0)
        return rc;
    h = b->p + start; /* the buffer may have moved */
    fs__store_put_u32(b->p + b->len, (uint32_t)len);
    if (len > 0)
        memcpy(b->p + b->len + 4, p, len);
    b->len += 4 + len;
    nargs++;
    h[10] = (uint8_t)nargs;
    h[11] = (uint8_t)(nargs >> 8);
    return FS_OK;
}

void fs__store_frame_end(fs__store_buf_t *b, size_t start)
{
    fs__store_put_u32(b->p + start, (uint32_t)(b->len - start - 4));
}

int fs__store_buf_make_room(fs__store_buf_t *b, size_t *off, int cautious, fs_error_t *err)
{
    if (*off > 0) {
        memmove(b->p, b->p + *off, b->len - *off);
        b->len -= *off;
        *off = 0;
    }
    size_t want = FS__STORE_READ_CHUNK;
    if (b->len >= 4) {
        size_t frame = (size_t)fs__store_get_u32(b->p) + 4;
        if (frame > b->len && frame - b->len > want) {
            want = frame - b->len;
            if (cautious && want > 2 * b->cap)
                want = 2 * b->cap; /* grow as bytes arrive, not as claimed */
        }
    }
    return fs__store_buf_reserve(b, want, err);
}
