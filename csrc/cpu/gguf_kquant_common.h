// What the K-quant codecs (gguf_kquants.cpp: Q4_K, Q5_K, Q6_K; gguf_kquants_low.cpp: Q2_K, Q3_K)
// share, as refusal_kernels/quant/gguf/_kquant_common.py does for the references: llama.cpp's
// nearest_int, make_qkx2_quants, the scans for the largest scale and the 2-bit fields that Q6_K's
// high bits and the quants of Q2_K and Q3_K are stored in.
#pragma once

#include "gguf_edit.h"

namespace refusal::cpu::gguf {

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

// The parameters of make_qkx2_quants' search over scales and mins; absolute_error is its use_mad.
struct MinSearch {
  int nmax;
  float rmin;
  float rdelta;
  int nstep;
  bool absolute_error;
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

template <int N>
LevelSums level_sums(const float* x, const float* w, const int* l) {
  auto weighted = [&](int i) { return w[i] * static_cast<float>(l[i]); };
  LevelSums s{weighted(0), weighted(0) * static_cast<float>(l[0]), weighted(0) * x[0]};
  for (int i = 1; i < N; ++i) {
    s.l += weighted(i);
    s.l2 += weighted(i) * static_cast<float>(l[i]);
    s.xl += weighted(i) * x[i];
  }
  return s;
}

// The sum of w |fit - x| (absolute_error) or of w (fit - x)^2.
template <int N>
float weighted_error(const float* x, const float* w, const int* l, float scale, float low,
                     bool absolute_error) {
  return running_sum(N, [&](int i) {
    const float diff = (scale * static_cast<float>(l[i]) + low) - x[i];
    return w[i] * (absolute_error ? std::fabs(diff) : diff * diff);
  });
}

template <int N>
void levels_from(const float* x, float inverse, float low, int nmax, int* l) {
  for (int i = 0; i < N; ++i) l[i] = clamped(nearest_int(inverse * (x[i] - low)), 0, nmax);
}

// make_qkx2_quants over N values; each step of the search starts from the best min so far.
template <int N>
MinFit make_qkx2_quants(const float* x, const float* w, const MinSearch& search, int* levels) {
  float low = *std::min_element(x, x + N);
  const float high = *std::max_element(x, x + N);
  if (low > 0) low = 0.f;
  if (high == low) {
    std::fill(levels, levels + N, 0);
    return {0.f, -low};
  }
  const float sum_w = running_sum(N, [&](int i) { return w[i]; });
  const float sum_x = running_sum(N, [&](int i) { return w[i] * x[i]; });
  float inverse = static_cast<float>(search.nmax) / (high - low);
  float scale = 1.f / inverse;
  levels_from<N>(x, inverse, low, search.nmax, levels);
  float best_error = weighted_error<N>(x, w, levels, scale, low, search.absolute_error);
  int trial[N];
  for (int step = 0; step <= search.nstep; ++step) {
    inverse = (search.rmin + search.rdelta * static_cast<float>(step) +
               static_cast<float>(search.nmax)) /
              (high - low);
    levels_from<N>(x, inverse, low, search.nmax, trial);
    const LevelSums s = level_sums<N>(x, w, trial);
    const float determinant = sum_w * s.l2 - s.l * s.l;
    if (!(determinant > 0)) continue;
    float trial_scale = (sum_w * s.xl - sum_x * s.l) / determinant;
    float trial_min = (s.l2 * sum_x - s.l * s.xl) / determinant;
    if (trial_min > 0) {
      trial_min = 0.f;
      trial_scale = s.xl / s.l2;
    }
    const float error =
        weighted_error<N>(x, w, trial, trial_scale, trial_min, search.absolute_error);
    if (error < best_error) {
      std::copy(trial, trial + N, levels);
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

// The index of the first value of largest magnitude.
inline int first_largest(const float* values, int n) {
  int first = 0;
  for (int k = 1; k < n; ++k) {
    if (std::fabs(values[k]) > std::fabs(values[first])) first = k;
  }
  return first;
}

// The scale of largest magnitude, as the scan `if (|s| > best)` from 0 finds it: the first one,
// and index 0 with magnitude 0 when none is above 0.
struct LargestScale {
  int index;
  float magnitude;
};

inline LargestScale first_of_largest_magnitude(const float* scales, int n) {
  LargestScale largest{0, 0.f};
  for (int j = 0; j < n; ++j) {
    if (std::fabs(scales[j]) > largest.magnitude) largest = {j, std::fabs(scales[j])};
  }
  return largest;
}

// The levels of x on the grid step * level - offset, kept to 0..nmax.
inline void grid_levels_with_min(const float* x, int n, float step, float offset, int nmax,
                                 int* levels) {
  for (int i = 0; i < n; ++i) levels[i] = clamped(nearest_int((x[i] + offset) / step), 0, nmax);
}

// The levels of x on the grid step * level, kept to -nmax..nmax - 1 and stored offset by nmax.
inline void signed_grid_levels(const float* x, int n, float step, int nmax, int* levels) {
  for (int i = 0; i < n; ++i) {
    levels[i] = clamped(nearest_int(x[i] / step), -nmax, nmax - 1) + nmax;
  }
}

// 2-bit fields of 256 values in 64 bytes: bits 2t and 2t + 1 of byte 32h + l hold value
// 128h + 32t + l (h = 0, 1, t = 0..3).
inline int two_bit_field(const uint8_t* bytes, int i) {
  return (bytes[32 * (i / 128) + i % 32] >> (2 * ((i % 128) / 32))) & 3;
}

// Bits shift and shift + 1 of each level, packed as two_bit_field reads them.
inline void pack_two_bit_fields(const int* levels, int shift, uint8_t* bytes) {
  for (int h = 0; h < 2; ++h) {
    for (int l = 0; l < 32; ++l) {
      int packed = 0;
      for (int t = 0; t < 4; ++t) {
        packed |= ((levels[128 * h + 32 * t + l] >> shift) & 3) << (2 * t);
      }
      bytes[32 * h + l] = static_cast<uint8_t>(packed);
    }
  }
}

}  // namespace refusal::cpu::gguf
