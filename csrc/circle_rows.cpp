// circle_rows: the per-row epilogues of the chunked CPU Circle loss, fused.
//
// The chunked path (dcr_fast/circle_loss/chunked.py) computes a row chunk of similarities
// S = X̂[rows] R̂ᵀ with a GEMM; everything after it is elementwise over the chunk. In PyTorch
// that is ~15 passes over chunk × M memory (logits, masks, exp, softmax weights, dS); here
// each is one pass per row over S, which stays in cache:
//
//   circle_rows_lse:  lse_p[i] = LSE_{j∈P(i)} -γ·[o_p - s_ij]₊·(s_ij - Δp)
//                     lse_n[i] = LSE_{j∈N(i)}  γ·[s_ij - o_n]₊·(s_ij - Δn)     (-inf: empty set)
//   circle_rows_ds_:  S ← dS, dS_ij = γ·(g_n[i]·w_n·[s_ij - o_n]₊ - g_p[i]·w_p·[o_p - s_ij]₊),
//                     w = exp(logit - lse) on the set's members, 0 elsewhere
//
// P(i): same label (minus the diagonal j = row0 + i with exclude_diag), N(i): other label.
// α is a constant (detached), as in the reference. Reference: the PyTorch branch of
// _ChunkedCircleLSE (dcr_fast/circle_loss/chunked.py); the tests hold the two together in float32 and float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace dcr_fast {
namespace {

#define DCR_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

struct Margins {
  double o_p, o_n, delta_p, delta_n, gamma;
};

// Which set column j belongs to for row label y: 1 positive, -1 negative, 0 neither (diagonal).
inline int member(int64_t y, int64_t yr, bool diagonal) { return y == yr ? (diagonal ? 0 : 1) : -1; }

template <typename T>
inline T logit_p(T s, const Margins& m) {
  return static_cast<T>(-m.gamma) * std::max(static_cast<T>(m.o_p) - s, T(0)) * (s - static_cast<T>(m.delta_p));
}

template <typename T>
inline T logit_n(T s, const Margins& m) {
  return static_cast<T>(m.gamma) * std::max(s - static_cast<T>(m.o_n), T(0)) * (s - static_cast<T>(m.delta_n));
}

template <typename T>
DCR_FAST_CPU_CLONES void lse_row(const T* s, const int64_t* ref, int64_t M, int64_t y, int64_t diag, const Margins& m,
                                 T* out_p, T* out_n) {
  const T inf = std::numeric_limits<T>::infinity();
  T max_p = -inf, max_n = -inf;
  for (int64_t j = 0; j < M; ++j) {
    const int set = member(y, ref[j], j == diag);
    if (set > 0) max_p = std::max(max_p, logit_p(s[j], m));
    if (set < 0) max_n = std::max(max_n, logit_n(s[j], m));
  }
  // A row sums up to M terms one after another: in double, so float rows keep float accuracy.
  double sum_p = 0, sum_n = 0;
  for (int64_t j = 0; j < M; ++j) {
    const int set = member(y, ref[j], j == diag);
    if (set > 0) sum_p += std::exp(logit_p(s[j], m) - max_p);
    if (set < 0) sum_n += std::exp(logit_n(s[j], m) - max_n);
  }
  *out_p = max_p == -inf ? -inf : max_p + static_cast<T>(std::log(sum_p));
  *out_n = max_n == -inf ? -inf : max_n + static_cast<T>(std::log(sum_n));
}

template <typename T>
DCR_FAST_CPU_CLONES void ds_row(T* s, const int64_t* ref, int64_t M, int64_t y, int64_t diag, const Margins& m,
                                T lse_p, T lse_n, T g_p, T g_n) {
  const T gamma = static_cast<T>(m.gamma), o_p = static_cast<T>(m.o_p), o_n = static_cast<T>(m.o_n);
  for (int64_t j = 0; j < M; ++j) {
    const int set = member(y, ref[j], j == diag);
    const T v = s[j];
    T ds = 0;
    if (set > 0) ds = -gamma * g_p * std::exp(logit_p(v, m) - lse_p) * std::max(o_p - v, T(0));
    if (set < 0) ds = gamma * g_n * std::exp(logit_n(v, m) - lse_n) * std::max(v - o_n, T(0));
    s[j] = ds;
  }
}

void check_rows(const at::Tensor& s, const at::Tensor& labels, const at::Tensor& ref_labels, int64_t row0) {
  TORCH_CHECK_VALUE(s.dim() == 2 && s.is_contiguous() && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                    "circle_rows: s must be a contiguous 2-D float32 or float64 [rows, M] tensor, got ",
                    s.scalar_type(), " of shape ", s.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.scalar_type() == at::kLong && labels.is_contiguous(),
                    "circle_rows: labels must be a contiguous 1-D int64 tensor");
  TORCH_CHECK_VALUE(ref_labels.dim() == 1 && ref_labels.scalar_type() == at::kLong && ref_labels.is_contiguous() &&
                        ref_labels.size(0) == s.size(1),
                    "circle_rows: ref_labels must be a contiguous 1-D int64 tensor of M = ", s.size(1), " labels");
  TORCH_CHECK_VALUE(row0 >= 0 && row0 + s.size(0) <= labels.size(0), "circle_rows: rows [", row0, ", ",
                    row0 + s.size(0), ") are outside the ", labels.size(0), " labels");
}

std::tuple<at::Tensor, at::Tensor> circle_rows_lse(const at::Tensor& s, const at::Tensor& labels,
                                                   const at::Tensor& ref_labels, int64_t row0, bool exclude_diag,
                                                   double o_p, double o_n, double delta_p, double delta_n,
                                                   double gamma) {
  check_rows(s, labels, ref_labels, row0);
  const int64_t n = s.size(0), M = s.size(1);
  at::Tensor lse_p = at::empty({n}, s.options()), lse_n = at::empty({n}, s.options());
  const Margins m{o_p, o_n, delta_p, delta_n, gamma};
  const int64_t* y = labels.data_ptr<int64_t>() + row0;
  const int64_t* ref = ref_labels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "circle_rows_lse", [&] {
    const scalar_t* S = s.data_ptr<scalar_t>();
    scalar_t* P = lse_p.data_ptr<scalar_t>();
    scalar_t* N = lse_n.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        lse_row(S + i * M, ref, M, y[i], exclude_diag ? row0 + i : -1, m, P + i, N + i);
    });
  });
  return {lse_p, lse_n};
}

void circle_rows_ds_(at::Tensor& s, const at::Tensor& labels, const at::Tensor& ref_labels, int64_t row0,
                     bool exclude_diag, double o_p, double o_n, double delta_p, double delta_n, double gamma,
                     const at::Tensor& lse_p, const at::Tensor& lse_n, const at::Tensor& g_p, const at::Tensor& g_n) {
  check_rows(s, labels, ref_labels, row0);
  const int64_t n = s.size(0), M = s.size(1);
  for (const at::Tensor* t : {&lse_p, &lse_n, &g_p, &g_n})
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n && t->scalar_type() == s.scalar_type() && t->is_contiguous(),
                      "circle_rows: lse_p, lse_n, g_p and g_n must be contiguous [", n, "] tensors of s's dtype");
  const Margins m{o_p, o_n, delta_p, delta_n, gamma};
  const int64_t* y = labels.data_ptr<int64_t>() + row0;
  const int64_t* ref = ref_labels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "circle_rows_ds_", [&] {
    scalar_t* S = s.data_ptr<scalar_t>();
    const scalar_t *LP = lse_p.data_ptr<scalar_t>(), *LN = lse_n.data_ptr<scalar_t>();
    const scalar_t *GP = g_p.data_ptr<scalar_t>(), *GN = g_n.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        ds_row(S + i * M, ref, M, y[i], exclude_diag ? row0 + i : -1, m, LP[i], LN[i], GP[i], GN[i]);
    });
  });
}

}  // namespace
}  // namespace dcr_fast

TORCH_LIBRARY_IMPL(dcr_fast, CPU, m) {
  m.impl("circle_rows_lse", &dcr_fast::circle_rows_lse);
  m.impl("circle_rows_ds_", &dcr_fast::circle_rows_ds_);
}
