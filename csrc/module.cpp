// The dcr_fast operator library: every schema lives here, each op's kernels live in its own
// files (TORCH_LIBRARY_IMPL per device). The PyInit stub only makes `import dcr_fast._C` load
// this shared object, which runs the registrations; the ops are reached through torch.ops.
// The module also records the torch release it was compiled against (`built_with_torch`), so that
// dcr_fast/_extension.py can refuse a build whose torch is not the one running.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#define DCR_FAST_STR_(x) #x
#define DCR_FAST_STR(x) DCR_FAST_STR_(x)

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "built_with_torch",
                                 DCR_FAST_STR(TORCH_VERSION_MAJOR) "." DCR_FAST_STR(TORCH_VERSION_MINOR) "." DCR_FAST_STR(
                                     TORCH_VERSION_PATCH)) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(dcr_fast, m) {
  // y[p] = x[p] W^T + b + scale[p] * ((x[p] A[f]^T) D[f] + d_bias[f]),  f = p % F.
  // See csrc/probe_linear.h for the shapes and dcr_fast/ntk/probe_ops.py for the reference.
  m.def(
      "probe_linear(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor d, Tensor? d_bias, "
      "Tensor scale) -> Tensor");
  // The fused per-row epilogues of the chunked CPU Circle loss over a chunk S of similarity
  // rows [row0, row0 + S.size(0)): the two log-sum-exps, and dS written over S in place.
  // See csrc/circle_rows.cpp; the reference is the PyTorch branch of dcr_fast/circle_loss/chunked.py.
  m.def(
      "circle_rows_lse(Tensor s, Tensor labels, Tensor ref_labels, int row0, bool exclude_diag, float o_p, "
      "float o_n, float delta_p, float delta_n, float gamma) -> (Tensor, Tensor)");
  m.def(
      "circle_rows_ds_(Tensor(a!) s, Tensor labels, Tensor ref_labels, int row0, bool exclude_diag, float o_p, "
      "float o_n, float delta_p, float delta_n, float gamma, Tensor lse_p, Tensor lse_n, Tensor g_p, Tensor g_n) -> ()");
}
