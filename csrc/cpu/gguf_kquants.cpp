// refusal::orthogonalize_{q4_k,q5_k,q6_k} on the CPU: llama.cpp's K-quant super-blocks of 256
// values, edited in place (gguf_edit.h). The layouts and the quantizers (quantize_row_q*_K_ref,
// with make_qkx2_quants and make_qx_quants) are those of refusal_kernels/quant/gguf/kquants.py,
// operation for operation: fp32 sums in llama.cpp's order and nearest_int's rounding.
#include <torch/library.h>

#include "gguf_kquant_common.h"

namespace refusal::cpu::gguf {
namespace {

// ---- Q4_K and Q5_K: 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min.

constexpr int kSub = 32;

// nearest_int(63 / largest * value) stored in a uint8 and kept to 63; 0 when largest is 0.
inline void six_bit_codes(const float* values, float largest, int* codes) {
  const float inverse = largest > 0 ? 63.f / largest : 0.f;
  for (int j = 0; j < 8; ++j) codes[j] = std::min(nearest_int(inverse * values[j]) & 0xFF, 63);
}

inline void unpack_scales_and_mins(const uint8_t* s, int* scales, int* mins) {
  for (int j = 0; j < 4; ++j) {
    scales[j] = s[j] & 63;
    mins[j] = s[j + 4] & 63;
    scales[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
    mins[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

inline void pack_scales_and_mins(const int* scales, const int* mins, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>(scales[j] | ((scales[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>(mins[j] | ((mins[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((scales[j + 4] & 0xF) | ((mins[j + 4] & 0xF) << 4));
  }
}

// Q4_K (144 bytes): d, dmin, scales[12], qs[128]. Q5_K (176 bytes): the same with qh[32]
// (the fifth bits) before qs.
template <bool kFiveBits>
struct WithMins {
  static constexpr int kValues = kSuper;
  static constexpr int kBytes = kFiveBits ? 176 : 144;
  static constexpr int kQs = kFiveBits ? 48 : 16;
  static constexpr MinSearch kSearch = kFiveBits ? MinSearch{31, -0.5f, 0.1f, 15, false}
                                                  : MinSearch{15, -1.f, 0.1f, 20, false};

  static void dequantize(const uint8_t* block, float* values) {
    int scales[8], mins[8];
    unpack_scales_and_mins(block + 4, scales, mins);
    const float d = fp16_at(block);
    const float dmin = fp16_at(block + 2);
    const uint8_t* qs = block + kQs;
    for (int j = 0; j < 8; ++j) {
      const float step = d * static_cast<float>(scales[j]);
      const float offset = dmin * static_cast<float>(mins[j]);
      for (int l = 0; l < kSub; ++l) {
        // Sub-blocks 2c and 2c + 1 share the bytes qs[32c + l], low and high nibble.
        int q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF;
        if constexpr (kFiveBits) q |= ((block[16 + l] >> j) & 1) << 4;
        values[kSub * j + l] = step * static_cast<float>(q) - offset;
      }
    }
  }

  static void pack(const int* levels, uint8_t* block) {
    uint8_t* qs = block + kQs;
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < kSub; ++l) {
        qs[32 * c + l] = static_cast<uint8_t>((levels[64 * c + l] & 0xF) | ((levels[64 * c + 32 + l] & 0xF) << 4));
      }
    }
    if constexpr (kFiveBits) {
      for (int l = 0; l < kSub; ++l) {
        int high = 0;
        for (int j = 0; j < 8; ++j) high |= (levels[kSub * j + l] >> 4) << j;
        block[16 + l] = static_cast<uint8_t>(high);
      }
    }
  }

  // The fit of every sub-block, weights sqrt(mean x^2) + |x|.
  static void fit(const float* x, int* levels, float* scales, float* mins) {
    for (int j = 0; j < 8; ++j) {
      const float* xs = x + kSub * j;
      const float spread = std::sqrt(running_sum(kSub, [&](int i) { return xs[i] * xs[i]; }) / 32.f);
      float w[kSub];
      for (int i = 0; i < kSub; ++i) w[i] = spread + std::fabs(xs[i]);
      const MinFit f = make_qkx2_quants<kSub>(xs, w, kSearch, levels + kSub * j);
      scales[j] = f.scale;
      mins[j] = f.min;
    }
  }

  static void quantize(const float* x, uint8_t* block) {
    int levels[kSuper], scale_codes[8], min_codes[8];
    float scales[8], mins[8];
    fit(x, levels, scales, mins);
    const float largest_scale = positive_max(scales, 8);
    const float largest_min = positive_max(mins, 8);
    six_bit_codes(scales, largest_scale, scale_codes);
    six_bit_codes(mins, largest_min, min_codes);
    store_fp16(block, largest_scale / 63.f);
    store_fp16(block + 2, largest_min / 63.f);
    pack_scales_and_mins(scale_codes, min_codes, block + 4);
    const float d = fp16_at(block);
    const float dmin = fp16_at(block + 2);
    for (int j = 0; j < 8; ++j) {
      const float step = d * static_cast<float>(scale_codes[j]);
      const float offset = dmin * static_cast<float>(min_codes[j]);
      if (step == 0.f) continue;  // the sub-block keeps the levels of its own fit
      grid_levels_with_min(x + kSub * j, kSub, step, offset, kSearch.nmax, levels + kSub * j);
    }
    pack(levels, block);
  }
};

struct Q4_K : WithMins<false> {
  static constexpr const char* kName = "Q4_K";
};
struct Q5_K : WithMins<true> {
  static constexpr const char* kName = "Q5_K";
};

// ---- Q6_K: 16 sub-blocks of 16, each with an int8 scale.

constexpr int kSub6 = 16;
constexpr int kNmax6 = 32;

struct SignedSums {
  float lx;
  float l2;
};

// l = nearest_int(inverse * x) in -32..31, and the sums of w x l and w l^2 with w = x^2.
inline SignedSums signed_levels(const float* x, float inverse, int* l) {
  for (int i = 0; i < kSub6; ++i) l[i] = clamped(nearest_int(inverse * x[i]), -kNmax6, kNmax6 - 1);
  return {running_sum(kSub6, [&](int i) { return x[i] * x[i] * x[i] * static_cast<float>(l[i]); }),
          running_sum(kSub6, [&](int i) { return x[i] * x[i] * static_cast<float>(l[i]) * static_cast<float>(l[i]); })};
}

// make_qx_quants(16, 32, x, L, rmse_type=1, NULL): returns the scale, levels offset by 32.
float make_qx_quants(const float* x, int* levels) {
  const float largest = x[first_largest(x, kSub6)];
  if (std::fabs(largest) < kGroupMaxEps) {
    std::fill(levels, levels + kSub6, 0);
    return 0.f;
  }
  const SignedSums first = signed_levels(x, -static_cast<float>(kNmax6) / largest, levels);
  float scale = first.l2 != 0 ? first.lx / first.l2 : 0.f;
  float best = scale * first.lx;
  int trial[kSub6];
  for (int step = -9; step <= 9; ++step) {
    if (step == 0) continue;
    const float inverse = -(static_cast<float>(kNmax6) + 0.1f * static_cast<float>(step)) / largest;
    const SignedSums s = signed_levels(x, inverse, trial);
    if (s.l2 > 0 && s.lx * s.lx > best * s.l2) {
      std::copy(trial, trial + kSub6, levels);
      scale = s.lx / s.l2;
      best = scale * s.lx;
    }
  }
  for (int i = 0; i < kSub6; ++i) levels[i] += kNmax6;
  return scale;
}

// Q6_K (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], d.
struct Q6_K {
  static constexpr const char* kName = "Q6_K";
  static constexpr int kValues = kSuper;
  static constexpr int kBytes = 210;

  // Value 128h + 32t + l: nibble t / 2 of ql[64h + 32(t % 2) + l], bits 2t of qh[32h + l].
  static int level(const uint8_t* block, int i) {
    const int h = i / 128, t = (i % 128) / 32, l = i % 32;
    const int low = (block[64 * h + 32 * (t % 2) + l] >> (4 * (t / 2))) & 0xF;
    return low | (two_bit_field(block + 128, i) << 4);
  }

  static void dequantize(const uint8_t* block, float* values) {
    const float d = fp16_at(block + 208);
    for (int j = 0; j < kSuper / kSub6; ++j) {
      const float step = d * static_cast<float>(static_cast<int8_t>(block[192 + j]));
      for (int i = kSub6 * j; i < kSub6 * (j + 1); ++i) values[i] = step * static_cast<float>(level(block, i) - kNmax6);
    }
  }

  static void pack(const int* levels, uint8_t* block) {
    for (int h = 0; h < 2; ++h) {
      for (int p = 0; p < 64; ++p) {
        block[64 * h + p] =
            static_cast<uint8_t>((levels[128 * h + p] & 0xF) | ((levels[128 * h + 64 + p] & 0xF) << 4));
      }
    }
    pack_two_bit_fields(levels, 4, block + 128);
  }

  static void quantize(const float* x, uint8_t* block) {
    constexpr int kGroups = kSuper / kSub6;
    int levels[kSuper];
    float scales[kGroups];
    for (int j = 0; j < kGroups; ++j) scales[j] = make_qx_quants(x + kSub6 * j, levels + kSub6 * j);
    const LargestScale first = first_of_largest_magnitude(scales, kGroups);
    if (first.magnitude < kGroupMaxEps) {
      std::memset(block, 0, kBytes);
      return;
    }
    const float largest = scales[first.index];
    const float inverse = -128.f / largest;
    store_fp16(block + 208, 1.f / inverse);
    const float d = fp16_at(block + 208);
    for (int j = 0; j < kGroups; ++j) {
      const auto code = static_cast<int8_t>(std::min(nearest_int(inverse * scales[j]), 127));
      block[192 + j] = static_cast<uint8_t>(code);
      const float step = d * static_cast<float>(code);
      if (step == 0.f) continue;  // the sub-block keeps the levels of its own fit
      signed_grid_levels(x + kSub6 * j, kSub6, step, kNmax6, levels + kSub6 * j);
    }
    pack(levels, block);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(refusal, CPU, m) {
  m.impl("orthogonalize_q4_k", &orthogonalize<Q4_K>);
  m.impl("orthogonalize_q5_k", &orthogonalize<Q5_K>);
  m.impl("orthogonalize_q6_k", &orthogonalize<Q6_K>);
}

}  // namespace refusal::cpu::gguf
