#!/usr/bin/env bash
# Create .venv and install ensemblekit with everything it needs (tests, docs,
# sample plugins). Safe to run again: it reinstalls only when the project's
# requirements changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST (the benchmark of `reproduce` and `demo`): the Debian package dataset-fashion-mnist puts the four
# files into /usr/share/datasets/fashion-mnist. Installed here when running as root with apt-get; elsewhere the
# command says how to get them. Never fails the setup: without the data, digits is the fallback.
FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist
fashion_mnist_present() {
  [ -f "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ] && [ -f "$FASHION_MNIST_DIR/t10k-labels-idx1-ubyte.gz" ]
}
if [ -n "${ENSEMBLEKIT_FASHION_MNIST:-}" ]; then
  echo "setup: Fashion-MNIST: ENSEMBLEKIT_FASHION_MNIST=$ENSEMBLEKIT_FASHION_MNIST"
elif fashion_mnist_present; then
  echo "setup: Fashion-MNIST: $FASHION_MNIST_DIR (package dataset-fashion-mnist)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing the Debian package dataset-fashion-mnist (Fashion-MNIST, about 30 MB)"
  export DEBIAN_FRONTEND=noninteractive
  if timeout 300 apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
     || { timeout 300 apt-get update -qq >/dev/null 2>&1 \
          && timeout 300 apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
     && fashion_mnist_present; then
    echo "setup: Fashion-MNIST: $FASHION_MNIST_DIR"
  else
    echo "setup: warning: apt-get could not install dataset-fashion-mnist; Fashion-MNIST is unavailable" \
         "(digits still works). Put the four *-ubyte.gz files of https://github.com/zalandoresearch/fashion-mnist" \
         "into a folder and set ENSEMBLEKIT_FASHION_MNIST=<folder>"
  fi
else
  echo "setup: Fashion-MNIST not found (digits still works). To get it: sudo apt-get install dataset-fashion-mnist," \
       "or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and" \
       "t10k-labels-idx1-ubyte.gz (https://github.com/zalandoresearch/fashion-mnist) into a folder and set" \
       "ENSEMBLEKIT_FASHION_MNIST=<folder>"
fi

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
