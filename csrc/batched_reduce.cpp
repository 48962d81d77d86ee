// CPU implementations of imaml_ext::batched_dot and imaml_ext::batched_sq_norm
// (see imaml_ext/ops.py for the contracts); the kernel is cpu/batched_dot.h,
// chosen through cpu/isa.h.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/isa.h"

namespace imaml_ext {

namespace {

at::Tensor batched_dot_impl(const at::Tensor& x, const at::Tensor& y) {
  at::Tensor out = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batched_dot", [&] {
    cpu::vector_kernels<scalar_t>().batched_dot(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                                out.data_ptr<scalar_t>(), x.size(0), x.size(1));
  });
  return out;
}

at::Tensor batched_dot_cpu(const at::Tensor& x, const at::Tensor& y) {
  check_batched_dot(x, y);
  return batched_dot_impl(x, y);
}

at::Tensor batched_sq_norm_cpu(const at::Tensor& x) {
  check_batched_sq_norm(x);
  return batched_dot_impl(x, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("batched_dot", &batched_dot_cpu);
  m.impl("batched_sq_norm", &batched_sq_norm_cpu);
}

}  // namespace imaml_ext
