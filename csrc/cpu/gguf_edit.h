// The in-place edit of a tensor's GGUF blocks on the CPU, shared by every block type
// (gguf_legacy.cpp, gguf_kquants.cpp). A Codec gives kName, kValues and kBytes per block,
// dequantize(block, values) and quantize(values, block), both as the pure-torch references in
// refusal_kernels/quant/gguf/ compute them. Two streams over the blocks, never a float copy:
//   1. read only: "matrix" c = d^T W (each thread owns block columns and sums down the rows in
//      order), "rows" p_r = v_r . d; then every value the update will produce is known finite;
//   2. each block is dequantized again, updated (value j of row r loses factor[r] * along[j])
//      and requantized with fresh scales into the same bytes.
// Extra memory: c (or p) and one block of floats per worker.
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

template <typename Codec>
const uint8_t* block_at(const Blocks& b, int64_t row, int64_t k) {
  return b.bytes + (row * b.per_row + k) * Codec::kBytes;
}

// "matrix": factor = scale * d, along = c = d^T W.
template <typename Codec>
Update column_update(const Blocks& b, const float* d, float scale) {
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
  std::vector<float> factor(b.rows);
  for (int64_t i = 0; i < b.rows; ++i) factor[i] = scale * d[i];
  return {std::move(factor), std::move(c), *std::max_element(column_max.begin(), column_max.end())};
}

// "rows": factor = scale * (v_r . d), along = d.
template <typename Codec>
Update row_update(const Blocks& b, const float* d, float scale) {
  constexpr int V = Codec::kValues;
  std::vector<float> factor(b.rows);
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
      factor[r] = scale * dot_d;
      row_max[r] = top;
    }
  });
  return {std::move(factor), std::vector<float>(d, d + b.per_row * V),
          *std::max_element(row_max.begin(), row_max.end())};
}

// visit(values, block) for every block, with values its updated floats.
template <typename Codec, typename Visit>
void for_each_updated_block(const Blocks& b, const Update& u, const Visit& visit) {
  constexpr int V = Codec::kValues;
  at::parallel_for(0, b.rows * b.per_row, std::max(1, 2048 / V), [&](int64_t begin, int64_t end) {
    float values[V];
    for (int64_t n = begin; n < end; ++n) {
      uint8_t* block = b.bytes + n * Codec::kBytes;
      Codec::dequantize(block, values);
      const float a = u.factor[n / b.per_row];
      const float* along = u.along.data() + (n % b.per_row) * V;
      for (int j = 0; j < V; ++j) values[j] -= a * along[j];
      visit(values, block);
    }
  });
}

inline bool all_finite(const std::vector<float>& values) {
  return std::all_of(values.begin(), values.end(), [](float v) { return std::isfinite(v); });
}

// Every updated value is finite, or ValueError before the first write (the reference raises
// too). A non-finite value (an inf or NaN scale in the bytes) makes its c_j or p_r non-finite;
// past that, only a huge scale can overflow, and only then are the values computed to see.
template <typename Codec>
void check_update_finite(const Blocks& b, const Update& u) {
  bool finite = all_finite(u.factor) && all_finite(u.along);
  auto largest = [](const std::vector<float>& v) {
    double top = 0.0;
    for (float x : v) top = std::max(top, std::fabs(static_cast<double>(x)));
    return top;
  };
  if (finite && largest(u.factor) * largest(u.along) + u.max_abs > FLT_MAX / 2) {
    std::atomic<bool> all(true);
    for_each_updated_block<Codec>(b, u, [&](const float* values, const uint8_t*) {
      if (!std::all_of(values, values + Codec::kValues, [](float v) { return std::isfinite(v); })) all = false;
    });
    finite = all;
  }
  TORCH_CHECK_VALUE(finite, "blocks must dequantize to finite values that stay finite in float32 after the update");
}

template <typename Codec>
void orthogonalize(at::Tensor& blocks, const at::Tensor& direction, double scale, c10::string_view layout) {
  const GgufShape shape =
      check_gguf(blocks, direction, scale, layout, {Codec::kName, Codec::kValues, Codec::kBytes});
  const at::Tensor unit = normalized_rows(direction, "direction");
  const Blocks b{blocks.mutable_data_ptr<uint8_t>(), blocks.size(0), shape.blocks_per_row};
  if (b.rows == 0 || b.per_row == 0) return;
  const float* d = unit.const_data_ptr<float>();
  const float s = static_cast<float>(scale);
  const Update u = shape.layout == GgufLayout::kMatrix ? column_update<Codec>(b, d, s) : row_update<Codec>(b, d, s);
  check_update_finite<Codec>(b, u);
  for_each_updated_block<Codec>(b, u, [](const float* values, uint8_t* block) { Codec::quantize(values, block); });
}

}  // namespace refusal::cpu::gguf
