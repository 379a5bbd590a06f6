#!/usr/bin/env bash
# Create .venv and install ensemblekit with everything it needs (tests, docs,
# sample plugins). Safe to run again: it reinstalls only when the project's
# requirements changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.ensemblekit-installed
shopt -s nullglob
want=$(cat pyproject.toml constraints.txt plugins/*/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

echo "setup: installing ensemblekit and its dependencies (torch is large: a few minutes on a fresh machine)"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,docs]"
for plugin in plugins/*/pyproject.toml; do
  .venv/bin/python -m pip install --quiet -c constraints.txt -e "$(dirname "$plugin")"
done
echo "$want" > "$stamp"
echo "setup: done"
