#!/usr/bin/env bash
# Run each C example binary; every one must exit 0. Prints one closing line.
set -u
failed=0
for bin in "$@"; do
    echo "== $bin"
    "$bin"; rc=$?
    if [ $rc -ne 0 ]; then echo "$bin exited with status $rc"; failed=$((failed + 1)); fi
done
echo "C examples: $(($# - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
