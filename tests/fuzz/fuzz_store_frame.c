/*
 * fuzz_store_frame.c - libFuzzer target for the store's wire format
 * (store_proto.c): fs__store_parse_frame, fs__store_check_request and the
 * helpers a server runs on untrusted bytes. Build and run: scripts/fuzz_store.sh.
 *
 * The input is treated as a byte stream of frames, the way the server reads a
 * connection. Oracles besides the sanitizers: a parsed frame re-encodes to
 * exactly its own bytes; args lie inside the frame; "need more bytes" is
 * stable under truncation.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "store_proto.h"

static fs__store_arg_t args[FS__STORE_MAX_ARGS];

static void check_reencode(const uint8_t *frame, size_t len, const fs__store_msg_t *m)
{
    fs__store_buf_t b = {0};
    fs_error_t e;
    size_t start;
    if (fs__store_frame_begin(&b, m->id, m->code, &start, &e) < 0)
        abort();
    for (unsigned i = 0; i < m->nargs; i++) {
        if (m->args[i].p < frame || m->args[i].p + m->args[i].len > frame + len)
            abort(); /* an argument outside its frame */
        if (fs__store_frame_arg(&b, start, m->args[i].p, m->args[i].len, &e) < 0)
            abort();
    }
    fs__store_frame_end(&b, start);
    if (b.len != len || memcmp(b.p, frame, len) != 0)
        abort(); /* parse and encode disagree */
    fs__store_buf_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* The first byte picks the limits, so small limits get exercised too. */
    size_t max_value = size > 0 ? ((size_t)1 << (data[0] % 24)) : 64;
    size_t max_frame =
        size > 0 && (data[0] & 0x80) ? FS__STORE_HELLO_MAX_FRAME : fs__store_max_frame(max_value);
    size_t off = size > 0 ? 1 : 0;
    while (off < size) {
        fs__store_msg_t m;
        fs_error_t e;
        int64_t n = fs__store_parse_frame(data + off, size - off, max_frame, args,
                                          FS__STORE_MAX_ARGS, &m, &e);
        if (n <= 0) {
            if (n < 0 && (e.code != (int)n || e.msg[0] == '\0'))
                abort(); /* errors must say what went wrong */
            break;
        }
        if ((size_t)n > size - off || (size_t)n > max_frame)
            abort();
        /* Any prefix of a complete frame is "need more", never an error or a frame. */
        if (fs__store_parse_frame(data + off, (size_t)n - 1, max_frame, args, FS__STORE_MAX_ARGS,
                                  &m, &e) > 0)
            abort();
        n = fs__store_parse_frame(data + off, (size_t)n, max_frame, args, FS__STORE_MAX_ARGS, &m,
                                  &e);
        check_reencode(data + off, (size_t)n, &m);
        if (fs__store_check_request(&m, max_value, &e) == FS_OK) {
            for (unsigned i = 0; i < m.nargs; i++) {
                char kb[200];
                int64_t v;
                fs__store_fmt_key(kb, sizeof kb, m.args[i].p, m.args[i].len);
                if (strlen(kb) >= sizeof kb)
                    abort();
                (void)fs__store_parse_i64(m.args[i].p, m.args[i].len, &v);
            }
            if (m.code == FS__OP_ADD && m.args[1].len != 8)
                abort();
        }
        off += (size_t)n;
    }
    return 0;
}
