#!/usr/bin/env bash
# Run the Python suite against an extension built with ASan + UBSan.
# setup.py builds it (FASTSPAWN_SANITIZE=1: its own build folders) into a scratch copy of
# the package, so the normal in-place build is left alone. Leak detection is off: CPython
# and torch keep memory until exit by design; the C tests (make sanitize) check leaks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(cat "$root/.fs-python")
work=$(mktemp -d /tmp/fastspawn-asan.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r "$root/python/fastspawn" "$work/fastspawn"
rm -f "$work"/fastspawn/_C*.so
(cd "$root" && FASTSPAWN_DEV=1 FASTSPAWN_SANITIZE=1 "$py" setup.py -q build_ext \
    --build-lib "$work" >/dev/null)
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:handle_segv=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export FASTSPAWN_TEST_PACKAGE_DIR="$work"
# Tests read this to skip what GCC 12's libasan cannot run reliably: its allocator
# takes no lock around fork(), so a rank forked while the launcher's store thread
# holds that lock deadlocks at its first malloc (seen with gdb: gloo's thread in a
# rank waiting forever on __sanitizer::SizeClassAllocator64's mutex). glibc's
# malloc is fork-safe; only the sanitized build has this.
export FASTSPAWN_TEST_SANITIZED=1
export PYTHONPATH="$work"
cd "$root"
set +e
"$py" -m pytest -p no:cacheprovider -m "not slow" "${@:-tests}"
rc=$?
[ $rc -eq 5 ] && { echo "no tests ran under the sanitizers" >&2; exit 1; }
exit $rc
