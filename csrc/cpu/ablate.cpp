// refusal::ablate and refusal::ablate_indexed on the CPU: rows in parallel, each row read
// twice (dot, then update) while it is still in L1.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "vec_ops.h"

namespace refusal::cpu {
namespace {

// Rows per parallel task: enough elements to amortize scheduling.
int64_t row_grain(int64_t row_length) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_length, 1)); }

void ablate(at::Tensor& x, const at::Tensor& direction, double scale) {
  check_ablate(x, direction, scale);
  const at::Tensor unit = normalized_rows(direction, "direction");
  const SliceOffsets rows(x, 1);
  const int64_t n = x.size(-1);
  const float* d = unit.const_data_ptr<float>();
  const float s = static_cast<float>(scale);
  REFUSAL_DISPATCH_FLOATS(x.scalar_type(), "refusal::ablate", [&] {
    scalar_t* base = x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows.count(), row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* v = base + rows.offset(r);
        subtract_scaled(v, s * dot(v, d, n), d, n);
      }
    });
  });
}

void ablate_indexed(at::Tensor& x, const at::Tensor& directions, const at::Tensor& index,
                    double scale) {
  check_ablate_indexed(x, directions, index, scale);
  const at::Tensor unit = normalized_rows(directions, "directions");
  const at::Tensor choice = index.contiguous();
  const int64_t* k_of = choice.const_data_ptr<int64_t>();
  const int64_t num_directions = directions.size(0);
  // Validate every index before the first write, so a bad one leaves x untouched.
  for (const auto i : c10::irange(choice.numel())) {
    TORCH_CHECK_VALUE(k_of[i] >= -1 && k_of[i] < num_directions, "index holds ", k_of[i],
                      " at flat position ", i, "; valid values are -1 (skip) to ",
                      num_directions - 1);
  }
  const SliceOffsets rows(x, 1);
  const int64_t n = x.size(-1);
  // With one index per batch row, consecutive `rows_per_index` rows share an entry.
  const int64_t rows_per_index =
      index_is_per_batch_row(x, index) ? std::max<int64_t>(1, rows.count() / std::max<int64_t>(1, x.size(0))) : 1;
  const float* d = unit.const_data_ptr<float>();
  const float s = static_cast<float>(scale);
  REFUSAL_DISPATCH_FLOATS(x.scalar_type(), "refusal::ablate_indexed", [&] {
    scalar_t* base = x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows.count(), row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t k = k_of[r / rows_per_index];
        if (k < 0) continue;
        scalar_t* v = base + rows.offset(r);
        const float* dk = d + k * n;
        subtract_scaled(v, s * dot(v, dk, n), dk, n);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(refusal, CPU, m) {
  m.impl("ablate", &ablate);
  m.impl("ablate_indexed", &ablate_indexed);
}

}  // namespace refusal::cpu
