// Kernels and launch sequence of imaml_ext::prox_sgd_step_ on CUDA (see
// imaml_ext/ops.py for the contract; prox_sgd_step.cu launches them). Without
// clipping, or when a row fits one slice: one launch. With clipping over
// several slices per row: per-slice partials of ||g_t||^2 first, then the
// update, every block summing its row's partials.
#pragma once

#include <cstdint>

#include "block_reduce.cuh"

namespace imaml_ext::cuda {

// Grid: T * nb blocks. part_sq holds the per-slice partials of ||g_t||^2 when
// nb > 1 and is null when nb == 1 (the block then computes ||g_t||^2 itself).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) prox_sgd_step_kernel(
    scalar_t* __restrict__ phi, const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ theta, scalar_t lr, scalar_t lam,
    scalar_t max_norm, int64_t P, int64_t nb,
    const acc_t* __restrict__ part_sq) {
  const Slice sl = block_slice(nb, P);
  const int64_t off = sl.t * P;
  scalar_t* __restrict__ phi_t = phi + off;
  const scalar_t* __restrict__ g_t = g + off;
  scalar_t scale = 1;
  if (max_norm > 0) {
    acc_t sq;
    if (part_sq != nullptr) {
      sq = row_total(part_sq, sl.t, nb);
    } else {
      sq = block_sum(dot_share(g_t, g_t, sl.begin, sl.end));
    }
    const acc_t q = acc_t(max_norm) / (sqrt(sq) + acc_t(1e-6));
    scale = static_cast<scalar_t>(q < acc_t(1) ? q : acc_t(1));
  }
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

// The whole step for T rows of nb slices; part_sq (T * nb elements) is
// needed only when max_norm > 0 and nb > 1.
template <typename Launch, typename scalar_t>
void prox_sgd_step_launch(const Launch& launch, scalar_t* phi, const scalar_t* g,
                          const scalar_t* theta, scalar_t lr, scalar_t lam, scalar_t max_norm,
                          int64_t T, int64_t P, int64_t nb, acc_t* part_sq) {
  const unsigned blocks = static_cast<unsigned>(T * nb);
  const bool partials = max_norm > 0 && nb > 1;
  if (partials) {
    launch(row_dot_partial_kernel<scalar_t>, blocks, g, g, P, nb, part_sq,
           static_cast<scalar_t*>(nullptr));
  }
  launch(prox_sgd_step_kernel<scalar_t>, blocks, phi, g, theta, lr, lam, max_norm, P, nb,
         static_cast<const acc_t*>(partials ? part_sq : nullptr));
}

}  // namespace imaml_ext::cuda
