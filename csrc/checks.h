// Metadata checks shared by the CPU and CUDA kernels. They read shapes, dtypes, strides and
// devices only, never data, so they cost no device synchronization. Each failure raises a
// Python ValueError or TypeError whose message names the offending argument; nothing has
// been written at that point. The Python mirror for the fake, Triton and torch backends is
// refusal_kernels/_ops.py.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <cmath>

namespace refusal {

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_direction_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must have a floating-point dtype, got ", t.scalar_type());
}

inline void check_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& target,
                              const char* target_name) {
  TORCH_CHECK_VALUE(t.device() == target.device(), name, " is on ", t.device(), " but ",
                    target_name, " is on ", target.device());
}

// The tensor written in place: rows along the last dim with unit stride, no element aliasing.
inline void check_writable_rows(const at::Tensor& t, const char* name) {
  check_float_tensor(t, name);
  TORCH_CHECK_VALUE(t.dim() >= 1, name, " must have at least 1 dim, got a scalar");
  TORCH_CHECK_VALUE(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    " must have stride 1 in its last dim, got strides ", t.strides());
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                    " has elements that overlap in memory (an expanded view?); pass a "
                    "tensor that owns each element, e.g. .clone()");
}

inline void check_vector(const at::Tensor& direction, const char* name, int64_t length,
                         const char* length_of) {
  check_direction_dtype(direction, name);
  TORCH_CHECK_VALUE(direction.dim() == 1, name, " must be 1-D, got shape ", direction.sizes());
  TORCH_CHECK_VALUE(direction.size(0) == length, name, " has length ", direction.size(0),
                    " but ", length_of, " is ", length);
}

inline void check_ablate(const at::Tensor& x, const at::Tensor& direction, double scale) {
  check_writable_rows(x, "x");
  check_vector(direction, "direction", x.size(-1), "x.shape[-1]");
  check_same_device(direction, "direction", x, "x");
  check_scale(scale);
}

inline void check_ablate_indexed(const at::Tensor& x, const at::Tensor& directions,
                                 const at::Tensor& index, double scale) {
  check_writable_rows(x, "x");
  check_direction_dtype(directions, "directions");
  TORCH_CHECK_VALUE(directions.dim() == 2, "directions must be 2-D [K, d], got shape ",
                    directions.sizes());
  TORCH_CHECK_VALUE(directions.size(1) == x.size(-1), "directions has rows of length ",
                    directions.size(1), " but x.shape[-1] is ", x.size(-1));
  check_same_device(directions, "directions", x, "x");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index must be int64, got ",
                   index.scalar_type());
  const auto leading = x.sizes().slice(0, x.dim() - 1);
  const bool per_vector = index.sizes() == leading;
  const bool per_batch_row = x.dim() >= 2 && index.dim() == 1 && index.size(0) == x.size(0);
  TORCH_CHECK_VALUE(per_vector || per_batch_row, "index must have shape x.shape[:-1] = ",
                    leading, " or x.shape[:1], got ", index.sizes());
  check_same_device(index, "index", x, "x");
  check_scale(scale);
}

inline void check_orthogonalize(const at::Tensor& weight, const at::Tensor& direction,
                                double scale) {
  TORCH_CHECK_VALUE(weight.dim() >= 2, "weight must have at least 2 dims [d_model, d_in], got shape ",
                    weight.sizes());
  check_writable_rows(weight, "weight");
  check_vector(direction, "direction", weight.size(-2), "weight.shape[-2] (d_model)");
  check_same_device(direction, "direction", weight, "weight");
  check_scale(scale);
}

// Which norms orthogonalize_norm_preserving keeps: each column's (the vector along d_model
// that d is removed from) or each row's (grimjim's row-normalized form).
enum class NormAxis { kColumn, kRow };

inline NormAxis check_orthogonalize_norm_preserving(const at::Tensor& weight,
                                                    const at::Tensor& direction, double scale,
                                                    c10::string_view axis) {
  check_orthogonalize(weight, direction, scale);
  TORCH_CHECK_VALUE(axis == "column" || axis == "row", "axis must be 'column' or 'row', got '",
                    axis, "'");
  return axis == "column" ? NormAxis::kColumn : NormAxis::kRow;
}

// True when index holds one entry per batch row, broadcast over the middle dims of x.
inline bool index_is_per_batch_row(const at::Tensor& x, const at::Tensor& index) {
  return index.sizes() != x.sizes().slice(0, x.dim() - 1);
}

}  // namespace refusal
