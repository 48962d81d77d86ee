// CUDA kernels of imaml_ext::prox_sgd_step_ (see csrc/library.cpp for the
// contract). Without clipping, or when a row fits one slice: one launch. With
// clipping over several slices per row: per-slice partials of ||g_t||^2
// first, then the update, every block summing its row's partials.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace imaml_ext::cuda {

namespace {

// Grid: T * nb blocks. part_sq holds the per-slice partials of ||g_t||^2 when
// nb > 1 and is null when nb == 1 (the block then computes ||g_t||^2 itself).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) prox_sgd_step_kernel(
    scalar_t* __restrict__ phi, const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ theta, scalar_t lr, scalar_t lam,
    scalar_t max_norm, int64_t P, int64_t nb,
    const scalar_t* __restrict__ part_sq) {
  const Slice sl = block_slice(nb, P);
  const int64_t off = sl.t * P;
  scalar_t scale = 1;
  if (max_norm > 0) {
    scalar_t sq;
    if (part_sq != nullptr) {
      sq = row_total(part_sq, sl.t, nb);
    } else {
      sq = block_sum(dot_share(g + off, g + off, sl.begin, sl.end));
    }
    const scalar_t q = max_norm / (sqrt(sq) + scalar_t(1e-6));
    scale = q < scalar_t(1) ? q : scalar_t(1);
  }
  scalar_t* __restrict__ phi_t = phi + off;
  const scalar_t* __restrict__ g_t = g + off;
  // theta is one row shared by all tasks: it is aligned like phi_t only when
  // t*P is a multiple of the pack width, so it stays out of the cut.
  for_each_pack(
      packed_slice(sl.begin, sl.end, phi_t, g_t), threadIdx.x, kThreads,
      [&](int64_t i, auto w) {
        constexpr int N = decltype(w)::value;
        const auto gv = load<N>(g_t + i);
        const auto tv = load_any<N>(theta + i);
        auto pv = load<N>(phi_t + i);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          pv.v[k] = pv.v[k] - lr * (scale * gv.v[k] + lam * (pv.v[k] - tv.v[k]));
        }
        store<N>(phi_t + i, pv);
      });
}

void prox_sgd_step_cuda(at::Tensor& phi, const at::Tensor& g,
                        const at::Tensor& theta, double lr, double lam,
                        double max_norm) {
  check_prox_sgd_step(phi, g, theta);
  const int64_t T = phi.size(0);
  const int64_t P = phi.size(1);
  if (T == 0) return;
  const c10::cuda::CUDAGuard guard(phi.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t nb = slices_per_row(T, P);
  const unsigned blocks = grid_blocks(T, nb);
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "prox_sgd_step_", [&] {
    at::Tensor part;
    const scalar_t* part_sq = nullptr;
    if (max_norm > 0 && nb > 1) {
      part = at::empty({T * nb}, phi.options());
      row_dot_partial_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), P, nb,
          part.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      part_sq = part.data_ptr<scalar_t>();
    }
    prox_sgd_step_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        phi.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), theta.data_ptr<scalar_t>(),
        static_cast<scalar_t>(lr), static_cast<scalar_t>(lam),
        static_cast<scalar_t>(max_norm), P, nb, part_sq);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("prox_sgd_step_", &prox_sgd_step_cuda);
}

}  // namespace imaml_ext::cuda
