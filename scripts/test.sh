#!/usr/bin/env bash
# Set up (if needed), lint (ruff, configured in pyproject.toml) and run the whole test suite, as
# CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
