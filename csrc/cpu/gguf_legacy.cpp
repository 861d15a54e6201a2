// refusal::orthogonalize_{q4_0,q4_1,q5_0,q5_1,q8_0} on the CPU: llama.cpp's legacy blocks of 32
// values, edited in place (gguf_edit.h). The layouts and the quantizers (quantize_row_q*_ref)
// are those of refusal_kernels/quant/gguf/legacy.py, operation for operation.
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <utility>

#include "gguf_edit.h"

namespace refusal::cpu::gguf {
namespace {

using Vec = at::vec::Vectorized<float>;

// The smallest and largest of n values (n a multiple of the vector width), in vector registers:
// the order of a min or max does not change it.
inline std::pair<float, float> min_max(const float* x, int n) {
  Vec low = Vec::loadu(x);
  Vec high = low;
  for (int j = Vec::size(); j < n; j += Vec::size()) {
    low = at::vec::minimum(low, Vec::loadu(x + j));
    high = at::vec::maximum(high, Vec::loadu(x + j));
  }
  return {at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::minimum(a, b); }, low),
          at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, high)};
}

inline float largest_magnitude(const float* x, int n) {
  Vec top(0.f);
  for (int j = 0; j < n; j += Vec::size()) top = at::vec::maximum(top, Vec::loadu(x + j).abs());
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, top);
}

// A block: fp16 d (and fp16 m with kHasMin), then the quants; value j is d * (q_j - kOffset) (+ m).
template <int kBits, int kOffset, bool kHasMin>
struct Legacy {
  static constexpr int kValues = 32;
  static constexpr int kHalf = kValues / 2;
  static constexpr int kScaleBytes = kHasMin ? 4 : 2;
  static constexpr int kBytes = kScaleBytes + kValues * kBits / 8;
  static constexpr int kTop = (1 << kBits) - 1;

  // 4 and 5 bits: byte j of qs holds q_j and q_{j+16} in its nibbles; the fifth bits are the
  // little-endian uint32 qh before qs. 8 bits: one int8 per value.
  static void unpack(const uint8_t* packed, int* q) {
    if constexpr (kBits == 8) {
      for (int j = 0; j < kValues; ++j) q[j] = static_cast<int8_t>(packed[j]);
    } else {
      const uint8_t* qs = packed + (kBits == 5 ? 4 : 0);
      for (int j = 0; j < kHalf; ++j) {
        q[j] = qs[j] & 0xF;
        q[j + kHalf] = qs[j] >> 4;
      }
      if constexpr (kBits == 5) {
        uint32_t qh;
        std::memcpy(&qh, packed, sizeof(qh));
        for (int j = 0; j < kValues; ++j) q[j] |= ((qh >> j) & 1) << 4;
      }
    }
  }

  static void pack(const int* q, uint8_t* packed) {
    if constexpr (kBits == 8) {
      for (int j = 0; j < kValues; ++j) packed[j] = static_cast<uint8_t>(q[j]);
    } else {
      uint8_t* qs = packed + (kBits == 5 ? 4 : 0);
      for (int j = 0; j < kHalf; ++j) qs[j] = static_cast<uint8_t>((q[j] & 0xF) | ((q[j + kHalf] & 0xF) << 4));
      if constexpr (kBits == 5) {
        uint32_t qh = 0;
        for (int j = 0; j < kValues; ++j) qh |= static_cast<uint32_t>(q[j] >> 4) << j;
        std::memcpy(packed, &qh, sizeof(qh));
      }
    }
  }

  static void dequantize(const uint8_t* block, float* values) {
    int q[kValues];
    unpack(block + kScaleBytes, q);
    const float d = fp16_at(block);
    for (int j = 0; j < kValues; ++j) values[j] = d * static_cast<float>(q[j] - kOffset);
    if constexpr (kHasMin) {
      const float m = fp16_at(block + 2);
      for (int j = 0; j < kValues; ++j) values[j] += m;
    }
  }

  // q_j = trunc((x_j - low) * id + shift) kept to 0..kTop, as the reference computes it, in
  // vector registers: GCC's scalar form is a branch per value, and does not vectorize.
  static void levels(const float* x, float low, float id, float shift, int* q) {
    float level[kValues];
    for (int j = 0; j < kValues; j += Vec::size()) {
      const Vec v = ((Vec::loadu(x + j) - Vec(low)) * Vec(id) + Vec(shift)).trunc();
      at::vec::clamp(v, Vec(0.f), Vec(static_cast<float>(kTop))).store(level + j);
    }
    for (int j = 0; j < kValues; ++j) q[j] = static_cast<int>(level[j]);
  }

  static float inverse(float d) { return d == 0.f ? 0.f : 1.f / d; }

  // q = roundf(x * id) (halves away from zero) as the reference computes it, in vector
  // registers, for the same reason.
  static void rounded_half_away(const float* x, float id, int* q) {
    float rounded[kValues];
    for (int j = 0; j < kValues; j += Vec::size()) {
      const Vec v = Vec::loadu(x + j) * Vec(id);
      const Vec magnitude = v.abs();
      const Vec whole = magnitude.floor();
      (whole + (magnitude - whole).ge(Vec(0.5f))).copysign(v).store(rounded + j);
    }
    for (int j = 0; j < kValues; ++j) q[j] = static_cast<int>(rounded[j]);
  }

  // quantize_row_q4_1_ref / q5_1: d = (max - min) / top, m = min.
  static void quantize_with_min(const float* x, uint8_t* block, int* q) {
    const auto [low, high] = min_max(x, kValues);
    const float d = (high - low) / static_cast<float>(kTop);
    const float id = inverse(d);
    levels(x, low, id, 0.5f, q);
    store_fp16(block, d);
    store_fp16(block + 2, low);
  }

  // quantize_row_q8_0_ref: d = max |x| / 127, q = roundf(x / d) (halves away from zero).
  static void quantize_q8(const float* x, uint8_t* block, int* q) {
    const float d = largest_magnitude(x, kValues) / 127.f;
    const float id = inverse(d);
    rounded_half_away(x, id, q);
    store_fp16(block, d);
  }

  // quantize_row_q4_0_ref / q5_0: the value of largest magnitude (the first of a tie) sits
  // on level 0, d = max / -offset.
  static void quantize_signed(const float* x, uint8_t* block, int* q) {
    const float top = largest_magnitude(x, kValues);
    int first = 0;
    while (std::fabs(x[first]) != top) ++first;
    const float d = x[first] / static_cast<float>(-kOffset);
    const float id = inverse(d);
    levels(x, 0.f, id, kOffset + 0.5f, q);  // x - 0 is x
    store_fp16(block, d);
  }

  static void quantize(const float* x, uint8_t* block) {
    int q[kValues];
    if constexpr (kHasMin) {
      quantize_with_min(x, block, q);
    } else if constexpr (kBits == 8) {
      quantize_q8(x, block, q);
    } else {
      quantize_signed(x, block, q);
    }
    pack(q, block + kScaleBytes);
  }
};

struct Q4_0 : Legacy<4, 8, false> {
  static constexpr const char* kName = "Q4_0";
};
struct Q4_1 : Legacy<4, 0, true> {
  static constexpr const char* kName = "Q4_1";
};
struct Q5_0 : Legacy<5, 16, false> {
  static constexpr const char* kName = "Q5_0";
};
struct Q5_1 : Legacy<5, 0, true> {
  static constexpr const char* kName = "Q5_1";
};
struct Q8_0 : Legacy<8, 0, false> {
  static constexpr const char* kName = "Q8_0";
};

}  // namespace

TORCH_LIBRARY_IMPL(refusal, CPU, m) {
  m.impl("orthogonalize_q4_0", &orthogonalize<Q4_0>);
  m.impl("orthogonalize_q4_1", &orthogonalize<Q4_1>);
  m.impl("orthogonalize_q5_0", &orthogonalize<Q5_0>);
  m.impl("orthogonalize_q5_1", &orthogonalize<Q5_1>);
  m.impl("orthogonalize_q8_0", &orthogonalize<Q8_0>);
}

}  // namespace refusal::cpu::gguf
