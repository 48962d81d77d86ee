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
  if (x.size(0) == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_", [&] {
    const RowGrid grid(x, cg_dots_kernel<scalar_t>, cg_update_kernel<scalar_t>);
    const int64_t T = grid.T, P = grid.P, nb = grid.nb;
    // One allocation (from the caching allocator) for all scratch: the acc_t
    // partials, then the int32 outcomes.
    at::Tensor scratch;
    acc_t* partials = nullptr;
    int32_t* outcome = nullptr;
    if (nb > 1) {
      const int64_t n = cg_step_scratch_size(T, nb);
      scratch = at::empty({n + (T + 1) / 2}, x.options().dtype(at::kDouble));
      partials = scratch.data_ptr<acc_t>();
      outcome = reinterpret_cast<int32_t*>(partials + n);
    }
    cg_step_launch(StreamLauncher{c10::cuda::getCurrentCUDAStream()},
                   x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                   Hp.const_data_ptr<scalar_t>(), rs.data_ptr<scalar_t>(),
                   state.data_ptr<int32_t>(), threshold_sq.const_data_ptr<scalar_t>(),
                   static_cast<scalar_t>(a), static_cast<scalar_t>(b), T, P, nb,
                   partials, outcome);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("cg_step_", &cg_step_cuda);
}

}  // namespace imaml_ext::cuda
