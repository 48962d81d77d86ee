"""Host tests of the CUDA kernels' code, for machines without a GPU: the C++
programs in tests/native/ are compiled with the C++ compiler and run.

- packs_test.cpp: the packed (16-byte) access of csrc/cuda/packs.h visits
  every element of a slice once, every pack aligned in every row, over many
  row lengths, slicings, storage offsets and thread counts.
- cuda_kernels_test.cpp: the kernels and launch sequences of csrc/cuda run
  under a host emulation of CUDA blocks, barriers and warp shuffles
  (tests/native/cuda_emulation.h) and match naive double-precision loops.

A missing compiler skips these tests, or fails them when
IMAML_EXT_REQUIRE_COMPILED=1 (CI).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).parent / "native"
REQUIRE_COMPILED = os.environ.get("IMAML_EXT_REQUIRE_COMPILED", "") not in ("", "0")


def _build_and_run(source: str, tmp_path: Path, extra_flags=()) -> list[int]:
    """Compiles tests/native/<source>, runs it, returns the numbers it printed."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        assert not REQUIRE_COMPILED, "IMAML_EXT_REQUIRE_COMPILED=1 but no C++ compiler (set CXX)"
        pytest.skip("no C++ compiler (set CXX)")
    binary = tmp_path / Path(source).stem
    build = subprocess.run(
        [compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", *extra_flags,
         str(NATIVE / source), "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    # A guard against a hung emulation only: on a loaded machine the run takes minutes.
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr
    return [int(w) for w in run.stdout.split() if w.isdigit()]


def test_packed_access_visits_every_element_once_aligned(tmp_path):
    slices, packs = _build_and_run("packs_test.cpp", tmp_path)
    assert slices > 10_000 and packs > 100_000


def test_cuda_kernels_match_naive_loops_under_host_emulation(tmp_path):
    # The kernels' `#pragma unroll` means nothing to the host compiler.
    calls, launches = _build_and_run("cuda_kernels_test.cpp", tmp_path,
                                     ["-Wno-unknown-pragmas"])
    assert calls >= 500 and launches > calls
