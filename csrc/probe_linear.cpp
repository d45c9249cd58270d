// probe_linear: input checks, the shared ATen prologue and the CPU kernel of the fused update.
// Shapes and maths: probe_linear.h. Reference: dcr_fast/ntk/probe_ops.py.
#include "probe_linear.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace dcr_fast {
namespace {

void check_same(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), "probe_linear: ", name, " must have the dtype of x (",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "probe_linear: ", name, " must be on the device of x (", x.device(),
              "), got ", t.device());
}

}  // namespace

ProbeLinearPrologue probe_linear_prologue(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const at::Tensor& a, const at::Tensor& d,
                                          const std::optional<at::Tensor>& d_bias,
                                          const at::Tensor& scale) {
  TORCH_CHECK_VALUE(x.dim() == 3, "probe_linear: x must be [P, M, d_in] (directions, rows, features), got shape ",
              x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "probe_linear: x must be floating point, got ",
              x.scalar_type());
  const int64_t P = x.size(0), M = x.size(1), K = x.size(2);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == K, "probe_linear: weight must be [d_out, d_in] with d_in = ",
              K, " (x.size(2)), got shape ", weight.sizes());
  const int64_t N = weight.size(0);
  check_same(weight, "weight", x);
  TORCH_CHECK_VALUE(a.dim() == 3 && a.size(2) == K, "probe_linear: a must be [F, T, d_in] with d_in = ", K,
              ", got shape ", a.sizes());
  const int64_t F = a.size(0), T = a.size(1);
  TORCH_CHECK_VALUE(d.dim() == 3 && d.size(0) == F && d.size(1) == T && d.size(2) == N,
              "probe_linear: d must be [F, T, d_out] = [", F, ", ", T, ", ", N, "] to match a and weight, got shape ",
              d.sizes());
  check_same(a, "a", x);
  check_same(d, "d", x);
  TORCH_CHECK_VALUE(F > 0 ? P % F == 0 : P == 0, "probe_linear: the number of directions P = x.size(0) = ", P,
              " must be a multiple of the number of factor pairs F = a.size(0) = ", F);
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == P && at::isFloatingType(scale.scalar_type()),
              "probe_linear: scale must be a 1-D floating tensor of P = ", P, " steps, got ", scale.scalar_type(),
              " of shape ", scale.sizes());
  TORCH_CHECK_VALUE(scale.device() == x.device(), "probe_linear: scale must be on the device of x (", x.device(),
              "), got ", scale.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "probe_linear: bias must be [d_out] = [", N,
                "], got shape ", bias->sizes());
    check_same(*bias, "bias", x);
  }
  if (d_bias.has_value()) {
    TORCH_CHECK_VALUE(d_bias->dim() == 2 && d_bias->size(0) == F && d_bias->size(1) == N,
                "probe_linear: d_bias must be [F, d_out] = [", F, ", ", N, "], got shape ", d_bias->sizes());
    check_same(*d_bias, "d_bias", x);
  }

  const auto acc_type = at::toOpMathType(x.scalar_type());
  ProbeLinearPrologue out;
  // The bias is added by the update kernel, saving the pass addmm spends copying it into y.
  out.y = at::mm(x.reshape({P * M, K}), weight.t()).view({P, M, N});
  if (bias.has_value()) out.bias = bias->contiguous();
  // Directions come as R = P / F blocks of the F factor pairs: one batched GEMM per block
  // reads a without repeating it. u is small (M x T per direction): kept in the op-math type.
  const int64_t R = F > 0 ? P / F : 0;
  const at::Tensor x_acc = x.to(acc_type).reshape({R, F, M, K});
  const at::Tensor a_t = a.to(acc_type).transpose(1, 2);
  out.u = at::empty({R, F, M, T}, x.options().dtype(acc_type));
  for (int64_t r = 0; r < R; ++r) {
    at::Tensor u_r = out.u.select(0, r);
    at::bmm_out(u_r, x_acc.select(0, r), a_t);
  }
  out.u = out.u.view({P, M, T});
  out.d = d.contiguous();
  if (d_bias.has_value()) out.d_bias = d_bias->contiguous();
  out.scale = scale.to(acc_type).contiguous();
  return out;
}

namespace {

// The update is a small-rank GEMM per direction (rows x T times T x d_out), fused with the
// scale, the bias perturbation and the add into y. Register tiles of kRowTile rows by one
// 64-byte vector of columns (GCC/Clang vector extension): each D[f, t, j-tile] load serves
// kRowTile rows, and the tile stays in registers across the whole rank T. On x86 with GCC the
// tile loop is also compiled for AVX2 and AVX-512 and picked at load time, as ATen's own
// kernels are, so one build runs at full width on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DCR_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DCR_FAST_CPU_CLONES
#endif

constexpr int64_t kRowTile = 4;
constexpr int64_t kVectorBytes = 64;

template <typename scalar_t>
struct UpdateArgs {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* y;
  const acc_t* u;
  const scalar_t* d;
  const scalar_t* bias;    // nullptr when absent
  const scalar_t* d_bias;  // nullptr when absent
  const acc_t* scale;
  int64_t M, N, F, T, row_tiles;
};

template <typename scalar_t>
DCR_FAST_CPU_CLONES void update_tiles(const UpdateArgs<scalar_t>& g, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  typedef acc_t vec_t __attribute__((vector_size(kVectorBytes)));
  constexpr int64_t J = kVectorBytes / sizeof(acc_t);
  const int64_t M = g.M, N = g.N, T = g.T;
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t p = tile / g.row_tiles, f = p % g.F;
    const int64_t m0 = (tile % g.row_tiles) * kRowTile;
    const int64_t rows = std::min(kRowTile, M - m0);
    const acc_t* u_tile = g.u + (p * M + m0) * T;
    const scalar_t* d_f = g.d + f * T * N;
    const acc_t s = g.scale[p];
    for (int64_t j0 = 0; j0 < N; j0 += J) {
      const int64_t cols = std::min(J, N - j0);
      vec_t acc[kRowTile] = {};
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* d_ft = d_f + t * N + j0;
        vec_t dv;
        if (cols == J) {
          for (int64_t j = 0; j < J; ++j) dv[j] = static_cast<acc_t>(d_ft[j]);
        } else {
          for (int64_t j = 0; j < J; ++j) dv[j] = j < cols ? static_cast<acc_t>(d_ft[j]) : acc_t(0);
        }
        for (int64_t r = 0; r < kRowTile; ++r) acc[r] += (r < rows ? u_tile[r * T + t] : acc_t(0)) * dv;
      }
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* y_row = g.y + (p * M + m0 + r) * N + j0;
        for (int64_t j = 0; j < cols; ++j) {
          const acc_t b = g.bias ? static_cast<acc_t>(g.bias[j0 + j]) : acc_t(0);
          const acc_t db = g.d_bias ? static_cast<acc_t>(g.d_bias[f * N + j0 + j]) : acc_t(0);
          y_row[j] = static_cast<scalar_t>(static_cast<acc_t>(y_row[j]) + b + s * (acc[r][j] + db));
        }
      }
    }
  }
}

template <typename scalar_t>
void probe_linear_update_cpu(ProbeLinearPrologue& pr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = pr.y.size(0), M = pr.y.size(1), N = pr.y.size(2);
  const int64_t T = pr.d.size(1);
  const UpdateArgs<scalar_t> args{pr.y.data_ptr<scalar_t>(),
                                  pr.u.data_ptr<acc_t>(),
                                  pr.d.data_ptr<scalar_t>(),
                                  pr.bias.defined() ? pr.bias.data_ptr<scalar_t>() : nullptr,
                                  pr.d_bias.defined() ? pr.d_bias.data_ptr<scalar_t>() : nullptr,
                                  pr.scale.data_ptr<acc_t>(),
                                  M,
                                  N,
                                  pr.d.size(0),
                                  T,
                                  (M + kRowTile - 1) / kRowTile};
  // Consecutive tiles share a direction, so a thread's chunk keeps D[f] hot in cache.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kRowTile * T * N));
  at::parallel_for(0, P * args.row_tiles, grain,
                   [&](int64_t begin, int64_t end) { update_tiles<scalar_t>(args, begin, end); });
}

at::Tensor probe_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& a, const at::Tensor& d, const std::optional<at::Tensor>& d_bias,
                            const at::Tensor& scale) {
  ProbeLinearPrologue pr = probe_linear_prologue(x, weight, bias, a, d, d_bias, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.y.scalar_type(), "probe_linear_cpu",
                                  [&] { probe_linear_update_cpu<scalar_t>(pr); });
  return pr.y;
}

}  // namespace
}  // namespace dcr_fast

TORCH_LIBRARY_IMPL(dcr_fast, CPU, m) { m.impl("probe_linear", &dcr_fast::probe_linear_cpu); }
