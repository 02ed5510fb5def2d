#!/usr/bin/env bash
# Set up (if needed) and run the main job: until `sgm-ext demo` exists, the by-hand example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if .venv/bin/sgm-ext demo --help >/dev/null 2>&1; then
    exec .venv/bin/sgm-ext demo "$@"
fi
exec .venv/bin/python examples/patch_by_hand.py
