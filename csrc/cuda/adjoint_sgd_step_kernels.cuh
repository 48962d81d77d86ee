// Kernels and launch sequence of imaml_ext::adjoint_sgd_step_ on CUDA (see
// imaml_ext/ops.py for the contract; adjoint_sgd_step.cu launches them). One
// pass reads each element of adj once, for <g_t, adj_t>, and overwrites it
// with adj - lr*Ha. When a row spans several slices, a second small launch
// subtracts the row totals of the per-slice partials from lr_grad.
#pragma once

#include <cstdint>

#include "block_reduce.cuh"

namespace imaml_ext::cuda {

// Grid: T * nb blocks. With nb == 1 (part null) the block subtracts its row's
// <g, adj> from lr_grad itself; otherwise it writes the slice partial.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) adjoint_sgd_step_kernel(
    scalar_t* __restrict__ adj, const scalar_t* __restrict__ Ha,
    const scalar_t* __restrict__ g, scalar_t* __restrict__ lr_grad,
    scalar_t lr, int64_t P, int64_t nb, acc_t* __restrict__ part) {
  const Slice sl = block_slice(nb, P);
  const int64_t off = sl.t * P;
  scalar_t* __restrict__ adj_t = adj + off;
  const scalar_t* __restrict__ Ha_t = Ha + off;
  const scalar_t* __restrict__ g_t = g + off;
  acc_t acc = 0;
  for_each_pack(
      packed_slice(sl.begin, sl.end, adj_t, Ha_t, g_t), threadIdx.x, kThreads,
      [&](int64_t i, auto w) {
        constexpr int N = decltype(w)::value;
        const auto hv = load<N>(Ha_t + i);
        const auto gv = load<N>(g_t + i);
        auto av = load<N>(adj_t + i);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          acc += acc_t(gv.v[k]) * acc_t(av.v[k]);
          av.v[k] = av.v[k] - lr * hv.v[k];
        }
        store<N>(adj_t + i, av);
      });
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    if (part != nullptr) {
      part[blockIdx.x] = acc;
    } else {
      lr_grad[sl.t] = static_cast<scalar_t>(acc_t(lr_grad[sl.t]) - acc);
    }
  }
}

// The whole step for T rows of nb slices; part (T * nb elements) is needed
// only when nb > 1.
template <typename Launch, typename scalar_t>
void adjoint_sgd_step_launch(const Launch& launch, scalar_t* adj, const scalar_t* Ha,
                             const scalar_t* g, scalar_t* lr_grad, scalar_t lr, int64_t T,
                             int64_t P, int64_t nb, acc_t* part) {
  launch(adjoint_sgd_step_kernel<scalar_t>, static_cast<unsigned>(T * nb), adj, Ha, g, lr_grad,
         lr, P, nb, nb > 1 ? part : nullptr);
  if (nb > 1) {
    launch(row_total_kernel<scalar_t>, static_cast<unsigned>(T),
           static_cast<const acc_t*>(part), nb, /*subtract=*/true, lr_grad);
  }
}

}  // namespace imaml_ext::cuda
