// Channels-last kernels of imaml_ext_layers::bn_relu_pool without pooling
// (k = 1), whose math bn_relu_pool.cpp's header states; compiled once per
// instruction set (cpu/isa_kernels.h) and called through cpu::vector_kernels().
//
// x is [N, C, H, W] stored channels-last: R = N*H*W rows of C contiguous
// values.  A channel's statistics run down a column, so every pass walks
// the rows in memory order with the channels in the inner, vectorized loop.
// Column sums are taken over fixed blocks of kRowBlock rows (in scalar_t,
// one accumulator per channel) and the blocks are merged in order in double:
// no result depends on the number of threads.
#pragma once

#include "isa_prelude.h"

namespace imaml_ext::cpu::IMAML_EXT_ISA {

namespace rows {

constexpr int64_t kRowBlock = 64;
constexpr uint8_t kActive = 0;  // the window position of k = 1

// sums[j*C + c] = sum over rows r of the j-th of K terms at (r, c).
// add_row(r, acc) adds row r's terms to acc[j][0..C).
template <int K, typename scalar_t, typename F>
void column_sums(int64_t R, int64_t C, const F& add_row, double* sums) {
  const int64_t blocks = (R + kRowBlock - 1) / kRowBlock;
  std::vector<double> partial(static_cast<size_t>(blocks * K * C));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<scalar_t> local(static_cast<size_t>(K * C));
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(local.begin(), local.end(), scalar_t(0));
      std::array<scalar_t*, K> acc;
      for (int j = 0; j < K; ++j) acc[j] = local.data() + j * C;
      for (int64_t r = b * kRowBlock; r < std::min(R, (b + 1) * kRowBlock); ++r) add_row(r, acc);
      double* out = partial.data() + b * K * C;
      for (int64_t i = 0; i < K * C; ++i) out[i] = local[i];
    }
  });
  std::fill(sums, sums + K * C, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
    const double* p = partial.data() + b * K * C;
    for (int64_t i = 0; i < K * C; ++i) sums[i] += p[i];
  }
}

// Calls f(r) for every row, the rows spread over the threads.
template <typename F>
void for_each_row(int64_t R, int64_t C, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(r);
  });
}

template <typename scalar_t>
void forward(int64_t R, int64_t C, const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
             double eps, scalar_t* out, scalar_t* mean_out, scalar_t* invstd_out, uint8_t* index) {
  std::vector<double> s(C), m2(C);
  column_sums<1, scalar_t>(R, C, [&](int64_t r, const std::array<scalar_t*, 1>& acc) {
    const scalar_t* __restrict__ row = x + r * C;
    scalar_t* __restrict__ a0 = acc[0];
    for (int64_t c = 0; c < C; ++c) a0[c] += row[c];
  }, s.data());
  // deviations from the rounded mean, corrected for its rounding
  std::vector<scalar_t> m(C);
  for (int64_t c = 0; c < C; ++c) m[c] = static_cast<scalar_t>(s[c] / R);
  column_sums<1, scalar_t>(R, C, [&](int64_t r, const std::array<scalar_t*, 1>& acc) {
    const scalar_t* __restrict__ row = x + r * C;
    const scalar_t* __restrict__ mc = m.data();
    scalar_t* __restrict__ a0 = acc[0];
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t dev = row[c] - mc[c];
      a0[c] += dev * dev;
    }
  }, m2.data());
  std::vector<scalar_t> a(C), b(C);
  for (int64_t c = 0; c < C; ++c) {
    const double mu = s[c] / R, dm = mu - m[c];
    const double var = std::max(m2[c] - R * dm * dm, 0.0) / R;  // NaN (an inf in x) stays NaN
    const double invstd = 1.0 / std::sqrt(var + eps);
    mean_out[c] = m[c];
    invstd_out[c] = static_cast<scalar_t>(invstd);
    a[c] = static_cast<scalar_t>((weight ? weight[c] : scalar_t(1)) * invstd);
    b[c] = bias ? bias[c] : scalar_t(0);
  }
  for_each_row(R, C, [&](int64_t r) {
    const int64_t n = C;  // a local bound: the byte stores below could alias a captured one
    const scalar_t* __restrict__ row = x + r * n;
    const scalar_t *__restrict__ mc = m.data(), *__restrict__ ac = a.data(), *__restrict__ bc = b.data();
    scalar_t* __restrict__ o = out + r * n;
    uint8_t* __restrict__ ix = index + r * n;
    for (int64_t c = 0; c < n; ++c) {
      const scalar_t y = ac[c] * (row[c] - mc[c]) + bc[c];
      const bool active = !(y <= 0);  // NaN stays, as ReLU passes it
      o[c] = active ? y : scalar_t(0);
      ix[c] = active ? kActive : kInactive;
    }
  });
}

// dL/dx, dL/dweight, dL/dbias from dL/dout (grad), with g = grad where active:
// dx = k1*g + A + B*(x - mean).
template <typename scalar_t>
void backward(int64_t R, int64_t C, const scalar_t* grad, const scalar_t* x, const scalar_t* weight,
              const scalar_t* mean, const scalar_t* invstd, const uint8_t* index, scalar_t* grad_x,
              scalar_t* grad_weight, scalar_t* grad_bias) {
  std::vector<double> sums(2 * C);  // sum(g), sum(g*(x - mean))
  column_sums<2, scalar_t>(R, C, [&](int64_t r, const std::array<scalar_t*, 2>& acc) {
    const scalar_t *__restrict__ row = x + r * C, *__restrict__ gr = grad + r * C, *__restrict__ mc = mean;
    const uint8_t* __restrict__ ix = index + r * C;
    scalar_t *__restrict__ sg = acc[0], *__restrict__ sgd = acc[1];
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t v = gr[c];  // loaded unconditionally: the select vectorizes
      const scalar_t g = ix[c] == kInactive ? scalar_t(0) : v;
      sg[c] += g;
      sgd[c] += g * (row[c] - mc[c]);
    }
  }, sums.data());
  std::vector<scalar_t> A(C), B(C), k1(C);
  for (int64_t c = 0; c < C; ++c) {
    const double is = invstd[c], gain = (weight ? weight[c] : scalar_t(1)) * is;
    const double sum_gx = sums[C + c] * is;  // sum of g*xhat
    grad_weight[c] = static_cast<scalar_t>(sum_gx);
    grad_bias[c] = static_cast<scalar_t>(sums[c]);
    k1[c] = static_cast<scalar_t>(gain);
    B[c] = static_cast<scalar_t>(-gain * (sum_gx / R) * is);
    A[c] = static_cast<scalar_t>(-gain * (sums[c] / R));
  }
  for_each_row(R, C, [&](int64_t r) {
    const scalar_t *__restrict__ row = x + r * C, *__restrict__ gr = grad + r * C, *__restrict__ mc = mean;
    const scalar_t *__restrict__ a0 = A.data(), *__restrict__ b0 = B.data(), *__restrict__ kc = k1.data();
    const uint8_t* __restrict__ ix = index + r * C;
    scalar_t* __restrict__ gx = grad_x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t v = kc[c] * gr[c];
      gx[c] = a0[c] + b0[c] * (row[c] - mc[c]) + (ix[c] == kInactive ? scalar_t(0) : v);
    }
  });
}

// The backward's own backward (bn_relu_pool.cpp's header): cotangents u of dx
// (or none), u_w of dweight, u_b of dbias -> d grad, d x, d weight.
template <typename scalar_t>
void double_backward(int64_t R, int64_t C, const scalar_t* u, const scalar_t* u_w, const scalar_t* u_b,
                     const scalar_t* grad, const scalar_t* x, const scalar_t* weight, const scalar_t* mean,
                     const scalar_t* invstd, const uint8_t* index, scalar_t* d_grad, scalar_t* d_x,
                     scalar_t* d_weight) {
  // per channel: sums of g, g*d, and with u of u*g, u, u*d (d = x - mean)
  std::vector<double> s(5 * C, 0.0);
  auto g_terms = [&](int64_t r, const scalar_t* __restrict__ row, scalar_t* __restrict__ sg,
                     scalar_t* __restrict__ sgd) {
    const scalar_t *__restrict__ gr = grad + r * C, *__restrict__ mc = mean;
    const uint8_t* __restrict__ ix = index + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t v = gr[c];
      const scalar_t g = ix[c] == kInactive ? scalar_t(0) : v;
      sg[c] += g;
      sgd[c] += g * (row[c] - mc[c]);
    }
  };
  if (u == nullptr) {
    column_sums<2, scalar_t>(R, C, [&](int64_t r, const std::array<scalar_t*, 2>& acc) {
      g_terms(r, x + r * C, acc[0], acc[1]);
    }, s.data());
  } else {
    column_sums<5, scalar_t>(R, C, [&](int64_t r, const std::array<scalar_t*, 5>& acc) {
      const scalar_t* __restrict__ row = x + r * C;
      g_terms(r, row, acc[0], acc[1]);
      const int64_t n = C;
      const scalar_t *__restrict__ gr = grad + r * n, *__restrict__ up = u + r * n, *__restrict__ mc = mean;
      const uint8_t* __restrict__ ix = index + r * n;
      scalar_t *__restrict__ sug = acc[2], *__restrict__ su = acc[3], *__restrict__ sud = acc[4];
      #pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const scalar_t ug = up[c] * gr[c];
        sug[c] += ix[c] == kInactive ? scalar_t(0) : ug;
        su[c] += up[c];
        sud[c] += up[c] * (row[c] - mc[c]);
      }
    }, s.data());
  }
  // dx = cd*d + cu*u + c0 (+ cg*grad where active); dgrad = gu*u + gd*d + g0 where active
  std::vector<scalar_t> cd(C), cu(C), c0(C), cg(C), gu(C), gd(C), g0(C);
  for (int64_t c = 0; c < C; ++c) {
    const double r = invstd[c], gamma = weight ? weight[c] : scalar_t(1);
    const double uw = u_w == nullptr ? 0.0 : static_cast<double>(u_w[c]);
    const double ub = u_b == nullptr ? 0.0 : static_cast<double>(u_b[c]);
    const double gbar = s[c] / R, A = r * s[C + c] / R;
    const double ubar = s[3 * C + c] / R, B = r * s[4 * C + c] / R, Cug = s[2 * C + c] / R;
    const double gr2 = gamma * r * r;
    d_weight[c] = static_cast<scalar_t>(r * R * (Cug - gbar * ubar - A * B));
    cd[c] = static_cast<scalar_t>((-gr2 * (Cug - gbar * ubar - 3 * A * B) - uw * r * A) * r);
    cu[c] = static_cast<scalar_t>(u == nullptr ? 0.0 : -gr2 * A);
    cg[c] = static_cast<scalar_t>(-gr2 * B + uw * r);
    c0[c] = static_cast<scalar_t>(gr2 * (B * gbar + A * ubar) - uw * r * gbar);
    gu[c] = static_cast<scalar_t>(u == nullptr ? 0.0 : gamma * r);
    gd[c] = static_cast<scalar_t>((uw - gamma * r * B) * r);
    g0[c] = static_cast<scalar_t>(ub - gamma * r * ubar);
  }
  for_each_row(R, C, [&](int64_t r) {
    const int64_t n = C;
    const scalar_t *__restrict__ row = x + r * n, *__restrict__ gr = grad + r * n, *__restrict__ mc = mean;
    const scalar_t *__restrict__ a_d = cd.data(), *__restrict__ a_0 = c0.data(), *__restrict__ a_g = cg.data();
    const scalar_t *__restrict__ b_d = gd.data(), *__restrict__ b_0 = g0.data();
    const uint8_t* __restrict__ ix = index + r * n;
    scalar_t *__restrict__ dx = d_x + r * n, *__restrict__ dg = d_grad + r * n;
    if (u == nullptr) {
      #pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const scalar_t d = row[c] - mc[c], v = a_g[c] * gr[c], w = b_d[c] * d + b_0[c];
        dx[c] = a_d[c] * d + a_0[c] + (ix[c] == kInactive ? scalar_t(0) : v);
        dg[c] = ix[c] == kInactive ? scalar_t(0) : w;
      }
    } else {
      const scalar_t *__restrict__ up = u + r * n, *__restrict__ a_u = cu.data(), *__restrict__ b_u = gu.data();
      #pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const scalar_t d = row[c] - mc[c], v = a_g[c] * gr[c], w = b_u[c] * up[c] + b_d[c] * d + b_0[c];
        dx[c] = a_d[c] * d + a_u[c] * up[c] + a_0[c] + (ix[c] == kInactive ? scalar_t(0) : v);
        dg[c] = ix[c] == kInactive ? scalar_t(0) : w;
      }
    }
  });
}

}  // namespace rows
}  // namespace imaml_ext::cpu::IMAML_EXT_ISA
