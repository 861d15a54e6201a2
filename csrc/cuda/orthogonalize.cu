// refusal::orthogonalize on CUDA: W <- W - s * d (d^T W) for each [d_model, d_in] matrix.
// Each matrix is cut into tiles: a strip of kWarpSize packs of columns (with 128-bit packs a
// warp reads 512 contiguous bytes of a row) by a split of its rows. Splitting rows too gives
// enough tiles to fill the GPU even for a single 2-D weight, whose column strips alone would
// occupy only a few SMs.
//   1. each tile sums d[i] * W[i, strip] over its rows, in fp32, into sums[E, splits, d_in];
//   2. with several splits, a tiny kernel adds the splits in a fixed order into split 0
//      (deterministic, unlike atomics);
//   3. each tile subtracts s * d[i] * c[strip] from its rows.
// Pass 3 visits the tiles in the reverse order of pass 1, so that it starts on the tiles
// pass 1 read last, which are the likeliest to be still in L2.
// Extra memory: E * splits * d_in fp32; splits is 1 when E * strips already fills the GPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"

namespace refusal::cuda {
namespace {

constexpr int kRowLanes = 8;  // warps per tile, each summing or updating its own rows
constexpr int kTileThreads = kRowLanes * kWarpSize;
constexpr int64_t kMinRowsPerSplit = 128;  // enough rows per tile to amortize its reduction
constexpr int64_t kTilesPerSM = 8;         // enough loads in flight to saturate bandwidth

struct Tiling {
  int64_t strips;  // column strips per matrix
  int64_t splits;  // row splits per matrix
  int64_t rows_per_split;
  int64_t num_tiles;
};

Tiling plan_tiles(int64_t num_matrices, int64_t rows, int64_t cols, int64_t strip_width) {
  const int64_t strips = ceil_div(cols, strip_width);
  const int64_t target_tiles =
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount * kTilesPerSM;
  const int64_t wanted_splits = std::clamp<int64_t>(
      ceil_div(target_tiles, strips * num_matrices), 1,
      std::max<int64_t>(1, rows / kMinRowsPerSplit));
  const int64_t rows_per_split = ceil_div(rows, wanted_splits);
  const int64_t splits = ceil_div(rows, rows_per_split);  // none of them empty
  return {strips, splits, rows_per_split, num_matrices * splits * strips};
}

template <typename T>
struct OrthogonalizeParams {
  T* weight;
  SliceOffsets matrices;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  const float* unit;  // [rows] fp32 unit direction
  float* sums;        // [matrices, splits, cols]: partial sums of d^T W; c ends in split 0
  Tiling tiling;
  float scale;
};

struct Tile {
  int64_t matrix;
  int64_t split;
  int64_t strip;
  int64_t first_row;
  int64_t end_row;
};

// Consecutive tiles are neighbouring strips of the same rows, so the tiles in flight stream
// through a contiguous stretch of the matrix.
__device__ __forceinline__ Tile tile_at(const Tiling& tiling, int64_t rows, int64_t t) {
  Tile tile;
  tile.strip = t % tiling.strips;
  t /= tiling.strips;
  tile.split = t % tiling.splits;
  tile.matrix = t / tiling.splits;
  tile.first_row = tile.split * tiling.rows_per_split;
  tile.end_row = min(rows, tile.first_row + tiling.rows_per_split);
  return tile;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kTileThreads)
    partial_column_sums_kernel(const OrthogonalizeParams<T> p) {
  constexpr int kStripWidth = kWarpSize * kVec;
  __shared__ float lane_sums[kRowLanes][kStripWidth];
  const int lane = threadIdx.x % kWarpSize;
  const int row_lane = threadIdx.x / kWarpSize;
  for (int64_t t = blockIdx.x; t < p.tiling.num_tiles; t += gridDim.x) {
    const Tile tile = tile_at(p.tiling, p.rows, t);
    const int64_t strip_col = tile.strip * kStripWidth;
    const int64_t col = strip_col + lane * kVec;
    float acc[kVec] = {};
    if (col < p.cols) {
      const T* w = p.weight + p.matrices.offset(tile.matrix) + col;
#pragma unroll 4
      for (int64_t r = tile.first_row + row_lane; r < tile.end_row; r += kRowLanes) {
        accumulate(acc, p.unit[r], load_pack<T, kVec>(w + r * p.row_stride));
      }
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) lane_sums[row_lane][lane * kVec + i] = acc[i];
    __syncthreads();
    float* out = p.sums + (tile.matrix * p.tiling.splits + tile.split) * p.cols + strip_col;
    for (int j = threadIdx.x; j < kStripWidth && strip_col + j < p.cols; j += blockDim.x) {
      float total = 0.f;
#pragma unroll
      for (int y = 0; y < kRowLanes; ++y) total += lane_sums[y][j];
      out[j] = total;
    }
    __syncthreads();  // lane_sums is rewritten by the next tile
  }
}

// sums[m, 0, j] = sum over s of sums[m, s, j], in order.
__global__ void __launch_bounds__(kTileThreads)
    sum_splits_kernel(float* sums, int64_t num_matrices, int64_t splits, int64_t cols) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < num_matrices * cols; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float* column = sums + (i / cols) * splits * cols + i % cols;
    float total = 0.f;
    for (int64_t s = 0; s < splits; ++s) total += column[s * cols];
    column[0] = total;
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kTileThreads)
    subtract_projection_kernel(const OrthogonalizeParams<T> p) {
  const int lane = threadIdx.x % kWarpSize;
  const int row_lane = threadIdx.x / kWarpSize;
  for (int64_t t = blockIdx.x; t < p.tiling.num_tiles; t += gridDim.x) {
    const Tile tile = tile_at(p.tiling, p.rows, p.tiling.num_tiles - 1 - t);
    const int64_t col = tile.strip * kWarpSize * kVec + lane * kVec;
    if (col >= p.cols) continue;
    const Pack<float, kVec> c =
        load_pack<float, kVec>(p.sums + tile.matrix * p.tiling.splits * p.cols + col);
    T* w = p.weight + p.matrices.offset(tile.matrix) + col;
#pragma unroll 4
    for (int64_t r = tile.first_row + row_lane; r < tile.end_row; r += kRowLanes) {
      T* v = w + r * p.row_stride;
      store_pack(v, subtract_scaled(load_pack<T, kVec>(v), p.scale * p.unit[r], c));
    }
  }
}

template <typename T, int kVec>
void launch(OrthogonalizeParams<T> p, const at::TensorOptions& options) {
  const int64_t num_matrices = p.matrices.count();
  p.tiling = plan_tiles(num_matrices, p.rows, p.cols, kWarpSize * kVec);
  // Float packs of sums are read at multiples of kVec floats: the allocator's alignment
  // (at least 256 bytes) and kVec | cols keep them aligned.
  const at::Tensor sums = at::empty({num_matrices, p.tiling.splits, p.cols}, options);
  p.sums = sums.mutable_data_ptr<float>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned tile_grid = grid_size(p.tiling.num_tiles);
  partial_column_sums_kernel<T, kVec><<<tile_grid, kTileThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.tiling.splits > 1) {
    sum_splits_kernel<<<grid_size(ceil_div(num_matrices * p.cols, kTileThreads)), kTileThreads,
                        0, stream>>>(p.sums, num_matrices, p.tiling.splits, p.cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  subtract_projection_kernel<T, kVec><<<tile_grid, kTileThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void orthogonalize(at::Tensor& weight, const at::Tensor& direction, double scale) {
  check_orthogonalize(weight, direction, scale);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  if (weight.numel() == 0) return;
  const at::Tensor unit = unit_rows(direction);
  const SliceOffsets matrices(weight, 2);
  const int64_t rows = weight.size(-2);
  const int64_t row_stride = weight.stride(-2);
  const at::TensorOptions sums_options = weight.options().dtype(at::kFloat);
  REFUSAL_DISPATCH_FLOATS(weight.scalar_type(), "refusal::orthogonalize", [&] {
    const OrthogonalizeParams<scalar_t> p{weight.mutable_data_ptr<scalar_t>(),
                                          matrices,
                                          rows,
                                          weight.size(-1),
                                          row_stride,
                                          unit.const_data_ptr<float>(),
                                          /*sums=*/nullptr,
                                          /*tiling=*/{},
                                          static_cast<float>(scale)};
    constexpr int kPack = kPackSize<scalar_t>;
    if (is_pack_aligned(p.weight) && p.cols % kPack == 0 &&
        (rows == 1 || row_stride % kPack == 0) && matrices.strides_divisible_by(kPack)) {
      launch<scalar_t, kPack>(p, sums_options);
    } else {
      launch<scalar_t, 1>(p, sums_options);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(refusal, CUDA, m) { m.impl("orthogonalize", &orthogonalize); }

}  // namespace refusal::cuda
