// CPU kernels of imaml_ext_layers::bn_relu_pool and its backward (the
// contract is in imaml_ext/fused_layers.py): batch-norm with batch statistics,
// ReLU and a k x k max-pool of stride k, in two passes over the activation.
//
// x is [N, C, H, W] (a channels-last x without pooling runs the row kernels
// of cpu/bn_relu_rows.h instead, through cpu/isa.h); the statistics of channel c run over its N
// planes of H x W (M = N*H*W values).  Every pass walks x in memory order (example by
// example, the channels of one example spread over the threads), which keeps
// the reads sequential; per-channel results are merged in example order, so
// no result depends on the number of threads.
//   pass 1: each plane's mean and sum of squared deviations (two sweeps over
//           the plane, in cache), merged per channel in double (Chan et al.);
//   pass 2: with a = weight*invstd, for every k x k window the ReLU of
//           max(y), y = a*(x - mean) + bias, the window position
//           (row*k + col) of that maximum in `index` (uint8; kInactive where
//           the maximum is <= 0, so ReLU passes no gradient) and, for k > 1,
//           the x at the maximum in `xmax`.
//
// Backward, with g = dL/dy at the active window maxima and 0 elsewhere
// (y before ReLU):
//   dx = weight*invstd*(g - sum(g)/M - xhat*sum(g*xhat)/M),
//   dweight = sum(g*xhat),  dbias = sum(g);
// the sums need only the pooled gradient and xmax, then one pass over x
// writes dx.
//
// Double backward (the backward's own vector-Jacobian product, the math in
// fused_layers.reference_double_backward): with cotangents u of dx (dense,
// optional), u_w of dweight and u_b of dbias, r = invstd, d = x - mean,
// gamma = weight (1 without) and the per-channel means gbar = sum(g)/M,
// A = r*sum(g*d)/M, ubar = sum(u)/M, B = r*sum(u*d)/M, Cug = sum(u*g)/M,
//   d grad   = gamma*r*u + (u_w - gamma*r*B)*r*d + u_b - gamma*r*ubar  (at the
//              active maxima; 0 elsewhere),
//   d weight = r*M*(Cug - gbar*ubar - A*B),
//   d x      = ax*r*d + au*u + ag*g + a0, with
//     ax = -gamma*r^2*(Cug - gbar*ubar - 3*A*B) - u_w*r*A,  au = -gamma*r^2*A,
//     ag = -gamma*r^2*B + u_w*r,  a0 = gamma*r^2*(B*gbar + A*ubar) - u_w*r*gbar;
// one pass over the pooled planes (sums of g), one over u and x (sums of u),
// one that writes dx.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/isa.h"
#include "cpu/relu_index.h"


namespace imaml_ext {

namespace {

constexpr int64_t kMaxKernel = 15;  // k*k window positions must fit below kInactive

struct Dims {
  int64_t N, C, H, W, k, Ho, Wo;
  int64_t plane() const { return H * W; }
  int64_t pooled() const { return Ho * Wo; }
  int64_t count() const { return N * H * W; }
};

// The argument rules of both operators (the forward's eps is checked by the forward).
Dims check_forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, int64_t k) {
  TORCH_CHECK_VALUE(x.dim() == 4, "bn_relu_pool: x must be [N, C, H, W], got ",
                    x.dim(), " dimensions");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                    "bn_relu_pool: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxKernel, "bn_relu_pool: kernel must be in 1..",
                    kMaxKernel, ", got ", k);
  Dims d{x.size(0), x.size(1), x.size(2), x.size(3), k, x.size(2) / k, x.size(3) / k};
  TORCH_CHECK_VALUE(d.Ho >= 1 && d.Wo >= 1, "bn_relu_pool: the ", k, "x", k,
                    " pooling window does not fit in ", d.H, "x", d.W);
  TORCH_CHECK_VALUE(d.count() > 1, "bn_relu_pool: batch statistics need more than 1 value "
                    "per channel, got N*H*W = ", d.count());
  for (const auto* t : {&weight, &bias}) {
    if (t->has_value()) {
      const at::Tensor& v = **t;
      TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == d.C, "bn_relu_pool: weight and bias "
                        "must be [C] = [", d.C, "]");
      TORCH_CHECK_VALUE(v.scalar_type() == x.scalar_type() && v.device() == x.device(),
                        "bn_relu_pool: weight and bias must match x's dtype and device");
    }
  }
  return d;
}

// The argument rules of the backward operators (`op` names the operator in errors).
Dims check_backward(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& index,
                    const at::Tensor& xmax, int64_t k, const char* op) {
  const Dims d = check_forward(x, weight, std::nullopt, k);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({d.N, d.C, d.Ho, d.Wo}) &&
                        index.sizes() == grad.sizes() && index.scalar_type() == at::kByte &&
                        grad.scalar_type() == x.scalar_type() && mean.numel() == d.C &&
                        invstd.numel() == d.C && mean.scalar_type() == x.scalar_type() &&
                        invstd.scalar_type() == x.scalar_type(),
                    op, ": the gradient, index, mean and invstd do not match x");
  TORCH_CHECK_VALUE(k == 1 || (xmax.sizes() == grad.sizes() && xmax.scalar_type() == x.scalar_type()),
                    op, ": xmax does not match the gradient");
  return d;
}

// Without pooling, a channels-last x runs the row kernels (cpu/bn_relu_rows.h)
// and every x-shaped tensor in and out is channels-last; otherwise all are
// contiguous.  fused_layers._layout is the same rule in Python.
bool channels_last(const at::Tensor& x, int64_t k) {
  return k == 1 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor in_layout(const at::Tensor& t, bool rows) {
  return t.contiguous(rows ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
scalar_t value_or(const std::optional<at::Tensor>& t, int64_t c, scalar_t fallback) {
  return t.has_value() ? t->const_data_ptr<scalar_t>()[c] : fallback;
}

// The loops below are written for the compiler's auto-vectorizer: eight
// independent partial sums over a plane, branch-free element-wise passes.
constexpr int64_t kLanes = 8;

template <typename scalar_t, typename F>
double plane_sum(int64_t n, const F& term) {
  scalar_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += term(i + j);
  }
  double sum = 0;
  for (; i < n; ++i) sum += term(i);
  for (int64_t j = 0; j < kLanes; ++j) sum += acc[j];
  return sum;
}

// Calls f(c, n*C + c) for every plane (n, c), example by example, the
// channels of an example spread over the threads.
template <typename F>
void for_each_plane(const Dims& d, const F& f) {
  for (int64_t n = 0; n < d.N; ++n) {
    at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) f(c, n * d.C + c);
    });
  }
}

// max-pool's rule: a larger value or a NaN takes the window.  Written as
// selects, so that the loops over a row's windows vectorize.
template <typename scalar_t>
inline void take(scalar_t y, scalar_t x, int32_t position, scalar_t& best, scalar_t& at,
                 int32_t& where) {
  const bool larger = y > best || y != y;
  best = larger ? y : best;
  at = larger ? x : at;
  where = larger ? position : where;
}

// ReLU of a window maximum: (output, index entry).
template <typename scalar_t>
inline scalar_t relu_of(scalar_t best, int32_t where, int32_t& entry) {
  const bool active = !(best <= 0);
  entry = active ? where : kInactive;
  return active ? best : scalar_t(0);
}

// One plane p [H, W] -> out, index, xmax [Ho, Wo] (xmax for k > 1), with
// y = a*(x - m) + b.  `entries` is scratch for one row of index entries.
template <typename scalar_t>
void pool_plane(const Dims& d, const scalar_t* p, scalar_t m, scalar_t a, scalar_t b, scalar_t* out,
                uint8_t* index, scalar_t* xmax, int32_t* entries) {
  const int64_t k = d.k, W = d.W;
  for (int64_t ho = 0; ho < d.Ho; ++ho) {
    const scalar_t* row = p + ho * k * W;
    scalar_t* o = out + ho * d.Wo;
    scalar_t* xm = k == 1 ? nullptr : xmax + ho * d.Wo;
    if (k == 1) {
      for (int64_t wo = 0; wo < d.Wo; ++wo) {
        o[wo] = relu_of<scalar_t>(a * (row[wo] - m) + b, 0, entries[wo]);
      }
    } else if (k == 2) {
      const scalar_t* next = row + W;
      for (int64_t wo = 0; wo < d.Wo; ++wo) {
        const scalar_t v0 = row[2 * wo], v1 = row[2 * wo + 1];
        const scalar_t v2 = next[2 * wo], v3 = next[2 * wo + 1];
        scalar_t best = a * (v0 - m) + b, at = v0;
        int32_t where = 0;
        take<scalar_t>(a * (v1 - m) + b, v1, 1, best, at, where);
        take<scalar_t>(a * (v2 - m) + b, v2, 2, best, at, where);
        take<scalar_t>(a * (v3 - m) + b, v3, 3, best, at, where);
        o[wo] = relu_of<scalar_t>(best, where, entries[wo]);
        xm[wo] = at;
      }
    } else {
      for (int64_t wo = 0; wo < d.Wo; ++wo) {
        const scalar_t* w0 = row + wo * k;
        scalar_t best = a * (w0[0] - m) + b, at = w0[0];
        int32_t where = 0;
        for (int64_t r = 0; r < k; ++r) {
          for (int64_t s = 0; s < k; ++s) {
            const scalar_t v = w0[r * W + s];
            take<scalar_t>(a * (v - m) + b, v, static_cast<int32_t>(r * k + s), best, at, where);
          }
        }
        o[wo] = relu_of<scalar_t>(best, where, entries[wo]);
        xm[wo] = at;
      }
    }
    uint8_t* ix = index + ho * d.Wo;
    for (int64_t wo = 0; wo < d.Wo; ++wo) ix[wo] = static_cast<uint8_t>(entries[wo]);
  }
}

template <typename scalar_t>
void forward_kernel(const Dims& d, const scalar_t* x, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, double eps, scalar_t* out,
                    scalar_t* mean_out, scalar_t* invstd_out, uint8_t* index, scalar_t* xmax) {
  const int64_t HW = d.plane();
  // Per channel: mean and sum of squared deviations of the planes seen so far.
  std::vector<double> mean(d.C, 0.0), m2(d.C, 0.0);
  for_each_plane(d, [&](int64_t c, int64_t plane) {
    const int64_t seen = plane / d.C * HW;  // values of channel c before this plane
    const scalar_t* p = x + plane * HW;
    const double pm = plane_sum<scalar_t>(HW, [&](int64_t i) { return p[i]; }) / HW;
    const scalar_t spm = static_cast<scalar_t>(pm);
    // deviations from the rounded plane mean, corrected for its rounding
    const double dm = pm - spm;
    const double pm2 = plane_sum<scalar_t>(HW, [&](int64_t i) {
      const scalar_t dev = p[i] - spm;
      return dev * dev;
    }) - HW * dm * dm;
    // Chan et al.'s merge of (seen, mean, m2) with the plane's (HW, pm, pm2)
    const double delta = pm - mean[c], total = static_cast<double>(seen + HW);
    mean[c] += delta * HW / total;
    m2[c] += pm2 + delta * delta * (static_cast<double>(seen) * HW / total);
  });
  std::vector<scalar_t> a(d.C), b(d.C);
  for (int64_t c = 0; c < d.C; ++c) {
    const double invstd = 1.0 / std::sqrt(m2[c] / d.count() + eps);
    mean_out[c] = static_cast<scalar_t>(mean[c]);
    invstd_out[c] = static_cast<scalar_t>(invstd);
    a[c] = static_cast<scalar_t>(value_or<scalar_t>(weight, c, 1) * invstd);
    b[c] = value_or<scalar_t>(bias, c, 0);
  }
  for (int64_t n = 0; n < d.N; ++n) {
    at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<int32_t> entries(d.Wo);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t plane = n * d.C + c;
        pool_plane(d, x + plane * HW, mean_out[c], a[c], b[c], out + plane * d.pooled(),
                   index + plane * d.pooled(),
                   d.k == 1 ? nullptr : xmax + plane * d.pooled(), entries.data());
      }
    });
  }
}

// gx += k1*g at the active window maxima of one plane (gx, x-shaped plane;
// grad, index: its pooled plane).
template <typename scalar_t>
void add_at_maxima(const Dims& d, const scalar_t* grad, const uint8_t* index, scalar_t k1,
                   scalar_t* gx) {
  const int64_t k = d.k, W = d.W;
  if (k == 1) {
    for (int64_t i = 0; i < d.plane(); ++i) {
      const scalar_t v = k1 * grad[i];  // loaded unconditionally: the select vectorizes
      gx[i] += index[i] == kInactive ? scalar_t(0) : v;
    }
    return;
  }
  for (int64_t ho = 0; ho < d.Ho; ++ho) {
    const scalar_t* g = grad + ho * d.Wo;
    const uint8_t* ix = index + ho * d.Wo;
    scalar_t* row = gx + ho * k * W;
    if (k == 2) {
      scalar_t* next = row + W;
      for (int64_t wo = 0; wo < d.Wo; ++wo) {
        const scalar_t v = k1 * g[wo];
        const int32_t where = ix[wo];
        row[2 * wo] += where == 0 ? v : scalar_t(0);
        row[2 * wo + 1] += where == 1 ? v : scalar_t(0);
        next[2 * wo] += where == 2 ? v : scalar_t(0);
        next[2 * wo + 1] += where == 3 ? v : scalar_t(0);
      }
      continue;
    }
    for (int64_t wo = 0; wo < d.Wo; ++wo) {
      if (ix[wo] >= k * k) continue;  // kInactive (or no window position)
      row[(ix[wo] / k) * W + wo * k + ix[wo] % k] += k1 * g[wo];
    }
  }
}

// out[j] = plane value at window j's maximum (0 where the window is inactive).
template <typename scalar_t>
void gather_at_maxima(const Dims& d, const scalar_t* plane, const uint8_t* index, scalar_t* out) {
  const int64_t k = d.k, W = d.W;
  if (k == 1) {
    for (int64_t i = 0; i < d.plane(); ++i) {
      out[i] = index[i] == kInactive ? scalar_t(0) : plane[i];
    }
    return;
  }
  for (int64_t ho = 0; ho < d.Ho; ++ho) {
    const scalar_t* row = plane + ho * k * W;
    const uint8_t* ix = index + ho * d.Wo;
    scalar_t* o = out + ho * d.Wo;
    for (int64_t wo = 0; wo < d.Wo; ++wo) {
      const int32_t where = ix[wo];
      o[wo] = where >= k * k ? scalar_t(0) : row[(where / k) * W + wo * k + where % k];
    }
  }
}

// g of one plane's windows: the pooled gradient where the window is active, else 0.
template <typename scalar_t>
void active_gradient(int64_t n, const scalar_t* grad, const uint8_t* index, scalar_t* g) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t v = grad[j];  // loaded unconditionally: the select vectorizes
    g[j] = index[j] == kInactive ? scalar_t(0) : v;
  }
}

template <typename scalar_t>
void backward_kernel(const Dims& d, const scalar_t* grad, const scalar_t* x,
                     const std::optional<at::Tensor>& weight, const scalar_t* mean,
                     const scalar_t* invstd, const uint8_t* index, const scalar_t* xmax,
                     scalar_t* grad_x, scalar_t* grad_weight, scalar_t* grad_bias) {
  const int64_t HW = d.plane(), M = d.count();
  // the x at each window's maximum: xmax, or x itself without pooling
  const scalar_t* at_max = d.k == 1 ? x : xmax;
  std::vector<double> sum_g(d.C, 0.0), sum_gd(d.C, 0.0);  // sums of g and g*(x - mean)
  for_each_plane(d, [&](int64_t c, int64_t plane) {
    const int64_t at = plane * d.pooled();
    const scalar_t m = mean[c];
    // g of this plane's windows: the pooled gradient where the window is active
    thread_local std::vector<scalar_t> g;
    g.resize(d.pooled());
    active_gradient<scalar_t>(d.pooled(), grad + at, index + at, g.data());
    sum_g[c] += plane_sum<scalar_t>(d.pooled(), [&](int64_t j) { return g[j]; });
    sum_gd[c] += plane_sum<scalar_t>(d.pooled(), [&](int64_t j) { return g[j] * (at_max[at + j] - m); });
  });
  std::vector<scalar_t> A(d.C), B(d.C), k1(d.C);
  for (int64_t c = 0; c < d.C; ++c) {
    const double is = invstd[c], gain = value_or<scalar_t>(weight, c, 1) * is;
    const double sum_gx = sum_gd[c] * is;  // sum of g*xhat
    grad_weight[c] = static_cast<scalar_t>(sum_gx);
    grad_bias[c] = static_cast<scalar_t>(sum_g[c]);
    // dx = k1*(g - sum_g/M - xhat*sum_gx/M) = k1*g + A + B*(x - mean)
    const double slope = -gain * (sum_gx / M) * is;
    k1[c] = static_cast<scalar_t>(gain);
    B[c] = static_cast<scalar_t>(slope);
    A[c] = static_cast<scalar_t>(-gain * (sum_g[c] / M));
  }
  for_each_plane(d, [&](int64_t c, int64_t plane) {
    const scalar_t* p = x + plane * HW;
    scalar_t* gx = grad_x + plane * HW;
    const scalar_t a0 = A[c], b0 = B[c];
    const scalar_t m0 = mean[c];
    for (int64_t i = 0; i < HW; ++i) gx[i] = a0 + b0 * (p[i] - m0);
    add_at_maxima<scalar_t>(d, grad + plane * d.pooled(), index + plane * d.pooled(), k1[c], gx);
  });
}

template <typename scalar_t>
void double_backward_kernel(const Dims& d, const scalar_t* u, const scalar_t* u_w, const scalar_t* u_b,
                            const scalar_t* grad, const scalar_t* x,
                            const std::optional<at::Tensor>& weight, const scalar_t* mean,
                            const scalar_t* invstd, const uint8_t* index, const scalar_t* xmax,
                            scalar_t* d_grad, scalar_t* d_x, scalar_t* d_weight) {
  const int64_t HW = d.plane(), P = d.pooled(), M = d.count();
  const scalar_t* at_max = d.k == 1 ? x : xmax;
  // sums of g, g*d, u*g (pooled planes) and u, u*d (dense planes), per channel; d_grad
  // holds u at the window maxima until the last pass turns it into the result
  std::vector<double> s_g(d.C, 0.0), s_gd(d.C, 0.0), s_ug(d.C, 0.0), s_u(d.C, 0.0), s_ud(d.C, 0.0);
  for_each_plane(d, [&](int64_t c, int64_t plane) {
    const int64_t at = plane * P;
    const scalar_t m = mean[c];
    thread_local std::vector<scalar_t> g;
    g.resize(P);
    active_gradient<scalar_t>(P, grad + at, index + at, g.data());
    s_g[c] += plane_sum<scalar_t>(P, [&](int64_t j) { return g[j]; });
    s_gd[c] += plane_sum<scalar_t>(P, [&](int64_t j) { return g[j] * (at_max[at + j] - m); });
    if (u != nullptr) {
      scalar_t* um = d_grad + at;
      gather_at_maxima<scalar_t>(d, u + plane * HW, index + at, um);
      s_ug[c] += plane_sum<scalar_t>(P, [&](int64_t j) { return g[j] * um[j]; });
      const scalar_t* up = u + plane * HW;
      const scalar_t* p = x + plane * HW;
      s_u[c] += plane_sum<scalar_t>(HW, [&](int64_t i) { return up[i]; });
      s_ud[c] += plane_sum<scalar_t>(HW, [&](int64_t i) { return up[i] * (p[i] - m); });
    }
  });
  // per channel: dx = cd*d + cu*u + c0 (+ cg*g at the maxima); dgrad = gu*u + gd*d + g0
  std::vector<scalar_t> cd(d.C), cu(d.C), c0(d.C), cg(d.C), gu(d.C), gd(d.C), g0(d.C);
  for (int64_t c = 0; c < d.C; ++c) {
    const double r = invstd[c], gamma = value_or<scalar_t>(weight, c, 1);
    const double uw = u_w == nullptr ? 0.0 : static_cast<double>(u_w[c]);
    const double ub = u_b == nullptr ? 0.0 : static_cast<double>(u_b[c]);
    const double gbar = s_g[c] / M, A = r * s_gd[c] / M;
    const double ubar = s_u[c] / M, B = r * s_ud[c] / M, Cug = s_ug[c] / M;
    const double gr2 = gamma * r * r;
    d_weight[c] = static_cast<scalar_t>(r * M * (Cug - gbar * ubar - A * B));
    cd[c] = static_cast<scalar_t>((-gr2 * (Cug - gbar * ubar - 3 * A * B) - uw * r * A) * r);
    cu[c] = static_cast<scalar_t>(-gr2 * A);
    cg[c] = static_cast<scalar_t>(-gr2 * B + uw * r);
    c0[c] = static_cast<scalar_t>(gr2 * (B * gbar + A * ubar) - uw * r * gbar);
    gu[c] = static_cast<scalar_t>(gamma * r);
    gd[c] = static_cast<scalar_t>((uw - gamma * r * B) * r);
    g0[c] = static_cast<scalar_t>(ub - gamma * r * ubar);
  }
  for_each_plane(d, [&](int64_t c, int64_t plane) {
    const int64_t at = plane * P;
    const scalar_t* p = x + plane * HW;
    scalar_t* dx = d_x + plane * HW;
    const scalar_t m = mean[c], a_d = cd[c], a_0 = c0[c];
    if (u == nullptr) {
      for (int64_t i = 0; i < HW; ++i) dx[i] = a_d * (p[i] - m) + a_0;
    } else {
      const scalar_t* up = u + plane * HW;
      const scalar_t a_u = cu[c];
      for (int64_t i = 0; i < HW; ++i) dx[i] = a_d * (p[i] - m) + a_u * up[i] + a_0;
    }
    add_at_maxima<scalar_t>(d, grad + at, index + at, cg[c], dx);
    const scalar_t b_u = u == nullptr ? scalar_t(0) : gu[c], b_d = gd[c], b_0 = g0[c];
    scalar_t* dg = d_grad + at;  // u at the maxima (first pass), or unset without u
    for (int64_t j = 0; j < P; ++j) {
      const scalar_t um = u == nullptr ? scalar_t(0) : dg[j];
      const scalar_t v = b_u * um + b_d * (at_max[at + j] - m) + b_0;
      dg[j] = index[at + j] == kInactive ? scalar_t(0) : v;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps, int64_t kernel) {
  TORCH_CHECK_VALUE(eps > 0, "bn_relu_pool: eps must be positive, got ", eps);
  const Dims d = check_forward(x_in, weight_in, bias_in, kernel);
  const bool rows = channels_last(x_in, kernel);
  const at::Tensor x = in_layout(x_in, rows);
  std::optional<at::Tensor> weight, bias;
  if (weight_in.has_value()) weight = weight_in->contiguous();
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const auto layout = rows ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({d.N, d.C, d.Ho, d.Wo}, x.options().memory_format(layout));
  at::Tensor mean = at::empty({d.C}, x.options());
  at::Tensor invstd = at::empty({d.C}, x.options());
  at::Tensor index = at::empty({d.N, d.C, d.Ho, d.Wo}, x.options().dtype(at::kByte).memory_format(layout));
  at::Tensor xmax = at::empty({d.k == 1 ? 0 : d.N, d.C, d.Ho, d.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool", [&] {
    if (rows) {
      cpu::vector_kernels<scalar_t>().rows_forward(
          d.count(), d.C, x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(weight),
          data_or_null<scalar_t>(bias), eps, out.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
          invstd.data_ptr<scalar_t>(), index.data_ptr<uint8_t>());
      return;
    }
    forward_kernel<scalar_t>(d, x.const_data_ptr<scalar_t>(), weight, bias, eps,
                             out.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                             invstd.data_ptr<scalar_t>(), index.data_ptr<uint8_t>(),
                             xmax.data_ptr<scalar_t>());
  });
  return {out, mean, invstd, index, xmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& index_in,
    const at::Tensor& xmax_in, int64_t kernel) {
  const Dims d = check_backward(grad_in, x_in, weight_in, mean, invstd, index_in, xmax_in, kernel,
                                "bn_relu_pool_backward");
  const bool rows = channels_last(x_in, kernel);
  const at::Tensor x = in_layout(x_in, rows), grad = in_layout(grad_in, rows), index = in_layout(index_in, rows);
  const at::Tensor xmax = xmax_in.contiguous();
  std::optional<at::Tensor> weight;
  if (weight_in.has_value()) weight = weight_in->contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty({d.C}, x.options());
  at::Tensor grad_bias = at::empty({d.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool_backward", [&] {
    const scalar_t* mean_p = mean.contiguous().const_data_ptr<scalar_t>();
    const scalar_t* invstd_p = invstd.contiguous().const_data_ptr<scalar_t>();
    if (rows) {
      cpu::vector_kernels<scalar_t>().rows_backward(
          d.count(), d.C, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          data_or_null<scalar_t>(weight), mean_p, invstd_p, index.const_data_ptr<uint8_t>(),
          grad_x.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>());
      return;
    }
    backward_kernel<scalar_t>(
        d, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight, mean_p, invstd_p,
        index.const_data_ptr<uint8_t>(), xmax.const_data_ptr<scalar_t>(),
        grad_x.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(),
        grad_bias.data_ptr<scalar_t>());
  });
  return {grad_x, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_double_backward_cpu(
    const std::optional<at::Tensor>& grad_grad_x_in, const std::optional<at::Tensor>& grad_grad_weight_in,
    const std::optional<at::Tensor>& grad_grad_bias_in, const at::Tensor& grad_in, const at::Tensor& x_in,
    const std::optional<at::Tensor>& weight_in, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& index_in, const at::Tensor& xmax_in, int64_t kernel) {
  const Dims d = check_backward(grad_in, x_in, weight_in, mean, invstd, index_in, xmax_in, kernel,
                                "bn_relu_pool_double_backward");
  TORCH_CHECK_VALUE(!grad_grad_x_in.has_value() || (grad_grad_x_in->sizes() == x_in.sizes() &&
                                                     grad_grad_x_in->scalar_type() == x_in.scalar_type()),
                    "bn_relu_pool_double_backward: grad_grad_x must be x-shaped, of x's dtype");
  for (const auto* t : {&grad_grad_weight_in, &grad_grad_bias_in}) {
    TORCH_CHECK_VALUE(!t->has_value() || ((*t)->dim() == 1 && (*t)->numel() == d.C &&
                                           (*t)->scalar_type() == x_in.scalar_type()),
                      "bn_relu_pool_double_backward: grad_grad_weight and grad_grad_bias must be [C] of "
                      "x's dtype");
  }
  const bool rows = channels_last(x_in, kernel);
  const at::Tensor x = in_layout(x_in, rows), grad = in_layout(grad_in, rows), index = in_layout(index_in, rows);
  const at::Tensor xmax = xmax_in.contiguous();
  std::optional<at::Tensor> weight, u, u_w, u_b;
  if (weight_in.has_value()) weight = weight_in->contiguous();
  if (grad_grad_x_in.has_value()) u = in_layout(*grad_grad_x_in, rows);
  if (grad_grad_weight_in.has_value()) u_w = grad_grad_weight_in->contiguous();
  if (grad_grad_bias_in.has_value()) u_b = grad_grad_bias_in->contiguous();
  at::Tensor d_grad = at::empty_like(grad);
  at::Tensor d_x = at::empty_like(x);
  at::Tensor d_weight = at::empty({d.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_pool_double_backward", [&] {
    const scalar_t* mean_p = mean.contiguous().const_data_ptr<scalar_t>();
    const scalar_t* invstd_p = invstd.contiguous().const_data_ptr<scalar_t>();
    if (rows) {
      cpu::vector_kernels<scalar_t>().rows_double_backward(
          d.count(), d.C, data_or_null<scalar_t>(u), data_or_null<scalar_t>(u_w), data_or_null<scalar_t>(u_b),
          grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(weight), mean_p,
          invstd_p, index.const_data_ptr<uint8_t>(), d_grad.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(),
          d_weight.data_ptr<scalar_t>());
      return;
    }
    double_backward_kernel<scalar_t>(
        d, data_or_null<scalar_t>(u), data_or_null<scalar_t>(u_w), data_or_null<scalar_t>(u_b),
        grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight, mean_p, invstd_p,
        index.const_data_ptr<uint8_t>(), xmax.const_data_ptr<scalar_t>(), d_grad.data_ptr<scalar_t>(),
        d_x.data_ptr<scalar_t>(), d_weight.data_ptr<scalar_t>());
  });
  return {d_grad, d_x, d_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(imaml_ext_layers, CPU, m) {
  m.impl("bn_relu_pool", &bn_relu_pool_cpu);
  m.impl("bn_relu_pool_backward", &bn_relu_pool_backward_cpu);
  m.impl("bn_relu_pool_double_backward", &bn_relu_pool_double_backward_cpu);
}

}  // namespace imaml_ext
