// CPU kernels of imaml_ext::batched_dot and imaml_ext::batched_sq_norm
// (see imaml_ext/ops.py for the contracts): one pass, [T, P] -> [T].
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/chunked.h"

namespace imaml_ext {

namespace {

// out[t] = <x_t, y_t>; y may equal x.
template <typename scalar_t>
void batched_dot_kernel(const scalar_t* x, const scalar_t* y, scalar_t* out,
                        int64_t T, int64_t P) {
  using Vec = at::vec::Vectorized<scalar_t>;
  cpu::Partials part(T, P);
  cpu::for_each_chunk(T, P, [&](int64_t t, int64_t c, int64_t begin, int64_t end) {
    const scalar_t* xt = x + t * P;
    const scalar_t* yt = y + t * P;
    part.at(t, c) = cpu::reduce_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      return cpu::load(xt + i, n) * cpu::load(yt + i, n);
    });
  });
  for (int64_t t = 0; t < T; ++t) {
    out[t] = static_cast<scalar_t>(part.row_sum(t));
  }
}

at::Tensor batched_dot_impl(const at::Tensor& x, const at::Tensor& y) {
  at::Tensor out = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batched_dot", [&] {
    batched_dot_kernel<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
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
