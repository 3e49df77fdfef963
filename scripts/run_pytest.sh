#!/usr/bin/env bash
# Run the Python suite; pytest's exit 5 (no tests collected) counts as failure.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/py" -m pytest "$root/tests" "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
