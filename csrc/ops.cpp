// Every schema of the `refusal` namespace, in one place. Kernels register per device in
// csrc/cpu/ and csrc/cuda/; fake kernels and autograd are registered from Python (_ops.py).
#include <Python.h>
#include <torch/library.h>

// An importable, empty module: importing it runs the static registrations below, so no
// pybind11 glue is needed (the pattern of pytorch/extension-cpp).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(refusal, m) {
  m.def("ablate(Tensor(a!) x, Tensor direction, float scale=1.0) -> ()");
  m.def("ablate_indexed(Tensor(a!) x, Tensor directions, Tensor index, float scale=1.0) -> ()");
  m.def("orthogonalize(Tensor(a!) weight, Tensor direction, float scale=1.0) -> ()");
  // orthogonalize that keeps each column's norm (axis="column") or, in the row-normalized
  // form, each row's norm (axis="row").
  m.def(
      "orthogonalize_norm_preserving(Tensor(a!) weight, Tensor direction, float scale=1.0, "
      "str axis=\"column\") -> ()");
  // Functional form of `ablate`: the in-place op cannot carry an autograd formula.
  m.def("ablated(Tensor x, Tensor direction, float scale=1.0) -> Tensor");
  // orthogonalize on quantized storage: dequantize, update, requantize with fresh scales
  // (and zeros), in place. Layouts: refusal_kernels/quant/<format>.py.
  m.def(
      "orthogonalize_int8(Tensor(a!) qweight, Tensor(b!) row_scale, Tensor direction, float scale=1.0, "
      "bool absmax_scale=False) -> ()");
  m.def(
      "orthogonalize_gptq(Tensor(a!) qweight, Tensor(b!) qzeros, Tensor(c!) scales, Tensor? g_idx, "
      "Tensor direction, int group_size, float scale=1.0, str zeros_format=\"v1\") -> ()");
  m.def(
      "orthogonalize_awq(Tensor(a!) qweight, Tensor(b!) qzeros, Tensor(c!) scales, Tensor direction, "
      "int group_size, float scale=1.0) -> ()");
  m.def("orthogonalize_fp8(Tensor(a!) weight, Tensor(b!) weight_scale, Tensor direction, float scale=1.0) -> ()");
  m.def(
      "orthogonalize_nf4(Tensor(a!) packed, Tensor(b!) absmax, Tensor code, Tensor direction, int blocksize, "
      "Tensor(c!)? nested_absmax, Tensor(d!)? nested_offset, Tensor? nested_code, int nested_blocksize=256, "
      "float scale=1.0) -> ()");
  // orthogonalize on a tensor's GGUF blocks (uint8 [rows, bytes_per_row]), one op per block type,
  // requantized in their own type; layout "matrix" (W [out][in]) or "rows" (token embeddings);
  // `passes` feedback passes after the plain edit (refusal_kernels/quant/gguf/feedback.py).
  // Layouts: refusal_kernels/quant/gguf/{legacy,kquants,kquants_low}.py.
  m.def(
      "orthogonalize_q4_0(Tensor(a!) blocks, Tensor direction, float scale=1.0, str layout=\"matrix\", "
      "int passes=0) -> ()");
  m.def(
      "orthogonalize_q4_1(Tensor(a!) blocks, Tensor direction, float scale=1.0, str layout=\"matrix\", "
      "int passes=0) -> ()");
  m.def(
      "orthogonalize_q5_0(Tensor(a!) blocks, Tensor direction, float scale=1.0, str layout=\"matrix\", "
      "int passes=0) -> ()");
  m.def(
      "orthogonalize_q5_1(Tensor(a!) blocks, Tensor direction, float scale=1.0, str layout=\"matrix\", "
      "int passes=0) -> ()");
  m.def(
      "orthogonalize_q8_0(Tensor(a!) blocks, Tensor direction, float scale=1.0, str layout=\"matrix\", "
      "int passes=0) -> ()");
  m.def(
      "orthogonalize_q2_k(Tensor(a!) blocks, Tensor direction, float scale=1.0, str layout=\"matrix\", "
      "int passes=0) -> ()");
  m.def(
      "orthogonalize_q3_k(Tensor(a!) blocks, Tensor direction, float scale=1.0, str layout=\"matrix\", "
      "int passes=0) -> ()");
  m.def(
      "orthogonalize_q4_k(Tensor(a!) blocks, Tensor direction, float scale=1.0, str layout=\"matrix\", "
      "int passes=0) -> ()");
  m.def(
      "orthogonalize_q5_k(Tensor(a!) blocks, Tensor direction, float scale=1.0, str layout=\"matrix\", "
      "int passes=0) -> ()");
  m.def(
      "orthogonalize_q6_k(Tensor(a!) blocks, Tensor direction, float scale=1.0, str layout=\"matrix\", "
      "int passes=0) -> ()");
}

namespace {
at::Tensor ablated(const at::Tensor& x, const at::Tensor& direction, double scale) {
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("refusal::ablate", "")
                       .typed<void(at::Tensor&, const at::Tensor&, double)>();
  op.call(out, direction, scale);
  return out;
}
}  // namespace

TORCH_LIBRARY_IMPL(refusal, CompositeExplicitAutograd, m) { m.impl("ablated", &ablated); }
