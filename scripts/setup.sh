#!/usr/bin/env bash
# Creates .venv beside the repo and installs lvr_jax with everything the demo and tests need.
# Idempotent: a second run only checks that the environment is complete.
#   PYTHON=python3.12 VENV=.venv-py312 bash scripts/setup.sh   # another Python (3.11-3.13)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
# torch first and pinned: an unpinned torch pulls gigabytes of CUDA wheels. (Only Python 3.11
# has a CPU wheel of it on this project's machines; other Pythons download PyPI's build.)
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
