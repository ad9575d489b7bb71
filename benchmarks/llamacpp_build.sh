#!/usr/bin/env bash
# llama.cpp's tools for benchmark scripts only (never CI), built from the sources inside the
# llama-cpp-python sdist (DESIGN.md §7): llama-bench, llama-perplexity, llama-server, plus its
# llama-quantize and convert_hf_to_gguf.py; a tool missing from an earlier build is built. Usage: bash benchmarks/llamacpp_build.sh [DIR]; prints DIR.
set -euo pipefail
DIR=${1:-$HOME/.cache/llamatrt/llamacpp}
VERSION=0.3.36
TARGETS="llama-server llama-bench llama-perplexity llama-quantize"
MISSING=$(for t in $TARGETS; do [ -x "$DIR/build/bin/$t" ] || echo "$t"; done)
if [ ! -f "$DIR/build/CMakeCache.txt" ]; then
    mkdir -p "$DIR"
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist"
    tar -xzf "$DIR"/sdist/llama_cpp_python-$VERSION.tar.gz -C "$DIR"
    SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
    FLAGS=""
    if grep -q amx_int8 /proc/cpuinfo; then FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi  # ggml's AMX path crashes here
    CFLAGS="$FLAGS" CXXFLAGS="$FLAGS" cmake -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=ON -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF > "$DIR/cmake.log"
    ln -sfn "$SRC" "$DIR/src"
    MISSING=$TARGETS
fi
if [ -n "$MISSING" ]; then
    # shellcheck disable=SC2086
    cmake --build "$DIR/build" --target $MISSING -j2 > "$DIR/build.log"
fi
echo "$DIR"
