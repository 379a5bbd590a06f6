#!/usr/bin/env bash
# Set everything up, then run the whole test suite: the library's tests, the
# sample plugins' tests, the examples in smoke mode and the docs build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000

.venv/bin/python -m pytest tests "$@"
shopt -s nullglob
for tests in plugins/*/tests; do
  (cd "$(dirname "$tests")" && "$OLDPWD/.venv/bin/python" -m pytest -q tests)
done
