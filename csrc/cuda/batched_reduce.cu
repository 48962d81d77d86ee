// CUDA entry points of imaml_ext::batched_dot and imaml_ext::batched_sq_norm
// (see imaml_ext/ops.py for the contracts). One launch when a row fits one
// slice; otherwise per-slice partials, then one block per row sums them
// (batched_dot_launch in block_reduce.cuh).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace imaml_ext::cuda {

namespace {

// out[t] = <x_t, y_t>; y may equal x.
at::Tensor batched_dot_impl(const at::Tensor& x, const at::Tensor& y) {
  at::Tensor out = at::empty({x.size(0)}, x.options());
  if (x.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batched_dot", [&] {
    const RowGrid grid(x, row_dot_partial_kernel<scalar_t>);
    const int64_t T = grid.T, P = grid.P, nb = grid.nb;
    at::Tensor part;
    if (nb > 1) part = at::empty({T * nb}, x.options().dtype(at::kDouble));
    batched_dot_launch(StreamLauncher{c10::cuda::getCurrentCUDAStream()},
                       x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), T, P, nb,
                       data_or_null<acc_t>(part));
  });
  return out;
}

at::Tensor batched_dot_cuda(const at::Tensor& x, const at::Tensor& y) {
  check_batched_dot(x, y);
  return batched_dot_impl(x, y);
}

at::Tensor batched_sq_norm_cuda(const at::Tensor& x) {
  check_batched_sq_norm(x);
  return batched_dot_impl(x, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("batched_dot", &batched_dot_cuda);
  m.impl("batched_sq_norm", &batched_sq_norm_cuda);
}

}  // namespace imaml_ext::cuda
