// refusal::orthogonalize_{q4_k,q5_k,q6_k} on the CPU: llama.cpp's K-quant super-blocks of 256
// values, edited in place (gguf_edit.h). The layouts and the quantizers (quantize_row_q*_K_ref,
// with make_qkx2_quants and make_qx_quants) are those of refusal_kernels/quant/gguf/kquants.py,
// operation for operation: fp32 sums in llama.cpp's order and nearest_int's rounding.
#include <torch/library.h>

#include "gguf_edit.h"

namespace refusal::cpu::gguf {
namespace {

constexpr int kSuper = 256;
// llama.cpp's GROUP_MAX_EPS: a group whose largest magnitude is below it is stored as zeros.
constexpr float kGroupMaxEps = 1e-15f;

// llama.cpp's nearest_int: adding 1.5 * 2^23 leaves round(x) (ties to even) in the low 23 bits.
inline int nearest_int(float value) {
  const float shifted = value + 12582912.f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  return (bits & 0x7FFFFF) - 0x400000;
}

inline int clamped(int value, int low, int high) { return std::min(std::max(value, low), high); }

// ---- Q4_K and Q5_K: 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min.

constexpr int kSub = 32;

// The parameters of make_qkx2_quants' search over scales and mins.
struct MinSearch {
  int nmax;
  float rmin;
  float rdelta;
  int nstep;
};

// x ~ scale * level - min over one sub-block.
struct MinFit {
  float scale;
  float min;
};

struct LevelSums {
  float l;
  float l2;
  float xl;
};

inline LevelSums level_sums(const float* x, const float* w, const int* l) {
  auto weighted = [&](int i) { return w[i] * static_cast<float>(l[i]); };
  LevelSums s{weighted(0), weighted(0) * static_cast<float>(l[0]), weighted(0) * x[0]};
  for (int i = 1; i < kSub; ++i) {
    s.l += weighted(i);
    s.l2 += weighted(i) * static_cast<float>(l[i]);
    s.xl += weighted(i) * x[i];
  }
  return s;
}

inline float weighted_error(const float* x, const float* w, const int* l, float scale, float low) {
  return running_sum(kSub, [&](int i) {
    const float diff = (scale * static_cast<float>(l[i]) + low) - x[i];
    return w[i] * (diff * diff);
  });
}

inline void levels_from(const float* x, float inverse, float low, int nmax, int* l) {
  for (int i = 0; i < kSub; ++i) l[i] = clamped(nearest_int(inverse * (x[i] - low)), 0, nmax);
}

// make_qkx2_quants (use_mad false); each step of the search starts from the best min so far.
MinFit make_qkx2_quants(const float* x, const float* w, const MinSearch& search, int* levels) {
  float low = *std::min_element(x, x + kSub);
  const float high = *std::max_element(x, x + kSub);
  if (low > 0) low = 0.f;
  if (high == low) {
    std::fill(levels, levels + kSub, 0);
    return {0.f, -low};
  }
  const float sum_w = running_sum(kSub, [&](int i) { return w[i]; });
  const float sum_x = running_sum(kSub, [&](int i) { return w[i] * x[i]; });
  float inverse = static_cast<float>(search.nmax) / (high - low);
  float scale = 1.f / inverse;
  levels_from(x, inverse, low, search.nmax, levels);
  float best_error = weighted_error(x, w, levels, scale, low);
  int trial[kSub];
  for (int step = 0; step <= search.nstep; ++step) {
    inverse = (search.rmin + search.rdelta * static_cast<float>(step) + static_cast<float>(search.nmax)) / (high - low);
    levels_from(x, inverse, low, search.nmax, trial);
    const LevelSums s = level_sums(x, w, trial);
    const float determinant = sum_w * s.l2 - s.l * s.l;
    if (!(determinant > 0)) continue;
    float trial_scale = (sum_w * s.xl - sum_x * s.l) / determinant;
    float trial_min = (s.l2 * sum_x - s.l * s.xl) / determinant;
    if (trial_min > 0) {
      trial_min = 0.f;
      trial_scale = s.xl / s.l2;
    }
    const float error = weighted_error(x, w, trial, trial_scale, trial_min);
    if (error < best_error) {
      std::copy(trial, trial + kSub, levels);
      best_error = error;
      scale = trial_scale;
      low = trial_min;
    }
  }
  return {scale, -low};
}

// The largest of values that is above 0, or 0: what a scan `if (v > best) best = v` from 0 finds.
inline float positive_max(const float* values, int n) {
  float best = 0.f;
  for (int k = 0; k < n; ++k) best = values[k] > best ? values[k] : best;
  return best;
}

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
  static constexpr MinSearch kSearch = kFiveBits ? MinSearch{31, -0.5f, 0.1f, 15} : MinSearch{15, -1.f, 0.1f, 20};

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
      const MinFit f = make_qkx2_quants(xs, w, kSearch, levels + kSub * j);
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
      for (int i = kSub * j; i < kSub * (j + 1); ++i) {
        levels[i] = clamped(nearest_int((x[i] + offset) / step), 0, kSearch.nmax);
      }
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

// The index of the first value of largest magnitude.
inline int first_largest(const float* values, int n) {
  int first = 0;
  for (int k = 1; k < n; ++k) {
    if (std::fabs(values[k]) > std::fabs(values[first])) first = k;
  }
  return first;
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
    return low | (((block[128 + 32 * h + l] >> (2 * t)) & 3) << 4);
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
      for (int l = 0; l < 32; ++l) {
        int high = 0;
        for (int t = 0; t < 4; ++t) high |= (levels[128 * h + 32 * t + l] >> 4) << (2 * t);
        block[128 + 32 * h + l] = static_cast<uint8_t>(high);
      }
    }
  }

  static void quantize(const float* x, uint8_t* block) {
    constexpr int kGroups = kSuper / kSub6;
    int levels[kSuper];
    float scales[kGroups];
    for (int j = 0; j < kGroups; ++j) scales[j] = make_qx_quants(x + kSub6 * j, levels + kSub6 * j);
    // The first scale of largest magnitude, as the scan `if (|s| > best)` from 0 finds it.
    int first = 0;
    float magnitude = 0.f;
    for (int j = 0; j < kGroups; ++j) {
      if (std::fabs(scales[j]) > magnitude) {
        magnitude = std::fabs(scales[j]);
        first = j;
      }
    }
    if (magnitude < kGroupMaxEps) {
      std::memset(block, 0, kBytes);
      return;
    }
    const float largest = scales[first];
    const float inverse = -128.f / largest;
    store_fp16(block + 208, 1.f / inverse);
    const float d = fp16_at(block + 208);
    for (int j = 0; j < kGroups; ++j) {
      const auto code = static_cast<int8_t>(std::min(nearest_int(inverse * scales[j]), 127));
      block[192 + j] = static_cast<uint8_t>(code);
      const float step = d * static_cast<float>(code);
      if (step == 0.f) continue;  // the sub-block keeps the levels of its own fit
      for (int i = kSub6 * j; i < kSub6 * (j + 1); ++i) {
        levels[i] = clamped(nearest_int(x[i] / step), -kNmax6, kNmax6 - 1) + kNmax6;
      }
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
