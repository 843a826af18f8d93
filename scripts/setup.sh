#!/usr/bin/env bash
# Create .venv with everything fedfer needs (Python 3.11). Idempotent: a second run only checks.
# torch/torchvision are pinned to the releases that lie on this machine's disk (no multi-GB download).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import fedfer, flwr, opacus, torchvision, pytest" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.fedfer-installed ]; then
  echo "setting up .venv (first time: a few minutes)..."
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "WARNING: Location" || true
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "WARNING: Location" || true
  # PYTHONWARNINGS reaches the build backend: setuptools' generic "editable installation" warning block is noise here
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "WARNING: Location" || true
  .venv/bin/python -c "import fedfer, flwr, opacus, torchvision, pytest"
  touch .venv/.fedfer-installed
fi
