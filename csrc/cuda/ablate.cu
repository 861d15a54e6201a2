// refusal::ablate and refusal::ablate_indexed on CUDA. One kernel serves both: ablate is the
// indexed op with a single direction and no index. A warp owns a short row and a block a
// long one; the row stays in registers between its dot product and its update, so it is
// read from memory once. Rows too long for registers are read twice, the second time
// mostly from cache.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"

namespace refusal::cuda {
namespace {

constexpr int kRowsPerWarpBlock = 8;  // rows (one per warp) in a block of the warp schedule
constexpr int kWarpBlockThreads = kRowsPerWarpBlock * kWarpSize;
constexpr int kMaxRowThreads = 512;  // threads of a block that owns a row

template <typename T>
struct AblateParams {
  T* x;
  SliceOffsets rows;
  int64_t num_rows;
  int64_t row_length;
  const float* units;      // [num_directions, row_length] fp32 unit directions
  const int64_t* index;    // direction of each group of rows; nullptr: all rows use units[0]
  int64_t rows_per_index;  // consecutive rows that share an index entry
  int64_t num_directions;
  float scale;
};

// kVec: elements per access (a 128-bit pack, or 1 when the rows do not allow packs).
// kChunks: accesses per thread, the row held in registers; 0 loops over the row twice.
// kWarpPerRow: a warp owns each row (short rows); otherwise the whole block does.
template <typename T, int kVec, int kChunks, bool kWarpPerRow>
__global__ void __launch_bounds__(kWarpPerRow ? kWarpBlockThreads : kMaxRowThreads)
    ablate_rows_kernel(const AblateParams<T> p) {
  __shared__ float scratch[kMaxRowThreads / kWarpSize];
  const int64_t group_threads = kWarpPerRow ? kWarpSize : blockDim.x;
  const int64_t lane = kWarpPerRow ? threadIdx.x % kWarpSize : threadIdx.x;
  const int64_t rows_per_block = kWarpPerRow ? blockDim.x / kWarpSize : 1;
  const int64_t row_in_block = kWarpPerRow ? threadIdx.x / kWarpSize : 0;
  auto row_sum = [&](float v) {
    if constexpr (kWarpPerRow) {
      return warp_sum(v);
    } else {
      return block_sum(v, scratch);
    }
  };

  for (int64_t row = blockIdx.x * rows_per_block + row_in_block; row < p.num_rows;
       row += gridDim.x * rows_per_block) {
    const float* unit = p.units;
    if (p.index != nullptr) {
      const int64_t k = p.index[row / p.rows_per_index];
      // -1 skips the row; so does an index out of range, which must not fault (the Python
      // wrapper has reported it already).
      if (k < 0 || k >= p.num_directions) continue;
      unit += k * p.row_length;
    }
    T* v = p.x + p.rows.offset(row);
    if constexpr (kChunks > 0) {
      Pack<T, kVec> held[kChunks];
      float partial = 0.f;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int64_t col = (c * group_threads + lane) * kVec;
        if (col < p.row_length) {
          held[c] = load_pack<T, kVec>(v + col);
          partial += dot(held[c], load_pack<float, kVec>(unit + col));
        }
      }
      const float amount = p.scale * row_sum(partial);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int64_t col = (c * group_threads + lane) * kVec;
        if (col < p.row_length) {
          store_pack(v + col, subtract_scaled(held[c], amount, load_pack<float, kVec>(unit + col)));
        }
      }
    } else {
      float partial = 0.f;
      for (int64_t col = lane * kVec; col < p.row_length; col += group_threads * kVec) {
        partial += dot(load_pack<T, kVec>(v + col), load_pack<float, kVec>(unit + col));
      }
      const float amount = p.scale * row_sum(partial);
      for (int64_t col = lane * kVec; col < p.row_length; col += group_threads * kVec) {
        store_pack(v + col, subtract_scaled(load_pack<T, kVec>(v + col), amount,
                                            load_pack<float, kVec>(unit + col)));
      }
    }
  }
}

template <typename T, int kVec, int kChunks, bool kWarpPerRow>
void launch(const AblateParams<T>& p, int threads) {
  const int64_t rows_per_block = kWarpPerRow ? threads / kWarpSize : 1;
  ablate_rows_kernel<T, kVec, kChunks, kWarpPerRow>
      <<<grid_size(ceil_div(p.num_rows, rows_per_block)), threads, 0,
         at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The smallest schedule that holds a row of p.row_length elements, accessed kVec at a time,
// in registers: a warp with up to 8 accesses per lane, then a block with 4 or 8 per thread.
template <typename T, int kVec>
void launch_for_row_length(const AblateParams<T>& p) {
  const int64_t accesses = ceil_div(p.row_length, kVec);
  // A block size, in whole warps, that covers the row with `chunks` accesses per thread.
  auto block_threads = [&](int64_t chunks) {
    return static_cast<int>(ceil_div(accesses, chunks * kWarpSize) * kWarpSize);
  };
  if (accesses <= 1 * kWarpSize) {
    launch<T, kVec, 1, true>(p, kWarpBlockThreads);
  } else if (accesses <= 2 * kWarpSize) {
    launch<T, kVec, 2, true>(p, kWarpBlockThreads);
  } else if (accesses <= 4 * kWarpSize) {
    launch<T, kVec, 4, true>(p, kWarpBlockThreads);
  } else if (accesses <= 8 * kWarpSize) {
    launch<T, kVec, 8, true>(p, kWarpBlockThreads);
  } else if (accesses <= 4 * kMaxRowThreads) {
    launch<T, kVec, 4, false>(p, block_threads(4));
  } else if (accesses <= 8 * kMaxRowThreads) {
    launch<T, kVec, 8, false>(p, block_threads(8));
  } else {
    launch<T, kVec, 0, false>(p, kMaxRowThreads);
  }
}

// Ablates units[index[row / rows_per_index]] (units[0] when index is undefined) from each
// row of the non-empty tensor x.
void ablate_rows(at::Tensor& x, const at::Tensor& units, const at::Tensor& index,
                 int64_t rows_per_index, double scale) {
  const SliceOffsets rows(x, 1);
  REFUSAL_DISPATCH_FLOATS(x.scalar_type(), "refusal::ablate", [&] {
    const AblateParams<scalar_t> p{x.mutable_data_ptr<scalar_t>(),
                                   rows,
                                   rows.count(),
                                   x.size(-1),
                                   units.const_data_ptr<float>(),
                                   index.defined() ? index.const_data_ptr<int64_t>() : nullptr,
                                   rows_per_index,
                                   units.size(0),
                                   static_cast<float>(scale)};
    constexpr int kPack = kPackSize<scalar_t>;
    if (is_pack_aligned(p.x) && p.row_length % kPack == 0 && rows.strides_divisible_by(kPack)) {
      launch_for_row_length<scalar_t, kPack>(p);
    } else {
      launch_for_row_length<scalar_t, 1>(p);
    }
  });
}

void ablate(at::Tensor& x, const at::Tensor& direction, double scale) {
  check_ablate(x, direction, scale);
  const c10::cuda::CUDAGuard device_guard(x.device());
  if (x.numel() == 0) return;
  ablate_rows(x, unit_rows(direction), /*index=*/at::Tensor(), /*rows_per_index=*/1, scale);
}

void ablate_indexed(at::Tensor& x, const at::Tensor& directions, const at::Tensor& index,
                    double scale) {
  check_ablate_indexed(x, directions, index, scale);
  const c10::cuda::CUDAGuard device_guard(x.device());
  if (x.numel() == 0) return;
  // With one index per batch row, the rows of a batch row are consecutive.
  const int64_t rows_per_index =
      index_is_per_batch_row(x, index) ? x.numel() / x.size(-1) / x.size(0) : 1;
  ablate_rows(x, unit_rows(directions), index.contiguous(), rows_per_index, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(refusal, CUDA, m) {
  m.impl("ablate", &ablate);
  m.impl("ablate_indexed", &ablate_indexed);
}

}  // namespace refusal::cuda
