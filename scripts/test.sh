#!/usr/bin/env bash
# Set up (if needed), lint (ruff, configured in pyproject.toml) and run the whole test suite, as
# CI does: tests/ in .venv (scripts/run_tests.sh: one pytest run without a GPU, and on a GPU
# machine a second one for tests/test_gpu.py with the Triton interpreter off), then tests_vllm/
# (serving in vLLM) in .venv-vllm, which scripts/setup_vllm.sh makes (about 3.5 minutes the
# first time; SGM_EXT_VLLM_TESTS=0 skips this part). Arguments are pytest options, given to
# every run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
bash scripts/run_tests.sh "$@"
if [ "${SGM_EXT_VLLM_TESTS:-1}" != 0 ]; then
    bash scripts/setup_vllm.sh
    exec .venv-vllm/bin/pytest tests_vllm -p no:cacheprovider "$@"
fi
