// The per-instruction-set kernels (cpu/isa.h) for the compiler's baseline.
#include "cpu/isa_prelude.h"

#define IMAML_EXT_ISA isa_default
#define IMAML_EXT_ISA_NAME "default"
#include "cpu/isa_kernels.h"
