// Chooses the build of the per-instruction-set kernels (cpu/isa.h) that this
// CPU runs, once per process, and tells Python which
// (imaml_ext_cpu_isa, read by imaml_ext._build).
#include <ATen/Version.h>

#include <string>

#include "cpu/isa.h"

namespace imaml_ext::cpu {

namespace {

#if IMAML_EXT_HAVE_AVX2_KERNELS
bool use_avx2() {
  // ATen says "AVX2" or "AVX512" where the CPU has them and ATEN_CPU_CAPABILITY
  // does not ask for less, but also where ATEN_CPU_CAPABILITY asks for more
  // than the CPU has: the CPU is asked as well.
  static const bool avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return (capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return avx2;
}
#endif

template <typename scalar_t>
VectorKernels<scalar_t> choose() {
#if IMAML_EXT_HAVE_AVX2_KERNELS
  if (use_avx2()) return isa_avx2::kernels<scalar_t>();
#endif
  return isa_default::kernels<scalar_t>();
}

}  // namespace

template <typename scalar_t>
const VectorKernels<scalar_t>& vector_kernels() {
  static const VectorKernels<scalar_t> chosen = choose<scalar_t>();
  return chosen;
}

template const VectorKernels<float>& vector_kernels<float>();
template const VectorKernels<double>& vector_kernels<double>();

}  // namespace imaml_ext::cpu

// The instruction set of the kernels this process runs: "default" or "avx2".
extern "C" const char* imaml_ext_cpu_isa() {
  return imaml_ext::cpu::vector_kernels<float>().isa;
}
