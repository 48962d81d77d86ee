// Helpers for the CUDA kernels: launch geometry over the rows of a [T, P]
// buffer, deterministic block reductions, and the row-reduction kernels that
// several ops share. Element loops go through for_each_pack (packs.h), which
// uses 16-byte loads and stores where the rows are aligned.
//
// Each row of P elements is cut into `nb` contiguous slices, one per block:
// a 1-D grid of T * nb blocks where block k handles slice k % nb of row
// k / nb. Sums are taken per thread in index order, then across the block by a
// fixed shuffle tree, so results are reproducible run to run. The per-slice
// partials of a row are added by the same fixed tree, so every block of a row
// that needs the row's total gets the identical value.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "packs.h"

namespace imaml_ext::cuda {

constexpr int kThreads = 256;
// Shortest slice worth a block of its own.
constexpr int64_t kMinSlice = 4096;

// Slices per row: enough blocks to fill the GPU several times over, but no
// slice shorter than kMinSlice. A result of 1 (one block per row) lets an op
// finish a row inside a single kernel.
inline int64_t slices_per_row(int64_t T, int64_t P) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t target_blocks = 8 * static_cast<int64_t>(sms);
  const int64_t by_size = std::max<int64_t>(1, (P + kMinSlice - 1) / kMinSlice);
  const int64_t by_grid = std::max<int64_t>(1, (target_blocks + T - 1) / std::max<int64_t>(T, 1));
  return std::min(by_size, by_grid);
}

// Number of blocks of a launch over T rows of nb slices.
inline unsigned grid_blocks(int64_t T, int64_t nb) {
  TORCH_CHECK(
      T * nb <= std::numeric_limits<int>::max(),
      "imaml_ext: too many tasks for one launch (T = ", std::to_string(T), ")");
  return static_cast<unsigned>(T * nb);
}

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

}  // namespace imaml_ext::cuda
