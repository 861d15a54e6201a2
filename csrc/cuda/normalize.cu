// The fp32 unit directions that the CUDA kernels read: one tiny kernel writes them into a
// buffer from the caching allocator, so that ablate and orthogonalize neither synchronize
// with the host to check the norm nor recompute it in every block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>

#include "common.cuh"

namespace refusal::cuda {
namespace {

constexpr int kNormalizeThreads = 256;

// One block per row k: out[k] = row / ||row||, the norm summed in fp32 (as the reference does).
template <typename T>
__global__ void __launch_bounds__(kNormalizeThreads)
    unit_rows_kernel(const T* directions, int64_t row_stride, int64_t col_stride,
                     int64_t length, float* out) {
  __shared__ float scratch[kNormalizeThreads / kWarpSize];
  const T* row = directions + blockIdx.x * row_stride;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < length; i += blockDim.x) {
    const float v = static_cast<float>(row[i * col_stride]);
    sum_sq += v * v;
  }
  const float norm = sqrtf(block_sum(sum_sq, scratch));
  float* unit = out + blockIdx.x * length;
  for (int64_t i = threadIdx.x; i < length; i += blockDim.x) {
    unit[i] = static_cast<float>(row[i * col_stride]) / norm;
  }
}

}  // namespace

at::Tensor unit_rows(const at::Tensor& directions) {
  const at::Tensor rows = directions.dim() == 1 ? directions.unsqueeze(0) : directions;
  // Storage dtypes without a kernel (fp8) are widened first, like the CPU path does.
  const auto dtype = rows.scalar_type();
  const bool has_kernel =
      dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
  const at::Tensor source = has_kernel ? rows : rows.to(at::kFloat);
  at::Tensor out = at::empty(source.sizes(), source.options().dtype(at::kFloat));
  const int64_t num_rows = source.size(0);
  const int64_t length = source.size(1);
  if (out.numel() == 0) return out;
  TORCH_CHECK_VALUE(num_rows <= kMaxGridSize, "too many directions: ", num_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, source.scalar_type(),
                                  "refusal::unit_rows", [&] {
    unit_rows_kernel<scalar_t><<<num_rows, kNormalizeThreads, 0,
                                 at::cuda::getCurrentCUDAStream()>>>(
        source.const_data_ptr<scalar_t>(), source.stride(0), source.stride(1), length,
        out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace refusal::cuda
