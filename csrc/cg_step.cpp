// CPU implementation of imaml_ext::cg_step_ (see imaml_ext/ops.py for the
// contract); the kernel is cpu/cg_step.h, chosen through cpu/isa.h.
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

#include "checks.h"
#include "cpu/isa.h"

namespace imaml_ext {

namespace {

void cg_step_cpu(at::Tensor& x, at::Tensor& r, at::Tensor& p,
                 const at::Tensor& Hp, at::Tensor& rs, at::Tensor& state,
                 const at::Tensor& threshold_sq, double a, double b) {
  check_cg_step(x, r, p, Hp, rs, state, threshold_sq);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_", [&] {
    cpu::vector_kernels<scalar_t>().cg_step(
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
