// The kernel of imaml_ext::prox_sgd_step_: with clipping (max_norm > 0) one
// pass for ||g_t||^2, one for the update; without, the update pass alone.
// Compiled once per instruction set (cpu/isa_kernels.h).
#pragma once

#include "chunked.h"

namespace imaml_ext::cpu::IMAML_EXT_ISA {

template <typename scalar_t>
void prox_sgd_step(scalar_t* phi, const scalar_t* g,
                   const scalar_t* theta, scalar_t lr, scalar_t lam,
                   scalar_t max_norm, int64_t T, int64_t P) {
  using Vec = at::vec::Vectorized<scalar_t>;
  // scale[t] = min(1, max_norm / (||g_t|| + 1e-6)) when clipping, else 1.
  std::vector<scalar_t> scale(T, scalar_t(1));
  if (max_norm > 0) {
    Partials part(T, P);
    for_each_chunk(T, P, [&](int64_t t, int64_t c, int64_t begin, int64_t end) {
      const scalar_t* gt = g + t * P;
      part.at(t, c) = reduce_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
        const Vec gv = load(gt + i, n);
        return gv * gv;
      });
    });
    for (int64_t t = 0; t < T; ++t) {
      scale[t] = static_cast<scalar_t>(std::min(
          1.0, static_cast<double>(max_norm) / (std::sqrt(part.row_sum(t)) + 1e-6)));
    }
  }

  const Vec vlr(lr), vlam(lam);
  for_each_chunk(T, P, [&](int64_t t, int64_t, int64_t begin, int64_t end) {
    scalar_t* pt = phi + t * P;
    const scalar_t* gt = g + t * P;
    const Vec vscale(scale[t]);
    map_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      const Vec pv = load(pt + i, n);
      const Vec step = vscale * load(gt + i, n) + vlam * (pv - load(theta + i, n));
      store(pv - vlr * step, pt + i, n);
    });
  });
}

}  // namespace imaml_ext::cpu::IMAML_EXT_ISA
