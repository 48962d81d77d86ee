// Device-side building blocks of the CUDA kernels: the slice of a row that a
// block handles, deterministic block reductions, and the row-reduction kernels
// that several ops share. Element loops go through for_each_pack (packs.h),
// which uses 16-byte loads and stores where the rows are aligned alike.
//
// Each row of P elements is cut into `nb` contiguous slices, one per block:
// a 1-D grid of T * nb blocks where block k handles slice k % nb of row
// k / nb. Sums are taken per thread in index order, then across the block by a
// fixed shuffle tree, so results are reproducible run to run. The per-slice
// partials of a row are added by the same fixed tree, so every block of a row
// that needs the row's total gets the identical value.
//
// Each op's launch sequence (`*_launch`, here and in the *_kernels.cuh
// headers) issues its kernels through a launcher (StreamLauncher in
// common.cuh) and assumes that T * nb blocks fit one grid, which the caller
// has checked (check_grid_size). Device code only, no host API:
// tests/native/cuda_kernels_test.cpp also runs it on the host, under
// tests/native/cuda_emulation.h.
#pragma once

#include <cstdint>

#include "packs.h"

namespace imaml_ext::cuda {

// Threads per block of every kernel.
constexpr int kThreads = 256;

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// The slice [begin, end) of row t that this block handles (s: slice index).
struct Slice {
  int64_t t, s, begin, end;
};

__device__ __forceinline__ Slice block_slice(int64_t nb, int64_t P) {
  Slice sl;
  sl.t = blockIdx.x / nb;
  sl.s = blockIdx.x % nb;
  const int64_t len = (P + nb - 1) / nb;
  sl.begin = min64(P, sl.s * len);
  sl.end = min64(P, sl.begin + len);
  return sl;
}

// Sum of v over the block (blockDim.x == kThreads), returned to every thread.
// Every thread of the block must call it.
template <typename scalar_t>
__device__ scalar_t block_sum(scalar_t v) {
  constexpr int kWarps = kThreads / 32;
  __shared__ scalar_t warp_sums[kWarps];
  __shared__ scalar_t total;
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  // Every thread has read `total` of the previous call before it is rewritten.
  __syncthreads();
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : scalar_t(0);
    for (int offset = 16; offset > 0; offset >>= 1) {
      v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// Sum of the nb per-slice partials of row t, identical in every block.
template <typename scalar_t>
__device__ scalar_t row_total(const scalar_t* part, int64_t t, int64_t nb) {
  scalar_t v = 0;
  for (int64_t j = threadIdx.x; j < nb; j += kThreads) {
    v += part[t * nb + j];
  }
  return block_sum(v);
}

// This thread's share of <x, y> over [begin, end) of one row (y may be x).
template <typename scalar_t>
__device__ scalar_t dot_share(const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ y, int64_t begin,
                              int64_t end) {
  scalar_t acc = 0;
  for_each_pack(
      packed_slice(begin, end, x, y), threadIdx.x, kThreads, [&](int64_t i, auto w) {
        constexpr int N = decltype(w)::value;
        const auto xv = load<N>(x + i);
        const auto yv = load<N>(y + i);
#pragma unroll
        for (int k = 0; k < N; ++k) acc += xv.v[k] * yv.v[k];
      });
  return acc;
}

// part[k] = <x, y> over slice k (k = blockIdx.x) of x, y: [T, P]. With
// nb == 1, part[t] is the full row's inner product.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) row_dot_partial_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t P,
    int64_t nb, scalar_t* __restrict__ part) {
  const Slice sl = block_slice(nb, P);
  const int64_t off = sl.t * P;
  const scalar_t acc = block_sum(dot_share(x + off, y + off, sl.begin, sl.end));
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

// One block per row t: out[t] = total (or out[t] -= total when subtract)
// where total sums part[t * nb : (t + 1) * nb].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) row_total_kernel(
    const scalar_t* __restrict__ part, int64_t nb, bool subtract,
    scalar_t* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const scalar_t total = row_total(part, t, nb);
  if (threadIdx.x == 0) out[t] = subtract ? out[t] - total : total;
}

// out[t] = <x_t, y_t> for T rows of nb slices (y may equal x); part (T * nb
// elements) is needed only when nb > 1.
template <typename Launch, typename scalar_t>
void batched_dot_launch(const Launch& launch, const scalar_t* x, const scalar_t* y,
                        scalar_t* out, int64_t T, int64_t P, int64_t nb, scalar_t* part) {
  if (nb == 1) {
    launch(row_dot_partial_kernel<scalar_t>, static_cast<unsigned>(T), x, y, P, int64_t{1}, out);
    return;
  }
  launch(row_dot_partial_kernel<scalar_t>, static_cast<unsigned>(T * nb), x, y, P, nb, part);
  launch(row_total_kernel<scalar_t>, static_cast<unsigned>(T),
         static_cast<const scalar_t*>(part), nb, /*subtract=*/false, out);
}

}  // namespace imaml_ext::cuda
