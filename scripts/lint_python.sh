#!/usr/bin/env bash
# Python lint: ruff over the package and the tests, mypy over the package.
# Settings (rules, exclusions) are in pyproject.toml; ruff and mypy come from
# requirements-dev.txt (scripts/bootstrap.sh installs them). Exits non-zero if
# either finds a problem; both always run.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=$(cat .fs-python 2>/dev/null || echo python3)
if ! "$py" -m ruff --version >/dev/null 2>&1 || ! "$py" -m mypy --version >/dev/null 2>&1; then
    echo "lint_python: ruff or mypy is missing for $py: run scripts/bootstrap.sh" >&2
    exit 2
fi
status=0
echo "== ruff check"
"$py" -m ruff check python/fastspawn tests || status=1
echo "== mypy"
"$py" -m mypy || status=1  # files = python/fastspawn (pyproject.toml)
exit $status
