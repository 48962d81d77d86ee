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
// that needs the row's total gets the identical value. Every sum accumulates
// in double (acc_t), for float32 inputs too: a thread's share runs over
// thousands of terms at the ResNet-18 size and tens of thousands at P = 1e8,
// and in these memory-bound kernels the wider adds cost nothing. Products of
// two float32 values are exact in double.
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

// The type every reduction accumulates in, and the per-slice partials' type.
using acc_t = double;

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
__device__ __forceinline__ acc_t row_total(const acc_t* part, int64_t t, int64_t nb) {
  acc_t v = 0;
  for (int64_t j = threadIdx.x; j < nb; j += kThreads) {
    v += part[t * nb + j];
  }
  return block_sum(v);
}

// This thread's share of <x, y> over [begin, end) of one row (y may be x).
template <typename scalar_t>
__device__ acc_t dot_share(const scalar_t* __restrict__ x,
                           const scalar_t* __restrict__ y, int64_t begin,
                           int64_t end) {
  acc_t acc = 0;
  for_each_pack(
      packed_slice(begin, end, x, y), threadIdx.x, kThreads, [&](int64_t i, auto w) {
        constexpr int N = decltype(w)::value;
        const auto xv = load<N>(x + i);
        const auto yv = load<N>(y + i);
#pragma unroll
        for (int k = 0; k < N; ++k) acc += acc_t(xv.v[k]) * acc_t(yv.v[k]);
      });
  return acc;
}

// <x, y> over slice k (k = blockIdx.x) of x, y: [T, P], into part[k]; with
// part null (nb == 1), the full row's inner product into out[t] instead.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) row_dot_partial_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t P,
    int64_t nb, acc_t* __restrict__ part, scalar_t* __restrict__ out) {
  const Slice sl = block_slice(nb, P);
  const int64_t off = sl.t * P;
  const acc_t acc = block_sum(dot_share(x + off, y + off, sl.begin, sl.end));
  if (threadIdx.x != 0) return;
  if (part != nullptr) {
    part[blockIdx.x] = acc;
  } else {
    out[sl.t] = static_cast<scalar_t>(acc);
  }
}

// One block per row t: out[t] = total (or out[t] -= total when subtract,
// in double) where total sums part[t * nb : (t + 1) * nb].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) row_total_kernel(
    const acc_t* __restrict__ part, int64_t nb, bool subtract,
    scalar_t* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const acc_t total = row_total(part, t, nb);
  if (threadIdx.x == 0) {
    out[t] = static_cast<scalar_t>(subtract ? acc_t(out[t]) - total : total);
  }
}

// out[t] = <x_t, y_t> for T rows of nb slices (y may equal x); part (T * nb
// elements) is needed only when nb > 1.
template <typename Launch, typename scalar_t>
void batched_dot_launch(const Launch& launch, const scalar_t* x, const scalar_t* y,
                        scalar_t* out, int64_t T, int64_t P, int64_t nb, acc_t* part) {
  if (nb == 1) {
    launch(row_dot_partial_kernel<scalar_t>, static_cast<unsigned>(T), x, y, P, int64_t{1},
           static_cast<acc_t*>(nullptr), out);
    return;
  }
  launch(row_dot_partial_kernel<scalar_t>, static_cast<unsigned>(T * nb), x, y, P, nb, part,
         static_cast<scalar_t*>(nullptr));
  launch(row_total_kernel<scalar_t>, static_cast<unsigned>(T),
         static_cast<const acc_t*>(part), nb, /*subtract=*/false, out);
}

}  // namespace imaml_ext::cuda
