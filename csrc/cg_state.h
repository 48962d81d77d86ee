// Per-task outcome of conjugate gradient: the int32 `state` that cg_step_
// reads and writes. The same codes are declared for Python in
// imaml_ext/ops.py (CGState).
#pragma once

#include <cstdint>

namespace imaml_ext {

enum CGState : int32_t {
  kRunning = 0,               // still iterating
  kConverged = 1,             // r'r <= threshold_sq
  kNonPositiveCurvature = 2,  // stopped on p'Ap <= 0, last iterate kept
  kNonFinite = 3,             // stopped on a non-finite p'Ap
};

}  // namespace imaml_ext
