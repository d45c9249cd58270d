// The dcr_fast operator library: every schema lives here, each op's kernels live in its own
// files (TORCH_LIBRARY_IMPL per device). The PyInit stub only makes `import dcr_fast._C` load
// this shared object, which runs the registrations; the ops are reached through torch.ops.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dcr_fast, m) {
  // y[p] = x[p] W^T + b + scale[p] * ((x[p] A[f]^T) D[f] + d_bias[f]),  f = p % F.
  // See csrc/probe_linear.h for the shapes and dcr_fast/ntk/probe_ops.py for the reference.
  m.def(
      "probe_linear(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor d, Tensor? d_bias, "
      "Tensor scale) -> Tensor");
}
