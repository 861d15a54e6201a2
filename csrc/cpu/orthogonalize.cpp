// refusal::orthogonalize on the CPU: W <- W - s * d (d^T W) for each [d_model, d_in] matrix.
// Two streaming passes over each matrix, both parallel over blocks of rows:
//   1. c = d^T W, each row block summing into its own fp32 buffer of d_in (then combined),
//      four rows per load and store of the buffer: with one, the buffer's traffic through L2,
//      not W's, bounds the pass;
//   2. W[i] -= s * d[i] * c, four rows per load of c (fp32, twice a bf16 row's bytes).
// Streaming whole rows keeps the hardware prefetchers and the TLB happy. A column-strip
// schedule, in which pass 2 re-reads each strip from the last-level cache so that W crosses the
// memory bus once each way, measured no faster here: each row of a strip is a short run on its
// own page, and one core cannot keep enough of them in flight. Extra memory: (blocks + 1) * d_in
// fp32, capped at ~1 MiB.
//
// refusal::orthogonalize_norm_preserving follows the same two passes:
//   axis="column": pass 1 also sums the squared column norms, and pass 2 scales each column
//     back to its norm (norm_preserving.h);
//   axis="row": pass 1 takes each row's norm while the row is in cache and sums d[i] W[i] / r_i;
//     pass 2 finds each updated row's norm from one dot product with c, again while the row is
//     in cache, then rescales it. Extra memory: a d_model-long buffer of row norms.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "../norm_preserving.h"
#include "vec_ops.h"

namespace refusal::cpu {
namespace {

constexpr int64_t kPartialBudgetBytes = 1 << 20;

// Column sums over the rows of a matrix, in parallel over blocks of rows:
// add_rows.template operator()<k>(first, sums) adds the terms of rows first..first+k-1 into a
// buffer of `width` floats, k = kRowsPerStep or 1. Each block sums into its own buffer, and the
// buffers are then added in order. The buffers are reused from matrix to matrix.
class RowBlockSums {
 public:
  RowBlockSums(int64_t rows, int64_t width)
      : rows_(rows),
        width_(width),
        blocks_(std::clamp<int64_t>(
            kPartialBudgetBytes / std::max<int64_t>(1, width * sizeof(float)) - 1, 1,
            std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(rows, 1)))),
        partial_(blocks_ * width),
        total_(width) {}

  static constexpr int kRowsPerStep = 4;

  // The sums in fp32, valid until the next call.
  template <typename AddRows>
  float* sum(const AddRows& add_rows) {
    at::parallel_for(0, blocks_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        float* sums = partial_.data() + b * width_;
        std::fill_n(sums, width_, 0.f);
        const int64_t last = rows_ * (b + 1) / blocks_;
        int64_t i = rows_ * b / blocks_;
        for (; i + kRowsPerStep <= last; i += kRowsPerStep) {
          add_rows.template operator()<kRowsPerStep>(i, sums);
        }
        for (; i < last; ++i) add_rows.template operator()<1>(i, sums);
      }
    });
    std::copy_n(partial_.data(), width_, total_.data());
    for (int64_t b = 1; b < blocks_; ++b) {
      accumulate(total_.data(), 1.f, partial_.data() + b * width_, width_);
    }
    return total_.data();
  }

 private:
  int64_t rows_;
  int64_t width_;
  int64_t blocks_;
  std::vector<float> partial_;
  std::vector<float> total_;
};

// What the kernels below share: one [rows, cols] matrix after another, the unit direction.
struct Matrices {
  SliceOffsets offsets;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  at::Tensor unit;  // [rows] fp32

  Matrices(const at::Tensor& weight, const at::Tensor& direction)
      : offsets(weight, 2),
        rows(weight.size(-2)),
        cols(weight.size(-1)),
        row_stride(weight.stride(-2)),
        unit(normalized_rows(direction, "direction")) {}
};

// Pointers to kRows consecutive rows of a matrix from `first`, and a weight for each.
template <int kRows, typename T>
struct RowGroup {
  T* rows[kRows];
  float weights[kRows];

  template <typename Weight>
  RowGroup(T* w, int64_t row_stride, int64_t first, const Weight& weight) {
    for (int r = 0; r < kRows; ++r) {
      rows[r] = w + (first + r) * row_stride;
      weights[r] = weight(first + r);
    }
  }
};

// Calls update(i) for every row i of a matrix, in parallel.
template <typename Update>
void for_each_row(int64_t rows, const Update& update) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) update(i);
  });
}

// update.template operator()<k>(first) updates rows first..first+k-1 of a matrix, k =
// RowBlockSums::kRowsPerStep or 1; called for every row once, in parallel over blocks of rows.
template <typename Update>
void for_each_row_group(int64_t rows, const Update& update) {
  constexpr int kRows = RowBlockSums::kRowsPerStep;
  at::parallel_for(0, rows, kRows, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kRows <= end; i += kRows) update.template operator()<kRows>(i);
    for (; i < end; ++i) update.template operator()<1>(i);
  });
}

void orthogonalize(at::Tensor& weight, const at::Tensor& direction, double scale) {
  check_orthogonalize(weight, direction, scale);
  const Matrices m(weight, direction);
  const float* d = m.unit.const_data_ptr<float>();
  const float s = static_cast<float>(scale);
  RowBlockSums column_sums(m.rows, m.cols);
  REFUSAL_DISPATCH_FLOATS(weight.scalar_type(), "refusal::orthogonalize", [&] {
    scalar_t* base = weight.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < m.offsets.count(); ++k) {
      scalar_t* w = base + m.offsets.offset(k);
      const float* c = column_sums.sum([&]<int kRows>(int64_t first, float* sums) {
        const RowGroup<kRows, const scalar_t> group(w, m.row_stride, first, [&](int64_t i) { return d[i]; });
        accumulate_rows<kRows>(sums, group.weights, group.rows, m.cols);
      });
      for_each_row_group(m.rows, [&]<int kRows>(int64_t first) {
        const RowGroup<kRows, scalar_t> group(w, m.row_stride, first, [&](int64_t i) { return s * d[i]; });
        scale_and_subtract_rows<kRows>(group.rows, 1.f, group.weights, c, m.cols);
      });
    }
  });
}

// Each column w_j <- ||w_j|| normalize(w_j - s c_j d).
template <typename T>
void preserve_column_norms(T* w, const Matrices& m, float s, RowBlockSums& sums) {
  const float* d = m.unit.const_data_ptr<float>();
  // sums holds c = d^T W in its first cols floats and the squared column norms after them.
  float* c = sums.sum([&]<int kRows>(int64_t first, float* partial) {
    const RowGroup<kRows, const T> group(w, m.row_stride, first, [&](int64_t i) { return d[i]; });
    accumulate_rows_with_squares<kRows>(partial, partial + m.cols, group.weights, group.rows, m.cols);
  });
  float* factor = c + m.cols;
  for (int64_t j = 0; j < m.cols; ++j) {
    factor[j] = column_norm_factor(factor[j], c[j], s);
    c[j] *= factor[j];
  }
  // W[i, j] <- factor[j] * (W[i, j] - s d[i] c[j]).
  for_each_row_group(m.rows, [&]<int kRows>(int64_t first) {
    const RowGroup<kRows, T> group(w, m.row_stride, first, [&](int64_t i) { return s * d[i]; });
    scale_and_subtract_rows<kRows>(group.rows, factor, group.weights, c, m.cols);
  });
}

// Each row W[i] <- ||W[i]|| normalize(W_n[i] - s d[i] c), with W_n the row-normalized W and
// c = d^T W_n.
template <typename T>
void preserve_row_norms(T* w, const Matrices& m, float s, RowBlockSums& sums, float* row_norms) {
  const float* d = m.unit.const_data_ptr<float>();
  const float* c = sums.sum([&]<int kRows>(int64_t first, float* partial) {
    const RowGroup<kRows, const T> group(w, m.row_stride, first, [&](int64_t i) {
      const T* row = w + i * m.row_stride;
      row_norms[i] = std::sqrt(dot(row, row, m.cols));
      return normalized_row_weight(d[i], row_norms[i]);
    });
    accumulate_rows<kRows>(partial, group.weights, group.rows, m.cols);
  });
  const float c_sq = dot(c, c, m.cols);
  for_each_row(m.rows, [&](int64_t i) {
    T* row = w + i * m.row_stride;
    const RowUpdate update = row_update(row_norms[i], d[i], dot(row, c, m.cols), c_sq, s);
    scale_and_subtract(row, update.keep, update.subtract, c, m.cols);
  });
}

void orthogonalize_norm_preserving(at::Tensor& weight, const at::Tensor& direction, double scale,
                                   c10::string_view axis) {
  const NormAxis norm_axis = check_orthogonalize_norm_preserving(weight, direction, scale, axis);
  const Matrices m(weight, direction);
  const float s = static_cast<float>(scale);
  RowBlockSums sums(m.rows, norm_axis == NormAxis::kColumn ? 2 * m.cols : m.cols);
  std::vector<float> row_norms(norm_axis == NormAxis::kRow ? m.rows : 0);
  REFUSAL_DISPATCH_FLOATS(weight.scalar_type(), "refusal::orthogonalize_norm_preserving", [&] {
    scalar_t* base = weight.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < m.offsets.count(); ++k) {
      scalar_t* w = base + m.offsets.offset(k);
      if (norm_axis == NormAxis::kColumn) {
        preserve_column_norms(w, m, s, sums);
      } else {
        preserve_row_norms(w, m, s, sums, row_norms.data());
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(refusal, CPU, m) {
  m.impl("orthogonalize", &orthogonalize);
  m.impl("orthogonalize_norm_preserving", &orthogonalize_norm_preserving);
}

}  // namespace refusal::cpu
