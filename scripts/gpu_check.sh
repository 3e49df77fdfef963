#!/usr/bin/env bash
# Every GPU check in one go (for a machine with CUDA): build with the machine's
# own Python and torch, run the C tests, the Python suite (CUDA tests included)
# and the start-up benchmarks. Logs go to $OUT (or ./gpu-out).
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
    nvidia-smi -L; uname -r; nproc; python3 --version
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
} 2>&1 | tee "$out/env.txt"
scripts/bootstrap.sh 2>&1 | tail -5
if command -v make >/dev/null; then
    make ctest 2>&1 | tail -3 | tee "$out/ctest.txt"
else
    # No make: the same archive the extension links (built by bootstrap), the same flags.
    flags() { sed -n "s/^$1 *:= *//p" csrc/flags.mk; }
    mkdir -p tests/c/bin
    bins=()
    for t in tests/c/test_*.c; do
        b=tests/c/bin/$(basename "$t" .c)
        # shellcheck disable=SC2046 # the flags are words
        gcc $(flags FS_CFLAGS) $(flags FS_DEV_CFLAGS) -Icsrc/include -Icsrc/lib "$t" \
            build/clib-dev/libfastspawn.a $(flags FS_LDLIBS) -lm -o "$b" && bins+=("$b")
    done
    scripts/run_ctests.sh "${bins[@]}" 2>&1 | tail -3 | tee "$out/ctest.txt"
fi
timeout 330 scripts/py -m pytest tests -q -p no:cacheprovider -m "not slow" -ra 2>&1 \
    | tee "$out/pytest.txt" | tail -25
timeout 60 scripts/py bench/spawn.py --n 4 8 --repeat 3 --slow-repeat 1 2>&1 | tail -22 | tee "$out/bench_spawn.txt"
timeout 40 scripts/py bench/pg_start.py --n 4 --repeat 3 2>&1 | tail -12 | tee "$out/bench_pg.txt"
