// CUDA entry point of imaml_ext::adjoint_sgd_step_: checks, scratch,
// dispatch; the kernels and their launch sequence are in
// adjoint_sgd_step_kernels.cuh.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "adjoint_sgd_step_kernels.cuh"
#include "common.cuh"

namespace imaml_ext::cuda {

namespace {

void adjoint_sgd_step_cuda(at::Tensor& adj, const at::Tensor& Ha,
                           const at::Tensor& g, at::Tensor& lr_grad, double lr) {
  check_adjoint_sgd_step(adj, Ha, g, lr_grad);
  if (adj.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES(adj.scalar_type(), "adjoint_sgd_step_", [&] {
    const RowGrid grid(adj, adjoint_sgd_step_kernel<scalar_t>);
    const int64_t T = grid.T, P = grid.P, nb = grid.nb;
    at::Tensor part;
    if (nb > 1) part = at::empty({T * nb}, adj.options().dtype(at::kDouble));
    adjoint_sgd_step_launch(StreamLauncher{c10::cuda::getCurrentCUDAStream()},
                            adj.data_ptr<scalar_t>(), Ha.const_data_ptr<scalar_t>(),
                            g.const_data_ptr<scalar_t>(), lr_grad.data_ptr<scalar_t>(),
                            static_cast<scalar_t>(lr), T, P, nb,
                            data_or_null<acc_t>(part));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("adjoint_sgd_step_", &adjoint_sgd_step_cuda);
}

}  // namespace imaml_ext::cuda
