#!/usr/bin/env bash
# On a fresh GPU machine (torch, triton, nvcc and pytest installed, no network): build the
# package with its CUDA kernels, run the GPU tests, then the GPU benchmarks.
# Usage: benchmarks/gpu_check.sh OUT_DIR   (writes OUT_DIR/bench_gpu.json, plus build and test logs)
set -uo pipefail

out_dir=$(realpath -m "${1:?usage: $0 OUT_DIR}")
python=${PYTHON:-python}
mkdir -p "$out_dir"
cd "$(dirname "$0")/.."

echo "== build"
# Build for this GPU only: a fresh machine has minutes, not the time for every target.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! REFUSAL_KERNELS_CUDA=1 "$python" -m pip install --no-build-isolation --no-deps -e . >"$out_dir/build.log" 2>&1; then
    tail -n 60 "$out_dir/build.log"
    exit 1
fi

echo "== tests/test_ops_gpu.py tests/test_quant_gpu.py"
"$python" -m pytest -q -rs tests/test_ops_gpu.py tests/test_quant_gpu.py 2>&1 | tee "$out_dir/test_ops_gpu.log"
tests_status=${PIPESTATUS[0]}

echo "== benchmarks"
"$python" benchmarks/bench_gpu.py "$out_dir"
bench_status=$?

# Benchmarks run even after a test failure; the exit status still reports it.
exit $((tests_status || bench_status))
