// Runs the CUDA kernels of csrc/cuda, through the same launch sequences as the
// CUDA ops, on the host (cuda_emulation.h), and compares every op with naive
// loops in double precision: float and double, one and several slices per
// row (nb, which the GPU picks from its size; up to more slices than a block
// has threads), buffers that start at different storage offsets (packed and
// element-wise access), and both emulated orders of threads and blocks.
// Scratch starts as NaN garbage, and every buffer has a canary after its end.
// Prints one summary line; exits non-zero on the first failure.
#include "cuda_emulation.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "../../csrc/cuda/adjoint_sgd_step_kernels.cuh"
#include "../../csrc/cuda/cg_step_kernels.cuh"
#include "../../csrc/cuda/prox_sgd_step_kernels.cuh"
#include "test_support.h"

namespace {

namespace cu = imaml_ext::cuda;
using Launch = cuda_emulation::Launcher<cu::kThreads>;

int64_t g_cases = 0, g_launches = 0;

// Offset in elements of argument i of an op, per layout.
int offset_of(int layout, int i) {
  switch (layout) {
    case 0: return 0;               // all aligned
    case 1: return 1;               // all shifted alike
    case 2: return i == 0 ? 1 : 0;  // only the first buffer shifted
    default: return i % 3;          // each differently
  }
}

// Deterministic values in [-1, 1).
struct Rng {
  uint64_t s;
  double next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>(s >> 11) * 0x1.0p-52 - 1.0;
  }
};

template <typename T>
std::vector<double> values(const Buffer<T>& b) {
  return std::vector<double>(b.data, b.data + b.n);
}

template <typename T>
double tolerance() {
  return std::is_same<T, float>::value ? 2e-5 : 1e-12;
}

template <typename T>
void check_close(const char* what, const Buffer<T>& got, const std::vector<double>& want) {
  CHECK(got.intact(), "%s: written past its end", what);
  for (int64_t i = 0; i < got.n; ++i) {
    const double g = got.data[i], w = want[i];
    if (std::isnan(w)) {
      CHECK(std::isnan(g), "%s[%lld] = %g, want NaN", what, (long long)i, g);
      continue;
    }
    if (g == w) continue;  // also infinities
    CHECK(std::fabs(g - w) <= tolerance<T>() * (1 + std::fabs(w)),
          "%s[%lld] = %.17g, want %.17g", what, (long long)i, g, w);
  }
}

template <typename T>
void check_scratch(const char* what, const Buffer<T>& scratch) {
  CHECK(scratch.intact(), "%s: scratch written past its end", what);
}

// ---------------------------------------------------------------------------
// cg_step_: task t runs scenario t % 6: 0 an ordinary step, 1 already
// converged, 2 already stopped, 3 p'Ap < 0, 4 p'Ap not finite, 5 a threshold
// between the old and the new r'r (so that testing the wrong one shows).
template <typename T>
void check_cg_step(const Launch& launch, int64_t Tn, int64_t P, int64_t nb, int layout) {
  Rng rng{static_cast<uint64_t>(Tn * 1000 + P * 10 + nb)};
  const int64_t n = Tn * P;
  Buffer<T> x(n, offset_of(layout, 0)), r(n, offset_of(layout, 1)), p(n, offset_of(layout, 2)),
      Hp(n, offset_of(layout, 3)), rs(Tn, offset_of(layout, 4)), thr(Tn, offset_of(layout, 6));
  Buffer<int32_t> state(Tn, offset_of(layout, 5));
  const double a = 1.0, b = 0.5;
  for (int64_t i = 0; i < n; ++i) {
    x.data[i] = T(rng.next());
    r.data[i] = T(rng.next());
    p.data[i] = T(rng.next());
    Hp.data[i] = T(0.5 * double(p.data[i]) + 0.1 * rng.next());
  }
  for (int64_t t = 0; t < Tn; ++t) {
    T* Hp_t = Hp.data + t * P;
    double rr = 0;
    for (int64_t i = 0; i < P; ++i) rr += double(r.data[t * P + i]) * r.data[t * P + i];
    rs.data[t] = T(rr);
    thr.data[t] = T(1e-8 * rr);
    state.data[t] = t % 6 == 1   ? imaml_ext::kConverged
                    : t % 6 == 2 ? imaml_ext::kNonPositiveCurvature
                                 : imaml_ext::kRunning;
    if (t % 6 == 3) {
      for (int64_t i = 0; i < P; ++i) Hp_t[i] = T(-4.0 * p.data[t * P + i]);
    }
    if (t % 6 == 4) p.data[t * P] = std::numeric_limits<T>::infinity();
  }
  // Naive step in double. Scenario 5's threshold is set once its new r'r is
  // known, halfway between the old and the new.
  std::vector<double> wx = values(x), wr = values(r), wp = values(p), wrs = values(rs);
  std::vector<int32_t> wstate(state.data, state.data + Tn);
  for (int64_t t = 0; t < Tn; ++t) {
    if (wstate[t] != imaml_ext::kRunning) continue;
    const int64_t lo = t * P, hi = (t + 1) * P;
    double pAp = 0;
    for (int64_t i = lo; i < hi; ++i) pAp += wp[i] * (a * wp[i] + b * double(Hp.data[i]));
    if (!std::isfinite(pAp)) {
      wstate[t] = imaml_ext::kNonFinite;
      continue;
    }
    if (pAp <= 0) {
      wstate[t] = imaml_ext::kNonPositiveCurvature;
      continue;
    }
    const double alpha = wrs[t] / pAp;
    double rr = 0;
    for (int64_t i = lo; i < hi; ++i) {
      wx[i] += alpha * wp[i];
      wr[i] -= alpha * (a * wp[i] + b * double(Hp.data[i]));
      rr += wr[i] * wr[i];
    }
    for (int64_t i = lo; i < hi; ++i) wp[i] = wr[i] + rr / wrs[t] * wp[i];
    if (t % 6 == 5) thr.data[t] = T(0.5 * (rr + wrs[t]));
    if (rr <= double(thr.data[t])) wstate[t] = imaml_ext::kConverged;
    wrs[t] = rr;
  }
  Buffer<cu::acc_t> scratch(cu::cg_step_scratch_size(Tn, nb), 0);
  Buffer<int32_t> outcome(Tn, 0);
  cu::cg_step_launch(launch, x.data, r.data, p.data, static_cast<const T*>(Hp.data), rs.data,
                     state.data, static_cast<const T*>(thr.data), T(a), T(b), Tn, P, nb,
                     scratch.data, outcome.data);
  CHECK(state.intact() && outcome.intact(), "cg_step_: state or outcome written past its end");
  for (int64_t t = 0; t < Tn; ++t) {
    CHECK(state.data[t] == wstate[t], "cg_step_ state[%lld] = %d, want %d (T=%lld P=%lld nb=%lld)",
          (long long)t, state.data[t], wstate[t], (long long)Tn, (long long)P, (long long)nb);
  }
  check_close("cg x", x, wx);
  check_close("cg r", r, wr);
  check_close("cg p", p, wp);
  check_close("cg rs", rs, wrs);
  check_scratch("cg_step_", scratch);
  ++g_cases;
}

// ---------------------------------------------------------------------------
template <typename T>
void check_prox_sgd_step(const Launch& launch, int64_t Tn, int64_t P, int64_t nb, int layout,
                         double max_norm) {
  Rng rng{static_cast<uint64_t>(Tn * 7 + P * 3 + nb)};
  const int64_t n = Tn * P;
  Buffer<T> phi(n, offset_of(layout, 0)), g(n, offset_of(layout, 1)),
      theta(P, offset_of(layout, 2));
  for (int64_t i = 0; i < n; ++i) {
    phi.data[i] = T(rng.next());
    g.data[i] = T(rng.next() * ((i / P) % 2 == 0 ? 100.0 : 1.0));  // even rows get clipped
  }
  for (int64_t i = 0; i < P; ++i) theta.data[i] = T(rng.next());
  const double lr = 0.1, lam = 2.0;
  std::vector<double> want = values(phi);
  for (int64_t t = 0; t < Tn; ++t) {
    double scale = 1;
    if (max_norm > 0) {
      double sq = 0;
      for (int64_t i = t * P; i < (t + 1) * P; ++i) sq += double(g.data[i]) * g.data[i];
      scale = std::fmin(1.0, max_norm / (std::sqrt(sq) + 1e-6));
    }
    for (int64_t i = 0; i < P; ++i) {
      double& w = want[t * P + i];
      w -= lr * (scale * double(g.data[t * P + i]) + lam * (w - double(theta.data[i])));
    }
  }
  Buffer<cu::acc_t> part(Tn * nb, 0);
  cu::prox_sgd_step_launch(launch, phi.data, static_cast<const T*>(g.data),
                           static_cast<const T*>(theta.data), T(lr), T(lam), T(max_norm), Tn, P,
                           nb, part.data);
  check_close("prox phi", phi, want);
  check_scratch("prox_sgd_step_", part);
  ++g_cases;
}

// ---------------------------------------------------------------------------
template <typename T>
void check_adjoint_sgd_step(const Launch& launch, int64_t Tn, int64_t P, int64_t nb,
                            int layout) {
  Rng rng{static_cast<uint64_t>(Tn * 11 + P * 5 + nb)};
  const int64_t n = Tn * P;
  Buffer<T> adj(n, offset_of(layout, 0)), Ha(n, offset_of(layout, 1)), g(n, offset_of(layout, 2)),
      lr_grad(Tn, offset_of(layout, 3));
  for (int64_t i = 0; i < n; ++i) {
    adj.data[i] = T(rng.next());
    Ha.data[i] = T(rng.next());
    g.data[i] = T(rng.next());
  }
  for (int64_t t = 0; t < Tn; ++t) lr_grad.data[t] = T(rng.next());
  const double lr = 0.3;
  std::vector<double> want_adj = values(adj), want_lr = values(lr_grad);
  for (int64_t t = 0; t < Tn; ++t) {
    for (int64_t i = t * P; i < (t + 1) * P; ++i) {
      want_lr[t] -= double(g.data[i]) * want_adj[i];
      want_adj[i] -= lr * double(Ha.data[i]);
    }
  }
  Buffer<cu::acc_t> part(Tn * nb, 0);
  cu::adjoint_sgd_step_launch(launch, adj.data, static_cast<const T*>(Ha.data),
                              static_cast<const T*>(g.data), lr_grad.data, T(lr), Tn, P, nb,
                              part.data);
  check_close("adjoint adj", adj, want_adj);
  check_close("adjoint lr_grad", lr_grad, want_lr);
  check_scratch("adjoint_sgd_step_", part);
  ++g_cases;
}

// ---------------------------------------------------------------------------
// batched_dot, and batched_sq_norm (y the same buffer as x).
template <typename T>
void check_batched_dot(const Launch& launch, int64_t Tn, int64_t P, int64_t nb, int layout,
                       bool same) {
  Rng rng{static_cast<uint64_t>(Tn * 13 + P + nb)};
  const int64_t n = Tn * P;
  Buffer<T> x(n, offset_of(layout, 0)), y(n, offset_of(layout, 1)), out(Tn, offset_of(layout, 2));
  for (int64_t i = 0; i < n; ++i) {
    x.data[i] = T(rng.next());
    y.data[i] = T(rng.next());
  }
  const T* yp = same ? x.data : y.data;
  std::vector<double> want(Tn, 0.0);
  for (int64_t t = 0; t < Tn; ++t) {
    for (int64_t i = t * P; i < (t + 1) * P; ++i) want[t] += double(x.data[i]) * double(yp[i]);
  }
  Buffer<cu::acc_t> part(Tn * nb, 0);
  cu::batched_dot_launch(launch, static_cast<const T*>(x.data), yp, out.data, Tn, P, nb,
                         part.data);
  check_close(same ? "batched_sq_norm" : "batched_dot", out, want);
  check_scratch("batched_dot", part);
  ++g_cases;
}

// The reductions accumulate in double: rows of 2^21 float32 terms of
// 1 + 5*2^-23, whose 5*2^-23 a float32 running sum drops once it passes 4
// (2^21 instead of 2^21 + 1.25), come out within the rounding of the result.
void check_float_sums_in_double(const Launch& launch) {
  const int64_t P = int64_t{1} << 21;
  const float term = 1.0f + 5.0f * 0x1.0p-23f;
  const double want = double(P) * double(term);
  for (int64_t nb : {1, 3}) {
    Buffer<float> x(2 * P, 0), out(2, 0), lr_grad(2, 0), Ha(2 * P, 0), g(2 * P, 0);
    for (int64_t i = 0; i < 2 * P; ++i) {
      x.data[i] = term;
      g.data[i] = 1.0f;
      Ha.data[i] = 0.0f;
    }
    Buffer<cu::acc_t> part(2 * nb, 0);
    cu::batched_dot_launch(launch, static_cast<const float*>(x.data),
                           static_cast<const float*>(g.data), out.data, 2, P, nb, part.data);
    lr_grad.data[0] = lr_grad.data[1] = 0.0f;
    cu::adjoint_sgd_step_launch(launch, x.data, static_cast<const float*>(Ha.data),
                                static_cast<const float*>(g.data), lr_grad.data, 0.5f, 2, P, nb,
                                part.data);
    for (int t = 0; t < 2; ++t) {
      CHECK(std::fabs(out.data[t] - want) <= 0x1.0p-23 * want,
            "batched_dot float32 sum %.9g, want %.9g (nb=%lld)", out.data[t], want, (long long)nb);
      CHECK(std::fabs(-lr_grad.data[t] - want) <= 0x1.0p-23 * want,
            "adjoint lr_grad float32 sum %.9g, want %.9g (nb=%lld)", -lr_grad.data[t], -want,
            (long long)nb);
    }
    g_cases += 2;
  }
}

template <typename T>
void check_ops(const Launch& launch, int64_t Tn, int64_t P, int64_t nb, int layout) {
  check_cg_step<T>(launch, Tn, P, nb, layout);
  for (double max_norm : {0.0, 3.0}) check_prox_sgd_step<T>(launch, Tn, P, nb, layout, max_norm);
  check_adjoint_sgd_step<T>(launch, Tn, P, nb, layout);
  check_batched_dot<T>(launch, Tn, P, nb, layout, false);
  check_batched_dot<T>(launch, Tn, P, nb, layout, true);
}

// (T, P): 6 tasks cover every cg_step_ scenario; P straddling and well above
// the pack widths, and above one block's stride of packs (1024 floats).
const int64_t kShapes[][2] = {{6, 7}, {6, 37}, {2, 1100}};
// Rows on both sides of the longest that cg_step_ keeps in registers with one
// block per row (nb == 1 only).
const int64_t kResidentEdge[] = {cu::kResidentP, cu::kResidentP + 1};
// Slices per row that the tests force, including more slices than elements.
const int64_t kSlices[] = {1, 2, 5};

template <typename T>
void check_all() {
  for (bool reversed : {false, true}) {
    const Launch launch{&g_launches, reversed};
    for (const auto& shape : kShapes) {
      for (int64_t nb : kSlices) {
        for (int layout = 0; layout < 4; ++layout) {
          check_ops<T>(launch, shape[0], shape[1], nb, layout);
        }
      }
    }
    for (int64_t P : kResidentEdge) {
      for (int layout = 0; layout < 4; ++layout) check_cg_step<T>(launch, 6, P, 1, layout);
    }
  }
  // More slices per row than a block has threads, every slice non-empty, so
  // that summing a row's partials takes several strides (one order per dtype,
  // for time).
  const Launch launch{&g_launches, std::is_same<T, double>::value};
  check_ops<T>(launch, 1, 2 * (cu::kThreads + 4), cu::kThreads + 4, 0);
}

}  // namespace

int main() {
  check_float_sums_in_double(Launch{&g_launches, false});
  check_all<float>();
  check_all<double>();
  std::printf("cuda_kernels_test: %lld op calls checked, %lld kernel launches emulated\n",
              (long long)g_cases, (long long)g_launches);
  return 0;
}
