// refusal::orthogonalize_{q2_k,q3_k} on the CPU: llama.cpp's low-bit K-quant super-blocks of 256
// values in 16 sub-blocks of 16, edited in place (gguf_edit.h). The layouts and the quantizers
// (quantize_row_q2_K_ref with make_qkx2_quants, quantize_row_q3_K_ref with make_q3_quants) are
// those of refusal_kernels/quant/gguf/kquants_low.py, operation for operation.
#include <torch/library.h>

#include "gguf_kquant_common.h"

namespace refusal::cpu::gguf {
namespace {

constexpr int kSub = 16;
constexpr int kGroups = kSuper / kSub;

// ---- Q2_K (84 bytes): scales[16] (4-bit scale | 4-bit min << 4), qs[64] (2 bits), d, dmin.

struct Q2_K {
  static constexpr const char* kName = "Q2_K";
  static constexpr int kValues = kSuper;
  static constexpr int kBytes = 84;
  // quantize_row_q2_K_ref's make_qkx2_quants: nmax 3, rmin -0.5, rdelta 0.1, nstep 15, use_mad.
  static constexpr MinSearch kSearch{3, -0.5f, 0.1f, 15, true};
  static constexpr float kScaleMax = 15.f;  // its q4scale

  static void dequantize(const uint8_t* block, float* values) {
    const float d = fp16_at(block + 80);
    const float dmin = fp16_at(block + 82);
    for (int j = 0; j < kGroups; ++j) {
      const float step = d * static_cast<float>(block[j] & 0xF);
      const float offset = dmin * static_cast<float>(block[j] >> 4);
      for (int i = kSub * j; i < kSub * (j + 1); ++i) {
        values[i] = step * static_cast<float>(two_bit_field(block + 16, i)) - offset;
      }
    }
  }

  // nearest_int(15 / largest * value), 0 when largest is 0; not kept to 4 bits, as in llama.cpp.
  static void four_bit_codes(const float* values, float largest, int* codes) {
    const float inverse = largest > 0 ? kScaleMax / largest : 0.f;
    for (int j = 0; j < kGroups; ++j) codes[j] = nearest_int(inverse * values[j]);
  }

  static void quantize(const float* x, uint8_t* block) {
    int levels[kSuper], scale_codes[kGroups], min_codes[kGroups];
    float scales[kGroups], mins[kGroups];
    for (int j = 0; j < kGroups; ++j) {
      const float* xs = x + kSub * j;
      float w[kSub];
      for (int i = 0; i < kSub; ++i) w[i] = std::fabs(xs[i]);
      const MinFit f = make_qkx2_quants<kSub>(xs, w, kSearch, levels + kSub * j);
      scales[j] = f.scale;
      mins[j] = f.min;
    }
    const float largest_scale = positive_max(scales, kGroups);
    const float largest_min = positive_max(mins, kGroups);
    four_bit_codes(scales, largest_scale, scale_codes);
    four_bit_codes(mins, largest_min, min_codes);
    store_fp16(block + 80, largest_scale / kScaleMax);
    store_fp16(block + 82, largest_min / kScaleMax);
    const float d = fp16_at(block + 80);
    const float dmin = fp16_at(block + 82);
    for (int j = 0; j < kGroups; ++j) {
      // The scale's int, then the min's shifted by 4 ORed in, stored in a byte.
      block[j] = static_cast<uint8_t>(static_cast<uint32_t>(scale_codes[j]) |
                                      static_cast<uint32_t>(min_codes[j]) << 4);
      const float step = d * static_cast<float>(block[j] & 0xF);
      const float offset = dmin * static_cast<float>(block[j] >> 4);
      if (step == 0.f) continue;  // the sub-block keeps the levels of its own fit
      grid_levels_with_min(x + kSub * j, kSub, step, offset, kSearch.nmax, levels + kSub * j);
    }
    pack_two_bit_fields(levels, 0, block + 16);
  }
};

// ---- Q3_K (110 bytes): hmask[32] (third bits), qs[64] (low 2 bits), scales[12] (6 bits), d.

constexpr int kNmax3 = 4;
constexpr int kScaleNmax3 = 32;
constexpr int kTries3 = 5;

// w = x^2; l_i are the levels in -4..3.
struct Q3Sums {
  float lx;  // sum of w x l
  float l2;  // sum of w l^2
};

// One try of make_q3_quants' coordinate descent: each value in turn moves to the level that fits
// the others' least squares scale, if that lowers the weighted error. Returns whether one moved.
bool q3_sweep(const float* x, int* levels, Q3Sums& sums) {
  bool changed = false;
  for (int i = 0; i < kSub; ++i) {
    const float weight = x[i] * x[i];
    const float weighted = weight * x[i];
    const float level = static_cast<float>(levels[i]);
    const float rest_lx = sums.lx - weighted * level;
    if (!(rest_lx > 0)) continue;
    const float rest_l2 = sums.l2 - weight * level * level;
    const int candidate = clamped(nearest_int(x[i] * rest_l2 / rest_lx), -kNmax3, kNmax3 - 1);
    if (candidate == levels[i]) continue;
    const float moved = static_cast<float>(candidate);
    const float trial_lx = rest_lx + weighted * moved;
    const float trial_l2 = rest_l2 + weight * moved * moved;
    if (trial_l2 > 0 && trial_lx * trial_lx * sums.l2 > sums.lx * sums.lx * trial_l2) {
      levels[i] = candidate;
      sums = {trial_lx, trial_l2};
      changed = true;
    }
  }
  return changed;
}

// make_q3_quants(16, 4, x, L, do_rmse=true): returns the scale, levels offset by 4.
float make_q3_quants(const float* x, int* levels) {
  const float largest = x[first_largest(x, kSub)];
  if (std::fabs(largest) < kGroupMaxEps) {
    std::fill(levels, levels + kSub, 0);
    return 0.f;
  }
  const float inverse = -static_cast<float>(kNmax3) / largest;
  for (int i = 0; i < kSub; ++i) {
    levels[i] = clamped(nearest_int(inverse * x[i]), -kNmax3, kNmax3 - 1);
  }
  auto weight = [&](int i) { return x[i] * x[i]; };
  auto level = [&](int i) { return static_cast<float>(levels[i]); };
  Q3Sums sums{running_sum(kSub, [&](int i) { return weight(i) * x[i] * level(i); }),
              running_sum(kSub, [&](int i) { return weight(i) * level(i) * level(i); })};
  for (int attempt = 0; attempt < kTries3; ++attempt) {
    // A try that moves nothing leaves the next one nothing to move either.
    if (!q3_sweep(x, levels, sums)) break;
  }
  for (int i = 0; i < kSub; ++i) levels[i] += kNmax3;
  return sums.l2 > 0 ? sums.lx / sums.l2 : 0.f;
}

struct Q3_K {
  static constexpr const char* kName = "Q3_K";
  static constexpr int kValues = kSuper;
  static constexpr int kBytes = 110;

  // The 6-bit code s_j: low 4 bits from nibble j / 8 of byte j % 8, high 2 bits from bits
  // 2(j / 4) of byte 8 + j % 4.
  static int scale_code(const uint8_t* scales, int j) {
    const int low = (scales[j % 8] >> (4 * (j / 8))) & 0xF;
    return low | ((scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4;
  }

  static void pack_scale_codes(const int* codes, uint8_t* scales) {
    for (int j = 0; j < 8; ++j) {
      scales[j] = static_cast<uint8_t>((codes[j] & 0xF) | (codes[j + 8] & 0xF) << 4);
    }
    for (int l = 0; l < 4; ++l) {
      int high = 0;
      for (int k = 0; k < 4; ++k) high |= (codes[4 * k + l] >> 4) << (2 * k);
      scales[8 + l] = static_cast<uint8_t>(high);
    }
  }

  static void dequantize(const uint8_t* block, float* values) {
    const float d = fp16_at(block + 108);
    for (int j = 0; j < kGroups; ++j) {
      const float step = d * static_cast<float>(scale_code(block + 96, j) - kScaleNmax3);
      for (int i = kSub * j; i < kSub * (j + 1); ++i) {
        const int level = two_bit_field(block + 32, i) | ((block[i % 32] >> (i / 32)) & 1) << 2;
        values[i] = step * static_cast<float>(level - kNmax3);
      }
    }
  }

  static void pack(const int* levels, uint8_t* block) {
    for (int l = 0; l < 32; ++l) {
      int third_bits = 0;
      for (int b = 0; b < 8; ++b) third_bits |= (levels[32 * b + l] >> 2) << b;
      block[l] = static_cast<uint8_t>(third_bits);
    }
    pack_two_bit_fields(levels, 0, block + 32);
  }

  static void quantize(const float* x, uint8_t* block) {
    int levels[kSuper], codes[kGroups];
    float scales[kGroups];
    for (int j = 0; j < kGroups; ++j) scales[j] = make_q3_quants(x + kSub * j, levels + kSub * j);
    const float largest = scales[first_of_largest_magnitude(scales, kGroups).index];
    const bool has_scale = largest != 0;
    const float inverse = -static_cast<float>(kScaleNmax3) / largest;
    for (int j = 0; j < kGroups; ++j) {
      // nearest_int stored in an int8, then kept to -32..31 and offset; all zero without a scale.
      const int code = static_cast<int8_t>(nearest_int(inverse * scales[j]));
      codes[j] = has_scale ? clamped(code, -kScaleNmax3, kScaleNmax3 - 1) + kScaleNmax3 : 0;
    }
    pack_scale_codes(codes, block + 96);
    store_fp16(block + 108, has_scale ? 1.f / inverse : 0.f);
    const float d = fp16_at(block + 108);
    for (int j = 0; j < kGroups; ++j) {
      const float step = d * static_cast<float>(codes[j] - kScaleNmax3);
      if (step == 0.f) continue;  // the sub-block keeps the levels of its own fit
      signed_grid_levels(x + kSub * j, kSub, step, kNmax3, levels + kSub * j);
    }
    pack(levels, block);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(refusal, CPU, m) {
  m.impl("orthogonalize_q2_k", &orthogonalize<Q2_K>);
  m.impl("orthogonalize_q3_k", &orthogonalize<Q3_K>);
}

}  // namespace refusal::cpu::gguf
