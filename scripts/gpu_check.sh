#!/usr/bin/env bash
# The GPU check: one command for a borrowed NVIDIA GPU machine, sized to finish in 8 minutes on
# an H100-class one from a clean clone, set-up included. Stages, each timed:
#   setup      scripts/setup.sh with sgm_ext._C built for this GPU's architecture only
#              (SGM_EXT_CUDA_ARCHS = nvidia-smi's compute capability: one architecture compiles
#              in about half the time of the default two)
#   gpu_tests  tests/test_gpu.py, Triton compiled for the GPU, where a skip is a failure
#              (scripts/run_tests.sh's GPU run)
#   bench_ops  bench/bench_ops.py --quick: act_mul_scale on each GPU backend against the eager
#              and the torch.compile'd chain at [2048, 11008], fp32 and bf16
#   bench_gpu  bench/bench_gpu.py --quick: gated_up_proj, the MLP modes at T = 1, 16, 512, 2048
#              at Llama-7B widths, greedy decode of the 98M and 1.88B Llamas per mode
# It writes $OUT/results.md (machine, versions, each stage's time and status, the test summary,
# the benchmark tables) and each stage's full log, $OUT/<stage>.log; OUT defaults to
# out/gpu_check. A failed stage does not stop the later ones (a failed set-up does).
# Exit status: 0 all passed, 1 a stage failed, 2 no NVIDIA GPU here (nothing is run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${SGM_EXT_GPU_CHECK_OUT:-out/gpu_check}

# The first GPU's compute capability, e.g. "9.0"; anything else (nvidia-smi missing, no driver,
# no GPU listed) means there is nothing to check here.
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 \
      | tr -d ' \r') || cap=
if ! [[ $cap =~ ^[0-9]+\.[0-9]+$ ]]; then
    echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi missing, failing or listing none)" >&2
    exit 2
fi
export SGM_EXT_CUDA_ARCHS=$cap
# torch's build finds the CUDA compiler as below; without one _C gets no CUDA kernels, and
# gpu_tests then fails on the missing cuda backend
if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]
then
    echo "gpu_check.sh: warning: no nvcc found (CUDA_HOME, PATH, /usr/local/cuda):" \
         "sgm_ext._C will be built without its CUDA kernels" >&2
fi
export TRITON_INTERPRET=0  # Triton compiled for the GPU in every stage
PY=.venv/bin/python
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT/results.md"
began=$SECONDS
rows=()
failed=0

# stage NAME LIMIT_S COMMAND...: run it, its output on the terminal and in $OUT/NAME.log. The
# limit only guards against a hang eating the borrowed time; the budget is the 8 minutes.
stage() {
    local name=$1 limit=$2 start=$SECONDS rc=0 status=ok took
    shift 2
    echo "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    if [ "$rc" != 0 ]; then
        status="FAILED (exit $rc)"
        if [ "$rc" = 124 ]; then status="FAILED (over its $limit s limit)"; fi
        failed=1
    fi
    took=$((SECONDS - start))
    echo "== $name: $took s, $status"
    rows+=("| $name | $took | $status |")
    return "$rc"
}

results() {
    local total=$((SECONDS - began)) f
    {
        echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'), scripts/gpu_check.sh)"
        echo
        echo "- commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
            git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
        echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total \
            --format=csv,noheader | head -n 1), compute capability $cap" \
            "(SGM_EXT_CUDA_ARCHS=$cap); $(nproc) CPU cores"
        if [ -x "$PY" ]; then
            "$PY" - <<'PYEOF' 2>&1 | tail -n 1
import sys, torch, triton, transformers, sgm_ext
cuda = sgm_ext.backends()["cuda"]
print(f"- python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__},"
      f" transformers {transformers.__version__}, sgm-ext {sgm_ext.__version__}; cuda backend:"
      f" {'available' if cuda.available else 'unavailable: ' + str(cuda.reason)}")
PYEOF
        fi
        echo
        echo "| stage | seconds | status |"
        echo "|---|---|---|"
        printf '%s\n' "${rows[@]}"
        echo
        echo "Total $total s (target: under 480 s on an H100-class machine)."
        if [ -f "$OUT/gpu_tests.log" ]; then
            echo
            echo "## tests/test_gpu.py"
            echo
            grep -E '^(=+ )?[0-9]+ (passed|failed|error)|(passed|failed|error).* in [0-9.]+s' \
                "$OUT/gpu_tests.log" | tail -n 1 || echo "(no pytest summary line: see gpu_tests.log)"
        fi
        for f in bench_ops bench_gpu; do
            if [ -f "$OUT/$f.log" ]; then
                echo
                echo "## bench/$f.py --quick (raw output; full log $f.log)"
                echo
                cat "$OUT/$f.log"
            fi
        done
    } > "$OUT/results.md"
    echo "gpu_check.sh: $total s in all (target 480 s); results in $OUT/results.md"
}

if ! stage setup 420 bash scripts/setup.sh; then
    results
    exit 1
fi
stage gpu_tests 240 env SGM_EXT_GPU=only bash scripts/run_tests.sh -q -p no:cacheprovider || true
stage bench_ops 150 "$PY" bench/bench_ops.py --quick --min-time 1 || true
stage bench_gpu 300 "$PY" bench/bench_gpu.py --quick || true
results
exit "$failed"
