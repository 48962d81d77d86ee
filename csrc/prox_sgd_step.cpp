// CPU implementation of imaml_ext::prox_sgd_step_ (see imaml_ext/ops.py for
// the contract); the kernel is cpu/prox_sgd_step.h, chosen through cpu/isa.h.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/isa.h"

namespace imaml_ext {

namespace {

void prox_sgd_step_cpu(at::Tensor& phi, const at::Tensor& g,
                       const at::Tensor& theta, double lr, double lam,
                       double max_norm) {
  check_prox_sgd_step(phi, g, theta);
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "prox_sgd_step_", [&] {
    cpu::vector_kernels<scalar_t>().prox_sgd_step(
        phi.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
        theta.data_ptr<scalar_t>(), static_cast<scalar_t>(lr),
        static_cast<scalar_t>(lam), static_cast<scalar_t>(max_norm),
        phi.size(0), phi.size(1));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("prox_sgd_step_", &prox_sgd_step_cpu);
}

}  // namespace imaml_ext
