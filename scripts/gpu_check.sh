#!/usr/bin/env bash
# Every GPU check in one run, for a machine with one CUDA GPU (an H100/H200 with
# Python 3.12 + torch 2.11 + CUDA 13 + bundled NCCL, no network), in under 8 minutes:
#
#   build    scripts/bootstrap.sh (the machine's Python as it is), the C tests, the fakes
#   env      GPU, driver, Python, torch and its NCCL
#   ctest    the C tests (the NCCL layer against the fake runtime + NCCL included)
#   pytest   tests/test_cuda.py (real GPU) + the NCCL tests (the Python side on the fakes)
#   train    examples/train_ddp.py on the GPU through fastspawn's group, world size 1
#   tutorial examples/tutorial_spawn.py on the GPU (it picks NCCL itself), world size 1
#   bench    bench/nccl.py: all_reduce per call vs ProcessGroupNCCL, spawn -> ready NCCL
#            group vs torch.multiprocessing.spawn
#
# Each phase runs under a deadline (its budget, cut to what the whole run has left) and
# the next one runs whatever happened; the end is a summary of what passed, failed or
# was skipped. Logs and tables go to $OUT (default ./gpu-out); bench/nccl.py's tables
# are also printed, for docs/benchmarks.md. Without a GPU (a rehearsal on a CPU
# machine) the GPU phases skip with the reason and the rest runs; the benchmark then
# rehearses its harness on the fakes (bench/nccl.py --rehearse).
#
#   scripts/gpu_check.sh                 # budget: GPU_CHECK_SECONDS (default 450)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# torch.cuda.is_available() asks NVML instead of initialising the driver: a launcher
# that asked may still fork ranks that use CUDA.
export PYTORCH_NVML_BASED_CUDA_CHECK=1
start=$(date +%s)
end=$((start + ${GPU_CHECK_SECONDS:-450}))
summary=()

say() { printf '[%s +%3ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - start))" "$*"; }

# phase NAME BUDGET CMD...: run CMD (a command, or a function of this script: they are
# exported) under min(BUDGET, time left), its output also in $out/NAME.log.
phase() {
    local name=$1 budget=$2
    shift 2
    local left=$((end - $(date +%s) - 5))
    local limit=$((budget < left ? budget : left))
    if [ "$limit" -lt 10 ]; then
        say "== $name: SKIPPED (no time left)"
        summary+=("$name: skipped (out of time)")
        return 0
    fi
    say "== $name (deadline ${limit}s)"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c '"$@"' phase "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    local took
    took=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        summary+=("$name: passed (${took}s)")
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        summary+=("$name: FAILED, deadline of ${limit}s reached")
    else
        summary+=("$name: FAILED (exit $rc, ${took}s)")
    fi
    say "== $name: exit $rc after ${took}s"
    return 0
}

skip() {
    say "== $1: SKIPPED ($2)"
    summary+=("$1: skipped ($2)")
}

py=python3
gpu=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi

env_info() {
    if [ $gpu -eq 1 ]; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    else
        echo "no GPU (nvidia-smi: $(command -v nvidia-smi || echo none))"
    fi
    echo "kernel $(uname -r), $(nproc) cores"
    $py --version
    $py - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
try:
    print("torch's NCCL", ".".join(map(str, torch.cuda.nccl.version())))
except Exception as e:  # CPU build
    print("torch's NCCL: none (%s)" % type(e).__name__)
PY
}
# --- build ----------------------------------------------------------------------------
flags() { sed -n "s/^$1 *:= *//p" csrc/flags.mk; }
build_c_tests() {
    # The C tests, the C example and the fakes; make where there is one, else the same
    # commands as the Makefile's rules.
    if command -v make >/dev/null; then
        make -s fakes tests/c/bin/test_supervise tests/c/bin/test_store tests/c/bin/test_coll \
            tests/c/bin/test_nccl examples/c/bin/allreduce_ranks
        return
    fi
    # shellcheck disable=SC2046 # the flags are words
    local cf="$(flags FS_CFLAGS) $(flags FS_DEV_CFLAGS)" lib=build/clib-dev/libfastspawn.a
    local fake=tests/c/bin/fake
    mkdir -p tests/c/bin "$fake" examples/c/bin
    gcc $cf -Icsrc/include -Icsrc/lib -Itests/c/fake_cuda -fPIC -shared -fvisibility=default \
        -Wl,-soname,libcudart.so.13 -Wl,-Bsymbolic tests/c/fake_cuda/fake_cudart.c -pthread \
        -o "$fake/libcudart.so.13" || return 1
    gcc $cf -Icsrc/include -Icsrc/lib -Itests/c/fake_cuda -fPIC -shared -fvisibility=default \
        -Wl,-soname,libnccl.so.2 -Wl,-Bsymbolic tests/c/fake_cuda/fake_nccl.c -pthread -ldl \
        -lm -o "$fake/libnccl.so.2" || return 1
    for t in tests/c/test_*.c; do
        gcc $cf -Icsrc/include -Icsrc/lib -Itests/c/fake_cuda "$t" "$lib" $(flags FS_LDLIBS) -lm \
            -o "tests/c/bin/$(basename "$t" .c)" || return 1
    done
    gcc $cf -Icsrc/include examples/c/allreduce_ranks.c "$lib" $(flags FS_LDLIBS) -lm \
        -o examples/c/bin/allreduce_ranks
}
build() {
    scripts/bootstrap.sh || return 1
    py=$(cat .fs-python)
    echo "python: $py"
    build_c_tests
}
export -f flags build_c_tests build
phase build 150 build
[ -f .fs-python ] && py=$(cat .fs-python)
export py out gpu
export -f env_info
phase env 30 env_info

# --- tests ----------------------------------------------------------------------------
ctests() {
    scripts/run_ctests.sh tests/c/bin/test_supervise tests/c/bin/test_store \
        tests/c/bin/test_coll tests/c/bin/test_nccl || return 1
    scripts/run_examples.sh examples/c/bin/allreduce_ranks
}
export -f ctests
phase ctest 90 ctests

gpu_tests=tests/test_cuda.py
[ $gpu -eq 0 ] && say "(no GPU: tests/test_cuda.py will skip its tests; the NCCL tests run on the fakes)"
phase pytest 150 scripts/py -m pytest -q -p no:cacheprovider -ra $gpu_tests \
    tests/test_nccl_backend.py tests/test_nccl_loader.py

# --- examples on the GPU --------------------------------------------------------------
if [ $gpu -eq 1 ]; then
    phase train 60 scripts/py examples/train_ddp.py --device cuda --nprocs 1 --epochs 6
    port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    phase tutorial 45 scripts/py examples/tutorial_spawn.py --nprocs 1 --epochs 2 --port "$port"
else
    skip train "no GPU"
    skip tutorial "no GPU"
fi

# --- benchmarks -----------------------------------------------------------------------
if [ $gpu -eq 1 ]; then
    phase bench 130 scripts/py bench/nccl.py --deadline 60 --out "$out"
else
    say "(no GPU: the benchmark rehearses its harness on the fake NCCL, its numbers mean nothing)"
    phase bench 60 scripts/py bench/nccl.py --rehearse --rounds 2 --start-rounds 2 \
        --deadline 25 --out "$out"
fi

# --- summary --------------------------------------------------------------------------
echo
say "summary (logs in $out):"
failed=0
for line in "${summary[@]}"; do
    echo "  $line"
    case $line in *FAILED*) failed=$((failed + 1)) ;; esac
done
printf '%s\n' "${summary[@]}" > "$out/summary.txt"
say "total $(($(date +%s) - start))s; $failed phase(s) failed"
[ $failed -eq 0 ]
