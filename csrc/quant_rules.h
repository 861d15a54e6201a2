// How a fresh scale (and zero) is chosen from a group's updated values: shared by the CPU
// and CUDA kernels, host and device. The pure-torch mirror is refusal_kernels/quant/_common.py.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>

namespace refusal {

constexpr float kInt8Max = 127.f;  // symmetric int8 uses [-127, 127]
constexpr float kFp8Max = 448.f;   // largest finite float8_e4m3fn

// The smallest value of T that is >= value (value >= 0): a scale stored in T still covers its group.
template <typename T>
C10_HOST_DEVICE inline float round_up_to(float value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else {
    T stored(value);
    if (static_cast<float>(stored) < value) stored.x += 1;
    return static_cast<float>(stored);
  }
}

// absmax / qmax rounded up to T; an all-zero group gets 1 (any scale represents it exactly).
template <typename T>
C10_HOST_DEVICE inline float symmetric_scale(float absmax, float qmax) {
  return round_up_to<T>(absmax > 0.f ? absmax / qmax : 1.f);
}

// Scale and zero z of a 4-bit group whose updated values span [low, high], W = step * (q - z),
// q in [0, 15]: the range is widened to include 0, z is kept within [zero_min, zero_min + 15]
// (what the format stores), and the step is chosen so that [low, high] lies inside
// [-z * step, (15 - z) * step]: no value needs clamping.
template <typename T>
C10_HOST_DEVICE inline void asymmetric_scale_zero(float low, float high, int zero_min, float* step, int* zero) {
  low = fminf(low, 0.f);
  high = fmaxf(high, 0.f);
  const float spread = (high - low) / 15.f;
  float z = spread > 0.f ? nearbyintf(-low / spread) : 0.f;
  z = fminf(fmaxf(z, static_cast<float>(zero_min)), static_cast<float>(zero_min + 15));
  if (high > 0.f) z = fminf(z, 14.f);
  if (low < 0.f) z = fmaxf(z, 1.f);
  float s = fmaxf(high / fmaxf(15.f - z, 1.f), -low / fmaxf(z, 1.f));
  if (!(s > 0.f)) s = 1.f;
  *step = round_up_to<T>(s);
  *zero = static_cast<int>(z);
}

// round(w / step) + zero, kept in [0, 15]; the clamp only resolves exact ties at the edge.
C10_HOST_DEVICE inline int quantize_int4(float w, float step, int zero) {
  return static_cast<int>(fminf(fmaxf(nearbyintf(w / step) + static_cast<float>(zero), 0.f), 15.f));
}

}  // namespace refusal
