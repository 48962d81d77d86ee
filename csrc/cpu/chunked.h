// Helpers for the CPU kernels: parallel loops over fixed-size chunks of the
// rows of a [T, P] buffer, and vectorized per-chunk sums.
//
// Reductions are deterministic: each chunk is summed in a fixed order and the
// chunk partials of a row are then added in chunk order, so the result does not
// depend on the number of threads. They accumulate in double for float32 and
// float64 alike.
//
// Compiled once per instruction set (cpu/isa_kernels.h): at::vec::Vectorized
// is that instruction set's.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "isa_prelude.h"

namespace imaml_ext::cpu::IMAML_EXT_ISA {

// Elements per chunk. Fixed (not derived from the thread count) so that the
// summation order, and hence every result bit, is reproducible.
constexpr int64_t kChunk = 8192;

inline int64_t num_chunks(int64_t P) {
  return (P + kChunk - 1) / kChunk;
}

// Calls f(t, c, begin, end) for chunk c = [begin, end) of every row t, with
// the T * num_chunks(P) chunks spread over at::parallel_for's threads.
template <typename F>
void for_each_chunk(int64_t T, int64_t P, const F& f) {
  const int64_t nc = num_chunks(P);
  at::parallel_for(0, T * nc, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = i / nc;
      const int64_t c = i % nc;
      f(t, c, c * kChunk, std::min(P, (c + 1) * kChunk));
    }
  });
}

// Loads n <= Vec::size() elements from ptr; lanes past n are zero.
template <typename scalar_t>
inline at::vec::Vectorized<scalar_t> load(const scalar_t* ptr, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  return n == Vec::size() ? Vec::loadu(ptr) : Vec::loadu(ptr, n);
}

// Stores the first n <= Vec::size() lanes of v to ptr.
template <typename scalar_t>
inline void store(const at::vec::Vectorized<scalar_t>& v, scalar_t* ptr,
                  int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  if (n == Vec::size()) {
    v.store(ptr);
  } else {
    v.store(ptr, static_cast<int>(n));
  }
}

// Returns the sum over [begin, end) of term(i, n), a Vectorized<scalar_t>
// built from the n elements starting at i (n < Vec::size() only at the end of
// the range; lanes past n must be zero, which load() guarantees for products
// of loaded values). term may also store updated values: every index is
// visited exactly once. The terms are added in double (one running sum per
// lane, then the lanes in order), whatever scalar_t: a float32 sum over
// thousands of terms would lose digits the kernels' callers need.
template <typename scalar_t, typename F>
double reduce_chunk(int64_t begin, int64_t end, const F& term) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  double acc[W] = {};
  scalar_t lanes[W];
  for (int64_t i = begin; i < end; i += W) {
    term(i, std::min(W, end - i)).store(lanes);
    for (int64_t k = 0; k < W; ++k) {
      acc[k] += static_cast<double>(lanes[k]);
    }
  }
  double sum = 0;
  for (int64_t k = 0; k < W; ++k) {
    sum += acc[k];
  }
  return sum;
}

// Calls body(i, n) over [begin, end) in steps of Vec::size() elements
// (n < Vec::size() only for the last step).
template <typename scalar_t, typename F>
void map_chunk(int64_t begin, int64_t end, const F& body) {
  constexpr int64_t W = at::vec::Vectorized<scalar_t>::size();
  int64_t i = begin;
  for (; i + W <= end; i += W) {
    body(i, W);
  }
  if (i < end) {
    body(i, end - i);
  }
}

// Per-chunk partial sums (double) of a [T, P] reduction, summed per row in
// chunk order.
class Partials {
 public:
  Partials(int64_t T, int64_t P)
      : nc_(num_chunks(P)), values_(T * nc_, 0.0) {}

  double& at(int64_t t, int64_t c) {
    return values_[t * nc_ + c];
  }

  double row_sum(int64_t t) const {
    double sum = 0;
    for (int64_t c = 0; c < nc_; ++c) {
      sum += values_[t * nc_ + c];
    }
    return sum;
  }

 private:
  int64_t nc_;
  std::vector<double> values_;
};

}  // namespace imaml_ext::cpu::IMAML_EXT_ISA
