// Building blocks of the CUDA kernels: 128-bit packs of float/half/bf16 computed on as fp32,
// warp and block sums, the element offset of each row of a strided tensor, and the
// normalized directions.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace refusal::cuda {

constexpr int kWarpSize = 32;
constexpr int64_t kMaxGridSize = std::numeric_limits<int32_t>::max();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for `work_items` independent items; kernels loop over items beyond the grid.
inline unsigned grid_size(int64_t work_items) {
  return static_cast<unsigned>(std::min(work_items, kMaxGridSize));
}

// Elements of T in one 128-bit access.
template <typename T>
constexpr int kPackSize = 16 / sizeof(T);

// N consecutive elements, aligned so that one load or store moves them all at once.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// sum_i v[i] * u[i] in fp32.
template <typename T, int N>
__device__ __forceinline__ float dot(const Pack<T, N>& v, const Pack<float, N>& u) {
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) sum += static_cast<float>(v.val[i]) * u.val[i];
  return sum;
}

// acc[i] += a * v[i] in fp32.
template <typename T, int N>
__device__ __forceinline__ void accumulate(float (&acc)[N], float a, const Pack<T, N>& v) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] += a * static_cast<float>(v.val[i]);
}

// acc[i] += v[i]^2 in fp32.
template <typename T, int N>
__device__ __forceinline__ void accumulate_squares(float (&acc)[N], const Pack<T, N>& v) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] += static_cast<float>(v.val[i]) * static_cast<float>(v.val[i]);
}

// k[i] * v[i] - a * u[i], computed in fp32 and rounded once to T. k is one factor for the
// whole pack (float) or one per element (Pack<float, N>).
template <typename T, int N, typename Factor>
__device__ __forceinline__ Pack<T, N> scale_and_subtract(const Pack<T, N>& v, const Factor& k,
                                                         float a, const Pack<float, N>& u) {
  Pack<T, N> out;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float k_i;
    if constexpr (std::is_same_v<Factor, float>) {
      k_i = k;
    } else {
      k_i = k.val[i];
    }
    out.val[i] = static_cast<T>(k_i * static_cast<float>(v.val[i]) - a * u.val[i]);
  }
  return out;
}

// v[i] - a * u[i], computed in fp32 and rounded once to T.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> subtract_scaled(const Pack<T, N>& v, float a,
                                                      const Pack<float, N>& u) {
  return scale_and_subtract(v, 1.f, a, u);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over a 1-D block whose size is a multiple of the warp size; every thread gets the
// total. All threads must call it. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < blockDim.x / kWarpSize ? scratch[lane] : 0.f);
}

// Element offset of each slice of a tensor over its leading dims, from the slice's flat
// (row-major) index: leading dims may have any strides. Dims that are contiguous with each
// other are merged on the host, so the common cases cost one multiply per slice.
class SliceOffsets {
 public:
  static constexpr int kMaxDims = 16;

  // The slices of `t` over all dims but the last `inner_dims`.
  SliceOffsets(const at::Tensor& t, int64_t inner_dims) {
    for (int64_t dim = 0; dim < t.dim() - inner_dims; ++dim) {
      const int64_t size = t.size(dim);
      const int64_t stride = t.stride(dim);
      if (size == 1) continue;  // its stride never matters
      if (ndim_ > 0 && strides_[ndim_ - 1] == stride * size) {
        sizes_[ndim_ - 1] *= size;
        strides_[ndim_ - 1] = stride;
        continue;
      }
      TORCH_CHECK_VALUE(ndim_ < kMaxDims, "the CUDA kernels support at most ", kMaxDims,
                        " leading dims that cannot be merged, got strides ", t.strides());
      sizes_[ndim_] = size;
      strides_[ndim_] = stride;
      ++ndim_;
    }
    if (ndim_ == 0) {  // a single slice
      sizes_[0] = 1;
      strides_[0] = 0;
      ndim_ = 1;
    }
  }

  int64_t count() const {
    int64_t result = 1;
    for (int dim = 0; dim < ndim_; ++dim) result *= sizes_[dim];
    return result;
  }

  // Whether every slice starts a multiple of `n` elements after the first.
  bool strides_divisible_by(int64_t n) const {
    return std::all_of(strides_, strides_ + ndim_, [n](int64_t s) { return s % n == 0; });
  }

  __device__ __forceinline__ int64_t offset(int64_t flat) const {
    int64_t result = 0;
    for (int dim = ndim_ - 1; dim > 0; --dim) {
      result += (flat % sizes_[dim]) * strides_[dim];
      flat /= sizes_[dim];
    }
    return result + flat * strides_[0];
  }

 private:
  int ndim_ = 0;
  int64_t sizes_[kMaxDims] = {};
  int64_t strides_[kMaxDims] = {};
};

// Whether `p` may be read and written in 128-bit packs.
template <typename T>
bool is_pack_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kPackSize<T>) == 0;
}

// Each row of `directions` ([K, d] or [d]) divided by its fp32 norm, as a fresh contiguous
// fp32 [K, d] tensor on the current stream. It does not check the norms (that would need a
// host synchronization); the Python wrappers do, once per tensor version.
at::Tensor unit_rows(const at::Tensor& directions);

}  // namespace refusal::cuda
