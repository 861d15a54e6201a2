#include <ATen/ATen.h>

#include "vec_ops.h"

namespace refusal::cpu {

at::Tensor normalized_rows(const at::Tensor& directions, const char* name) {
  at::Tensor rows = directions.to(at::kFloat).contiguous().view({-1, directions.size(-1)});
  at::Tensor norms = rows.norm(2, /*dim=*/1, /*keepdim=*/true);
  const float* norm = norms.const_data_ptr<float>();
  for (const auto k : c10::irange(norms.size(0))) {
    TORCH_CHECK_VALUE(std::isfinite(norm[k]) && norm[k] > 0.f, name,
                      directions.dim() == 1 ? "" : c10::str("[", k, "]"),
                      " must be finite and non-zero, its norm is ", norm[k]);
  }
  return (rows / norms).view(directions.sizes());
}

}  // namespace refusal::cpu
