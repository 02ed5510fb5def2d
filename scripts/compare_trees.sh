#!/usr/bin/env bash
# Run the same workflow on an earlier commit and on this checkout, and compare what each wrote:
# a refactor must leave scale files, reports and generations the same, bit for bit.
#
#   bash scripts/compare_trees.sh COMMIT [--real]
#
# COMMIT's tree is taken with `git archive` (nothing of it is installed; it runs from PYTHONPATH
# with this checkout's compiled library and .venv). Runs `sgm-ext demo --fast` (the synthetic
# LLaVA: profile, patch, eval) and, with --real, `sgm-ext demo --real` on SmolLM2-135M-Instruct
# with short generations. Latency is off (timings differ run to run); what may differ is listed
# in scripts/compare_outputs.py. Exit status 1 if anything else differs.
set -euo pipefail
cd "$(dirname "$0")/.."
commit=${1:?usage: scripts/compare_trees.sh COMMIT [--real]}
real=${2:-}
work=$(mktemp -d)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$work"' EXIT; echo "work: $work"
mkdir "$work/old"
git archive "$commit" | tar -x -C "$work/old"
cp sgm_ext/_C*.so "$work/old/sgm_ext/"
PY=$PWD/.venv/bin/python
run() {  # tree out args... (both trees write into the same path, then it is renamed: the
          # paths recorded in reports and generations are the same)
    local tree=$1 out=$2; shift 2
    (cd "$work" && PYTHONPATH="$tree" "$PY" -m sgm_ext demo --out "$work/out" --latency-runs 0 \
        "$@" > "$out.log" 2>&1) || { echo "failed in $tree:"; tail -20 "$out.log"; exit 1; }
    mv "$work/out" "$out"
}
status=0
for tree in old new; do
    src=$work/old; [ "$tree" = new ] && src=$PWD
    run "$src" "$work/$tree-demo" --fast --quiet
done
"$PY" scripts/compare_outputs.py "$work/old-demo" "$work/new-demo" || status=1
if [ "$real" = --real ]; then
    for tree in old new; do
        src=$work/old; [ "$tree" = new ] && src=$PWD
        run "$src" "$work/$tree-real" --real --max-new-tokens 16
    done
    "$PY" scripts/compare_outputs.py "$work/old-real" "$work/new-real" || status=1
fi
exit $status
