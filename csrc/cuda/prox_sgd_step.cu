// CUDA entry point of imaml_ext::prox_sgd_step_: checks, scratch, dispatch;
// the kernels and their launch sequence are in prox_sgd_step_kernels.cuh.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"
#include "prox_sgd_step_kernels.cuh"

namespace imaml_ext::cuda {

namespace {

void prox_sgd_step_cuda(at::Tensor& phi, const at::Tensor& g,
                        const at::Tensor& theta, double lr, double lam,
                        double max_norm) {
  check_prox_sgd_step(phi, g, theta);
  if (phi.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "prox_sgd_step_", [&] {
    const RowGrid grid(phi, prox_sgd_step_kernel<scalar_t>, row_dot_partial_kernel<scalar_t>);
    const int64_t T = grid.T, P = grid.P, nb = grid.nb;
    at::Tensor part;
    if (max_norm > 0 && nb > 1) part = at::empty({T * nb}, phi.options().dtype(at::kDouble));
    prox_sgd_step_launch(StreamLauncher{c10::cuda::getCurrentCUDAStream()},
                         phi.data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                         theta.const_data_ptr<scalar_t>(), static_cast<scalar_t>(lr),
                         static_cast<scalar_t>(lam), static_cast<scalar_t>(max_norm), T, P, nb,
                         data_or_null<acc_t>(part));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("prox_sgd_step_", &prox_sgd_step_cuda);
}

}  // namespace imaml_ext::cuda
