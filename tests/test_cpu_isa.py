"""The compiled CPU kernels' instruction sets (csrc/cpu/isa.h): the build the
backend reports follows ATen's CPU capability, the baseline build passes the
kernel tests and gives the AVX2 build's bits, and no code outside the AVX2
build uses instructions beyond baseline x86-64 (one that did could be the
copy the linker keeps for every caller, and crash a CPU without them)."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import imaml_ext as im

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = Path(im.__file__).resolve().parents[1]  # where the child processes import imaml_ext from
pytestmark = pytest.mark.skipif(not im.backend().cpu, reason="needs the compiled CPU ops (imaml_ext.backend())")
LIBRARY = im.backend().cpu_library
# whether the library holds the AVX2 build (GCC on x86-64 only): its table's symbol,
# imaml_ext::cpu::isa_avx2::kernels<float>()
AVX2_BUILT = hasattr(ctypes.CDLL(LIBRARY), "_ZN9imaml_ext3cpu8isa_avx27kernelsIfEENS0_13VectorKernelsIT_EEv")


def _child_env(**extra) -> dict:
    """The environment of a child process that imports the imaml_ext under test."""
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


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
                         env=_child_env(ATEN_CPU_CAPABILITY="default"))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) > 100, out.stdout[-2000:]


# Runs every per-instruction-set kernel on the inputs saved in argv[1] (torch.save)
# and saves the outputs to argv[2], with the build this process picked.
RUN_KERNELS = textwrap.dedent("""
    import sys
    import torch
    import imaml_ext as im
    from imaml_ext import fused_layers as fl
    from imaml_ext import ops
    out = {"isa": im.backend().cpu_isa}
    for dtype, a in torch.load(sys.argv[1]).items():
        x, r, p, hp, rs, th, theta, adj, lr_grad = (a[k].clone() for k in
                                                     ("x", "r", "p", "hp", "rs", "th", "theta", "adj", "lr_grad"))
        state = torch.zeros(x.shape[0], dtype=torch.int32)
        ops.cg_step_(x, r, p, hp, rs, state, th, 1.0, 0.5)
        phi = a["x"].clone()
        ops.prox_sgd_step_(phi, a["p"], theta, 0.1, 2.0, 1.5)
        ops.adjoint_sgd_step_(adj, a["hp"], a["p"], lr_grad, 0.1)
        act, w, b, grad, u = a["act"], a["w"], a["b"], a["grad"], a["u"]
        forward = fl._op(act, w, b, 1e-5, 1)
        out[dtype] = dict(x=x, r=r, p=p, rs=rs, state=state, phi=phi, adj=adj, lr_grad=lr_grad,
                          dot=ops.batched_dot(a["x"], a["r"]), sq_norm=ops.batched_sq_norm(a["x"]),
                          forward=forward, backward=fl._backward_op(grad, act, w, *forward[1:], 1),
                          double_backward=fl._double_backward_op(u, w, b, grad, act, w, *forward[1:], 1))
    torch.save(out, sys.argv[2])
""")


def _kernel_inputs(dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    T, P = 5, 20_011  # several 8192-element chunks and a ragged end
    x, r, p, hp = (torch.randn(T, P, generator=g, dtype=dtype) for _ in range(4))
    act, grad, u = (torch.randn(3, 37, 6, 5, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
                    for _ in range(3))
    return dict(x=x, r=r, p=p, hp=hp, rs=(r * r).sum(1), th=torch.zeros(T, dtype=dtype),
                theta=torch.randn(P, generator=g, dtype=dtype), adj=torch.randn(T, P, generator=g, dtype=dtype),
                lr_grad=torch.randn(T, generator=g, dtype=dtype), act=act, grad=grad, u=u,
                w=torch.randn(37, generator=g, dtype=dtype), b=torch.randn(37, generator=g, dtype=dtype))


def test_the_builds_give_the_same_bits(tmp_path):
    """Every kernel of csrc/cpu/isa.h, run by the baseline build (a process with
    ATEN_CPU_CAPABILITY=default) and by this process's, on the same saved inputs."""
    inputs = {str(dtype): _kernel_inputs(dtype) for dtype in (torch.float32, torch.float64)}
    torch.save(inputs, tmp_path / "inputs.pt")
    results = {}
    for name, extra in (("baseline", {"ATEN_CPU_CAPABILITY": "default"}), ("this", {})):
        out = subprocess.run([sys.executable, "-c", RUN_KERNELS, str(tmp_path / "inputs.pt"),
                              str(tmp_path / f"{name}.pt")], capture_output=True, text=True, timeout=300,
                             env=_child_env(**extra))
        assert out.returncode == 0, out.stderr[-3000:]
        results[name] = torch.load(tmp_path / f"{name}.pt")
    assert results["baseline"]["isa"] == "default"
    assert results["this"]["isa"] == im.backend().cpu_isa
    flat = {name: torch.utils._pytree.tree_leaves({k: v for k, v in r.items() if k != "isa"})
            for name, r in results.items()}
    assert len(flat["this"]) == len(flat["baseline"]) > 30
    for mine, base in zip(flat["this"], flat["baseline"]):
        assert mine.dtype == base.dtype and mine.stride() == base.stride()
        assert torch.equal(mine, base)


# An instruction beyond baseline x86-64 in objdump's listing: VEX/EVEX-encoded
# (v..., AVX-512 mask k...), BMI/BMI2, POPCNT, LZCNT, MOVBE.
_BEYOND_BASELINE = re.compile(r"^\s+[0-9a-f]+:\s+(?:\{vex\}\s+)?(v\w+|k\w+|andn|bextr|blsi|blsmsk|blsr|bzhi|"
                              r"mulx|pdep|pext|rorx|sarx|shlx|shrx|popcnt|lzcnt|movbe)\b")


def _functions_beyond_baseline(library: str) -> set:
    """The (demangled) functions of ``library`` with an instruction beyond baseline x86-64."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library],
                             capture_output=True, text=True, check=True).stdout
    found, function = set(), None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif function and _BEYOND_BASELINE.match(line):
            found.add(function)
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (GNU binutils) is not installed")
def test_only_the_avx2_build_goes_beyond_baseline_x86_64():
    symbols = subprocess.run(["objdump", "-t", LIBRARY], capture_output=True, text=True, check=True).stdout
    # without a symbol table, code would be attributed to whichever named function precedes it
    assert "isa_default" in symbols, "the library is stripped: the scan needs its symbol table"
    used = _functions_beyond_baseline(LIBRARY)
    outside = sorted(f for f in used if "isa_avx2" not in f and "at::vec::AVX2::" not in f)
    assert not outside, outside[:5]
    if AVX2_BUILT:
        assert any("isa_avx2::cg_step<float>" in f for f in used)  # the listing did see the AVX2 build
