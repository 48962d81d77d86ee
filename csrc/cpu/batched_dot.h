// The kernel of imaml_ext::batched_dot and imaml_ext::batched_sq_norm: one
// pass, [T, P] -> [T].
// Compiled once per instruction set (cpu/isa_kernels.h).
#pragma once

#include "chunked.h"

namespace imaml_ext::cpu::IMAML_EXT_ISA {

// out[t] = <x_t, y_t>; y may equal x.
template <typename scalar_t>
void batched_dot(const scalar_t* x, const scalar_t* y, scalar_t* out,
                 int64_t T, int64_t P) {
  Partials part(T, P);
  for_each_chunk(T, P, [&](int64_t t, int64_t c, int64_t begin, int64_t end) {
    const scalar_t* xt = x + t * P;
    const scalar_t* yt = y + t * P;
    part.at(t, c) = reduce_chunk<scalar_t>(begin, end, [&](int64_t i, int64_t n) {
      return load(xt + i, n) * load(yt + i, n);
    });
  });
  for (int64_t t = 0; t < T; ++t) {
    out[t] = static_cast<scalar_t>(part.row_sum(t));
  }
}

}  // namespace imaml_ext::cpu::IMAML_EXT_ISA
