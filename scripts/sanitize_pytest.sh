#!/usr/bin/env bash
# Run the Python suite against an extension built with ASan + UBSan.
# The sanitized build goes to a scratch copy of the package, so the normal
# in-place build is left alone. Leak detection is off: CPython and torch keep
# memory until exit by design; the C tests (make sanitize) check leaks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(cat "$root/.fs-python")
work=$(mktemp -d /tmp/fastspawn-asan.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r "$root/python/fastspawn" "$work/fastspawn"
rm -f "$work"/fastspawn/_C*.so
inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
gcc -shared -fPIC -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O1 -g \
    -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined \
    -Wno-missing-field-initializers -I"$root/csrc/include" -I"$root/csrc" -I"$inc" "$root"/csrc/*.c \
    "$root"/csrc/lib/*.c "$root"/csrc/python/*.c -lpthread -ldl -lm \
    -o "$work/fastspawn/_C$suffix"
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:handle_segv=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export FASTSPAWN_TEST_PACKAGE_DIR="$work"
export PYTHONPATH="$work"
cd "$root"
set +e
"$py" -m pytest -p no:cacheprovider -m "not slow" "${@:-tests}"
rc=$?
[ $rc -eq 5 ] && { echo "no tests ran under the sanitizers" >&2; exit 1; }
exit $rc
