// Metadata checks of the orthogonalize_<format> ops on quantized storage, shared by the CPU
// and CUDA kernels; the Python mirror is refusal_kernels/quant/_ops.py. Like checks.h they
// read metadata only and run before anything is written.
#pragma once

#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

#include "checks.h"

namespace refusal {

constexpr int64_t kFp8Block = 128;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> dtypes) {
  bool found = false;
  std::string expected;
  for (auto dtype : dtypes) {
    found = found || t.scalar_type() == dtype;
    expected += (expected.empty() ? "" : " or ") + std::string(c10::toString(dtype));
  }
  TORCH_CHECK_TYPE(found, name, " must be ", expected, ", got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape, const char* meaning) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, " (", meaning, "), got ", t.sizes());
}

// A quantized tensor written or read in place: the layout's dtype, contiguous, on the weight's device.
inline void check_storage(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> dtypes,
                          const at::Tensor& weight) {
  check_dtype(t, name, dtypes);
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
  check_same_device(t, name, weight, "the quantized weight");
}

inline void check_float_storage(const at::Tensor& t, const char* name, const at::Tensor& weight) {
  check_float_tensor(t, name);
  check_storage(t, name, {t.scalar_type()}, weight);
}

inline void check_quant_common(const at::Tensor& weight, const at::Tensor& direction, int64_t out_features,
                               double scale) {
  check_vector(direction, "direction", out_features, "the weight's d_model (out_features)");
  check_same_device(direction, "direction", weight, "the quantized weight");
  check_scale(scale);
}

inline int64_t check_group_size(int64_t in_features, int64_t group_size) {
  TORCH_CHECK_VALUE(group_size > 0 && in_features % group_size == 0,
                    "group_size must be positive and divide in_features = ", in_features, ", got ", group_size);
  return in_features / group_size;
}

inline void check_int8(const at::Tensor& qweight, const at::Tensor& row_scale, const at::Tensor& direction,
                       double scale) {
  check_storage(qweight, "qweight", {at::kChar}, qweight);
  TORCH_CHECK_VALUE(qweight.dim() == 2, "qweight must be 2-D [out, in], got shape ", qweight.sizes());
  const int64_t out = qweight.size(0);
  check_float_storage(row_scale, "row_scale", qweight);
  TORCH_CHECK_VALUE(row_scale.sizes() == at::IntArrayRef{out} || row_scale.sizes() == at::IntArrayRef({out, 1}),
                    "row_scale must have shape (", out, ",) or (", out, ", 1), got ", row_scale.sizes());
  check_quant_common(qweight, direction, out, scale);
}

inline void check_int4_groups(const at::Tensor& qzeros, const at::Tensor& scales, int64_t groups, int64_t out,
                              const at::Tensor& qweight) {
  check_storage(qzeros, "qzeros", {at::kInt}, qweight);
  check_shape(qzeros, "qzeros", {groups, out / 8}, "[groups, out / 8]");
  check_float_storage(scales, "scales", qweight);
  check_shape(scales, "scales", {groups, out}, "[groups, out]");
}

// GPTQ's qzeros hold z - zero_min: "v1" stores zero points minus 1, "v2" stores them as is.
inline int gptq_zero_min(c10::string_view zeros_format) {
  TORCH_CHECK_VALUE(zeros_format == "v1" || zeros_format == "v2",
                    "zeros_format must be 'v1' (qzeros hold zero - 1) or 'v2' (qzeros hold the zero), got '",
                    std::string(zeros_format), "'");
  return zeros_format == "v1" ? 1 : 0;
}

// Returns (in_features, out_features).
inline std::pair<int64_t, int64_t> check_gptq(const at::Tensor& qweight, const at::Tensor& qzeros,
                                              const at::Tensor& scales, const std::optional<at::Tensor>& g_idx,
                                              const at::Tensor& direction, int64_t group_size, double scale,
                                              c10::string_view zeros_format) {
  gptq_zero_min(zeros_format);
  check_storage(qweight, "qweight", {at::kInt}, qweight);
  TORCH_CHECK_VALUE(qweight.dim() == 2, "qweight must be 2-D [in / 8, out], got shape ", qweight.sizes());
  const int64_t in = 8 * qweight.size(0);
  const int64_t out = qweight.size(1);
  TORCH_CHECK_VALUE(out % 8 == 0, "qweight must have a multiple of 8 columns (out), got ", out);
  check_int4_groups(qzeros, scales, check_group_size(in, group_size), out, qweight);
  if (g_idx.has_value()) {
    check_storage(*g_idx, "g_idx", {at::kInt, at::kLong}, qweight);
    check_shape(*g_idx, "g_idx", {in}, "[in]");
  }
  check_quant_common(qweight, direction, out, scale);
  return {in, out};
}

inline std::pair<int64_t, int64_t> check_awq(const at::Tensor& qweight, const at::Tensor& qzeros,
                                             const at::Tensor& scales, const at::Tensor& direction,
                                             int64_t group_size, double scale) {
  check_storage(qweight, "qweight", {at::kInt}, qweight);
  TORCH_CHECK_VALUE(qweight.dim() == 2, "qweight must be 2-D [in, out / 8], got shape ", qweight.sizes());
  const int64_t in = qweight.size(0);
  const int64_t out = 8 * qweight.size(1);
  check_int4_groups(qzeros, scales, check_group_size(in, group_size), out, qweight);
  check_quant_common(qweight, direction, out, scale);
  return {in, out};
}

// (rows, cols) of the block sharing one scale, from weight_scale's shape.
inline std::pair<int64_t, int64_t> fp8_block_shape(const at::Tensor& weight, const at::Tensor& weight_scale) {
  const int64_t out = weight.size(0);
  const int64_t in = weight.size(1);
  const auto shape = weight_scale.sizes();
  if (weight_scale.numel() == 1) return {out, in};
  if (shape == at::IntArrayRef{out} || shape == at::IntArrayRef({out, 1})) return {1, in};
  if (shape == at::IntArrayRef({ceil_div(out, kFp8Block), ceil_div(in, kFp8Block)})) return {kFp8Block, kFp8Block};
  TORCH_CHECK_VALUE(false, "weight_scale shape ", shape, " matches no granularity of weight ", weight.sizes(),
                    ": expected one element per tensor, (", out, ",) or (", out, ", 1) per row, or (",
                    ceil_div(out, kFp8Block), ", ", ceil_div(in, kFp8Block), ") per ", kFp8Block, "x", kFp8Block,
                    " block");
  return {};
}

inline std::pair<int64_t, int64_t> check_fp8(const at::Tensor& weight, const at::Tensor& weight_scale,
                                             const at::Tensor& direction, double scale) {
  check_storage(weight, "weight", {at::kFloat8_e4m3fn}, weight);
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [out, in], got shape ", weight.sizes());
  check_float_storage(weight_scale, "weight_scale", weight);
  const auto block = fp8_block_shape(weight, weight_scale);
  check_quant_common(weight, direction, weight.size(0), scale);
  return block;
}

// Returns the weight's shape (out, in); out is the direction's length.
inline std::pair<int64_t, int64_t> check_nf4(const at::Tensor& packed, const at::Tensor& absmax,
                                             const at::Tensor& code, const at::Tensor& direction,
                                             int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                                             const std::optional<at::Tensor>& nested_offset,
                                             const std::optional<at::Tensor>& nested_code,
                                             int64_t nested_blocksize, double scale) {
  check_storage(packed, "packed", {at::kByte}, packed);
  check_quant_common(packed, direction, direction.dim() == 1 ? direction.size(0) : -1, scale);
  const int64_t out = direction.size(0);
  const int64_t numel = 2 * packed.numel();
  TORCH_CHECK_VALUE(out > 0 && numel % out == 0, "packed holds ", numel,
                    " values, not a multiple of direction's length ", out, " (out)");
  TORCH_CHECK_VALUE(blocksize > 0 && blocksize % 2 == 0,
                    "blocksize must be positive and even (whole bytes per block), got ", blocksize);
  const int64_t blocks = ceil_div(numel, blocksize);
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK_VALUE(nested == nested_offset.has_value() && nested == nested_code.has_value(),
                    "nested_absmax, nested_offset and nested_code must be given together (double quantization)");
  check_storage(absmax, "absmax", {nested ? at::kByte : at::kFloat}, packed);
  check_shape(absmax, "absmax", {blocks}, "one per block of blocksize values");
  check_storage(code, "code", {at::kFloat}, packed);
  check_shape(code, "code", {16}, "the 4-bit levels");
  if (nested) {
    TORCH_CHECK_VALUE(nested_blocksize > 0, "nested_blocksize must be positive, got ", nested_blocksize);
    check_storage(*nested_absmax, "nested_absmax", {at::kFloat}, packed);
    check_shape(*nested_absmax, "nested_absmax", {ceil_div(blocks, nested_blocksize)}, "one per nested block");
    check_storage(*nested_offset, "nested_offset", {at::kFloat}, packed);
    TORCH_CHECK_VALUE(nested_offset->numel() == 1, "nested_offset must hold one value, got shape ",
                      nested_offset->sizes());
    check_storage(*nested_code, "nested_code", {at::kFloat}, packed);
    check_shape(*nested_code, "nested_code", {256}, "the 8-bit levels");
  }
  return {out, numel / out};
}

}  // namespace refusal
