// CUDA entry point of imaml_ext::cg_step_: checks, scratch, dispatch; the
// kernels and their launch sequence are in cg_step_kernels.cuh.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "cg_step_kernels.cuh"
#include "common.cuh"

namespace imaml_ext::cuda {

namespace {

void cg_step_cuda(at::Tensor& x, at::Tensor& r, at::Tensor& p,
                  const at::Tensor& Hp, at::Tensor& rs, at::Tensor& state,
                  const at::Tensor& threshold_sq, double a, double b) {
  check_cg_step(x, r, p, Hp, rs, state, threshold_sq);
  const RowGrid grid(x);
  const int64_t T = grid.T, P = grid.P, nb = grid.nb;
  if (T == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_", [&] {
    at::Tensor scratch, outcome;
    if (nb > 1) {
      scratch = at::empty({cg_step_scratch_size(T, nb)}, x.options());
      outcome = at::empty({T}, state.options());
    }
    cg_step_launch(StreamLauncher{c10::cuda::getCurrentCUDAStream()},
                   x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                   Hp.const_data_ptr<scalar_t>(), rs.data_ptr<scalar_t>(),
                   state.data_ptr<int32_t>(), threshold_sq.const_data_ptr<scalar_t>(),
                   static_cast<scalar_t>(a), static_cast<scalar_t>(b), T, P, nb,
                   data_or_null<scalar_t>(scratch), data_or_null<int32_t>(outcome));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("cg_step_", &cg_step_cuda);
}

}  // namespace imaml_ext::cuda
