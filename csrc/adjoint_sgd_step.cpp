// CPU kernel of imaml_ext::adjoint_sgd_step_ (see imaml_ext/ops.py for the
// contract). One pass: each element of adj is read once, used for <g_t, adj_t>
// and then overwritten with adj - lr * Ha.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/chunked.h"

namespace imaml_ext {

namespace {

template <typename scalar_t>
void adjoint_sgd_step_kernel(scalar_t* adj, const scalar_t* Ha,
                             const scalar_t* g, scalar_t* lr_grad, scalar_t lr,
                             int64_t T, int64_t P) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec vlr(lr);
  cpu::Partials part(T, P);
  cpu::for_each_chunk(T, P, [&](int64_t t, int64_t c, int64_t begin, int64_t end) {
    scalar_t* adj_t = adj + t * P;
    const scalar_t* ht = Ha + t * P;
    const scalar_t* gt = g + t * P;
    part.at(t, c) = cpu::reduce_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      const Vec av = cpu::load(adj_t + i, n);
      cpu::store(av - vlr * cpu::load(ht + i, n), adj_t + i, n);
      return cpu::load(gt + i, n) * av;
    });
  });
  for (int64_t t = 0; t < T; ++t) {
    lr_grad[t] = static_cast<scalar_t>(static_cast<double>(lr_grad[t]) - part.row_sum(t));
  }
}

void adjoint_sgd_step_cpu(at::Tensor& adj, const at::Tensor& Ha,
                          const at::Tensor& g, at::Tensor& lr_grad, double lr) {
  check_adjoint_sgd_step(adj, Ha, g, lr_grad);
  AT_DISPATCH_FLOATING_TYPES(adj.scalar_type(), "adjoint_sgd_step_", [&] {
    adjoint_sgd_step_kernel<scalar_t>(
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
