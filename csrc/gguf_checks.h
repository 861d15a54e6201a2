// Metadata checks of the orthogonalize_<GGUF type> ops, which edit a tensor's GGUF blocks in
// place. The Python mirror is check_gguf in refusal_kernels/_checks.py; the blocks' messages
// print shapes and dtypes as Python does, so that both read the same.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

#include <string>

#include "checks.h"

namespace refusal {

// "matrix": the rows are the d_model outputs of a linear weight [out][in] (GGUF's order);
// "rows": each row is a d_model vector (token embeddings).
enum class GgufLayout { kMatrix, kRows };

// One block of a GGUF type: `values` values stored in `bytes` bytes.
struct GgufBlock {
  const char* type_name;
  int64_t values;
  int64_t bytes;
};

struct GgufShape {
  int64_t blocks_per_row;
  GgufLayout layout;
};

inline std::string python_tuple(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t k = 0; k < sizes.size(); ++k) out += (k ? ", " : "") + std::to_string(sizes[k]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

// Returns the number of blocks per row.
inline int64_t check_gguf_blocks(const at::Tensor& blocks, const GgufBlock& block) {
  TORCH_CHECK_TYPE(blocks.scalar_type() == at::kByte, "blocks must be torch.uint8, got torch.",
                   std::string(c10::getDtypeNames(blocks.scalar_type()).first));
  TORCH_CHECK_VALUE(blocks.dim() == 2, "blocks must be 2-D [rows, bytes_per_row], got shape ",
                    python_tuple(blocks.sizes()));
  TORCH_CHECK_VALUE(blocks.is_contiguous(), "blocks must be contiguous, got strides ", python_tuple(blocks.strides()));
  TORCH_CHECK_VALUE(blocks.size(1) % block.bytes == 0, "blocks has ", blocks.size(1),
                    " bytes per row, not a multiple of ", block.type_name, "'s ", block.bytes, " bytes per block");
  return blocks.size(1) / block.bytes;
}

inline GgufShape check_gguf(const at::Tensor& blocks, const at::Tensor& direction, double scale,
                            c10::string_view layout, int64_t passes, const GgufBlock& block) {
  const int64_t blocks_per_row = check_gguf_blocks(blocks, block);
  TORCH_CHECK_VALUE(layout == "matrix" || layout == "rows", "layout must be 'matrix' or 'rows', got '",
                    std::string(layout), "'");
  const GgufLayout kind = layout == "matrix" ? GgufLayout::kMatrix : GgufLayout::kRows;
  if (kind == GgufLayout::kMatrix) {
    check_vector(direction, "direction", blocks.size(0), "the rows of blocks (d_model)");
  } else {
    check_vector(direction, "direction", blocks_per_row * block.values, "the row length of blocks (d_model)");
  }
  check_same_device(direction, "direction", blocks, "blocks");
  check_scale(scale);
  TORCH_CHECK_VALUE(passes >= 0, "passes must be a non-negative int, got ", passes);
  return {blocks_per_row, kind};
}

}  // namespace refusal
