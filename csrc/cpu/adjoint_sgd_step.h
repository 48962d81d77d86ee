// The kernel of imaml_ext::adjoint_sgd_step_: one pass, each element of adj
// read once, used for <g_t, adj_t> and then overwritten with adj - lr * Ha.
// Compiled once per instruction set (cpu/isa_kernels.h).
#pragma once

#include "chunked.h"

namespace imaml_ext::cpu::IMAML_EXT_ISA {

template <typename scalar_t>
void adjoint_sgd_step(scalar_t* adj, const scalar_t* Ha,
                      const scalar_t* g, scalar_t* lr_grad, scalar_t lr,
                      int64_t T, int64_t P) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec vlr(lr);
  Partials part(T, P);
  for_each_chunk(T, P, [&](int64_t t, int64_t c, int64_t begin, int64_t end) {
    scalar_t* adj_t = adj + t * P;
    const scalar_t* ht = Ha + t * P;
    const scalar_t* gt = g + t * P;
    part.at(t, c) = reduce_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      const Vec av = load(adj_t + i, n);
      store(av - vlr * load(ht + i, n), adj_t + i, n);
      return load(gt + i, n) * av;
    });
  });
  for (int64_t t = 0; t < T; ++t) {
    lr_grad[t] = static_cast<scalar_t>(static_cast<double>(lr_grad[t]) - part.row_sum(t));
  }
}

}  // namespace imaml_ext::cpu::IMAML_EXT_ISA
