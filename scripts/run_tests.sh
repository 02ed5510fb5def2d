#!/usr/bin/env bash
# The pytest runs of tests/, which scripts/test.sh makes after set-up and lint. Arguments are
# pytest options, given to every run.
#
# Without a GPU: one run of all of tests/ (test_gpu.py skips as a whole). With one, two runs,
# because one interpreter setting cannot serve both halves: conftest.py turns the Triton
# interpreter on so that the Triton kernels run on CPU tensors (test_ops and the rest), and
# test_gpu.py needs Triton compiled for the GPU. So: tests/ without test_gpu.py under the
# interpreter, then test_gpu.py with TRITON_INTERPRET=0 and SGM_EXT_GPU_RUN=1 (conftest.py then
# fails any skip, so a GPU run cannot pass by skipping), on up to 8 workers when pytest-xdist
# is installed (requirements-dev.txt has it: compiling the Triton kernels for the GPU is most
# of that run's time). Both runs are made even when the first fails; the status is the first
# failure's.
#
# SGM_EXT_GPU: auto (default: torch.cuda.is_available() decides), 1 (the two runs), 0 (the one
# run) or only (the GPU run alone: scripts/gpu_check.sh). PYTHON: the interpreter (default
# .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
gpu=${SGM_EXT_GPU:-auto}
if [ "$gpu" = auto ]; then
    gpu=0
    if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null
    then
        gpu=1
    fi
fi
case $gpu in
    0) exec "$PYTHON" -m pytest "$@" ;;
    1 | only) ;;
    *) echo "run_tests.sh: SGM_EXT_GPU must be auto, 0, 1 or only, not '$gpu'" >&2; exit 2 ;;
esac
workers=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then
    n=$(nproc)
    workers=(-n "$(( n < 8 ? n : 8 ))")
fi
status=0
if [ "$gpu" = 1 ]; then
    TRITON_INTERPRET=1 SGM_EXT_GPU_RUN= "$PYTHON" -m pytest --ignore=tests/test_gpu.py "$@" \
        || status=$?
fi
# (${a[@]+...}: an empty array is "unbound" to set -u in bash before 4.4)
TRITON_INTERPRET=0 SGM_EXT_GPU_RUN=1 "$PYTHON" -m pytest tests/test_gpu.py \
    ${workers[@]+"${workers[@]}"} "$@" || { rc=$?; [ "$status" != 0 ] || status=$rc; }
exit "$status"
