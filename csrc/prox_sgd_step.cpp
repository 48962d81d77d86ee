// CPU kernel of imaml_ext::prox_sgd_step_ (see imaml_ext/ops.py for the contract).
//
// With clipping (max_norm > 0): one pass for ||g_t||^2, one for the update;
// without: the update pass alone.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "cpu/chunked.h"

namespace imaml_ext {

namespace {

template <typename scalar_t>
void prox_sgd_step_kernel(scalar_t* phi, const scalar_t* g,
                          const scalar_t* theta, scalar_t lr, scalar_t lam,
                          scalar_t max_norm, int64_t T, int64_t P) {
  using Vec = at::vec::Vectorized<scalar_t>;
  // scale[t] = min(1, max_norm / (||g_t|| + 1e-6)) when clipping, else 1.
  std::vector<scalar_t> scale(T, scalar_t(1));
  if (max_norm > 0) {
    cpu::Partials part(T, P);
    cpu::for_each_chunk(T, P, [&](int64_t t, int64_t c, int64_t begin, int64_t end) {
      const scalar_t* gt = g + t * P;
      part.at(t, c) = cpu::reduce_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
        const Vec gv = cpu::load(gt + i, n);
        return gv * gv;
      });
    });
    for (int64_t t = 0; t < T; ++t) {
      scale[t] = static_cast<scalar_t>(std::min(
          1.0, static_cast<double>(max_norm) / (std::sqrt(part.row_sum(t)) + 1e-6)));
    }
  }

  const Vec vlr(lr), vlam(lam);
  cpu::for_each_chunk(T, P, [&](int64_t t, int64_t, int64_t begin, int64_t end) {
    scalar_t* pt = phi + t * P;
    const scalar_t* gt = g + t * P;
    const Vec vscale(scale[t]);
    cpu::map_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      const Vec pv = cpu::load(pt + i, n);
      const Vec step = vscale * cpu::load(gt + i, n) + vlam * (pv - cpu::load(theta + i, n));
      cpu::store(pv - vlr * step, pt + i, n);
    });
  });
}

void prox_sgd_step_cpu(at::Tensor& phi, const at::Tensor& g,
                       const at::Tensor& theta, double lr, double lam,
                       double max_norm) {
  check_prox_sgd_step(phi, g, theta);
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "prox_sgd_step_", [&] {
    prox_sgd_step_kernel<scalar_t>(
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
