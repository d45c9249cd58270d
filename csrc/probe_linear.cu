// probe_linear: the CUDA kernel of the fused update y += b + scale * (u D + d_bias).
// Shapes and maths: probe_linear.h; the prologue (checks, cuBLAS GEMMs through ATen) is shared
// with the CPU path in probe_linear.cpp. Only headers that compile against a CPU torch wheel are
// used (no ATen/cuda/CUDAContext.h), so .ci/check_cuda.sh can compile-check this file anywhere.
#include "probe_linear.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace dcr_fast {
namespace {

constexpr int kCols = 128;   // threads per block, one output column each
constexpr int kRows = 8;     // rows of one direction per block, kept in registers
constexpr int kTChunk = 32;  // rank slice of u staged in shared memory at a time

// Block (column tile, row tile, direction p). Each thread owns column j for kRows rows: it
// streams D[f, t, j] once per t (coalesced across the block) and reuses it for every row,
// while the u values of those rows are shared by all columns through shared memory.
template <typename scalar_t, typename acc_t>
__global__ void probe_linear_update_kernel(scalar_t* __restrict__ y, const acc_t* __restrict__ u,
                                           const scalar_t* __restrict__ d, const scalar_t* __restrict__ bias,
                                           const scalar_t* __restrict__ d_bias,
                                           const acc_t* __restrict__ scale, int64_t M, int64_t N, int64_t T,
                                           int64_t F) {
  __shared__ acc_t u_tile[kRows][kTChunk];
  const int64_t p = blockIdx.z;
  const int64_t f = p % F;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int rows = static_cast<int>(M - m0 < kRows ? M - m0 : kRows);
  const bool active = j < N;
  const scalar_t* d_f = d + f * T * N;

  acc_t acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = acc_t(0);

  for (int64_t t0 = 0; t0 < T; t0 += kTChunk) {
    const int tc = static_cast<int>(T - t0 < kTChunk ? T - t0 : kTChunk);
    for (int i = threadIdx.x; i < kRows * kTChunk; i += kCols) {
      const int r = i / kTChunk, t = i % kTChunk;
      u_tile[r][t] = (r < rows && t < tc) ? u[((p * M) + m0 + r) * T + t0 + t] : acc_t(0);
    }
    __syncthreads();
    if (active) {
      for (int t = 0; t < tc; ++t) {
        const acc_t dv = static_cast<acc_t>(d_f[(t0 + t) * N + j]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] += u_tile[r][t] * dv;
      }
    }
    __syncthreads();
  }
  if (!active) return;
  const acc_t b = bias ? static_cast<acc_t>(bias[j]) : acc_t(0);
  const acc_t db = d_bias ? static_cast<acc_t>(d_bias[f * N + j]) : acc_t(0);
  const acc_t s = scale[p];
  for (int r = 0; r < rows; ++r) {
    const int64_t idx = ((p * M) + m0 + r) * N + j;
    y[idx] = static_cast<scalar_t>(static_cast<acc_t>(y[idx]) + b + s * (acc[r] + db));
  }
}

at::Tensor probe_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& a, const at::Tensor& d, const std::optional<at::Tensor>& d_bias,
                             const at::Tensor& scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  ProbeLinearPrologue pr = probe_linear_prologue(x, weight, bias, a, d, d_bias, scale);
  const int64_t P = pr.y.size(0), M = pr.y.size(1), N = pr.y.size(2);
  const int64_t F = pr.d.size(0), T = pr.d.size(1);
  if (P == 0 || M == 0 || N == 0) return pr.y;
  TORCH_CHECK_VALUE(P <= 65535, "probe_linear: at most 65535 directions per call on CUDA, got P = ", P);
  TORCH_CHECK_VALUE((M + kRows - 1) / kRows <= 65535, "probe_linear: at most ", 65535 * kRows,
              " rows per direction on CUDA, got M = ", M);
  const dim3 grid(static_cast<unsigned>((N + kCols - 1) / kCols), static_cast<unsigned>((M + kRows - 1) / kRows),
                  static_cast<unsigned>(P));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.y.scalar_type(), "probe_linear_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    probe_linear_update_kernel<scalar_t, acc_t><<<grid, kCols, 0, stream>>>(
        pr.y.data_ptr<scalar_t>(), pr.u.data_ptr<acc_t>(), pr.d.data_ptr<scalar_t>(),
        pr.bias.defined() ? pr.bias.data_ptr<scalar_t>() : nullptr,
        pr.d_bias.defined() ? pr.d_bias.data_ptr<scalar_t>() : nullptr, pr.scale.data_ptr<acc_t>(), M, N, T, F);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return pr.y;
}

}  // namespace
}  // namespace dcr_fast

TORCH_LIBRARY_IMPL(dcr_fast, CUDA, m) { m.impl("probe_linear", &dcr_fast::probe_linear_cuda); }
