#!/usr/bin/env bash
# Fuzz the store's frame parser (tests/fuzz/fuzz_store_frame.c) with libFuzzer
# + AddressSanitizer + UndefinedBehaviorSanitizer for a fixed time.
#   scripts/fuzz_store.sh [SECONDS]      (default 60)
# Needs clang with libFuzzer (Debian: clang-14, libclang-rt-14-dev). The corpus
# and any crash files go to fuzz-out/store/ (git-ignored); exit status != 0 on a crash.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-60}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
CLANG=${CLANG:-$(command -v clang || command -v clang-14 || true)}
if [ -z "$CLANG" ]; then
    echo "fuzz_store.sh: clang not found (apt-get install clang-14 libclang-rt-14-dev)" >&2
    exit 2
fi
out=fuzz-out/store
mkdir -p "$out/corpus" "$out/crashes"
bin=$out/fuzz_store_frame
flags() { sed -n "s/^$1 *:= *//p" csrc/flags.mk; }
# The library's flags (csrc/flags.mk), then the fuzzer's: later -O/-fsanitize win.
# shellcheck disable=SC2046 # the flags are words
"$CLANG" $(flags FS_CFLAGS) $(flags FS_DEV_CFLAGS) -O1 -fno-sanitize-recover=undefined \
    -fsanitize=fuzzer,address,undefined -Icsrc/include -Icsrc/lib tests/fuzz/fuzz_store_frame.c \
    csrc/lib/store_proto.c csrc/lib/error.c -o "$bin"

# Seeds: well-formed frames (the first byte picks the limits; see the target).
seed() { # NAME FORMAT... : the printf FORMATs, concatenated, as one corpus file
    local name=$1 f; shift
    for f in "$@"; do printf "$f"; done > "$out/corpus/$name"
}
# set("k", "v")
seed set '\x10\x12\x00\x00\x00\x01\x00\x00\x00\x02\x00\x02\x00\x01\x00\x00\x00k\x01\x00\x00\x00v'
# hello(magic, "tok")
seed hello '\x10\x24\x00\x00\x00\x01\x00\x00\x00\x01\x00\x02\x00' \
    '\x11\x00\x00\x00fastspawn-store/1\x03\x00\x00\x00tok'
# get("key") then add("n", 1)
seed get_add '\x10\x0f\x00\x00\x00\x02\x00\x00\x00\x03\x00\x01\x00\x03\x00\x00\x00key' \
    '\x19\x00\x00\x00\x03\x00\x00\x00\x04\x00\x02\x00\x01\x00\x00\x00n' \
    '\x08\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00'
# wait() with no keys; an error reply
seed wait0 '\x10\x08\x00\x00\x00\x04\x00\x00\x00\x06\x00\x00\x00'
seed reply_err '\x10\x0d\x00\x00\x00\x04\x00\x00\x00\xfb\x00\x01\x00\x01\x00\x00\x00x'

echo "fuzzing the store frame parser for ${secs}s ($bin)"
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
    "$bin" -max_total_time="$secs" -timeout=5 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$out/crashes/" "$out/corpus"
