// Kernels and launch sequence of imaml_ext::cg_step_ on CUDA (see
// imaml_ext/ops.py for the contract; cg_step.cu launches them).
//
// A step must read x, r, p and Hp and write x, r and p: 7 passes over [T, P]
// at the least, and that only if each row stays on chip between the two row
// reductions the step depends on (p'Ap before the x and r updates, r'r before
// the p update). Three paths, by the number of slices per row (nb) and P:
//
// * nb == 1 and P <= kResidentP: cg_step_row_kernel<_, true>, one block per
//   task with the row in registers: reads x, r, p, Hp once, writes x, r, p
//   once (the 7 passes), one launch.
// * nb == 1, longer rows: cg_step_row_kernel<_, false>, one block per task,
//   one launch, 10 passes (as kernels 1 and 2 below) over a row that one
//   block walks twice.
// * nb > 1: three launches, 10 passes:
//   1. cg_dots_kernel (T * nb blocks):   read r, p, Hp (3): per-slice
//      partials of p'Ap, r'Ap, Ap'Ap and r'r
//   2. cg_update_kernel (T * nb blocks): read x, r, p, Hp, write x, r, p (7):
//      every block sums its row's partials, applies the curvature test, gets
//      alpha and, from the expansion of the new r'r, beta; updates x, r and
//      p in one pass; per-slice partials of the new r'r as stored
//   3. cg_finish_kernel (T blocks):      no [T, P] data: rs and state
//   Blocks never write what another block of the same launch reads: kernel 2
//   leaves the per-task outcome in scratch for kernel 3, which alone writes
//   rs and state. The 7-pass minimum would need each row on chip across a
//   grid-wide sync (a cooperative launch), which the [T, P] data of the
//   models this targets does not fit.
//
// The reductions accumulate in double (acc_t); alpha and beta are worked out
// in double and rounded to scalar_t once, as on the CPU.
#pragma once

#include <cstdint>

#include "../cg_state.h"
#include "block_reduce.cuh"

namespace imaml_ext::cuda {

// Per-task outcome of the curvature test, passed from kernel 2 to kernel 3.
// The stop outcomes are the state codes they set (cg_state.h); the other two
// are negative, so they never collide with a state code.
constexpr int32_t kSkip = -2;                                // task was not running
constexpr int32_t kStep = -1;                                // step taken
constexpr int32_t kStopNonPositive = kNonPositiveCurvature;  // p'Ap <= 0
constexpr int32_t kStopNonFinite = kNonFinite;               // p'Ap not finite

// The four row sums a step needs, in this order (also in the scratch
// partials of the multi-slice path).
enum RowSum { kPAp, kRAp, kApAp, kRR, kNumRowSums };

// This thread's shares of p'Ap, r'Ap, Ap'Ap and r'r (Ap = a*p + b*Hp) over
// [begin, end) of one row, added into sum.
template <typename scalar_t>
__device__ void dots_share(const scalar_t* __restrict__ r, const scalar_t* __restrict__ p,
                           const scalar_t* __restrict__ Hp, int64_t begin, int64_t end,
                           scalar_t a, scalar_t b, acc_t (&sum)[kNumRowSums]) {
  for_each_pack(
      packed_slice(begin, end, r, p, Hp), threadIdx.x, kThreads, [&](int64_t i, auto w) {
        constexpr int N = decltype(w)::value;
        const auto rv = load<N>(r + i);
        const auto pv = load<N>(p + i);
        const auto hv = load<N>(Hp + i);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const acc_t ap = acc_t(a * pv.v[k] + b * hv.v[k]);
          sum[kPAp] += acc_t(pv.v[k]) * ap;
          sum[kRAp] += acc_t(rv.v[k]) * ap;
          sum[kApAp] += ap * ap;
          sum[kRR] += acc_t(rv.v[k]) * acc_t(rv.v[k]);
        }
      });
}

// beta of the step with this alpha, from the row sums before it:
//   r_new'r_new = r'r - 2 alpha r'Ap + alpha^2 Ap'Ap
// (sums in double of the very values the step updates), so that p can be
// updated in the same pass as x and r.
template <typename scalar_t>
__device__ __forceinline__ scalar_t beta_of(const acc_t (&sum)[kNumRowSums], scalar_t alpha,
                                            acc_t rs_old) {
  const acc_t al = alpha;
  const acc_t rs_new = sum[kRR] - 2 * al * sum[kRAp] + al * al * sum[kApAp];
  return static_cast<scalar_t>((rs_new > 0 ? rs_new : acc_t(0)) / rs_old);
}

// x += alpha*p, r -= alpha*(a*p + b*Hp), p = r + beta*p over [begin, end) of
// one row in one pass; returns this thread's share of the new r'r.
template <typename scalar_t>
__device__ acc_t update_xrp_share(scalar_t* __restrict__ x, scalar_t* __restrict__ r,
                                  scalar_t* __restrict__ p, const scalar_t* __restrict__ Hp,
                                  int64_t begin, int64_t end, scalar_t a, scalar_t b,
                                  scalar_t alpha, scalar_t beta) {
  acc_t acc = 0;
  for_each_pack(
      packed_slice(begin, end, x, r, p, Hp), threadIdx.x, kThreads, [&](int64_t i, auto w) {
        constexpr int N = decltype(w)::value;
        const auto hv = load<N>(Hp + i);
        auto xv = load<N>(x + i);
        auto rv = load<N>(r + i);
        auto pv = load<N>(p + i);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          xv.v[k] = xv.v[k] + alpha * pv.v[k];
          rv.v[k] = rv.v[k] - alpha * (a * pv.v[k] + b * hv.v[k]);
          pv.v[k] = rv.v[k] + beta * pv.v[k];
          acc += acc_t(rv.v[k]) * acc_t(rv.v[k]);
        }
        store<N>(x + i, xv);
        store<N>(r + i, rv);
        store<N>(p + i, pv);
      });
  return acc;
}

__device__ __forceinline__ int32_t curvature_outcome(acc_t pAp) {
  if (!isfinite(pAp)) return kStopNonFinite;
  return pAp > 0 ? kStep : kStopNonPositive;
}

// Longest row that the one-block-per-task kernel keeps in registers:
// kResidentElems elements of each of p, Ap and r per thread.
constexpr int kResidentElems = 8;
constexpr int64_t kResidentP = int64_t{kThreads} * kResidentElems;

// Thread 0's end of a step taken: rs[t] = rs_new and the convergence test.
template <typename scalar_t>
__device__ __forceinline__ void finish_step(scalar_t* __restrict__ rs,
                                            int32_t* __restrict__ state,
                                            const scalar_t* __restrict__ threshold_sq,
                                            int64_t t, acc_t rs_new) {
  rs[t] = static_cast<scalar_t>(rs_new);
  if (rs_new <= acc_t(threshold_sq[t])) state[t] = kConverged;
}

// The whole step with one block per task (grid: T blocks). InRegisters (P <=
// kResidentP): element j*kThreads + threadIdx.x of the row is this thread's
// slot j, read once into registers and written once (7 passes; a warp's
// accesses are consecutive). Otherwise the block walks the row three times.
template <typename scalar_t, bool InRegisters>
__global__ void __launch_bounds__(kThreads) cg_step_row_kernel(
    scalar_t* __restrict__ x, scalar_t* __restrict__ r, scalar_t* __restrict__ p,
    const scalar_t* __restrict__ Hp, scalar_t* __restrict__ rs,
    int32_t* __restrict__ state, const scalar_t* __restrict__ threshold_sq,
    scalar_t a, scalar_t b, int64_t P) {
  const int64_t t = blockIdx.x;
  if (state[t] != kRunning) return;
  const int64_t off = t * P;
  // Every thread read state[t] before block_sum's barriers, so thread 0 may
  // write it after them.
  if constexpr (InRegisters) {
    scalar_t pv[kResidentElems], ap[kResidentElems], rv[kResidentElems];
    acc_t acc = 0;
#pragma unroll
    for (int j = 0; j < kResidentElems; ++j) {
      const int64_t i = off + int64_t{j} * kThreads + threadIdx.x;
      const bool in = i < off + P;
      pv[j] = in ? p[i] : scalar_t(0);
      ap[j] = in ? a * pv[j] + b * Hp[i] : scalar_t(0);
      rv[j] = in ? r[i] : scalar_t(0);
      acc += acc_t(pv[j]) * acc_t(ap[j]);
    }
    const acc_t pAp = block_sum(acc);
    const int32_t outcome = curvature_outcome(pAp);
    if (outcome != kStep) {
      if (threadIdx.x == 0) state[t] = outcome;
      return;
    }
    const acc_t rs_old = rs[t];
    const scalar_t alpha = static_cast<scalar_t>(rs_old / pAp);
    acc = 0;
#pragma unroll
    for (int j = 0; j < kResidentElems; ++j) {
      const int64_t i = off + int64_t{j} * kThreads + threadIdx.x;
      if (i < off + P) x[i] = x[i] + alpha * pv[j];
      rv[j] = rv[j] - alpha * ap[j];
      acc += acc_t(rv[j]) * acc_t(rv[j]);
    }
    const acc_t rs_new = block_sum(acc);
    const scalar_t beta = static_cast<scalar_t>(rs_new / rs_old);
#pragma unroll
    for (int j = 0; j < kResidentElems; ++j) {
      const int64_t i = off + int64_t{j} * kThreads + threadIdx.x;
      if (i < off + P) {
        r[i] = rv[j];
        p[i] = rv[j] + beta * pv[j];
      }
    }
    if (threadIdx.x == 0) finish_step(rs, state, threshold_sq, t, rs_new);
  } else {
    acc_t sum[kNumRowSums] = {0, 0, 0, 0};
    dots_share(r + off, p + off, Hp + off, 0, P, a, b, sum);
    for (int q = 0; q < kNumRowSums; ++q) sum[q] = block_sum(sum[q]);
    const int32_t outcome = curvature_outcome(sum[kPAp]);
    if (outcome != kStep) {
      if (threadIdx.x == 0) state[t] = outcome;
      return;
    }
    const acc_t rs_old = rs[t];
    const scalar_t alpha = static_cast<scalar_t>(rs_old / sum[kPAp]);
    const acc_t rs_new = block_sum(update_xrp_share(x + off, r + off, p + off, Hp + off, 0, P,
                                                    a, b, alpha, beta_of(sum, alpha, rs_old)));
    if (threadIdx.x == 0) finish_step(rs, state, threshold_sq, t, rs_new);
  }
}

// Kernel 1 (grid: T * nb blocks): per-slice partials of p'Ap, r'Ap, Ap'Ap
// and r'r (Ap = a*p + b*Hp); part[q * T * nb + k] holds sum q over slice k.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cg_dots_kernel(
    const scalar_t* __restrict__ r, const scalar_t* __restrict__ p,
    const scalar_t* __restrict__ Hp, const int32_t* __restrict__ state, scalar_t a,
    scalar_t b, int64_t T, int64_t P, int64_t nb, acc_t* __restrict__ part) {
  const Slice sl = block_slice(nb, P);
  if (state[sl.t] != kRunning) return;
  const int64_t off = sl.t * P;
  acc_t sum[kNumRowSums] = {0, 0, 0, 0};
  dots_share(r + off, p + off, Hp + off, sl.begin, sl.end, a, b, sum);
  for (int q = 0; q < kNumRowSums; ++q) {
    const acc_t total = block_sum(sum[q]);
    if (threadIdx.x == 0) part[q * T * nb + blockIdx.x] = total;
  }
}

// Kernel 2 (grid: T * nb blocks): every block sums its row's partials (the
// same fixed tree everywhere, so all blocks agree), applies the curvature
// test, and with alpha = rs/p'Ap and
//   r_new'r_new = r'r - 2 alpha r'Ap + alpha^2 Ap'Ap
// (exact sums in double of the values it updates, so beta needs no second
// pass), updates x += alpha*p, r -= alpha*Ap, p = r + beta*p in one pass, and
// writes the per-slice partials of the new r'r as stored, for kernel 3. Slice
// 0 of each row records the outcome.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cg_update_kernel(
    scalar_t* __restrict__ x, scalar_t* __restrict__ r, scalar_t* __restrict__ p,
    const scalar_t* __restrict__ Hp, const scalar_t* __restrict__ rs,
    const int32_t* __restrict__ state, scalar_t a, scalar_t b, int64_t T, int64_t P,
    int64_t nb, const acc_t* __restrict__ part, acc_t* __restrict__ part_rr,
    int32_t* __restrict__ outcome) {
  const Slice sl = block_slice(nb, P);
  const bool leader = sl.s == 0 && threadIdx.x == 0;
  if (state[sl.t] != kRunning) {
    if (leader) outcome[sl.t] = kSkip;
    return;
  }
  acc_t sum[kNumRowSums];
  for (int q = 0; q < kNumRowSums; ++q) sum[q] = row_total(part + q * T * nb, sl.t, nb);
  const int32_t o = curvature_outcome(sum[kPAp]);
  if (leader) outcome[sl.t] = o;
  if (o != kStep) return;
  const acc_t rs_old = rs[sl.t];
  const scalar_t alpha = static_cast<scalar_t>(rs_old / sum[kPAp]);
  const int64_t off = sl.t * P;
  const acc_t acc = block_sum(update_xrp_share(x + off, r + off, p + off, Hp + off, sl.begin,
                                               sl.end, a, b, alpha, beta_of(sum, alpha, rs_old)));
  if (threadIdx.x == 0) part_rr[blockIdx.x] = acc;
}

// Kernel 3 (grid: T blocks, no [T, P] data): rs = the new r'r and the
// convergence test, or the stop outcome, per task.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cg_finish_kernel(
    scalar_t* __restrict__ rs, int32_t* __restrict__ state,
    const scalar_t* __restrict__ threshold_sq, int64_t nb,
    const acc_t* __restrict__ part_rr, const int32_t* __restrict__ outcome) {
  const int64_t t = blockIdx.x;
  const int32_t o = outcome[t];
  if (o == kSkip) return;
  if (o != kStep) {
    if (threadIdx.x == 0) state[t] = o;
    return;
  }
  const acc_t rs_new = row_total(part_rr, t, nb);
  if (threadIdx.x == 0) finish_step(rs, state, threshold_sq, t, rs_new);
}

// acc_t elements of cg_step_launch's scratch: with nb > 1, the per-slice
// partials of kernel 1's four sums, then of the new r'r; none with nb == 1.
inline int64_t cg_step_scratch_size(int64_t T, int64_t nb) {
  return nb > 1 ? (kNumRowSums + 1) * T * nb : 0;
}

// The whole step for T rows of nb slices. With nb > 1, scratch holds
// cg_step_scratch_size(T, nb) elements and outcome T entries; with nb == 1
// neither is used.
template <typename Launch, typename scalar_t>
void cg_step_launch(const Launch& launch, scalar_t* x, scalar_t* r, scalar_t* p,
                    const scalar_t* Hp, scalar_t* rs, int32_t* state,
                    const scalar_t* threshold_sq, scalar_t a, scalar_t b, int64_t T,
                    int64_t P, int64_t nb, acc_t* scratch, int32_t* outcome) {
  const unsigned blocks = static_cast<unsigned>(T * nb);
  if (nb == 1) {
    launch(P <= kResidentP ? cg_step_row_kernel<scalar_t, true>
                           : cg_step_row_kernel<scalar_t, false>,
           blocks, x, r, p, Hp, rs, state, threshold_sq, a, b, P);
    return;
  }
  acc_t* part = scratch;
  acc_t* part_rr = part + kNumRowSums * T * nb;
  launch(cg_dots_kernel<scalar_t>, blocks, static_cast<const scalar_t*>(r),
         static_cast<const scalar_t*>(p), Hp, static_cast<const int32_t*>(state), a, b, T, P,
         nb, part);
  launch(cg_update_kernel<scalar_t>, blocks, x, r, p, Hp, static_cast<const scalar_t*>(rs),
         static_cast<const int32_t*>(state), a, b, T, P, nb, static_cast<const acc_t*>(part),
         part_rr, outcome);
  launch(cg_finish_kernel<scalar_t>, static_cast<unsigned>(T), rs, state, threshold_sq, nb,
         static_cast<const acc_t*>(part_rr), static_cast<const int32_t*>(outcome));
}

}  // namespace imaml_ext::cuda
