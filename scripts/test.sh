#!/usr/bin/env bash
# Set everything up, then run the whole test suite: the linters, the library's
# tests, the sample plugins' tests, the examples in smoke mode and the docs build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check ensemblekit tests benchmarks examples plugins
.venv/bin/mypy  # the paths in pyproject.toml's [tool.mypy] files
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000

# Two worker processes of one thread each: the machine has 2 cores.
.venv/bin/python -m pytest -n 2 tests ensemblekit --doctest-modules "$@"
shopt -s nullglob
for tests in plugins/*/tests; do
  (cd "$(dirname "$tests")" && "$OLDPWD/.venv/bin/python" -m pytest -q tests)
done
.venv/bin/python -m mkdocs build --strict --quiet -d "$(mktemp -d)"
