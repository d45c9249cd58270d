// probe_linear: a linear layer evaluated under P low-rank weight perturbations at once.
//
//   y[p] = x[p] W^T + b + scale[p] * ((x[p] A[f]^T) D[f] + d_bias[f]),   f = p % F
//
//   x      [P, M, d_in]   the layer input under each direction p (M rows: tokens of all probes)
//   weight [d_out, d_in]  shared by every direction, never copied
//   bias   [d_out]        optional
//   a      [F, T, d_in]   the perturbation of direction f is  D[f]^T A[f]  (rank <= T), the form
//   d      [F, T, d_out]  a linear layer's VJP takes: sum_t delta_t a_t^T
//   d_bias [F, d_out]     optional bias perturbation (sum_t delta_t)
//   scale  [P]            the step of each direction (e.g. +eps and -eps)
//
// Directions come as P / F blocks of the F factor pairs, so +eps and -eps of the same VJP share
// one A and D. The perturbation Delta_f is never formed: the cost per direction is
// M*T*(d_in + d_out) on top of the shared product x W^T.
//
// Both device kernels share the prologue below (checks, the base product x W^T and the
// projection u = x A^T, which are ATen GEMMs) and differ only in the fused update
// y += b + scale * (u D + d_bias). The update and u accumulate in the op-math type
// (float for half/bfloat16); the output is rounded to x's dtype after x W^T and once more
// after the update.
#pragma once

#include <ATen/ATen.h>

namespace dcr_fast {

struct ProbeLinearPrologue {
  at::Tensor y;       // [P, M, d_out], x W^T (no bias yet), dtype of x, contiguous
  at::Tensor bias;    // [d_out] contiguous, or undefined
  at::Tensor u;       // [P, M, T], x A^T in the op-math type, contiguous
  at::Tensor d;       // [F, T, d_out] contiguous
  at::Tensor d_bias;  // [F, d_out] contiguous, or undefined
  at::Tensor scale;   // [P] in the op-math type, contiguous
};

ProbeLinearPrologue probe_linear_prologue(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const at::Tensor& a, const at::Tensor& d,
                                          const std::optional<at::Tensor>& d_bias,
                                          const at::Tensor& scale);

}  // namespace dcr_fast
