// The CPU kernels whose loops gain from wider vectors (the [T, P] vector ops
// and the fused layer's channels-last row kernels), compiled once per
// instruction set and chosen at run time.
//
// csrc/cpu_kernels_default.cpp builds them for the baseline of the compiler's
// target and csrc/cpu_kernels_avx2.cpp (GCC on x86-64) for AVX2 with FMA;
// vector_kernels() returns the AVX2 build where ATen reports AVX2 or AVX-512
// (at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=default forces the
// baseline) and the CPU has AVX2, FMA and F16C, else the baseline build.
// Both give the same bits: the build contracts no multiply-add into an FMA
// (-ffp-contract=off, setup.py), so results do not depend on the CPU.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define IMAML_EXT_HAVE_AVX2_KERNELS 1
#else
#define IMAML_EXT_HAVE_AVX2_KERNELS 0
#endif

namespace imaml_ext::cpu {

// One instruction set's kernels; their arguments are those of the kernel
// templates of the same names (cpu/cg_step.h, cpu/bn_relu_rows.h, ...).
template <typename scalar_t>
struct VectorKernels {
  const char* isa;  // "default" or "avx2"
  void (*cg_step)(scalar_t* x, scalar_t* r, scalar_t* p, const scalar_t* Hp, scalar_t* rs,
                  int32_t* state, const scalar_t* threshold_sq, scalar_t a, scalar_t b, int64_t T,
                  int64_t P);
  void (*prox_sgd_step)(scalar_t* phi, const scalar_t* g, const scalar_t* theta, scalar_t lr,
                        scalar_t lam, scalar_t max_norm, int64_t T, int64_t P);
  void (*adjoint_sgd_step)(scalar_t* adj, const scalar_t* Ha, const scalar_t* g,
                           scalar_t* lr_grad, scalar_t lr, int64_t T, int64_t P);
  void (*batched_dot)(const scalar_t* x, const scalar_t* y, scalar_t* out, int64_t T,
                      int64_t P);
  void (*rows_forward)(int64_t R, int64_t C, const scalar_t* x, const scalar_t* weight,
                       const scalar_t* bias, double eps, scalar_t* out, scalar_t* mean_out,
                       scalar_t* invstd_out, uint8_t* index);
  void (*rows_backward)(int64_t R, int64_t C, const scalar_t* grad, const scalar_t* x,
                        const scalar_t* weight, const scalar_t* mean, const scalar_t* invstd,
                        const uint8_t* index, scalar_t* grad_x, scalar_t* grad_weight,
                        scalar_t* grad_bias);
  void (*rows_double_backward)(int64_t R, int64_t C, const scalar_t* u, const scalar_t* u_w,
                               const scalar_t* u_b, const scalar_t* grad, const scalar_t* x,
                               const scalar_t* weight, const scalar_t* mean,
                               const scalar_t* invstd, const uint8_t* index, scalar_t* d_grad,
                               scalar_t* d_x, scalar_t* d_weight);
};

// Each build's table (defined by cpu/isa_kernels.h in its translation unit).
namespace isa_default {
template <typename scalar_t>
VectorKernels<scalar_t> kernels();
}
#if IMAML_EXT_HAVE_AVX2_KERNELS
namespace isa_avx2 {
template <typename scalar_t>
VectorKernels<scalar_t> kernels();
}
#endif

// The build this CPU runs (chosen once per process).
template <typename scalar_t>
const VectorKernels<scalar_t>& vector_kernels();

}  // namespace imaml_ext::cpu
