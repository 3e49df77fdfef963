#!/usr/bin/env bash
# Prepare a Python that can build and test fastspawn, then build the extension.
#
# - If .venv exists and its stamp matches the dependency files: nothing to install.
# - Else, if FASTSPAWN_PYTHON (or python3) already imports torch >= 2.1, pytest and
#   cloudpickle (e.g. the GPU machine: Python 3.12 + torch 2.11, no network): use it
#   as it is and install nothing.
# - Else create .venv and install the pinned set-up (requirements-dev.txt) into it,
#   then the project itself (editable).
# Always (re)builds libfastspawn and fastspawn._C in place, which is quick when nothing
# changed, with the development flags (FASTSPAWN_DEV=1: warnings are errors; see setup.py).
# Writes the chosen interpreter's path to .fs-python (used by scripts/py).
set -euo pipefail
export FASTSPAWN_DEV=1
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# setup.py is not part of it: the in-place build below runs on every call anyway.
stamp_of() { cat requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16; }
has_stack() {
    "$1" - <<'PY' 2>/dev/null
import sys
import torch, pytest, cloudpickle  # noqa: F401
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if v >= (2, 1) else 1)
PY
}

want=$(stamp_of)
py=""
if [ -x .venv/bin/python ] && [ "$(cat .venv/.fs-stamp 2>/dev/null)" = "$want" ]; then
    py="$root/.venv/bin/python"
elif [ ! -x .venv/bin/python ] && has_stack "${FASTSPAWN_PYTHON:-python3}"; then
    py=$(command -v "${FASTSPAWN_PYTHON:-python3}")
    echo "bootstrap: using $py as it is (it already has torch, pytest and cloudpickle)" >&2
else
    base=${FASTSPAWN_PYTHON:-python3}
    echo "bootstrap: creating .venv with $($base --version) and the pinned set-up" >&2
    [ -x .venv/bin/python ] || "$base" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    .venv/bin/python -m pip install -q -r requirements-dev.txt
    .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
    echo "$want" > .venv/.fs-stamp
    py="$root/.venv/bin/python"
fi
echo "$py" > .fs-python
# Build (or refresh) the library and the extension in place; both skip what is up to date.
"$py" setup.py -q build_ext --inplace >/dev/null
