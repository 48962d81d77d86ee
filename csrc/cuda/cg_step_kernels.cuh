// Kernels and launch sequence of imaml_ext::cg_step_ on CUDA (see
// imaml_ext/ops.py for the contract; cg_step.cu launches them).
//
// One block per task (one launch) when a row fits one slice; otherwise three
// launches over T * nb blocks:
//   1. cg_pap_kernel:       per-slice partials of p'Ap, Ap = a*p + b*Hp
//   2. cg_update_xr_kernel: every block sums its row's partials (the same
//      fixed tree everywhere, so all blocks agree on p'Ap), applies the
//      curvature test, x += alpha*p, r -= alpha*Ap, per-slice partials of r'r
//   3. cg_update_p_kernel:  p = r + (rs_new / rs_old)*p, then rs and state
// Blocks never write what another block of the same launch reads: kernel 2
// leaves the per-task outcome and rs_old in scratch for kernel 3, which alone
// writes rs and state.
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

// This thread's share of p'(a*p + b*Hp) over [begin, end) of one row.
template <typename scalar_t>
__device__ scalar_t pap_share(const scalar_t* __restrict__ p,
                              const scalar_t* __restrict__ Hp, int64_t begin,
                              int64_t end, scalar_t a, scalar_t b) {
  scalar_t acc = 0;
  for_each_pack(
      packed_slice(begin, end, p, Hp), threadIdx.x, kThreads, [&](int64_t i, auto w) {
        constexpr int N = decltype(w)::value;
        const auto pv = load<N>(p + i);
        const auto hv = load<N>(Hp + i);
#pragma unroll
        for (int k = 0; k < N; ++k) acc += pv.v[k] * (a * pv.v[k] + b * hv.v[k]);
      });
  return acc;
}

// x += alpha*p and r -= alpha*(a*p + b*Hp) over [begin, end) of one row;
// returns this thread's share of r'r (new r).
template <typename scalar_t>
__device__ scalar_t update_xr_share(scalar_t* __restrict__ x,
                                    scalar_t* __restrict__ r,
                                    const scalar_t* __restrict__ p,
                                    const scalar_t* __restrict__ Hp,
                                    int64_t begin, int64_t end, scalar_t a,
                                    scalar_t b, scalar_t alpha) {
  scalar_t acc = 0;
  for_each_pack(
      packed_slice(begin, end, x, r, p, Hp), threadIdx.x, kThreads, [&](int64_t i, auto w) {
        constexpr int N = decltype(w)::value;
        const auto pv = load<N>(p + i);
        const auto hv = load<N>(Hp + i);
        auto xv = load<N>(x + i);
        auto rv = load<N>(r + i);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          xv.v[k] = xv.v[k] + alpha * pv.v[k];
          rv.v[k] = rv.v[k] - alpha * (a * pv.v[k] + b * hv.v[k]);
          acc += rv.v[k] * rv.v[k];
        }
        store<N>(x + i, xv);
        store<N>(r + i, rv);
      });
  return acc;
}

// p = r + beta*p over [begin, end) of one row.
template <typename scalar_t>
__device__ void update_p(scalar_t* __restrict__ p, const scalar_t* __restrict__ r,
                         int64_t begin, int64_t end, scalar_t beta) {
  for_each_pack(
      packed_slice(begin, end, p, r), threadIdx.x, kThreads, [&](int64_t i, auto w) {
        constexpr int N = decltype(w)::value;
        const auto rv = load<N>(r + i);
        auto pv = load<N>(p + i);
#pragma unroll
        for (int k = 0; k < N; ++k) pv.v[k] = rv.v[k] + beta * pv.v[k];
        store<N>(p + i, pv);
      });
}

template <typename scalar_t>
__device__ __forceinline__ int32_t curvature_outcome(scalar_t pAp) {
  if (!isfinite(pAp)) return kStopNonFinite;
  return pAp > 0 ? kStep : kStopNonPositive;
}

// The whole step with one block per task (grid: T blocks).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cg_step_row_kernel(
    scalar_t* __restrict__ x, scalar_t* __restrict__ r, scalar_t* __restrict__ p,
    const scalar_t* __restrict__ Hp, scalar_t* __restrict__ rs,
    int32_t* __restrict__ state, const scalar_t* __restrict__ threshold_sq,
    scalar_t a, scalar_t b, int64_t P) {
  const int64_t t = blockIdx.x;
  if (state[t] != kRunning) return;
  const int64_t off = t * P;
  const scalar_t pAp = block_sum(pap_share(p + off, Hp + off, 0, P, a, b));
  const int32_t outcome = curvature_outcome(pAp);
  if (outcome != kStep) {
    // Every thread read state[t] before block_sum's barriers.
    if (threadIdx.x == 0) state[t] = outcome;
    return;
  }
  const scalar_t rs_old = rs[t];
  const scalar_t rs_new = block_sum(
      update_xr_share(x + off, r + off, p + off, Hp + off, 0, P, a, b, rs_old / pAp));
  update_p(p + off, r + off, 0, P, rs_new / rs_old);
  if (threadIdx.x == 0) {
    rs[t] = rs_new;
    if (rs_new <= threshold_sq[t]) state[t] = kConverged;
  }
}

// Kernel 1 (grid: T * nb blocks): part_pAp[k] = p'Ap over slice k.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cg_pap_kernel(
    const scalar_t* __restrict__ p, const scalar_t* __restrict__ Hp,
    const int32_t* __restrict__ state, scalar_t a, scalar_t b, int64_t P,
    int64_t nb, scalar_t* __restrict__ part_pAp) {
  const Slice sl = block_slice(nb, P);
  if (state[sl.t] != kRunning) return;
  const int64_t off = sl.t * P;
  const scalar_t s = block_sum(pap_share(p + off, Hp + off, sl.begin, sl.end, a, b));
  if (threadIdx.x == 0) part_pAp[blockIdx.x] = s;
}

// Kernel 2 (grid: T * nb blocks): curvature test, x and r update,
// part_rr[k] = r'r over slice k. Slice 0 of each row records the outcome and
// rs_old for kernel 3.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cg_update_xr_kernel(
    scalar_t* __restrict__ x, scalar_t* __restrict__ r,
    const scalar_t* __restrict__ p, const scalar_t* __restrict__ Hp,
    const scalar_t* __restrict__ rs, const int32_t* __restrict__ state,
    scalar_t a, scalar_t b, int64_t P, int64_t nb,
    const scalar_t* __restrict__ part_pAp, scalar_t* __restrict__ part_rr,
    int32_t* __restrict__ outcome, scalar_t* __restrict__ rs_old) {
  const Slice sl = block_slice(nb, P);
  const bool leader = sl.s == 0 && threadIdx.x == 0;
  if (state[sl.t] != kRunning) {
    if (leader) outcome[sl.t] = kSkip;
    return;
  }
  const scalar_t pAp = row_total(part_pAp, sl.t, nb);
  const int32_t o = curvature_outcome(pAp);
  if (leader) {
    outcome[sl.t] = o;
    rs_old[sl.t] = rs[sl.t];
  }
  if (o != kStep) return;
  const int64_t off = sl.t * P;
  const scalar_t s = block_sum(update_xr_share(
      x + off, r + off, p + off, Hp + off, sl.begin, sl.end, a, b, rs[sl.t] / pAp));
  if (threadIdx.x == 0) part_rr[blockIdx.x] = s;
}

// Kernel 3 (grid: T * nb blocks): p update; slice 0 of each row writes rs and
// state.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cg_update_p_kernel(
    scalar_t* __restrict__ p, const scalar_t* __restrict__ r,
    scalar_t* __restrict__ rs, int32_t* __restrict__ state,
    const scalar_t* __restrict__ threshold_sq, int64_t P, int64_t nb,
    const scalar_t* __restrict__ part_rr, const int32_t* __restrict__ outcome,
    const scalar_t* __restrict__ rs_old) {
  const Slice sl = block_slice(nb, P);
  const bool leader = sl.s == 0 && threadIdx.x == 0;
  const int32_t o = outcome[sl.t];
  if (o == kSkip) return;
  if (o != kStep) {
    if (leader) state[sl.t] = o;
    return;
  }
  const scalar_t rs_new = row_total(part_rr, sl.t, nb);
  const int64_t off = sl.t * P;
  update_p(p + off, r + off, sl.begin, sl.end, rs_new / rs_old[sl.t]);
  if (leader) {
    rs[sl.t] = rs_new;
    if (rs_new <= threshold_sq[sl.t]) state[sl.t] = kConverged;
  }
}

// Elements of cg_step_launch's scratch: with nb > 1, the per-slice partials
// of p'Ap and r'r, then rs_old; none with nb == 1.
inline int64_t cg_step_scratch_size(int64_t T, int64_t nb) {
  return nb > 1 ? 2 * T * nb + T : 0;
}

// The whole step for T rows of nb slices. With nb > 1, scratch holds
// cg_step_scratch_size(T, nb) elements and outcome T entries; with nb == 1
// neither is used.
template <typename Launch, typename scalar_t>
void cg_step_launch(const Launch& launch, scalar_t* x, scalar_t* r, scalar_t* p,
                    const scalar_t* Hp, scalar_t* rs, int32_t* state,
                    const scalar_t* threshold_sq, scalar_t a, scalar_t b, int64_t T,
                    int64_t P, int64_t nb, scalar_t* scratch, int32_t* outcome) {
  const unsigned blocks = static_cast<unsigned>(T * nb);
  if (nb == 1) {
    launch(cg_step_row_kernel<scalar_t>, blocks, x, r, p, Hp, rs, state, threshold_sq, a,
           b, P);
    return;
  }
  scalar_t* part_pAp = scratch;
  scalar_t* part_rr = part_pAp + T * nb;
  scalar_t* rs_old = part_rr + T * nb;
  launch(cg_pap_kernel<scalar_t>, blocks, p, Hp, state, a, b, P, nb, part_pAp);
  launch(cg_update_xr_kernel<scalar_t>, blocks, x, r, p, Hp, rs, state, a, b, P, nb, part_pAp,
         part_rr, outcome, rs_old);
  launch(cg_update_p_kernel<scalar_t>, blocks, p, r, rs, state, threshold_sq, P, nb, part_rr,
         outcome, rs_old);
}

}  // namespace imaml_ext::cuda
