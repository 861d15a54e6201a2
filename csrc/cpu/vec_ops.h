// Row primitives for the CPU kernels: fp32 accumulation over fp32, fp16 or bf16 storage,
// vectorized with at::vec (AVX2 when the build enables it, portable code otherwise).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "../dispatch.h"

namespace refusal::cpu {

using FloatVec = at::vec::Vectorized<float>;

// Elements handled per vector step: one fp32 vector, or one fp16/bf16 vector that widens
// into two fp32 vectors (lo, hi).
template <typename T>
constexpr int64_t chunk_size() {
  return std::is_same_v<T, float> ? FloatVec::size() : 2 * FloatVec::size();
}

template <typename T>
inline std::tuple<FloatVec, FloatVec> load_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return {FloatVec::loadu(p), FloatVec(0.f)};
  } else {
    return at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store_from_float(T* p, const FloatVec& lo, const FloatVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(p);
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // One instruction rounds 32 floats to nearest-even bf16, where at::vec's portable rounding
    // takes about ten per 16 and bounds the bf16 kernels. It flushes subnormals (below 1.2e-38)
    // to zero, which no weight or activation holds.
    _mm512_storeu_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
#endif
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

// The fp32 values of u that pair with one chunk of T storage; u holds floats or Ts.
template <typename T, typename U>
inline std::tuple<FloatVec, FloatVec> load_paired_chunk(const U* u) {
  if constexpr (std::is_same_v<U, float> && !std::is_same_v<T, float>) {
    return {FloatVec::loadu(u), FloatVec::loadu(u + FloatVec::size())};
  } else {
    return load_as_float(u);
  }
}

// sum_i v[i] * u[i], accumulated in fp32; u is fp32 or T (dot(v, v, n) is the squared norm).
// Two chunks per step, four accumulators in all, so that the FMA latency chain does not bound
// the loop.
template <typename T, typename U>
inline float dot(const T* v, const U* u, int64_t n) {
  constexpr int64_t kChunk = chunk_size<T>();
  FloatVec acc[4] = {FloatVec(0.f), FloatVec(0.f), FloatVec(0.f), FloatVec(0.f)};
  auto step = [&](int64_t i, FloatVec& acc_lo, FloatVec& acc_hi) {
    auto [lo, hi] = load_as_float(v + i);
    auto [u_lo, u_hi] = load_paired_chunk<T>(u + i);
    acc_lo = at::vec::fmadd(lo, u_lo, acc_lo);
    if constexpr (!std::is_same_v<T, float>) {
      acc_hi = at::vec::fmadd(hi, u_hi, acc_hi);
    }
  };
  int64_t i = 0;
  for (; i + 2 * kChunk <= n; i += 2 * kChunk) {
    step(i, acc[0], acc[1]);
    step(i + kChunk, acc[2], acc[3]);
  }
  for (; i + kChunk <= n; i += kChunk) step(i, acc[0], acc[1]);
  float sum = at::vec::vec_reduce_all<float>(
      [](const FloatVec& a, const FloatVec& b) { return a + b; }, (acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; i < n; ++i) sum += static_cast<float>(v[i]) * static_cast<float>(u[i]);
  return sum;
}

// acc[j] += sum_r a[r] * v[r][j] over kRows rows, added in row order, and, with kSquares,
// squares[j] += sum_r v[r][j]^2, in fp32. Several rows per call load and store acc once for
// all of them: with one row per call, acc's traffic, not W's, bounds the loop.
template <int kRows, bool kSquares, typename T>
inline void accumulate_rows_impl(float* acc, float* squares, const float* a, const T* const* v,
                                 int64_t n) {
  constexpr int64_t kVec = FloatVec::size();
  constexpr int64_t kChunk = chunk_size<T>();
  constexpr int kHalves = std::is_same_v<T, float> ? 1 : 2;
  FloatVec va[kRows];
  for (int r = 0; r < kRows; ++r) va[r] = FloatVec(a[r]);
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    FloatVec sum[kHalves];
    FloatVec sq[kHalves];
    for (int h = 0; h < kHalves; ++h) {
      sum[h] = FloatVec::loadu(acc + j + h * kVec);
      if constexpr (kSquares) sq[h] = FloatVec::loadu(squares + j + h * kVec);
    }
    for (int r = 0; r < kRows; ++r) {
      const auto [lo, hi] = load_as_float(v[r] + j);
      const FloatVec x[2] = {lo, hi};
      for (int h = 0; h < kHalves; ++h) {
        sum[h] = at::vec::fmadd(va[r], x[h], sum[h]);
        if constexpr (kSquares) sq[h] = at::vec::fmadd(x[h], x[h], sq[h]);
      }
    }
    for (int h = 0; h < kHalves; ++h) {
      sum[h].store(acc + j + h * kVec);
      if constexpr (kSquares) sq[h].store(squares + j + h * kVec);
    }
  }
  for (; j < n; ++j) {
    for (int r = 0; r < kRows; ++r) {
      const float x = static_cast<float>(v[r][j]);
      acc[j] += a[r] * x;
      if constexpr (kSquares) squares[j] += x * x;
    }
  }
}

// acc[i] += a * v[i], in fp32.
template <typename T>
inline void accumulate(float* acc, float a, const T* v, int64_t n) {
  accumulate_rows_impl<1, false>(acc, nullptr, &a, &v, n);
}

// acc[j] += sum_r a[r] * v[r][j] over kRows rows, in fp32.
template <int kRows, typename T>
inline void accumulate_rows(float* acc, const float* a, const T* const* v, int64_t n) {
  accumulate_rows_impl<kRows, false>(acc, nullptr, a, v, n);
}

// accumulate_rows, and squares[j] += sum_r v[r][j]^2, in one read of the rows.
template <int kRows, typename T>
inline void accumulate_rows_with_squares(float* acc, float* squares, const float* a,
                                         const T* const* v, int64_t n) {
  accumulate_rows_impl<kRows, true>(acc, squares, a, v, n);
}

// v[r][i] <- k[i] * v[r][i] - a[r] * u[i] over kRows rows, computed in fp32 and rounded once to
// T. k is one factor for every element (float) or one per element (const float*). u and k are
// loaded once for all the rows: with one row per call, their traffic through L2 (fp32, twice a
// bf16 row's bytes) bounds the loop.
template <int kRows, typename T, typename Factor>
inline void scale_and_subtract_rows(T* const* v, Factor k, const float* a, const float* u, int64_t n) {
  constexpr int64_t kVec = FloatVec::size();
  constexpr int64_t kChunk = chunk_size<T>();
  constexpr int kHalves = std::is_same_v<T, float> ? 1 : 2;
  constexpr bool kPerElement = std::is_pointer_v<Factor>;
  auto factor_at = [&](int64_t j) {
    if constexpr (kPerElement) {
      return k[j];
    } else {
      return k;
    }
  };
  auto factors_at = [&](int64_t j) {
    if constexpr (kPerElement) {
      return FloatVec::loadu(k + j);
    } else {
      return FloatVec(k);
    }
  };
  FloatVec va[kRows];
  for (int r = 0; r < kRows; ++r) va[r] = FloatVec(a[r]);
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    FloatVec uj[kHalves];
    FloatVec kj[kHalves];
    for (int h = 0; h < kHalves; ++h) {
      uj[h] = FloatVec::loadu(u + j + h * kVec);
      kj[h] = factors_at(j + h * kVec);
    }
    for (int r = 0; r < kRows; ++r) {
      auto [lo, hi] = load_as_float(v[r] + j);
      lo = at::vec::fnmadd(va[r], uj[0], kj[0] * lo);
      if constexpr (kHalves == 2) hi = at::vec::fnmadd(va[r], uj[1], kj[1] * hi);
      store_from_float(v[r] + j, lo, hi);
    }
  }
  for (; j < n; ++j) {
    for (int r = 0; r < kRows; ++r) v[r][j] = static_cast<T>(factor_at(j) * static_cast<float>(v[r][j]) - a[r] * u[j]);
  }
}

// v[i] <- k[i] * v[i] - a * u[i], as scale_and_subtract_rows on one row.
template <typename T, typename Factor>
inline void scale_and_subtract(T* v, Factor k, float a, const float* u, int64_t n) {
  scale_and_subtract_rows<1>(&v, k, &a, u, n);
}

// v[i] -= a * u[i], computed in fp32 and rounded once to T.
template <typename T>
inline void subtract_scaled(T* v, float a, const float* u, int64_t n) {
  scale_and_subtract(v, 1.f, a, u, n);
}

// Element offset of each slice of `t` over its leading dims (all but the last `inner_dims`),
// for tensors whose leading dims have arbitrary strides (slices of bigger buffers).
class SliceOffsets {
 public:
  SliceOffsets(const at::Tensor& t, int64_t inner_dims)
      : sizes_(t.sizes().begin(), t.sizes().end() - inner_dims),
        strides_(t.strides().begin(), t.strides().end() - inner_dims) {}

  int64_t count() const { return c10::multiply_integers(sizes_); }

  int64_t offset(int64_t flat) const {
    int64_t result = 0;
    for (int64_t dim = static_cast<int64_t>(sizes_.size()) - 1; dim >= 0; --dim) {
      result += (flat % sizes_[dim]) * strides_[dim];
      flat /= sizes_[dim];
    }
    return result;
  }

 private:
  std::vector<int64_t> sizes_;
  std::vector<int64_t> strides_;
};

// Each row of `directions` ([K, d] or [d]) divided by its fp32 norm, as contiguous fp32.
// This is where the CPU path checks data: a zero or non-finite row raises ValueError.
at::Tensor normalized_rows(const at::Tensor& directions, const char* name);

}  // namespace refusal::cpu
