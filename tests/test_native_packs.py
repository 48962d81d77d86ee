"""The packed (vectorized) access of the CUDA kernels (csrc/cuda/packs.h),
tested on the host: tests/native/packs_test.cpp is compiled with the C++
compiler and run. It checks that every element of a slice is visited once,
that every pack is 16-byte aligned in every row, that packs are used whenever
the rows share their alignment, and that packed loads and stores move the
right values, over many row lengths, slicings, storage offsets and thread
counts.

A missing compiler skips this test, or fails it when
IMAML_EXT_REQUIRE_COMPILED=1 (CI).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "native" / "packs_test.cpp"
REQUIRE_COMPILED = os.environ.get("IMAML_EXT_REQUIRE_COMPILED", "") not in ("", "0")


def test_packed_access_visits_every_element_once_aligned(tmp_path):
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        assert not REQUIRE_COMPILED, "IMAML_EXT_REQUIRE_COMPILED=1 but no C++ compiler (set CXX)"
        pytest.skip("no C++ compiler (set CXX)")
    binary = tmp_path / "packs_test"
    build = subprocess.run(
        [compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", str(SOURCE), "-o",
         str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    slices, packs = (int(w) for w in run.stdout.split() if w.isdigit())
    assert slices > 10_000 and packs > 100_000, run.stdout
