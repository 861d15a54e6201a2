// How orthogonalize_norm_preserving restores norms: shared by the CPU and CUDA kernels, host
// and device. d is the unit direction and s the scale; the pure-torch mirror is
// refusal_kernels/reference.py (orthogonalize_norm_preserving).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace refusal {

// A vector whose updated squared norm is at most this fraction of its old one counts as
// emptied by the update and becomes 0. The updated norms come from identities whose fp32
// rounding (about 1e-6 of the old squared norm) would otherwise decide the direction of such
// a vector; 2^-16 leaves vectors within 0.4% of the direction, bf16 precision, at zero.
constexpr float kEmptiedFraction = 1.f / 65536.f;

// axis="column": the factor k with w <- k (w - s c d) for a column w with c = d.w and
// ||w||^2 = norm_sq. The updated norm comes from ||w - s c d||^2 = ||w||^2 - (2s - s^2) c^2,
// so the column is read once for both sums. A zero column, or one that the update empties,
// gets 0 (not NaN).
C10_HOST_DEVICE inline float column_norm_factor(float norm_sq, float c, float s) {
  const float updated_sq = norm_sq - (2.f * s - s * s) * c * c;
  return updated_sq > kEmptiedFraction * norm_sq ? sqrtf(norm_sq / updated_sq) : 0.f;
}

// axis="row": the weight of row i in c = d^T W_n, where W_n holds the rows of W divided by
// their norms r; a zero row contributes nothing.
C10_HOST_DEVICE inline float normalized_row_weight(float d_i, float r) {
  return r > 0.f ? d_i / r : 0.f;
}

// axis="row": row w (norm r) becomes r * normalize(w / r - s d_i c), written as
// w <- keep * w - subtract * c.
struct RowUpdate {
  float keep;
  float subtract;
};

// With w_dot_c = w.c and c_sq = ||c||^2: ||w / r - s d_i c||^2 = 1 - 2 s d_i (w.c) / r
// + (s d_i)^2 ||c||^2. Zero rows, and rows that the update empties, become 0.
C10_HOST_DEVICE inline RowUpdate row_update(float r, float d_i, float w_dot_c, float c_sq,
                                            float s) {
  if (!(r > 0.f)) return {0.f, 0.f};
  const float sd = s * d_i;
  const float updated_sq = 1.f - 2.f * sd * w_dot_c / r + sd * sd * c_sq;
  if (!(updated_sq > kEmptiedFraction)) return {0.f, 0.f};
  const float keep = 1.f / sqrtf(updated_sq);
  return {keep, sd * r * keep};
}

}  // namespace refusal
