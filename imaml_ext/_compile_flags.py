"""The C++ compiler flags of the CPU library, one declaration for its two builds:
setup.py (which loads this file by its path, without importing the package) and
the just-in-time build of :mod:`imaml_ext._build`.  Imports nothing of the package."""
from __future__ import annotations

import sys

# -fno-trapping-math: lets the compiler vectorize the kernels' selects (it changes
# no result, only floating-point exception flags); -ffp-contract=off: the AVX2
# build of csrc/cpu/isa.h fuses no multiply-add, so it gives the baseline build's bits.
CPU_CFLAGS = ("-O3", "-fno-trapping-math", "-ffp-contract=off")


def openmp_flags(torch) -> list[str]:
    """-fopenmp where ``torch`` parallelises with OpenMP (at::parallel_for is a header
    template, so the extension must be compiled with OpenMP to run in parallel)."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []
