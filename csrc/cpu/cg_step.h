// The kernel of imaml_ext::cg_step_ (csrc/cg_step.cpp states its passes).
// Compiled once per instruction set (cpu/isa_kernels.h).
#pragma once

#include "chunked.h"

namespace imaml_ext::cpu::IMAML_EXT_ISA {

template <typename scalar_t>
void cg_step(scalar_t* x, scalar_t* r, scalar_t* p, const scalar_t* Hp,
             scalar_t* rs, int32_t* state, const scalar_t* threshold_sq,
             scalar_t a, scalar_t b, int64_t T, int64_t P) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec va(a), vb(b);
  // live[t]: task t takes part in the pass being run.
  std::vector<uint8_t> live(T);
  for (int64_t t = 0; t < T; ++t) {
    live[t] = state[t] == kRunning;
  }
  Partials part(T, P);

  for_each_chunk(T, P, [&](int64_t t, int64_t c, int64_t begin, int64_t end) {
    if (!live[t]) return;
    const scalar_t* pt = p + t * P;
    const scalar_t* ht = Hp + t * P;
    part.at(t, c) = reduce_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      const Vec pv = load(pt + i, n);
      return pv * (va * pv + vb * load(ht + i, n));
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

  for_each_chunk(T, P, [&](int64_t t, int64_t c, int64_t begin, int64_t end) {
    if (!live[t]) return;
    scalar_t* xt = x + t * P;
    scalar_t* rt = r + t * P;
    const scalar_t* pt = p + t * P;
    const scalar_t* ht = Hp + t * P;
    const Vec valpha(alpha[t]);
    part.at(t, c) = reduce_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      const Vec pv = load(pt + i, n);
      const Vec ap = va * pv + vb * load(ht + i, n);
      store(load(xt + i, n) + valpha * pv, xt + i, n);
      const Vec rv = load(rt + i, n) - valpha * ap;
      store(rv, rt + i, n);
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

  for_each_chunk(T, P, [&](int64_t t, int64_t, int64_t begin, int64_t end) {
    if (!live[t]) return;
    const scalar_t* rt = r + t * P;
    scalar_t* pt = p + t * P;
    const Vec vbeta(beta[t]);
    map_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      store(load(rt + i, n) + vbeta * load(pt + i, n), pt + i, n);
    });
  });
}

}  // namespace imaml_ext::cpu::IMAML_EXT_ISA
