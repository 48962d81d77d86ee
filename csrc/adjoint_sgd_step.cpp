// CPU implementation of imaml_ext::adjoint_sgd_step_ (see imaml_ext/ops.py
// for the contract); the kernel is cpu/adjoint_sgd_step.h, chosen through
// cpu/isa.h.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/isa.h"

namespace imaml_ext {

namespace {

void adjoint_sgd_step_cpu(at::Tensor& adj, const at::Tensor& Ha,
                          const at::Tensor& g, at::Tensor& lr_grad, double lr) {
  check_adjoint_sgd_step(adj, Ha, g, lr_grad);
  AT_DISPATCH_FLOATING_TYPES(adj.scalar_type(), "adjoint_sgd_step_", [&] {
    cpu::vector_kernels<scalar_t>().adjoint_sgd_step(
        adj.data_ptr<scalar_t>(), Ha.data_ptr<scalar_t>(),
        g.data_ptr<scalar_t>(), lr_grad.data_ptr<scalar_t>(),
        static_cast<scalar_t>(lr), adj.size(0), adj.size(1));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("adjoint_sgd_step_", &adjoint_sgd_step_cpu);
}

}  // namespace imaml_ext
