// refusal::orthogonalize_<format> on the CPU: W <- W - s * d (d^T W) on quantized storage,
// requantized with fresh scales (and zeros) chosen from the updated values. Never a full-
// precision copy of W: scales and zeros are decoded into O(groups) fp32 vectors, each worker
// holds at most one dequantized row, and the matrix is streamed twice (or three times):
//   1. c = d^T W, dequantizing on the fly in fp32;
//   2. (formats whose scales span several rows) the updated absmax of every block, without
//      writing, so that shared and global scales are known before any value is written;
//   3. each group is dequantized, updated with -s * d_i * c_j, and requantized in place.
// Fresh scales are rounded up to their storage dtype, so every updated value fits the
// format's range: nothing is clamped except exact ties at the edge, which are equally near.
// The pure-torch references with the same rules are refusal_kernels/quant/<format>.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "../quant_checks.h"
#include "../quant_rules.h"
#include "vec_ops.h"

namespace refusal::cpu {
namespace {

std::vector<float> to_float_vector(const at::Tensor& t) {
  const at::Tensor values = t.to(at::kFloat).contiguous();
  return {values.const_data_ptr<float>(), values.const_data_ptr<float>() + values.numel()};
}

// Writes values (already representable in t's dtype) back into t.
void store_floats(at::Tensor& t, std::vector<float>& values) {
  t.copy_(at::from_blob(values.data(), t.sizes(), at::kFloat));
}

// c[j] = sum_i d[i] * W[i, j] for a row-major [rows, cols] weight that dequantize_row(i, row)
// decodes one row at a time; row blocks sum into their own partial vectors, then combine.
template <typename DequantizeRow>
std::vector<float> column_dot(const float* d, int64_t rows, int64_t cols, const DequantizeRow& dequantize_row) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  std::vector<float> partial(blocks * cols, 0.f);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(cols);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = rows * b / blocks; i < rows * (b + 1) / blocks; ++i) {
        dequantize_row(i, row.data());
        accumulate(partial.data() + b * cols, d[i], row.data(), cols);
      }
    }
  });
  std::vector<float> c(partial.begin(), partial.begin() + cols);
  for (int64_t b = 1; b < blocks; ++b) accumulate(c.data(), 1.f, partial.data() + b * cols, cols);
  return c;
}

// ---- int8 per row and fp8 per tensor / row / block: row-major [out, in], one scale per block.

struct Int8Codec {
  using Storage = int8_t;
  static constexpr float kMax = kInt8Max;
  static float decode(Storage q) { return static_cast<float>(q); }
  static Storage encode(float x) { return static_cast<Storage>(std::clamp(std::nearbyint(x), -kMax, kMax)); }
};

struct Fp8Codec {
  using Storage = c10::Float8_e4m3fn;
  static constexpr float kMax = kFp8Max;
  static float decode(Storage q) { return static_cast<float>(q); }
  static Storage encode(float x) { return Storage(std::clamp(x, -kMax, kMax)); }
};

// weight [rows, cols]; scales [ceil(rows / block_rows), ceil(cols / block_cols)] (flattened),
// W = q * scales[block] / scale_divisor.
template <typename Codec, typename ScaleT>
void orthogonalize_block_scaled(at::Tensor& weight, at::Tensor& scales, int64_t block_rows, int64_t block_cols,
                                float scale_divisor, const at::Tensor& direction, double scale) {
  using Storage = typename Codec::Storage;
  const at::Tensor unit = normalized_rows(direction, "direction");
  const float* d = unit.const_data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t rows = weight.size(0);
  const int64_t cols = weight.size(1);
  const int64_t grid_cols = ceil_div(cols, block_cols);
  Storage* q = weight.mutable_data_ptr<Storage>();
  std::vector<float> old_step = to_float_vector(scales);
  for (float& step : old_step) step /= scale_divisor;

  auto dequantize_row = [&](int64_t i, float* row) {
    const float* step = old_step.data() + (i / block_rows) * grid_cols;
    for (int64_t j = 0; j < cols; ++j) row[j] = Codec::decode(q[i * cols + j]) * step[j / block_cols];
  };
  const std::vector<float> c = column_dot(d, rows, cols, dequantize_row);
  auto updated_row = [&](int64_t i, float* row) {
    dequantize_row(i, row);
    subtract_scaled(row, s * d[i], c.data(), cols);
  };

  // Updated absmax per block: rows go in chunks that stay inside one block row, enough
  // chunks to keep every thread busy even for a single (per-tensor) block.
  const int64_t chunk_rows = std::clamp<int64_t>(ceil_div(rows, 4 * at::get_num_threads()), 1, block_rows);
  const int64_t chunks_per_block_row = ceil_div(block_rows, chunk_rows);
  const int64_t grid_rows = ceil_div(rows, block_rows);
  std::vector<float> chunk_absmax(grid_rows * chunks_per_block_row * grid_cols, 0.f);
  at::parallel_for(0, grid_rows * chunks_per_block_row, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(cols);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = (chunk / chunks_per_block_row) * block_rows + (chunk % chunks_per_block_row) * chunk_rows;
      const int64_t last = std::min({first + chunk_rows, rows, (chunk / chunks_per_block_row + 1) * block_rows});
      float* absmax = chunk_absmax.data() + chunk * grid_cols;
      for (int64_t i = first; i < last; ++i) {
        updated_row(i, row.data());
        for (int64_t j = 0; j < cols; ++j) absmax[j / block_cols] = std::max(absmax[j / block_cols], std::abs(row[j]));
      }
    }
  });
  std::vector<float> new_step(grid_rows * grid_cols);
  std::vector<float> stored(grid_rows * grid_cols);
  for (int64_t b = 0; b < grid_rows * grid_cols; ++b) {
    float absmax = 0.f;
    for (int64_t k = 0; k < chunks_per_block_row; ++k) {
      absmax = std::max(absmax, chunk_absmax[((b / grid_cols) * chunks_per_block_row + k) * grid_cols + b % grid_cols]);
    }
    new_step[b] = symmetric_scale<ScaleT>(absmax, Codec::kMax);
    stored[b] = round_up_to<ScaleT>(new_step[b] * scale_divisor);
  }

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(cols);
    for (int64_t i = begin; i < end; ++i) {
      updated_row(i, row.data());
      const float* step = new_step.data() + (i / block_rows) * grid_cols;
      for (int64_t j = 0; j < cols; ++j) q[i * cols + j] = Codec::encode(row[j] / step[j / block_cols]);
    }
  });
  store_floats(scales, stored);
}

void orthogonalize_int8(at::Tensor& qweight, at::Tensor& row_scale, const at::Tensor& direction, double scale,
                        bool absmax_scale) {
  check_int8(qweight, row_scale, direction, scale);
  REFUSAL_DISPATCH_FLOATS(row_scale.scalar_type(), "refusal::orthogonalize_int8", [&] {
    orthogonalize_block_scaled<Int8Codec, scalar_t>(qweight, row_scale, 1, qweight.size(1),
                                                    absmax_scale ? kInt8Max : 1.f, direction, scale);
  });
}

void orthogonalize_fp8(at::Tensor& weight, at::Tensor& weight_scale, const at::Tensor& direction, double scale) {
  const auto [block_rows, block_cols] = check_fp8(weight, weight_scale, direction, scale);
  REFUSAL_DISPATCH_FLOATS(weight_scale.scalar_type(), "refusal::orthogonalize_fp8", [&] {
    orthogonalize_block_scaled<Fp8Codec, scalar_t>(weight, weight_scale, block_rows, block_cols, 1.f, direction,
                                                   scale);
  });
}

// ---- int4 group-wise asymmetric (GPTQ, AWQ): W[i, j] = scale[g, i] * (q[i, j] - z[g, i]).

// Where the nibble of (output i, input j) and the zero of (group g, output i) live.
struct GptqLayout {
  int32_t* qweight;  // [in / 8, out], packed along in
  int64_t out;
  int zero_min;  // qzeros hold z - zero_min (1 in v1, 0 in v2)
  int32_t* word(int64_t i, int64_t j) const { return qweight + (j >> 3) * out + i; }
  static int shift(int64_t i, int64_t j) { return 4 * static_cast<int>(j & 7); }
  static int zero_shift(int64_t i) { return 4 * static_cast<int>(i & 7); }
};

// AWQ packs outputs 8w + (0, 2, 4, 6, 1, 3, 5, 7)[k] at bits 4k of word w.
constexpr std::array<int, 8> kAwqNibbleOfOutput = {0, 4, 1, 5, 2, 6, 3, 7};

struct AwqLayout {
  int32_t* qweight;  // [in, out / 8], packed along out
  int64_t out;
  static constexpr int zero_min = 0;
  int32_t* word(int64_t i, int64_t j) const { return qweight + j * (out >> 3) + (i >> 3); }
  static int shift(int64_t i, int64_t j) { return zero_shift(i); }
  static int zero_shift(int64_t i) { return 4 * kAwqNibbleOfOutput[i & 7]; }
};

inline int nibble(int32_t word, int shift) { return (static_cast<uint32_t>(word) >> shift) & 0xF; }

inline void set_nibble(int32_t* word, int shift, int value) {
  const uint32_t cleared = static_cast<uint32_t>(*word) & ~(0xFu << shift);
  *word = static_cast<int32_t>(cleared | (static_cast<uint32_t>(value) << shift));
}

template <typename Layout, typename ScaleT>
void orthogonalize_int4(const Layout& layout, at::Tensor& qzeros, at::Tensor& scales, const at::Tensor& group_index,
                        int64_t in, int64_t groups, const at::Tensor& direction, double scale) {
  const int64_t out = layout.out;
  const at::Tensor unit = normalized_rows(direction, "direction");
  const float* d = unit.const_data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t* group = group_index.const_data_ptr<int64_t>();
  std::vector<float> step = to_float_vector(scales);  // [groups, out], updated in place
  std::vector<int> zero(groups * out);
  const int32_t* packed_zeros = qzeros.const_data_ptr<int32_t>();
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < out; ++i) {
      zero[g * out + i] = nibble(packed_zeros[g * (out / 8) + i / 8], Layout::zero_shift(i)) + layout.zero_min;
    }
  }
  auto dequantized = [&](int64_t i, int64_t j) {
    const int64_t k = group[j] * out + i;
    return step[k] * static_cast<float>(nibble(*layout.word(i, j), Layout::shift(i, j)) - zero[k]);
  };

  // 1. c[j], one input column at a time (contiguous words along out in both layouts).
  std::vector<float> c(in);
  at::parallel_for(0, in, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float sum = 0.f;
      for (int64_t i = 0; i < out; ++i) sum += d[i] * dequantized(i, j);
      c[j] = sum;
    }
  });

  // Input columns sorted by group (act-order groups are not contiguous).
  std::vector<int64_t> group_start(groups + 1, 0);
  for (int64_t j = 0; j < in; ++j) ++group_start[group[j] + 1];
  for (int64_t g = 0; g < groups; ++g) group_start[g + 1] += group_start[g];
  std::vector<int64_t> members(in);
  std::vector<int64_t> fill(group_start.begin(), group_start.end() - 1);
  for (int64_t j = 0; j < in; ++j) members[fill[group[j]]++] = j;

  // 2. Per chunk of outputs (whole packed words along out) and group: range of the updated
  // values, fresh scale and zero, then requantize. Each (group, output) is touched once.
  constexpr int64_t kChunk = 64;
  at::parallel_for(0, ceil_div(out, kChunk), 1, [&](int64_t begin, int64_t end) {
    std::array<float, kChunk> low, high, old_step, new_step;
    std::array<int, kChunk> old_zero, new_zero;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * kChunk;
      const int64_t width = std::min(kChunk, out - first);
      for (int64_t g = 0; g < groups; ++g) {
        low.fill(0.f);
        high.fill(0.f);
        for (int64_t m = group_start[g]; m < group_start[g + 1]; ++m) {
          const int64_t j = members[m];
          for (int64_t k = 0; k < width; ++k) {
            const float w = dequantized(first + k, j) - s * d[first + k] * c[j];
            low[k] = std::min(low[k], w);
            high[k] = std::max(high[k], w);
          }
        }
        for (int64_t k = 0; k < width; ++k) {
          const int64_t index = g * out + first + k;
          old_step[k] = step[index];
          old_zero[k] = zero[index];
          asymmetric_scale_zero<ScaleT>(low[k], high[k], layout.zero_min, &new_step[k], &new_zero[k]);
        }
        for (int64_t m = group_start[g]; m < group_start[g + 1]; ++m) {
          const int64_t j = members[m];
          for (int64_t k = 0; k < width; ++k) {
            const int64_t i = first + k;
            int32_t* word = layout.word(i, j);
            const int shift = Layout::shift(i, j);
            const float w = old_step[k] * static_cast<float>(nibble(*word, shift) - old_zero[k]) - s * d[i] * c[j];
            set_nibble(word, shift, quantize_int4(w, new_step[k], new_zero[k]));
          }
        }
        for (int64_t k = 0; k < width; ++k) {
          step[g * out + first + k] = new_step[k];
          zero[g * out + first + k] = new_zero[k];
        }
      }
    }
  });

  int32_t* zeros_out = qzeros.mutable_data_ptr<int32_t>();
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < out; ++i) {
      set_nibble(zeros_out + g * (out / 8) + i / 8, Layout::zero_shift(i), zero[g * out + i] - layout.zero_min);
    }
  }
  store_floats(scales, step);
}

void orthogonalize_gptq(at::Tensor& qweight, at::Tensor& qzeros, at::Tensor& scales,
                        const std::optional<at::Tensor>& g_idx, const at::Tensor& direction, int64_t group_size,
                        double scale, c10::string_view zeros_format) {
  const auto [in, out] = check_gptq(qweight, qzeros, scales, g_idx, direction, group_size, scale, zeros_format);
  const int zero_min = gptq_zero_min(zeros_format);
  const int64_t groups = in / group_size;
  at::Tensor group_index = g_idx.has_value() ? g_idx->to(at::kLong).contiguous()
                                             : at::arange(in, qweight.options().dtype(at::kLong)).floor_divide_(group_size);
  if (g_idx.has_value() && in > 0) {
    const int64_t low = group_index.min().item<int64_t>();
    const int64_t high = group_index.max().item<int64_t>();
    TORCH_CHECK_VALUE(low >= 0 && high < groups, "g_idx holds groups in [", low, ", ", high, "] but scales has ",
                      groups, " groups");
  }
  REFUSAL_DISPATCH_FLOATS(scales.scalar_type(), "refusal::orthogonalize_gptq", [&] {
    orthogonalize_int4<GptqLayout, scalar_t>(GptqLayout{qweight.mutable_data_ptr<int32_t>(), out, zero_min}, qzeros,
                                             scales, group_index, in, groups, direction, scale);
  });
}

void orthogonalize_awq(at::Tensor& qweight, at::Tensor& qzeros, at::Tensor& scales, const at::Tensor& direction,
                       int64_t group_size, double scale) {
  const auto [in, out] = check_awq(qweight, qzeros, scales, direction, group_size, scale);
  const at::Tensor group_index = at::arange(in, qweight.options().dtype(at::kLong)).floor_divide_(group_size);
  REFUSAL_DISPATCH_FLOATS(scales.scalar_type(), "refusal::orthogonalize_awq", [&] {
    orthogonalize_int4<AwqLayout, scalar_t>(AwqLayout{qweight.mutable_data_ptr<int32_t>(), out}, qzeros, scales,
                                            group_index, in, in / group_size, direction, scale);
  });
}

// ---- NF4: flat blocks of `blocksize` values, 4-bit indices into a 16-level code, high nibble first.

int nearest_level(float x, const float* code) {
  int best = 0;
  for (int k = 1; k < 16; ++k) {
    if (std::abs(x - code[k]) < std::abs(x - code[best])) best = k;
  }
  return best;
}

void orthogonalize_nf4(at::Tensor& packed, at::Tensor& absmax, const at::Tensor& code, const at::Tensor& direction,
                       int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                       const std::optional<at::Tensor>& nested_offset, const std::optional<at::Tensor>& nested_code,
                       int64_t nested_blocksize, double scale) {
  const auto [rows, cols] = check_nf4(packed, absmax, code, direction, blocksize, nested_absmax, nested_offset,
                                      nested_code, nested_blocksize, scale);
  const at::Tensor unit = normalized_rows(direction, "direction");
  const float* d = unit.const_data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t numel = rows * cols;
  const int64_t blocks = absmax.numel();
  const bool nested = nested_absmax.has_value();
  const std::vector<float> levels = to_float_vector(code);
  const std::vector<float> nested_levels = nested ? to_float_vector(*nested_code) : std::vector<float>();
  uint8_t* bytes = packed.mutable_data_ptr<uint8_t>();
  auto decode_absmax = [&](const std::vector<float>& nested_scale, float offset, const uint8_t* indices) {
    std::vector<float> decoded(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      decoded[b] = nested_levels[indices[b]] * nested_scale[b / nested_blocksize] + offset;
    }
    return decoded;
  };
  const std::vector<float> old_absmax =
      nested ? decode_absmax(to_float_vector(*nested_absmax), nested_offset->item<float>(),
                             absmax.const_data_ptr<uint8_t>())
             : to_float_vector(absmax);
  auto dequantized = [&](int64_t k) {
    const int level = (bytes[k / 2] >> (k % 2 == 0 ? 4 : 0)) & 0xF;
    return levels[level] * old_absmax[k / blocksize];
  };
  auto updated = [&](int64_t k, const std::vector<float>& c) {
    return dequantized(k) - s * d[k / cols] * c[k % cols];
  };

  const std::vector<float> c = column_dot(d, rows, cols, [&](int64_t i, float* row) {
    for (int64_t j = 0; j < cols; ++j) row[j] = dequantized(i * cols + j);
  });

  std::vector<float> new_absmax(blocks);
  at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float m = 0.f;
      for (int64_t k = b * blocksize; k < std::min(numel, (b + 1) * blocksize); ++k) m = std::max(m, std::abs(updated(k, c)));
      new_absmax[b] = m;
    }
  });

  // Double quantization: the offset (mean absmax) and nested scales come from every updated
  // absmax; each absmax then rounds up to the next nested level so that it still covers its block.
  std::vector<float> effective = new_absmax;
  std::vector<uint8_t> indices;
  std::vector<float> nested_scale;
  float offset = 0.f;
  if (nested) {
    double total = 0.0;
    for (float m : new_absmax) total += m;
    offset = static_cast<float>(total / static_cast<double>(blocks));
    nested_scale.assign(ceil_div(blocks, nested_blocksize), 0.f);
    for (int64_t b = 0; b < blocks; ++b) {
      float& top = nested_scale[b / nested_blocksize];
      top = std::max(top, std::abs(new_absmax[b] - offset));
    }
    for (float& top : nested_scale) top = top > 0.f ? top : 1.f;
    indices.resize(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      const float x = (new_absmax[b] - offset) / nested_scale[b / nested_blocksize];
      const auto it = std::lower_bound(nested_levels.begin(), nested_levels.end(), x);
      indices[b] = static_cast<uint8_t>(std::min<int64_t>(it - nested_levels.begin(), 255));
    }
    effective = decode_absmax(nested_scale, offset, indices.data());
  }

  // Blocks hold whole bytes (blocksize is even), so workers never share a byte.
  at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float top = effective[b];
      for (int64_t k = b * blocksize; k < std::min(numel, (b + 1) * blocksize); k += 2) {
        const float hi = top > 0.f ? updated(k, c) / top : 0.f;
        const float lo = top > 0.f ? updated(k + 1, c) / top : 0.f;
        bytes[k / 2] = static_cast<uint8_t>((nearest_level(hi, levels.data()) << 4) | nearest_level(lo, levels.data()));
      }
    }
  });

  if (nested) {
    std::copy(indices.begin(), indices.end(), absmax.mutable_data_ptr<uint8_t>());
    at::Tensor nested_absmax_out = *nested_absmax;
    store_floats(nested_absmax_out, nested_scale);
    nested_offset->fill_(offset);
  } else {
    store_floats(absmax, new_absmax);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(refusal, CPU, m) {
  m.impl("orthogonalize_int8", &orthogonalize_int8);
  m.impl("orthogonalize_gptq", &orthogonalize_gptq);
  m.impl("orthogonalize_awq", &orthogonalize_awq);
  m.impl("orthogonalize_fp8", &orthogonalize_fp8);
  m.impl("orthogonalize_nf4", &orthogonalize_nf4);
}

}  // namespace refusal::cpu
