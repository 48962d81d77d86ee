"""The compiled CPU kernels' instruction sets (csrc/cpu/isa.h): the build the
backend reports follows ATen's CPU capability, the baseline build passes the
kernel tests as the AVX2 build does, and no code outside the AVX2 build uses
AVX instructions (one that did could be the copy the linker keeps for every
caller, and crash a CPU without AVX)."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import imaml_ext as im

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not im.backend().cpu, reason="needs the compiled CPU ops (imaml_ext.backend())")
# where csrc/cpu/isa.h builds the AVX2 kernels (GCC, which setup.py uses on Linux)
AVX2_BUILT = platform.machine() == "x86_64" and sys.platform == "linux"


def test_the_kernels_follow_atens_cpu_capability():
    aten = torch.backends.cpu.get_cpu_capability()
    expected = "avx2" if AVX2_BUILT and aten in ("AVX2", "AVX512") else "default"
    assert im.backend().cpu_isa == expected, aten


def test_the_baseline_build_passes_the_kernel_tests():
    """The kernel tests again, in a process where ATEN_CPU_CAPABILITY=default
    makes the baseline build run (the check above confirms that it does)."""
    tests = ["tests/test_ops.py", "tests/test_fused_layers.py",
             "tests/test_cpu_isa.py::test_the_kernels_follow_atens_cpu_capability"]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200,
                         env=dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) > 100, out.stdout[-2000:]


def _functions_using_avx(library: str) -> set:
    """The (demangled) functions of ``library`` with a VEX-encoded instruction."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library],
                             capture_output=True, text=True, check=True).stdout
    found, function = set(), None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif function and re.match(r"^\s+[0-9a-f]+:\s+v[a-z0-9]+\s", line):
            found.add(function)
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (GNU binutils) is not installed")
def test_only_the_avx2_build_uses_avx_instructions():
    avx = _functions_using_avx(im.backend().cpu_library)
    outside = sorted(f for f in avx if "isa_avx2" not in f and "::AVX2::" not in f)
    assert not outside, outside[:5]
    if AVX2_BUILT:
        assert any("isa_avx2::cg_step<float>" in f for f in avx)  # the listing did see the AVX2 build
