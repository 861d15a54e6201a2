#!/usr/bin/env bash
# Installs llama-cpp-python (llama.cpp itself, for the tests that run a written GGUF) into
# .venv, from a wheel built once from its PyPI source distribution for CPU and cached under
# the user cache, keyed by version. The first build takes 7 to 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/refusal-kernels/wheels/llama-cpp-python-$VERSION"
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! ls "$CACHE"/llama_cpp_python-*.whl > /dev/null 2>&1; then
    mkdir -p "$CACHE.partial"
    CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        pip wheel --no-deps --no-binary llama-cpp-python -w "$CACHE.partial" "llama-cpp-python==$VERSION"
    rm -rf "$CACHE" && mv "$CACHE.partial" "$CACHE"
fi
# The [server] extra: the model-judge tests start its OpenAI-compatible server (python -m llama_cpp.server).
pip install "$(ls "$CACHE"/llama_cpp_python-*.whl)[server]"
