// CPU kernel of imaml_ext::cg_step_ (see imaml_ext/ops.py for the contract).
//
// Three passes over memory, each parallel over (task, chunk):
//   1. pAp_t = <p_t, a*p_t + b*Hp_t>
//   2. x_t += alpha_t*p_t, r_t -= alpha_t*Ap_t, rs_new_t = <r_t, r_t>
//      (Ap is recomputed rather than stored)
//   3. p_t = r_t + (rs_new_t / rs_t) * p_t
// with the per-task scalars (alpha, beta, state) settled between passes, from
// sums accumulated in double (cpu/chunked.h).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "cg_state.h"
#include "checks.h"
#include "cpu/chunked.h"

namespace imaml_ext {

namespace {

template <typename scalar_t>
void cg_step_kernel(scalar_t* x, scalar_t* r, scalar_t* p, const scalar_t* Hp,
                    scalar_t* rs, int32_t* state, const scalar_t* threshold_sq,
                    scalar_t a, scalar_t b, int64_t T, int64_t P) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec va(a), vb(b);
  // live[t]: task t takes part in the pass being run.
  std::vector<uint8_t> live(T);
  for (int64_t t = 0; t < T; ++t) {
    live[t] = state[t] == kRunning;
  }
  cpu::Partials part(T, P);

  cpu::for_each_chunk(T, P, [&](int64_t t, int64_t c, int64_t begin, int64_t end) {
    if (!live[t]) return;
    const scalar_t* pt = p + t * P;
    const scalar_t* ht = Hp + t * P;
    part.at(t, c) = cpu::reduce_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      const Vec pv = cpu::load(pt + i, n);
      return pv * (va * pv + vb * cpu::load(ht + i, n));
    });
  });

  std::vector<scalar_t> alpha(T);
  for (int64_t t = 0; t < T; ++t) {
    if (!live[t]) continue;
    const double pAp = part.row_sum(t);
    if (!std::isfinite(pAp)) {
      state[t] = kNonFinite;
      live[t] = 0;
    } else if (pAp <= 0) {
      state[t] = kNonPositiveCurvature;
      live[t] = 0;
    } else {
      alpha[t] = static_cast<scalar_t>(static_cast<double>(rs[t]) / pAp);
    }
  }

  cpu::for_each_chunk(T, P, [&](int64_t t, int64_t c, int64_t begin, int64_t end) {
    if (!live[t]) return;
    scalar_t* xt = x + t * P;
    scalar_t* rt = r + t * P;
    const scalar_t* pt = p + t * P;
    const scalar_t* ht = Hp + t * P;
    const Vec valpha(alpha[t]);
    part.at(t, c) = cpu::reduce_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      const Vec pv = cpu::load(pt + i, n);
      const Vec ap = va * pv + vb * cpu::load(ht + i, n);
      cpu::store(cpu::load(xt + i, n) + valpha * pv, xt + i, n);
      const Vec rv = cpu::load(rt + i, n) - valpha * ap;
      cpu::store(rv, rt + i, n);
      return rv * rv;
    });
  });

  std::vector<scalar_t> beta(T);
  for (int64_t t = 0; t < T; ++t) {
    if (!live[t]) continue;
    const double rs_new = part.row_sum(t);
    beta[t] = static_cast<scalar_t>(rs_new / static_cast<double>(rs[t]));
    rs[t] = static_cast<scalar_t>(rs_new);
    if (rs_new <= static_cast<double>(threshold_sq[t])) {
      state[t] = kConverged;
    }
  }

  cpu::for_each_chunk(T, P, [&](int64_t t, int64_t, int64_t begin, int64_t end) {
    if (!live[t]) return;
    const scalar_t* rt = r + t * P;
    scalar_t* pt = p + t * P;
    const Vec vbeta(beta[t]);
    cpu::map_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      cpu::store(cpu::load(rt + i, n) + vbeta * cpu::load(pt + i, n), pt + i, n);
    });
  });
}

void cg_step_cpu(at::Tensor& x, at::Tensor& r, at::Tensor& p,
                 const at::Tensor& Hp, at::Tensor& rs, at::Tensor& state,
                 const at::Tensor& threshold_sq, double a, double b) {
  check_cg_step(x, r, p, Hp, rs, state, threshold_sq);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_", [&] {
    cg_step_kernel<scalar_t>(
        x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
        Hp.data_ptr<scalar_t>(), rs.data_ptr<scalar_t>(),
        state.data_ptr<int32_t>(), threshold_sq.data_ptr<scalar_t>(),
        static_cast<scalar_t>(a), static_cast<scalar_t>(b), x.size(0),
        x.size(1));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("cg_step_", &cg_step_cpu);
}

}  // namespace imaml_ext
