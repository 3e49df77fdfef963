/*
 * store_proto.h - internal to the store's files (and the fuzzer): the wire format of
 * the rendezvous store and the buffer helpers server and client share (store_proto.c).
 * Not part of the public API (see fastspawn/store.h for that).
 *
 * Every message, in both directions, is one frame:
 *
 *     u32 len      bytes that follow this field (>= FS__STORE_HDR - 4)
 *     u32 id       request id; a reply carries the id of its request
 *     u8  code     request: enum fs__store_op; reply: 0 (ok) or -FS_E* (error)
 *     u8  flags    0 (reserved)
 *     u16 nargs    number of arguments that follow
 *     nargs x { u32 arglen, arglen bytes }
 *
 * All integers are little-endian. Integers carried as arguments (add's delta,
 * counters, flags) are 8-byte little-endian two's complement. An error reply
 * carries one argument: the message text. A connection's first frame must be
 * HELLO {magic, token}; its reply carries {u64 max_value_size}.
 */
#ifndef FS_STORE_PROTO_H
#define FS_STORE_PROTO_H

#include <endian.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fastspawn.h"

#define FS__STORE_MAGIC "fastspawn-store/1"
#define FS__STORE_HDR 12u /* len + id + code + flags + nargs */
#define FS__STORE_MAX_ARGS (2u * FS_STORE_MAX_KEYS + 1u)
/* Room in a frame for everything but values: 1024 keys and argument headers. */
#define FS__STORE_FRAME_SLACK ((size_t)FS_STORE_MAX_KEYS * (FS_STORE_MAX_KEY + 8u) + 65536u)
/* Largest frame accepted before HELLO succeeded. */
#define FS__STORE_HELLO_MAX_FRAME (FS__STORE_HDR + 64u + FS_STORE_MAX_TOKEN)
/* Bytes asked of the kernel per read, at least. */
#define FS__STORE_READ_CHUNK ((size_t)64 << 10)
/* Server and client keep polling this long after a message before they sleep: the next
   one often comes within microseconds, and waking a sleeping thread (an idle CPU, on a
   VM) costs tens of microseconds. */
#define FS__STORE_SPIN_US 50

enum fs__store_op {
    FS__OP_HELLO = 1,      /* magic, token -> u64 max_value_size */
    FS__OP_SET = 2,        /* key, value -> () */
    FS__OP_GET = 3,        /* key -> value (parks until the key exists) */
    FS__OP_ADD = 4,        /* key, i64 delta -> i64 new value */
    FS__OP_CAS = 5,        /* key, expected, desired -> current value */
    FS__OP_WAIT = 6,       /* keys... -> () (parks until all exist) */
    FS__OP_CHECK = 7,      /* keys... -> one byte per key, 1 if it exists */
    FS__OP_DELETE = 8,     /* key -> i64 1 if it existed else 0 */
    FS__OP_NUM_KEYS = 9,   /* () -> i64 */
    FS__OP_MULTI_GET = 10, /* keys... -> values... (parks until all exist) */
    FS__OP_MULTI_SET = 11, /* key, value, key, value... -> () */
    FS__OP_APPEND = 12,    /* key, value -> () */
    FS__OP_CANCEL = 13,    /* u32 request id -> no reply: drop that parked request */
    FS__OP_END_
};

typedef struct fs__store_arg {
    const uint8_t *p;
    uint32_t len;
} fs__store_arg_t;

typedef struct fs__store_msg {
    uint32_t id;
    int code; /* request: op; reply: 0 or a negative FS_E* code */
    uint16_t nargs;
    fs__store_arg_t *args; /* points into the caller's array, args into the frame */
} fs__store_msg_t;

/* A growable byte buffer. */
typedef struct fs__store_buf {
    uint8_t *p;
    size_t len, cap;
} fs__store_buf_t;

/* A name for an op ("get"), for messages. */
const char *fs__store_op_name(int op);

static inline void fs__store_put_u32(uint8_t *p, uint32_t v)
{
    uint32_t le = htole32(v);
    memcpy(p, &le, sizeof le);
}

static inline uint32_t fs__store_get_u32(const uint8_t *p)
{
    uint32_t le;
    memcpy(&le, p, sizeof le);
    return le32toh(le);
}

static inline void fs__store_put_u64(uint8_t *p, uint64_t v)
{
    uint64_t le = htole64(v);
    memcpy(p, &le, sizeof le);
}

static inline uint64_t fs__store_get_u64(const uint8_t *p)
{
    uint64_t le;
    memcpy(&le, p, sizeof le);
    return le64toh(le);
}

/*
 * Parse the frame at the start of buf[0..len). Returns the frame's total
 * length (> 0) when buf holds a complete, well-formed frame (msg filled, its
 * args pointing into buf), 0 when more bytes are needed, or a negative FS_E*
 * code (FS_EPROTO, FS_ETOOBIG) with err saying why. A declared length above
 * max_frame is rejected as soon as the 4 length bytes are in. Pure: no I/O, no
 * allocation; this is what the fuzzer drives.
 */
int64_t fs__store_parse_frame(const uint8_t *buf, size_t len, size_t max_frame,
                              fs__store_arg_t *args, size_t args_cap, fs__store_msg_t *msg,
                              fs_error_t *err);

/*
 * Check a parsed request against the per-op shape and the limits: argument
 * count, key length (FS_STORE_MAX_KEY), key count (FS_STORE_MAX_KEYS), value
 * size (max_value). Returns FS_OK or FS_EPROTO / FS_ETOOBIG. Pure.
 */
int fs__store_check_request(const fs__store_msg_t *m, size_t max_value, fs_error_t *err);

/* Largest frame a server with this value limit accepts (or sends). */
size_t fs__store_max_frame(size_t max_value);

/* Parse a decimal int64 ("-12"); returns 0 or -1 when not exactly that. Pure. */
int fs__store_parse_i64(const uint8_t *p, size_t len, int64_t *out);

/* Write key as a quoted, escaped, possibly shortened string for messages. */
void fs__store_fmt_key(char *out, size_t cap, const void *key, size_t len);

/* Buffer helpers: return FS_OK or FS_ENOMEM (err filled). */
int fs__store_buf_reserve(fs__store_buf_t *b, size_t extra, fs_error_t *err);
void fs__store_buf_free(fs__store_buf_t *b);
/* Start a frame at b->len; returns the frame's start offset via *start. */
int fs__store_frame_begin(fs__store_buf_t *b, uint32_t id, int code, size_t *start,
                          fs_error_t *err);
/* Append one argument to the frame that starts at `start`. */
int fs__store_frame_arg(fs__store_buf_t *b, size_t start, const void *p, size_t len,
                        fs_error_t *err);
/* Patch the frame's length field. */
void fs__store_frame_end(fs__store_buf_t *b, size_t start);
/*
 * Before reading into b, whose bytes before *off are handled: move the rest to the front
 * (*off = 0) and make room for FS__STORE_READ_CHUNK bytes, or for the rest of the frame
 * whose length b already holds. cautious (a peer not yet trusted): grow to at most twice
 * the buffer per call, so a frame claiming gigabytes costs memory only as bytes arrive.
 */
int fs__store_buf_make_room(fs__store_buf_t *b, size_t *off, int cautious, fs_error_t *err);

#endif /* FS_STORE_PROTO_H */
