#!/usr/bin/env bash
# Run each C test binary, then print one closing line with the totals.
set -u
passed=0; failed=0; bad=0
for bin in "$@"; do
    echo "== $bin"
    out=$("$bin" 2>&1); rc=$?
    echo "$out"
    line=$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -1)
    if [ -z "$line" ]; then
        echo "$bin printed no summary (exit $rc)"; bad=$((bad + 1)); continue
    fi
    p=${line%% passed*}; f=${line#*passed, }; f=${f%% failed*}
    passed=$((passed + p)); failed=$((failed + f))
    [ $rc -eq 0 ] || [ "$f" -gt 0 ] || bad=$((bad + 1))
done
failed=$((failed + bad))
echo "C tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
