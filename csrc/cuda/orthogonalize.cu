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
//
// refusal::orthogonalize_norm_preserving reuses these kernels:
//   axis="column": pass 1 also sums the squared column norms (a second set of partial sums),
//     and pass 3 scales each column back to its norm (norm_preserving.h);
//   axis="row": a block per row first takes each row's norm, pass 1 sums d[i] W[i] / r_i
//     (per-matrix row weights), and a block per row then finds the row's updated norm from
//     its dot product with c and rescales it (reading the row twice, the second time mostly
//     from cache). Extra memory: 2 * E * d_model fp32 more.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "../dispatch.h"
#include "../norm_preserving.h"
#include "common.cuh"

namespace refusal::cuda {
namespace {

constexpr int kRowLanes = 8;  // warps per tile, each summing or updating its own rows
constexpr int kTileThreads = kRowLanes * kWarpSize;
constexpr int64_t kMinRowsPerSplit = 128;  // enough rows per tile to amortize its reduction
constexpr int64_t kTilesPerSM = 8;         // enough loads in flight to saturate bandwidth
constexpr int kRowThreads = 256;           // threads of a block that owns a row

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
  // Pass 1 sums row_weights[i] * W[i]: the unit direction for every matrix (stride 0), or
  // d[i] / ||W[i]|| for each matrix (stride rows) in the row-normalized form.
  const float* row_weights;
  int64_t row_weights_matrix_stride;
  float* sums;     // [matrices, splits, cols]: partial sums of d^T W; c ends in split 0
  float* squares;  // likewise for the squared column norms, when pass 1 sums them
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

// kSquares: also sum the squared column norms into p.squares.
template <typename T, int kVec, bool kSquares>
__global__ void __launch_bounds__(kTileThreads)
    partial_column_sums_kernel(const OrthogonalizeParams<T> p) {
  constexpr int kStripWidth = kWarpSize * kVec;
  __shared__ float lane_sums[kRowLanes][kStripWidth];
  __shared__ float lane_squares[kSquares ? kRowLanes : 1][kSquares ? kStripWidth : 1];
  const int lane = threadIdx.x % kWarpSize;
  const int row_lane = threadIdx.x / kWarpSize;
  for (int64_t t = blockIdx.x; t < p.tiling.num_tiles; t += gridDim.x) {
    const Tile tile = tile_at(p.tiling, p.rows, t);
    const int64_t strip_col = tile.strip * kStripWidth;
    const int64_t col = strip_col + lane * kVec;
    float acc[kVec] = {};
    float squares[kVec] = {};
    if (col < p.cols) {
      const T* w = p.weight + p.matrices.offset(tile.matrix) + col;
      const float* row_weights = p.row_weights + tile.matrix * p.row_weights_matrix_stride;
#pragma unroll 4
      for (int64_t r = tile.first_row + row_lane; r < tile.end_row; r += kRowLanes) {
        const Pack<T, kVec> v = load_pack<T, kVec>(w + r * p.row_stride);
        accumulate(acc, row_weights[r], v);
        if constexpr (kSquares) accumulate_squares(squares, v);
      }
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      lane_sums[row_lane][lane * kVec + i] = acc[i];
      if constexpr (kSquares) lane_squares[row_lane][lane * kVec + i] = squares[i];
    }
    __syncthreads();
    const int64_t out_offset = (tile.matrix * p.tiling.splits + tile.split) * p.cols + strip_col;
    for (int j = threadIdx.x; j < kStripWidth && strip_col + j < p.cols; j += blockDim.x) {
      float total = 0.f;
      float total_squares = 0.f;
#pragma unroll
      for (int y = 0; y < kRowLanes; ++y) {
        total += lane_sums[y][j];
        if constexpr (kSquares) total_squares += lane_squares[y][j];
      }
      p.sums[out_offset + j] = total;
      if constexpr (kSquares) p.squares[out_offset + j] = total_squares;
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

// kPreserveColumnNorms: W[i, j] <- factor_j * (W[i, j] - s d[i] c_j), factor_j restoring
// column j's norm from its squared norm in p.squares.
template <typename T, int kVec, bool kPreserveColumnNorms>
__global__ void __launch_bounds__(kTileThreads)
    subtract_projection_kernel(const OrthogonalizeParams<T> p) {
  const int lane = threadIdx.x % kWarpSize;
  const int row_lane = threadIdx.x / kWarpSize;
  for (int64_t t = blockIdx.x; t < p.tiling.num_tiles; t += gridDim.x) {
    const Tile tile = tile_at(p.tiling, p.rows, p.tiling.num_tiles - 1 - t);
    const int64_t col = tile.strip * kWarpSize * kVec + lane * kVec;
    if (col >= p.cols) continue;
    const int64_t sums_offset = tile.matrix * p.tiling.splits * p.cols + col;
    Pack<float, kVec> c = load_pack<float, kVec>(p.sums + sums_offset);
    Pack<float, kVec> factor;
    if constexpr (kPreserveColumnNorms) {
      const Pack<float, kVec> norm_sq = load_pack<float, kVec>(p.squares + sums_offset);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        factor.val[i] = column_norm_factor(norm_sq.val[i], c.val[i], p.scale);
        c.val[i] *= factor.val[i];
      }
    }
    T* w = p.weight + p.matrices.offset(tile.matrix) + col;
#pragma unroll 4
    for (int64_t r = tile.first_row + row_lane; r < tile.end_row; r += kRowLanes) {
      T* v = w + r * p.row_stride;
      if constexpr (kPreserveColumnNorms) {
        store_pack(v, scale_and_subtract(load_pack<T, kVec>(v), factor, p.scale * p.unit[r], c));
      } else {
        store_pack(v, subtract_scaled(load_pack<T, kVec>(v), p.scale * p.unit[r], c));
      }
    }
  }
}

// A block per row, flat over the matrices: the row's norm r into norms, and its weight
// d[i] / r in the column sums into row_weights.
template <typename T, int kVec>
__global__ void __launch_bounds__(kRowThreads)
    row_norms_kernel(const OrthogonalizeParams<T> p, int64_t num_rows, float* norms,
                     float* row_weights) {
  __shared__ float scratch[kRowThreads / kWarpSize];
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const int64_t i = row % p.rows;
    const T* w = p.weight + p.matrices.offset(row / p.rows) + i * p.row_stride;
    float squares[kVec] = {};
    for (int64_t col = threadIdx.x * kVec; col < p.cols; col += blockDim.x * kVec) {
      accumulate_squares(squares, load_pack<T, kVec>(w + col));
    }
    float sum_sq = 0.f;
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum_sq += squares[k];
    const float r = sqrtf(block_sum(sum_sq, scratch));
    if (threadIdx.x == 0) {
      norms[row] = r;
      row_weights[row] = normalized_row_weight(p.unit[i], r);
    }
  }
}

// A block per row, flat over the matrices: W[i] <- r normalize(W[i] / r - s d[i] c), with
// the updated norm found from W[i].c and ||c||^2 (norm_preserving.h).
template <typename T, int kVec>
__global__ void __launch_bounds__(kRowThreads)
    rescale_rows_kernel(const OrthogonalizeParams<T> p, int64_t num_rows, const float* norms) {
  __shared__ float scratch[kRowThreads / kWarpSize];
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const int64_t matrix = row / p.rows;
    const int64_t i = row % p.rows;
    T* w = p.weight + p.matrices.offset(matrix) + i * p.row_stride;
    const float* c = p.sums + matrix * p.tiling.splits * p.cols;
    float w_dot_c = 0.f;
    float c_sq = 0.f;
    for (int64_t col = threadIdx.x * kVec; col < p.cols; col += blockDim.x * kVec) {
      const Pack<float, kVec> c_pack = load_pack<float, kVec>(c + col);
      w_dot_c += dot(load_pack<T, kVec>(w + col), c_pack);
      c_sq += dot(c_pack, c_pack);
    }
    w_dot_c = block_sum(w_dot_c, scratch);
    c_sq = block_sum(c_sq, scratch);
    const RowUpdate update = row_update(norms[row], p.unit[i], w_dot_c, c_sq, p.scale);
    for (int64_t col = threadIdx.x * kVec; col < p.cols; col += blockDim.x * kVec) {
      store_pack(w + col, scale_and_subtract(load_pack<T, kVec>(w + col), update.keep,
                                             update.subtract, load_pack<float, kVec>(c + col)));
    }
  }
}

// Passes 1 and 2: c = sum_i row_weights[i] W[i] in split 0 of p.sums and, with kSquares, the
// squared column norms in split 0 of p.squares. Returns the buffer that holds them.
template <int kVec, bool kSquares, typename T>
at::Tensor launch_column_sums(OrthogonalizeParams<T>& p, const at::TensorOptions& options) {
  const int64_t num_matrices = p.matrices.count();
  p.tiling = plan_tiles(num_matrices, p.rows, p.cols, kWarpSize * kVec);
  // The squares follow the sums, so one sum_splits launch adds both. Float packs of them are
  // read at multiples of kVec floats: the allocator's alignment (at least 256 bytes) and
  // kVec | cols keep them aligned.
  const int64_t sum_sets = kSquares ? 2 * num_matrices : num_matrices;
  at::Tensor sums = at::empty({sum_sets, p.tiling.splits, p.cols}, options);
  p.sums = sums.mutable_data_ptr<float>();
  p.squares = kSquares ? p.sums + num_matrices * p.tiling.splits * p.cols : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  partial_column_sums_kernel<T, kVec, kSquares>
      <<<grid_size(p.tiling.num_tiles), kTileThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.tiling.splits > 1) {
    sum_splits_kernel<<<grid_size(ceil_div(sum_sets * p.cols, kTileThreads)), kTileThreads, 0,
                        stream>>>(p.sums, sum_sets, p.tiling.splits, p.cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return sums;
}

// orthogonalize, and with kPreserveColumnNorms its axis="column" form.
template <int kVec, bool kPreserveColumnNorms, typename T>
void launch_orthogonalize(OrthogonalizeParams<T> p, const at::TensorOptions& options) {
  const at::Tensor sums = launch_column_sums<kVec, kPreserveColumnNorms>(p, options);
  subtract_projection_kernel<T, kVec, kPreserveColumnNorms>
      <<<grid_size(p.tiling.num_tiles), kTileThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The axis="row" form of orthogonalize_norm_preserving.
template <int kVec, typename T>
void launch_preserving_row_norms(OrthogonalizeParams<T> p, const at::TensorOptions& options) {
  const int64_t num_rows = p.matrices.count() * p.rows;
  const at::Tensor row_stats = at::empty({2, num_rows}, options);  // norms, then row weights
  float* norms = row_stats.mutable_data_ptr<float>();
  float* row_weights = norms + num_rows;
  const auto stream = at::cuda::getCurrentCUDAStream();
  row_norms_kernel<T, kVec><<<grid_size(num_rows), kRowThreads, 0, stream>>>(p, num_rows, norms,
                                                                            row_weights);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.row_weights = row_weights;
  p.row_weights_matrix_stride = p.rows;
  const at::Tensor sums = launch_column_sums<kVec, /*kSquares=*/false>(p, options);
  rescale_rows_kernel<T, kVec><<<grid_size(num_rows), kRowThreads, 0, stream>>>(p, num_rows, norms);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls launch(p, vec) with the parameters of the non-empty `weight` and vec a
// std::integral_constant of the elements per access: a 128-bit pack when the pointer and
// strides allow it, else 1.
template <typename Launch>
void with_params(at::Tensor& weight, const at::Tensor& unit, double scale, const Launch& launch) {
  const SliceOffsets matrices(weight, 2);
  const int64_t rows = weight.size(-2);
  const int64_t row_stride = weight.stride(-2);
  // The checks have rejected other dtypes, so the name in the dispatch error never shows.
  REFUSAL_DISPATCH_FLOATS(weight.scalar_type(), "refusal::orthogonalize", [&] {
    const OrthogonalizeParams<scalar_t> p{weight.mutable_data_ptr<scalar_t>(),
                                          matrices,
                                          rows,
                                          weight.size(-1),
                                          row_stride,
                                          unit.const_data_ptr<float>(),
                                          /*row_weights=*/unit.const_data_ptr<float>(),
                                          /*row_weights_matrix_stride=*/0,
                                          /*sums=*/nullptr,
                                          /*squares=*/nullptr,
                                          /*tiling=*/{},
                                          static_cast<float>(scale)};
    constexpr int kPack = kPackSize<scalar_t>;
    if (is_pack_aligned(p.weight) && p.cols % kPack == 0 &&
        (rows == 1 || row_stride % kPack == 0) && matrices.strides_divisible_by(kPack)) {
      launch(p, std::integral_constant<int, kPack>{});
    } else {
      launch(p, std::integral_constant<int, 1>{});
    }
  });
}

void orthogonalize(at::Tensor& weight, const at::Tensor& direction, double scale) {
  check_orthogonalize(weight, direction, scale);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  if (weight.numel() == 0) return;
  const at::TensorOptions sums_options = weight.options().dtype(at::kFloat);
  with_params(weight, unit_rows(direction), scale, [&](auto p, auto vec) {
    launch_orthogonalize<decltype(vec)::value, /*kPreserveColumnNorms=*/false>(p, sums_options);
  });
}

void orthogonalize_norm_preserving(at::Tensor& weight, const at::Tensor& direction, double scale,
                                   c10::string_view axis) {
  const NormAxis norm_axis = check_orthogonalize_norm_preserving(weight, direction, scale, axis);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  if (weight.numel() == 0) return;
  const at::TensorOptions sums_options = weight.options().dtype(at::kFloat);
  with_params(weight, unit_rows(direction), scale, [&](auto p, auto vec) {
    constexpr int kVec = decltype(vec)::value;
    if (norm_axis == NormAxis::kColumn) {
      launch_orthogonalize<kVec, /*kPreserveColumnNorms=*/true>(p, sums_options);
    } else {
      launch_preserving_row_norms<kVec>(p, sums_options);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(refusal, CUDA, m) {
  m.impl("orthogonalize", &orthogonalize);
  m.impl("orthogonalize_norm_preserving", &orthogonalize_norm_preserving);
}

}  // namespace refusal::cuda
