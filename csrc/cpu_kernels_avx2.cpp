// The per-instruction-set kernels (cpu/isa.h) for AVX2 with FMA: the code
// after the target switch is compiled for it, at::vec's Vectorized included,
// as ATen builds its own AVX2 kernels, with CPU_CAPABILITY=AVX2.
#include "cpu/isa_prelude.h"

#if IMAML_EXT_HAVE_AVX2_KERNELS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// what -mavx2 -mfma -mf16c define and the pragma does not: sleef.h (included
// by at::vec) declares its AVX2 functions only under them
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// at::vec's BFloat16 operators pass lambdas over __m256 whose function-pointer
// thunks GCC compiles without the target; unused here, but they warn (only
// there: the kernels below keep the warning)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop
static_assert(std::is_same_v<at::vec::Vectorized<float>, at::vec::AVX2::Vectorized<float>>,
              "at::vec was included before the switch to AVX2 (cpu/isa_prelude.h must not include it)");

#define IMAML_EXT_ISA isa_avx2
#define IMAML_EXT_ISA_NAME "avx2"
#include "cpu/isa_kernels.h"

#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#pragma GCC pop_options
#endif
