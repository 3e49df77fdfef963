#!/usr/bin/env bash
# Run the Python suite (every test, slow ones included); pytest's exit 5 (no tests
# collected) counts as failure. With test paths among the arguments
# (scripts/run_pytest.sh tests/test_store.py -x), only those run.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
targets=("$root/tests")
for arg in "$@"; do
    case $arg in
    -*) ;;
    *.py | *.py::* | tests | tests/* | */tests | */tests/*) targets=(); break ;;
    esac
done
"$root/scripts/py" -m pytest "${targets[@]}" "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
