#!/usr/bin/env bash
# Set up (if needed), lint (ruff, configured in pyproject.toml) and run the whole test suite, as
# CI does: tests/ in .venv, then tests_vllm/ (serving in vLLM) in .venv-vllm, which
# scripts/setup_vllm.sh makes (about 3.5 minutes the first time; SGM_EXT_VLLM_TESTS=0 skips
# this part). Arguments are pytest options, given to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
if [ "${SGM_EXT_VLLM_TESTS:-1}" != 0 ]; then
    bash scripts/setup_vllm.sh
    exec .venv-vllm/bin/pytest tests_vllm -p no:cacheprovider "$@"
fi
