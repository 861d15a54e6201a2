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
  // Functional form of `ablate`: the in-place op cannot carry an autograd formula.
  m.def("ablated(Tensor x, Tensor direction, float scale=1.0) -> Tensor");
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
