#!/usr/bin/env bash
# All the set-up a fresh machine needs: a virtual environment in .venv with the pinned toolchain
# (requirements-dev.txt) and sgm-ext installed editable, which builds sgm_ext._C from csrc/.
# Safe to run again: it only installs what is missing and rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-dev.txt
# --no-build-isolation: compile against the torch just installed (its CUDA 13.0 headers)
.venv/bin/python -m pip install --quiet --no-build-isolation -e .
