#!/usr/bin/env bash
# Format check (clang-format) and static analysis (cppcheck, clang-tidy) of the C sources:
# the library (csrc/include, csrc/lib), the binding (csrc/python), the C tests, the fuzz
# target and the C examples. Installs the Debian packages when they are missing.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
need=()
for tool in clang-format cppcheck clang-tidy; do command -v $tool >/dev/null || need+=($tool); done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
py=$(cat .fs-python 2>/dev/null || echo python3)
inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
shopt -s nullglob
lib=(csrc/lib/*.c)
binding=(csrc/python/*.c)
all=(csrc/include/*.h csrc/include/fastspawn/*.h csrc/lib/*.[ch] csrc/python/*.[ch]
     tests/c/*.[ch] tests/c/fake_cuda/*.[ch] tests/c/abi/*.[ch] tests/fuzz/*.c examples/c/*.c)
includes=(-Icsrc/include -Icsrc/lib -Icsrc/python)
status=0
echo "== clang-format"
for f in "${all[@]}"; do
    if ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then
        echo "needs formatting: $f (run: make format)"; status=1
    fi
done
echo "== cppcheck"
# Python.h is not given to cppcheck (slow), so it cannot see that Py_RETURN_NONE
# returns: missingReturn is a false positive in the binding files only.
cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability --std=c11 \
    --inline-suppr -D_GNU_SOURCE "${includes[@]}" --suppress='missingReturn:csrc/python/*.c' \
    "${lib[@]}" "${binding[@]}" || status=1
echo "== clang-tidy"
clang-tidy --quiet "${lib[@]}" "${binding[@]}" examples/c/*.c -- -std=c11 -D_GNU_SOURCE \
    "${includes[@]}" -I"$inc" 2>/dev/null | grep -E "warning:|error:" && status=1
exit $status
