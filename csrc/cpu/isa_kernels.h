// One build of the per-instruction-set kernels (cpu/isa.h): included by
// csrc/cpu_kernels_<isa>.cpp after it has included cpu/isa_prelude.h, set
// the instruction set and defined IMAML_EXT_ISA (the namespace of this
// build's code, so that no two builds define the same symbol).
#pragma once

#include "adjoint_sgd_step.h"
#include "batched_dot.h"
#include "bn_relu_rows.h"
#include "cg_step.h"
#include "prox_sgd_step.h"

namespace imaml_ext::cpu::IMAML_EXT_ISA {

template <typename scalar_t>
VectorKernels<scalar_t> kernels() {
  return {IMAML_EXT_ISA_NAME,       &cg_step<scalar_t>,        &prox_sgd_step<scalar_t>,
          &adjoint_sgd_step<scalar_t>, &batched_dot<scalar_t>, &rows::forward<scalar_t>,
          &rows::backward<scalar_t>, &rows::double_backward<scalar_t>};
}

template VectorKernels<float> kernels<float>();
template VectorKernels<double> kernels<double>();

}  // namespace imaml_ext::cpu::IMAML_EXT_ISA
