// The in-place edit of a tensor's GGUF blocks on the CPU, shared by every block type
// (gguf_legacy.cpp, gguf_kquants.cpp, gguf_kquants_low.cpp). A Codec gives kName, kValues and
// kBytes per block, dequantize(block, values) and quantize(values, block), both as the
// pure-torch references in refusal_kernels/quant/gguf/ compute them. Two streams over the blocks, never a float copy:
//   1. read only: "matrix" c = d^T W (each thread owns block columns and sums down the rows in
//      order), "rows" p_r = v_r . d; then every value the update will produce is known finite;
//   2. each block is dequantized again, updated (value j of row r loses factor[r] * along[j])
//      and requantized with fresh scales into the same bytes.
// Extra memory: c (or p) and one block of floats per worker. With feedback passes
// (refusal_kernels/quant/gguf/feedback.py), a copy of the original bytes too: each pass reads
// what the blocks now store along d (stream 1) and requantizes the original values minus d times
// the grown projection (stream 2, from the copy).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "../gguf_checks.h"
#include "vec_ops.h"

// The kernels round as the reference does, one fp32 operation at a time: GCC would otherwise
// fuse a * b + c into one FMA (rounded once), and a block would quantize differently.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace refusal::cpu::gguf {

inline float fp16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

// Rounded to the nearest fp16, ties to even, as torch's .to(torch.float16).
inline void store_fp16(uint8_t* p, float value) {
  const uint16_t bits = c10::Half(value).x;
  std::memcpy(p, &bits, sizeof(bits));
}

// sum of term(0), term(1), ... term(n - 1), added in order from the first term (the
// reference's _running_sum).
template <typename Term>
inline float running_sum(int n, const Term& term) {
  float total = term(0);
  for (int i = 1; i < n; ++i) total += term(i);
  return total;
}

struct Blocks {
  uint8_t* bytes;
  int64_t rows;
  int64_t per_row;
};

// Pass 2 subtracts factor[r] * along[j] from value j of row r.
struct Update {
  std::vector<float> factor;
  std::vector<float> along;
  float max_abs;  // the largest |value| before the update
};

// What the blocks store along d: "matrix" c = d^T W [row length], "rows" p_r = v_r . d [rows].
struct Component {
  std::vector<float> values;
  float max_abs;  // the largest |value| read
};

template <typename Codec>
const uint8_t* block_at(const Blocks& b, int64_t row, int64_t k) {
  return b.bytes + (row * b.per_row + k) * Codec::kBytes;
}

template <typename Codec>
Component column_component(const Blocks& b, const float* d) {
  constexpr int V = Codec::kValues;
  std::vector<float> c(b.per_row * V, 0.f);
  std::vector<float> column_max(b.per_row, 0.f);
  at::parallel_for(0, b.per_row, 1, [&](int64_t begin, int64_t end) {
    float values[V];
    for (int64_t i = 0; i < b.rows; ++i) {
      for (int64_t k = begin; k < end; ++k) {
        Codec::dequantize(block_at<Codec>(b, i, k), values);
        float* sum = c.data() + k * V;
        float top = column_max[k];
        for (int j = 0; j < V; ++j) {
          sum[j] += d[i] * values[j];
          top = std::max(top, std::fabs(values[j]));
        }
        column_max[k] = top;
      }
    }
  });
  return {std::move(c), *std::max_element(column_max.begin(), column_max.end())};
}

template <typename Codec>
Component row_component(const Blocks& b, const float* d) {
  constexpr int V = Codec::kValues;
  std::vector<float> p(b.rows);
  std::vector<float> row_max(b.rows);
  at::parallel_for(0, b.rows, 1, [&](int64_t begin, int64_t end) {
    float values[V];
    for (int64_t r = begin; r < end; ++r) {
      float dot_d = 0.f;
      float top = 0.f;
      for (int64_t k = 0; k < b.per_row; ++k) {
        Codec::dequantize(block_at<Codec>(b, r, k), values);
        dot_d += dot(values, d + k * V, V);
        for (int j = 0; j < V; ++j) top = std::max(top, std::fabs(values[j]));
      }
      p[r] = dot_d;
      row_max[r] = top;
    }
  });
  return {std::move(p), *std::max_element(row_max.begin(), row_max.end())};
}

template <typename Codec>
Component component_of(const Blocks& b, const float* d, GgufLayout layout) {
  return layout == GgufLayout::kMatrix ? column_component<Codec>(b, d) : row_component<Codec>(b, d);
}

inline std::vector<float> scaled(const std::vector<float>& values, float scale) {
  std::vector<float> out(values.size());
  for (size_t k = 0; k < values.size(); ++k) out[k] = scale * values[k];
  return out;
}

// The plain edit: "matrix" factor = scale * d, along = c; "rows" factor = scale * p, along = d.
inline Update plain_update(const Blocks& b, int64_t row_length, const float* d, float scale, GgufLayout layout,
                           const Component& component) {
  if (layout == GgufLayout::kMatrix) {
    return {scaled(std::vector<float>(d, d + b.rows), scale), component.values, component.max_abs};
  }
  return {scaled(component.values, scale), std::vector<float>(d, d + row_length), component.max_abs};
}

// A feedback pass: value j of row r loses d_r * a_j ("matrix") or a_r * d_j ("rows").
inline Update projection_update(const Blocks& b, int64_t row_length, const float* d, GgufLayout layout,
                                const std::vector<float>& projection, float max_abs) {
  if (layout == GgufLayout::kMatrix) return {std::vector<float>(d, d + b.rows), projection, max_abs};
  return {projection, std::vector<float>(d, d + row_length), max_abs};
}

// visit(values, block) for every block of target, with values the updated floats of the
// same block in source (which may be target itself).
template <typename Codec, typename Visit>
void for_each_updated_block(const Blocks& source, uint8_t* target, const Update& u, const Visit& visit) {
  constexpr int V = Codec::kValues;
  at::parallel_for(0, source.rows * source.per_row, std::max(1, 2048 / V), [&](int64_t begin, int64_t end) {
    float values[V];
    for (int64_t n = begin; n < end; ++n) {
      Codec::dequantize(source.bytes + n * Codec::kBytes, values);
      const float a = u.factor[n / source.per_row];
      const float* along = u.along.data() + (n % source.per_row) * V;
      for (int j = 0; j < V; ++j) values[j] -= a * along[j];
      visit(values, target + n * Codec::kBytes);
    }
  });
}

inline bool all_finite(const std::vector<float>& values) {
  return std::all_of(values.begin(), values.end(), [](float v) { return std::isfinite(v); });
}

// Whether every updated value is finite. A non-finite value (an inf or NaN scale in the bytes)
// makes its c_j or p_r non-finite; past that, only a huge scale can overflow, and only then are
// the values computed to see.
template <typename Codec>
bool update_finite(const Blocks& b, const Update& u) {
  bool finite = all_finite(u.factor) && all_finite(u.along);
  auto largest = [](const std::vector<float>& v) {
    double top = 0.0;
    for (float x : v) top = std::max(top, std::fabs(static_cast<double>(x)));
    return top;
  };
  if (finite && largest(u.factor) * largest(u.along) + u.max_abs > FLT_MAX / 2) {
    std::atomic<bool> all(true);
    for_each_updated_block<Codec>(b, b.bytes, u, [&](const float* values, const uint8_t*) {
      if (!std::all_of(values, values + Codec::kValues, [](float v) { return std::isfinite(v); })) all = false;
    });
    finite = all;
  }
  return finite;
}

constexpr const char* kNotFinite = "blocks must dequantize to finite values that stay finite in float32 after the update";

template <typename Codec>
void requantize(const Blocks& source, uint8_t* target, const Update& u) {
  for_each_updated_block<Codec>(source, target, u, [](const float* values, uint8_t* block) {
    Codec::quantize(values, block);
  });
}

// `passes` feedback passes after the plain edit of b, whose original bytes are `original`:
//   projection <- projection + (what b stores along d - kept); b <- quantize(W0 - d projection),
// starting from projection = scale c, kept = (1 - scale) c, as the reference does. A pass whose
// values would not be finite puts the original bytes back and raises.
template <typename Codec>
void feedback_passes(const Blocks& b, const Blocks& original, int64_t row_length, const float* d, float scale,
                     GgufLayout layout, const Component& component, int64_t passes) {
  const std::vector<float> kept = scaled(component.values, 1.f - scale);
  std::vector<float> projection = scaled(component.values, scale);
  for (int64_t pass = 0; pass < passes; ++pass) {
    const Component stored = component_of<Codec>(b, d, layout);
    for (size_t k = 0; k < projection.size(); ++k) projection[k] = projection[k] + (stored.values[k] - kept[k]);
    const Update u = projection_update(b, row_length, d, layout, projection, component.max_abs);
    if (!update_finite<Codec>(original, u)) {
      std::memcpy(b.bytes, original.bytes, b.rows * b.per_row * Codec::kBytes);
      TORCH_CHECK_VALUE(false, kNotFinite);
    }
    requantize<Codec>(original, b.bytes, u);
  }
}

template <typename Codec>
void orthogonalize(at::Tensor& blocks, const at::Tensor& direction, double scale, c10::string_view layout,
                   int64_t passes) {
  const GgufShape shape =
      check_gguf(blocks, direction, scale, layout, passes, {Codec::kName, Codec::kValues, Codec::kBytes});
  const at::Tensor unit = normalized_rows(direction, "direction");
  const Blocks b{blocks.mutable_data_ptr<uint8_t>(), blocks.size(0), shape.blocks_per_row};
  if (b.rows == 0 || b.per_row == 0) return;
  const int64_t row_length = b.per_row * Codec::kValues;
  const float* d = unit.const_data_ptr<float>();
  const float s = static_cast<float>(scale);
  const Component component = component_of<Codec>(b, d, shape.layout);
  const Update u = plain_update(b, row_length, d, s, shape.layout, component);
  // Every updated value is finite, or ValueError before the first write (the reference raises too).
  TORCH_CHECK_VALUE(update_finite<Codec>(b, u), kNotFinite);
  std::vector<uint8_t> original_bytes;
  if (passes > 0) original_bytes.assign(b.bytes, b.bytes + b.rows * b.per_row * Codec::kBytes);
  requantize<Codec>(b, b.bytes, u);
  if (passes > 0) {
    const Blocks original{original_bytes.data(), b.rows, b.per_row};
    feedback_passes<Codec>(b, original, row_length, d, s, shape.layout, component, passes);
  }
}

}  // namespace refusal::cpu::gguf
