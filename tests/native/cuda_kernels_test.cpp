// Runs the CUDA kernels of csrc/cuda, through the same launch sequences as the
// CUDA ops, on the host (cuda_emulation.h), and compares every op with naive
// loops in double precision: float and double, one and several slices per
// row (nb, which the GPU picks from its size), buffers that start at
// different storage offsets (packed and element-wise access), and blocks run
// first to last or last to first. Prints one
// summary line; exits non-zero on the first failure.
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
bool g_last_block_first = false;  // block order of the emulated launches

// Offset in elements of argument i of an op, per layout.
int offset_of(int layout, int i) {
  switch (layout) {
    case 0: return 0;                // all aligned
    case 1: return 1;                // all shifted alike
    case 2: return i == 0 ? 1 : 0;   // only the first buffer shifted
    default: return i % 3;           // each differently
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
struct Array {
  Buffer<T> buf;
  int64_t n;
  Array(int64_t n_, int offset) : buf(n_, offset), n(n_) {}
  T* data() { return buf.data; }
  T& operator[](int64_t i) { return buf.data[i]; }
  std::vector<double> values() const {
    return std::vector<double>(buf.data, buf.data + n);
  }
};

template <typename T>
double tolerance() {
  return std::is_same<T, float>::value ? 2e-5 : 1e-12;
}

template <typename T>
void check_close(const char* what, const T* got, const std::vector<double>& want,
                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double g = got[i], w = want[i];
    if (std::isnan(w)) {
      CHECK(std::isnan(g), "%s[%lld] = %g, want NaN", what, (long long)i, g);
      continue;
    }
    if (g == w) continue;  // also infinities
    CHECK(std::fabs(g - w) <= tolerance<T>() * (1 + std::fabs(w)), "%s[%lld] = %.17g, want %.17g",
          what, (long long)i, g, w);
  }
}

// Slices per row that the tests force, including more slices than elements.
const int64_t kSlices[] = {1, 2, 5};
// (T, P): 6 tasks cover every cg_step_ scenario; P below, straddling and
// well above the pack widths, and longer than one block's stride.
const int64_t kShapes[][2] = {{6, 1}, {6, 7}, {6, 37}, {2, 600}};

// ---------------------------------------------------------------------------
// cg_step_: task t runs scenario t % 6 (as in tests/test_ops.py): 0 an
// ordinary step, 1 already converged, 2 already stopped, 3 p'Ap < 0,
// 4 p'Ap not finite, 5 converges in this step.
template <typename T>
void check_cg_step(int64_t Tn, int64_t P, int64_t nb, int layout) {
  Rng rng{static_cast<uint64_t>(Tn * 1000 + P * 10 + nb)};
  const int64_t n = Tn * P;
  Array<T> x(n, offset_of(layout, 0)), r(n, offset_of(layout, 1)), p(n, offset_of(layout, 2)),
      Hp(n, offset_of(layout, 3)), rs(Tn, offset_of(layout, 4)), thr(Tn, offset_of(layout, 6));
  Buffer<int32_t> state(Tn, offset_of(layout, 5));
  const double a = 1.0, b = 0.5;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = T(rng.next());
    r[i] = T(rng.next());
    p[i] = T(rng.next());
    Hp[i] = T(0.5 * double(p[i]) + 0.1 * rng.next());
  }
  for (int64_t t = 0; t < Tn; ++t) {
    double rr = 0;
    for (int64_t i = 0; i < P; ++i) rr += double(r[t * P + i]) * r[t * P + i];
    rs[t] = T(rr);
    thr[t] = T(1e-8 * rr);
    state.data[t] = 0;
    switch (t % 6) {
      case 1: state.data[t] = 1; break;
      case 2: state.data[t] = 2; break;
      case 3: for (int64_t i = 0; i < P; ++i) Hp[t * P + i] = T(-4.0 * p[t * P + i]); break;
      case 4: p[t * P] = std::numeric_limits<T>::infinity(); break;
      case 5: thr[t] = T(1e30); break;
    }
  }
  // Naive step in double.
  std::vector<double> wx = x.values(), wr = r.values(), wp = p.values(), wrs = rs.values();
  std::vector<int32_t> wstate(state.data, state.data + Tn);
  for (int64_t t = 0; t < Tn; ++t) {
    if (wstate[t] != 0) continue;
    double pAp = 0;
    for (int64_t i = t * P; i < (t + 1) * P; ++i) pAp += wp[i] * (a * wp[i] + b * double(Hp[i]));
    if (!std::isfinite(pAp)) { wstate[t] = 3; continue; }
    if (pAp <= 0) { wstate[t] = 2; continue; }
    const double alpha = wrs[t] / pAp;
    double rr = 0;
    for (int64_t i = t * P; i < (t + 1) * P; ++i) {
      wx[i] += alpha * wp[i];
      wr[i] -= alpha * (a * wp[i] + b * double(Hp[i]));
      rr += wr[i] * wr[i];
    }
    for (int64_t i = t * P; i < (t + 1) * P; ++i) wp[i] = wr[i] + rr / wrs[t] * wp[i];
    wrs[t] = rr;
    if (rr <= double(thr[t])) wstate[t] = 1;
  }
  Buffer<T> scratch(2 * Tn * nb + Tn, 0);
  Buffer<int32_t> outcome(Tn, 0);
  cu::cg_step_launch(Launch{&g_launches, g_last_block_first}, x.data(), r.data(), p.data(),
                     static_cast<const T*>(Hp.data()), rs.data(), state.data,
                     static_cast<const T*>(thr.data()), T(a), T(b), Tn, P, nb, scratch.data,
                     outcome.data);
  for (int64_t t = 0; t < Tn; ++t) {
    CHECK(state.data[t] == wstate[t], "cg_step_ state[%lld] = %d, want %d (T=%lld P=%lld nb=%lld)",
          (long long)t, state.data[t], wstate[t], (long long)Tn, (long long)P, (long long)nb);
  }
  check_close("cg x", x.data(), wx, n);
  check_close("cg r", r.data(), wr, n);
  check_close("cg p", p.data(), wp, n);
  check_close("cg rs", rs.data(), wrs, Tn);
  ++g_cases;
}

// ---------------------------------------------------------------------------
template <typename T>
void check_prox_sgd_step(int64_t Tn, int64_t P, int64_t nb, int layout, double max_norm) {
  Rng rng{static_cast<uint64_t>(Tn * 7 + P * 3 + nb)};
  const int64_t n = Tn * P;
  Array<T> phi(n, offset_of(layout, 0)), g(n, offset_of(layout, 1)),
      theta(P, offset_of(layout, 2));
  for (int64_t i = 0; i < n; ++i) {
    phi[i] = T(rng.next());
    g[i] = T(rng.next() * ((i / P) % 2 == 0 ? 100.0 : 1.0));  // even rows get clipped
  }
  for (int64_t i = 0; i < P; ++i) theta[i] = T(rng.next());
  const double lr = 0.1, lam = 2.0;
  std::vector<double> want = phi.values();
  for (int64_t t = 0; t < Tn; ++t) {
    double scale = 1;
    if (max_norm > 0) {
      double sq = 0;
      for (int64_t i = t * P; i < (t + 1) * P; ++i) sq += double(g[i]) * g[i];
      scale = std::fmin(1.0, max_norm / (std::sqrt(sq) + 1e-6));
    }
    for (int64_t i = 0; i < P; ++i) {
      double& w = want[t * P + i];
      w -= lr * (scale * double(g[t * P + i]) + lam * (w - double(theta[i])));
    }
  }
  Buffer<T> part(Tn * nb, 0);
  cu::prox_sgd_step_launch(Launch{&g_launches, g_last_block_first}, phi.data(), static_cast<const T*>(g.data()),
                           static_cast<const T*>(theta.data()), T(lr), T(lam), T(max_norm), Tn,
                           P, nb, part.data);
  check_close("prox phi", phi.data(), want, n);
  ++g_cases;
}

// ---------------------------------------------------------------------------
template <typename T>
void check_adjoint_sgd_step(int64_t Tn, int64_t P, int64_t nb, int layout) {
  Rng rng{static_cast<uint64_t>(Tn * 11 + P * 5 + nb)};
  const int64_t n = Tn * P;
  Array<T> adj(n, offset_of(layout, 0)), Ha(n, offset_of(layout, 1)), g(n, offset_of(layout, 2)),
      lr_grad(Tn, offset_of(layout, 3));
  for (int64_t i = 0; i < n; ++i) {
    adj[i] = T(rng.next());
    Ha[i] = T(rng.next());
    g[i] = T(rng.next());
  }
  for (int64_t t = 0; t < Tn; ++t) lr_grad[t] = T(rng.next());
  const double lr = 0.3;
  std::vector<double> want_adj = adj.values(), want_lr = lr_grad.values();
  for (int64_t t = 0; t < Tn; ++t) {
    for (int64_t i = t * P; i < (t + 1) * P; ++i) {
      want_lr[t] -= double(g[i]) * want_adj[i];
      want_adj[i] -= lr * double(Ha[i]);
    }
  }
  Buffer<T> part(Tn * nb, 0);
  cu::adjoint_sgd_step_launch(Launch{&g_launches, g_last_block_first}, adj.data(), static_cast<const T*>(Ha.data()),
                              static_cast<const T*>(g.data()), lr_grad.data(), T(lr), Tn, P, nb,
                              part.data);
  check_close("adjoint adj", adj.data(), want_adj, n);
  check_close("adjoint lr_grad", lr_grad.data(), want_lr, Tn);
  ++g_cases;
}

// ---------------------------------------------------------------------------
// batched_dot, and batched_sq_norm (y the same buffer as x).
template <typename T>
void check_batched_dot(int64_t Tn, int64_t P, int64_t nb, int layout, bool same) {
  Rng rng{static_cast<uint64_t>(Tn * 13 + P + nb)};
  const int64_t n = Tn * P;
  Array<T> x(n, offset_of(layout, 0)), y(n, offset_of(layout, 1)), out(Tn, offset_of(layout, 2));
  for (int64_t i = 0; i < n; ++i) {
    x[i] = T(rng.next());
    y[i] = T(rng.next());
  }
  const T* yp = same ? x.data() : y.data();
  std::vector<double> want(Tn, 0.0);
  for (int64_t t = 0; t < Tn; ++t) {
    for (int64_t i = t * P; i < (t + 1) * P; ++i) want[t] += double(x[i]) * double(yp[i]);
  }
  Buffer<T> part(Tn * nb, 0);
  cu::batched_dot_launch(Launch{&g_launches, g_last_block_first}, static_cast<const T*>(x.data()), yp, out.data(),
                         Tn, P, nb, part.data);
  check_close(same ? "batched_sq_norm" : "batched_dot", out.data(), want, Tn);
  ++g_cases;
}

template <typename T>
void check_all() {
  for (const auto& shape : kShapes) {
    for (int64_t nb : kSlices) {
      for (int layout = 0; layout < 4; ++layout) {
        const int64_t Tn = shape[0], P = shape[1];
        g_last_block_first = layout % 2 == 1;
        check_cg_step<T>(Tn, P, nb, layout);
        for (double max_norm : {0.0, 3.0}) check_prox_sgd_step<T>(Tn, P, nb, layout, max_norm);
        check_adjoint_sgd_step<T>(Tn, P, nb, layout);
        check_batched_dot<T>(Tn, P, nb, layout, false);
        check_batched_dot<T>(Tn, P, nb, layout, true);
      }
    }
  }
}

}  // namespace

int main() {
  check_all<float>();
  check_all<double>();
  std::printf("cuda_kernels_test: %lld op calls checked, %lld kernel launches emulated\n",
              (long long)g_cases, (long long)g_launches);
  return 0;
}
