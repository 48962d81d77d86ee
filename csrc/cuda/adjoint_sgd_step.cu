// CUDA kernels of imaml_ext::adjoint_sgd_step_ (see csrc/library.cpp for the
// contract). One pass reads each element of adj once, for <g_t, adj_t>, and
// overwrites it with adj - lr*Ha. When a row spans several slices, a second
// small launch subtracts the row totals of the per-slice partials from
// lr_grad.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace imaml_ext::cuda {

namespace {

// Grid: T * nb blocks. With nb == 1 (part null) the block subtracts its row's
// <g, adj> from lr_grad itself; otherwise it writes the slice partial.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) adjoint_sgd_step_kernel(
    scalar_t* __restrict__ adj, const scalar_t* __restrict__ Ha,
    const scalar_t* __restrict__ g, scalar_t* __restrict__ lr_grad,
    scalar_t lr, int64_t P, int64_t nb, scalar_t* __restrict__ part) {
  const Slice sl = block_slice(nb, P);
  const int64_t off = sl.t * P;
  scalar_t* __restrict__ adj_t = adj + off;
  const scalar_t* __restrict__ Ha_t = Ha + off;
  const scalar_t* __restrict__ g_t = g + off;
  scalar_t acc = 0;
  for_each_pack(
      packed_slice(sl.begin, sl.end, adj_t, Ha_t, g_t), threadIdx.x, kThreads,
      [&](int64_t i, auto w) {
        constexpr int N = decltype(w)::value;
        const auto hv = load<N>(Ha_t + i);
        const auto gv = load<N>(g_t + i);
        auto av = load<N>(adj_t + i);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          acc += gv.v[k] * av.v[k];
          av.v[k] = av.v[k] - lr * hv.v[k];
        }
        store<N>(adj_t + i, av);
      });
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    if (part != nullptr) {
      part[blockIdx.x] = acc;
    } else {
      lr_grad[sl.t] -= acc;
    }
  }
}

void adjoint_sgd_step_cuda(at::Tensor& adj, const at::Tensor& Ha,
                           const at::Tensor& g, at::Tensor& lr_grad, double lr) {
  check_adjoint_sgd_step(adj, Ha, g, lr_grad);
  const int64_t T = adj.size(0);
  const int64_t P = adj.size(1);
  if (T == 0) return;
  const c10::cuda::CUDAGuard guard(adj.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t nb = slices_per_row(T, P);
  AT_DISPATCH_FLOATING_TYPES(adj.scalar_type(), "adjoint_sgd_step_", [&] {
    at::Tensor part;
    if (nb > 1) part = at::empty({T * nb}, adj.options());
    adjoint_sgd_step_kernel<scalar_t><<<grid_blocks(T, nb), kThreads, 0, stream>>>(
        adj.data_ptr<scalar_t>(), Ha.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
        lr_grad.data_ptr<scalar_t>(), static_cast<scalar_t>(lr), P, nb,
        nb > 1 ? part.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (nb > 1) {
      row_total_kernel<scalar_t><<<grid_blocks(T, 1), kThreads, 0, stream>>>(
          part.data_ptr<scalar_t>(), nb, /*subtract=*/true,
          lr_grad.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("adjoint_sgd_step_", &adjoint_sgd_step_cuda);
}

}  // namespace imaml_ext::cuda
