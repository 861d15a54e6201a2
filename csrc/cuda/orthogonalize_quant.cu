// refusal::orthogonalize_{int8,gptq,fp8} on CUDA: same passes and rules as the CPU kernels
// (csrc/cpu/orthogonalize_quant.cpp), with scales and zeros decoded into O(groups) fp32
// buffers and no full-precision copy of the weight:
//   1. c = d^T W, dequantizing on the fly (fp32 accumulation);
//   2. the range of every group's updated values, read only; fresh scales (and zeros) from
//      quant_rules.h;
//   3. dequantize, update, requantize in place; each thread owns whole packed words.
// The direction's data is checked by the Python wrapper, once per version, so that these
// kernels never synchronize with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include "../quant_checks.h"
#include "../quant_rules.h"

// The scale dtypes the checks accept.
#define REFUSAL_DISPATCH_SCALES(TYPE, NAME, ...)                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace refusal::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerDotBlock = 256;
constexpr int kTileCols = 128;  // a row tile never straddles two scale blocks (1 x in, or 128 x 128)

at::Tensor unit_direction(const at::Tensor& direction) {
  const at::Tensor d = direction.to(at::kFloat);
  return (d / d.norm()).contiguous();
}

__device__ inline float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ inline float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// ---- int8 per row and fp8 per tensor / row / 128 block: row-major [rows, cols].

struct Int8Codec {
  using Storage = int8_t;
  static constexpr float kMax = kInt8Max;
  __device__ static float decode(Storage q) { return static_cast<float>(q); }
  __device__ static Storage encode(float x) { return static_cast<Storage>(fminf(fmaxf(nearbyintf(x), -kMax), kMax)); }
};

struct Fp8Codec {
  using Storage = c10::Float8_e4m3fn;
  static constexpr float kMax = kFp8Max;
  __device__ static float decode(Storage q) { return static_cast<float>(q); }
  __device__ static Storage encode(float x) { return Storage(fminf(fmaxf(x, -kMax), kMax)); }
};

struct BlockGrid {
  int64_t rows, cols, block_rows, block_cols, grid_cols;
  __device__ int64_t block(int64_t i, int64_t j) const { return (i / block_rows) * grid_cols + j / block_cols; }
};

// c[j] += sum over rows of this block's row chunk of d[i] * W[i, j]; c starts at zero.
template <typename Codec>
__global__ void block_scaled_column_dot(const typename Codec::Storage* q, const float* step, const float* d, float* c,
                                        BlockGrid g) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= g.cols) return;
  const int64_t first = blockIdx.y * static_cast<int64_t>(kRowsPerDotBlock);
  const int64_t last = min(first + kRowsPerDotBlock, g.rows);
  float sum = 0.f;
  for (int64_t i = first; i < last; ++i) sum += d[i] * Codec::decode(q[i * g.cols + j]) * step[g.block(i, j)];
  atomicAdd(c + j, sum);
}

// One row (blockIdx.x) by kTileCols columns (blockIdx.y): the updated values' absmax into
// absmax_bits (non-negative floats order like their bits), or, with kWrite, the requantized values.
template <typename Codec, bool kWrite>
__global__ void block_scaled_update(typename Codec::Storage* q, const float* step, const float* new_step,
                                    unsigned int* absmax_bits, const float* d, const float* c, float s, BlockGrid g) {
  const int64_t i = blockIdx.x;
  const int64_t j = blockIdx.y * static_cast<int64_t>(kTileCols) + threadIdx.x;
  float w = 0.f;
  if (j < g.cols) {
    w = Codec::decode(q[i * g.cols + j]) * step[g.block(i, j)] - s * d[i] * c[j];
    if constexpr (kWrite) q[i * g.cols + j] = Codec::encode(w / new_step[g.block(i, j)]);
  }
  if constexpr (!kWrite) {
    __shared__ float partial[kTileCols / 32];
    const float m = warp_max(fabsf(w));
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
      float top = 0.f;
      for (int k = 0; k < kTileCols / 32; ++k) top = fmaxf(top, partial[k]);
      atomicMax(absmax_bits + g.block(i, blockIdx.y * static_cast<int64_t>(kTileCols)), __float_as_uint(top));
    }
  }
}

template <typename ScaleT>
__global__ void choose_symmetric_scales(const unsigned int* absmax_bits, float qmax, float divisor, float* new_step,
                                        ScaleT* stored, int64_t blocks) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= blocks) return;
  const float step = symmetric_scale<ScaleT>(__uint_as_float(absmax_bits[b]), qmax);
  new_step[b] = step;
  stored[b] = ScaleT(round_up_to<ScaleT>(step * divisor));
}

// weight [rows, cols]; scales [ceil(rows / block_rows), ceil(cols / block_cols)] (any shape of
// that many elements), W = q * scales[block] / divisor.
template <typename Codec>
void orthogonalize_block_scaled(at::Tensor& weight, at::Tensor& scales, int64_t block_rows, int64_t block_cols,
                                float divisor, const at::Tensor& direction, double scale) {
  using Storage = typename Codec::Storage;
  const at::cuda::OptionalCUDAGuard guard(weight.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const BlockGrid g{weight.size(0), weight.size(1), block_rows, block_cols, ceil_div(weight.size(1), block_cols)};
  if (g.rows == 0 || g.cols == 0) return;
  const int64_t blocks = ceil_div(g.rows, block_rows) * g.grid_cols;
  const auto floats = weight.options().dtype(at::kFloat);
  const at::Tensor d = unit_direction(direction);
  const at::Tensor step = (scales.to(at::kFloat) / divisor).reshape(-1).contiguous();
  at::Tensor c = at::zeros({g.cols}, floats);
  at::Tensor absmax = at::zeros({blocks}, weight.options().dtype(at::kInt));
  at::Tensor new_step = at::empty({blocks}, floats);
  Storage* q = reinterpret_cast<Storage*>(weight.data_ptr());

  const dim3 dot_grid(ceil_div(g.cols, kThreads), ceil_div(g.rows, kRowsPerDotBlock));
  block_scaled_column_dot<Codec><<<dot_grid, kThreads, 0, stream>>>(q, step.const_data_ptr<float>(),
                                                                    d.const_data_ptr<float>(), c.data_ptr<float>(), g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 tile_grid(g.rows, ceil_div(g.cols, kTileCols));
  auto* absmax_bits = reinterpret_cast<unsigned int*>(absmax.data_ptr<int32_t>());
  const float s = static_cast<float>(scale);
  block_scaled_update<Codec, false><<<tile_grid, kTileCols, 0, stream>>>(
      q, step.const_data_ptr<float>(), nullptr, absmax_bits, d.const_data_ptr<float>(), c.const_data_ptr<float>(), s, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  REFUSAL_DISPATCH_SCALES(scales.scalar_type(), "refusal::orthogonalize (scales)", [&] {
    choose_symmetric_scales<scalar_t><<<ceil_div(blocks, kThreads), kThreads, 0, stream>>>(
        absmax_bits, Codec::kMax, divisor, new_step.data_ptr<float>(), scales.data_ptr<scalar_t>(), blocks);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  block_scaled_update<Codec, true><<<tile_grid, kTileCols, 0, stream>>>(
      q, step.const_data_ptr<float>(), new_step.const_data_ptr<float>(), nullptr, d.const_data_ptr<float>(),
      c.const_data_ptr<float>(), s, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void orthogonalize_int8(at::Tensor& qweight, at::Tensor& row_scale, const at::Tensor& direction, double scale,
                        bool absmax_scale) {
  check_int8(qweight, row_scale, direction, scale);
  orthogonalize_block_scaled<Int8Codec>(qweight, row_scale, 1, qweight.size(1), absmax_scale ? kInt8Max : 1.f,
                                        direction, scale);
}

void orthogonalize_fp8(at::Tensor& weight, at::Tensor& weight_scale, const at::Tensor& direction, double scale) {
  const auto [block_rows, block_cols] = check_fp8(weight, weight_scale, direction, scale);
  orthogonalize_block_scaled<Fp8Codec>(weight, weight_scale, block_rows, block_cols, 1.f, direction, scale);
}

// ---- GPTQ int4: qweight [in / 8, out]; step and zero decoded to [groups, out].

__device__ inline float gptq_updated(uint32_t word, int k, int64_t index, const float* step, const float* zero,
                                     float d_times_s, float c) {
  return step[index] * (static_cast<float>((word >> (4 * k)) & 0xFu) - zero[index]) - d_times_s * c;
}

// c[8p + k] for the packed row p = blockIdx.x; threads stride over the outputs.
__global__ void gptq_column_dot(const int32_t* qweight, const float* step, const float* zero, const int64_t* group,
                                const float* d, float* c, int64_t out) {
  const int64_t p = blockIdx.x;
  float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t i = threadIdx.x; i < out; i += blockDim.x) {
    const uint32_t word = static_cast<uint32_t>(qweight[p * out + i]);
    for (int k = 0; k < 8; ++k) sum[k] += d[i] * gptq_updated(word, k, group[8 * p + k] * out + i, step, zero, 0.f, 0.f);
  }
  __shared__ float partial[8][kWarps];
  for (int k = 0; k < 8; ++k) {
    const float v = warp_sum(sum[k]);
    if (threadIdx.x % 32 == 0) partial[k][threadIdx.x / 32] = v;
  }
  __syncthreads();
  if (threadIdx.x < 8) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += partial[threadIdx.x][w];
    c[8 * p + threadIdx.x] = total;
  }
}

// Range of the updated values of group blockIdx.y at output i, then its fresh step and zero.
template <typename ScaleT>
__global__ void gptq_choose_scales(const int32_t* qweight, const float* step, const float* zero,
                                   const int64_t* members, const int64_t* group_start, const float* d, const float* c,
                                   float s, int zero_min, float* new_step, int* new_zero, int64_t out) {
  const int64_t g = blockIdx.y;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= out) return;
  const int64_t index = g * out + i;
  float low = 0.f, high = 0.f;
  for (int64_t m = group_start[g]; m < group_start[g + 1]; ++m) {
    const int64_t j = members[m];
    const uint32_t word = static_cast<uint32_t>(qweight[(j >> 3) * out + i]);
    const float w = gptq_updated(word, static_cast<int>(j & 7), index, step, zero, s * d[i], c[j]);
    low = fminf(low, w);
    high = fmaxf(high, w);
  }
  asymmetric_scale_zero<ScaleT>(low, high, zero_min, new_step + index, new_zero + index);
}

// Rewrites word (packed row blockIdx.y, output i): its 8 inputs, each with its own group.
__global__ void gptq_requantize(int32_t* qweight, const float* step, const float* zero, const float* new_step,
                                const int* new_zero, const int64_t* group, const float* d, const float* c, float s,
                                int64_t out) {
  const int64_t p = blockIdx.y;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= out) return;
  const uint32_t word = static_cast<uint32_t>(qweight[p * out + i]);
  uint32_t packed = 0;
  for (int k = 0; k < 8; ++k) {
    const int64_t j = 8 * p + k;
    const int64_t index = group[j] * out + i;
    const float w = gptq_updated(word, k, index, step, zero, s * d[i], c[j]);
    packed |= static_cast<uint32_t>(quantize_int4(w, new_step[index], new_zero[index])) << (4 * k);
  }
  qweight[p * out + i] = static_cast<int32_t>(packed);
}

// qzeros[g, w] from zero points [groups, out], stored minus zero_min (1 in GPTQ v1, 0 in v2).
__global__ void gptq_pack_zeros(const int* zero, int zero_min, int32_t* qzeros, int64_t words) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= words) return;
  uint32_t packed = 0;
  for (int k = 0; k < 8; ++k) packed |= static_cast<uint32_t>(zero[8 * index + k] - zero_min) << (4 * k);
  qzeros[index] = static_cast<int32_t>(packed);
}

void orthogonalize_gptq(at::Tensor& qweight, at::Tensor& qzeros, at::Tensor& scales,
                        const std::optional<at::Tensor>& g_idx, const at::Tensor& direction, int64_t group_size,
                        double scale, c10::string_view zeros_format) {
  const auto [in, out] = check_gptq(qweight, qzeros, scales, g_idx, direction, group_size, scale, zeros_format);
  const int zero_min = gptq_zero_min(zeros_format);
  if (in == 0 || out == 0) return;
  const at::cuda::OptionalCUDAGuard guard(qweight.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t groups = scales.size(0);
  const auto longs = qweight.options().dtype(at::kLong);
  const at::Tensor group = g_idx.has_value() ? g_idx->to(at::kLong).contiguous()
                                             : at::arange(in, longs).floor_divide_(group_size);
  const at::Tensor members = std::get<1>(group.sort(/*stable=*/std::optional<bool>(true), /*dim=*/0)).contiguous();
  const at::Tensor group_start = at::cat({at::zeros({1}, longs), group.bincount({}, groups).cumsum(0)});
  const at::Tensor d = unit_direction(direction);
  const at::Tensor step = scales.to(at::kFloat).contiguous();
  const at::Tensor shifts = at::arange(0, 32, 4, qzeros.options());
  const at::Tensor zero = (qzeros.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(0xF) + zero_min)
                              .reshape({groups, out})
                              .to(at::kFloat);
  at::Tensor c = at::empty({in}, step.options());
  at::Tensor new_step = at::empty({groups, out}, step.options());
  at::Tensor new_zero = at::empty({groups, out}, qzeros.options());
  const float s = static_cast<float>(scale);

  gptq_column_dot<<<in / 8, kThreads, 0, stream>>>(qweight.const_data_ptr<int32_t>(), step.const_data_ptr<float>(),
                                                  zero.const_data_ptr<float>(), group.const_data_ptr<int64_t>(),
                                                  d.const_data_ptr<float>(), c.data_ptr<float>(), out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  REFUSAL_DISPATCH_SCALES(scales.scalar_type(), "refusal::orthogonalize_gptq", [&] {
    gptq_choose_scales<scalar_t><<<dim3(ceil_div(out, kThreads), groups), kThreads, 0, stream>>>(
        qweight.const_data_ptr<int32_t>(), step.const_data_ptr<float>(), zero.const_data_ptr<float>(),
        members.const_data_ptr<int64_t>(), group_start.const_data_ptr<int64_t>(), d.const_data_ptr<float>(),
        c.const_data_ptr<float>(), s, zero_min, new_step.data_ptr<float>(), new_zero.data_ptr<int>(), out);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gptq_requantize<<<dim3(ceil_div(out, kThreads), in / 8), kThreads, 0, stream>>>(
      qweight.data_ptr<int32_t>(), step.const_data_ptr<float>(), zero.const_data_ptr<float>(),
      new_step.const_data_ptr<float>(), new_zero.const_data_ptr<int>(), group.const_data_ptr<int64_t>(),
      d.const_data_ptr<float>(), c.const_data_ptr<float>(), s, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gptq_pack_zeros<<<ceil_div(qzeros.numel(), kThreads), kThreads, 0, stream>>>(
      new_zero.const_data_ptr<int>(), zero_min, qzeros.data_ptr<int32_t>(), qzeros.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scales.copy_(new_step);  // exact: every fresh step is representable in the scales' dtype
}

}  // namespace

TORCH_LIBRARY_IMPL(refusal, CUDA, m) {
  m.impl("orthogonalize_int8", &orthogonalize_int8);
  m.impl("orthogonalize_gptq", &orthogonalize_gptq);
  m.impl("orthogonalize_fp8", &orthogonalize_fp8);
}

}  // namespace refusal::cuda
