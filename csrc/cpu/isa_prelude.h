// The headers that every build of the per-instruction-set kernels
// (cpu/isa_kernels.h) includes before it switches the instruction set, so
// that the inline functions they define, which the linker keeps one copy of,
// are compiled for the baseline in every translation unit.  at::vec's own
// dependencies are among them; at::vec itself, whose code lives in a
// namespace of its instruction set, is included after the switch.  A kernel
// header may include only at::vec, this header and other kernel headers:
// anything else it needs belongs here.
#pragma once

#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "../cg_state.h"
#include "isa.h"
#include "relu_index.h"
