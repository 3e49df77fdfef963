#!/usr/bin/env bash
# Build fastspawn and run its test suite (not the slow tests) against one torch release:
#
#   scripts/test_torch_version.sh 2.1.2 [pytest arguments...]
#
# - Creates (or reuses) .venv-torch-VERSION in the repo root with torch==VERSION and
#   what the suite needs: numpy<2, pytest, pytest-timeout, cloudpickle, and
#   scikit-learn (the data set of examples/tutorial_spawn.py, which a test runs).
#   The other entries of requirements-dev.txt serve lint and benchmarks; without
#   the nvidia-* pins the NCCL ABI check compares against the nccl.h that this
#   torch's own wheel brings (2.18 for torch 2.1).
#   Also setuptools>=77: older ones reject pyproject's SPDX `license = "..."`.
#   A venv whose stamp matches is reused as it is: nothing is downloaded.
# - Builds fastspawn._C in place with that venv's Python. The extension is plain
#   CPython (no libtorch), so the one build serves every torch.
# - Runs pytest -m "not slow"; its exit status is the script's, and pytest's 5
#   (no tests collected) counts as a failure.
#
# PyPI's x86_64 torch wheels are CUDA builds (several GB with their nvidia-*
# packages); they run on a CPU-only machine. FASTSPAWN_PYTHON picks the base
# interpreter (default python3).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    echo "usage: $0 TORCH_VERSION [pytest arguments...]   (e.g. $0 2.1.2)" >&2
    exit 2
fi
version=$1
shift
if ! [[ $version =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?(\+[A-Za-z0-9.]+)?$ ]]; then
    echo "$0: '$version' is not a torch version (like 2.1.2 or 2.13.0+cpu)" >&2
    exit 2
fi

venv="$root/.venv-torch-$version"
py="$venv/bin/python"
reqs=("torch==$version" "numpy<2" "pytest" "pytest-timeout" "cloudpickle" "scikit-learn" "setuptools>=77" "wheel")
want=$(printf '%s\n' "${reqs[@]}" | sha256sum | cut -c1-16)

if [ -x "$py" ] && [ "$(cat "$venv/.fs-stamp" 2>/dev/null)" = "$want" ]; then
    echo "test_torch_version: reusing $venv" >&2
else
    base=${FASTSPAWN_PYTHON:-python3}
    echo "test_torch_version: installing torch $version into $venv ($($base --version))" >&2
    [ -x "$py" ] || "$base" -m venv "$venv"
    "$py" -m pip install -q "${reqs[@]}"
    echo "$want" > "$venv/.fs-stamp"
fi

# The torch that imports must be the one asked for (not, say, a cached other build).
"$py" - "$version" <<'PY'
import sys
import torch
want = sys.argv[1]
got = torch.__version__
def release(v):
    parts = [int(x) for x in v.split("+")[0].split(".")]
    return parts + [0] * (3 - len(parts))
if release(got) != release(want) or ("+" in want and got != want):
    sys.exit(f"test_torch_version: asked for torch {want}, the venv has {got}")
print(f"test_torch_version: torch {got}, Python {sys.version.split()[0]}", file=sys.stderr)
PY

cd "$root"
"$py" setup.py -q build_ext --inplace >/dev/null

set +e
PYTHONPATH="$root/python" "$py" -m pytest -p no:cacheprovider tests -m "not slow" "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "test_torch_version: pytest collected no tests: failing" >&2
    exit 1
fi
exit $rc
