"""Ahead-of-time build of imaml_ext's compiled ops (metadata: pyproject.toml).

    pip install --no-build-isolation .        # or -e . ; uses the installed torch

Extensions (kernel libraries only: the ops are declared in imaml_ext/ops.py;
named apart from the _C / _C_cuda of older builds, which declared the ops and
so cannot load beside ops.py, and which a stale in-place build may leave):
  imaml_ext._kernels       CPU kernels (csrc/*.cpp), -O3, OpenMP
                           (-g0: no debug info, which Python's CFLAGS would add)
  imaml_ext._kernels_cuda  CUDA kernels (csrc/cuda/*.cu), when torch is a CUDA
                           build and a CUDA toolkit is found (CUDA_HOME, or nvcc
                           on PATH)
An extension that fails to compile is skipped with a warning (unless required,
below); imaml_ext then compiles it on first use or falls back to its PyTorch
reference ops (imaml_ext/_build.py). csrc/ is shipped in the package as
imaml_ext/_csrc for that just-in-time build.

Environment:
  IMAML_EXT_BUILD=0             build no extension (pure-Python install)
  IMAML_EXT_REQUIRE_CUDA=1      fail unless the CUDA extension builds (CI)
  IMAML_EXT_REQUIRE_COMPILED=1  fail unless the CPU extension builds (CI)
  TORCH_CUDA_ARCH_LIST          GPU architectures, e.g. "8.0;8.6;9.0+PTX";
                                "9.0" (H100 only) if unset, to keep CI compiles
                                short: set it for other GPUs
  CUDA_HOME                     CUDA toolkit root
  MAX_JOBS                      parallel compile jobs (ninja)
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _say(message):
    print(f"imaml_ext setup: {message}", file=sys.stderr, flush=True)


def _compile_flags():
    """imaml_ext/_compile_flags.py, loaded by its path: the package itself is not
    importable before it is built."""
    spec = importlib.util.spec_from_file_location(
        "imaml_ext_compile_flags", os.path.join(ROOT, "imaml_ext", "_compile_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


class BuildPy(build_py):
    """Also ships csrc/ as imaml_ext/_csrc (not needed in editable mode, where
    the loader finds csrc/ next to the package)."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            target = os.path.join(self.build_lib, "imaml_ext", "_csrc")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(os.path.join(ROOT, "csrc"), target)


def _is_cuda(ext):
    return ext.name.endswith("_kernels_cuda")


def _make_build_ext(base):
    class BuildExt(base):
        """Skips an extension that fails to compile, unless it is required."""

        def build_extensions(self):
            self._skipped = []
            self._started = False
            try:
                super().build_extensions()
            except Exception as e:
                # Before compiling anything, torch checks the compiler and the
                # CUDA toolkit version: a CUDA problem there costs only _kernels_cuda.
                cuda = [ext for ext in self.extensions if _is_cuda(ext)]
                if self._started or not cuda:
                    raise
                self._skip(cuda[0], e)
                self.extensions = [ext for ext in self.extensions if not _is_cuda(ext)]
                super().build_extensions()
            self.extensions = [ext for ext in self.extensions if ext not in self._skipped]

        def build_extension(self, ext):
            self._started = True
            try:
                super().build_extension(ext)
            except Exception as e:
                self._skip(ext, e)

        def _skip(self, ext, error):
            required = "IMAML_EXT_REQUIRE_CUDA" if _is_cuda(ext) else "IMAML_EXT_REQUIRE_COMPILED"
            if _flag(required):
                _say(f"{ext.name} failed to build and {required}=1: failing the build")
                raise error
            self._skipped.append(ext)
            _say(
                f"WARNING: {ext.name} failed to build and is skipped ({error}). "
                + ("CUDA tensors will use the PyTorch reference ops unless the CUDA "
                   "kernels compile on first use." if _is_cuda(ext) else
                   "The ops will be compiled on first use or fall back to PyTorch."))

    return BuildExt


def _cuda_problem(torch, cuda_home):
    """Why the CUDA extension cannot be built, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return "no CUDA toolkit found (set CUDA_HOME to a toolkit containing bin/nvcc)"
    return None


def _extensions():
    """(ext_modules, cmdclass entries for build_ext)."""
    if os.environ.get("IMAML_EXT_BUILD", "1") == "0":
        _say("IMAML_EXT_BUILD=0: building no extension (the ops compile on first use)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError as e:
        if _flag("IMAML_EXT_REQUIRE_COMPILED") or _flag("IMAML_EXT_REQUIRE_CUDA"):
            raise
        _say(f"torch is not importable ({e}); building no extension")
        return [], {}

    flags = _compile_flags()
    openmp = flags.openmp_flags(torch)
    extensions = [
        CppExtension(
            "imaml_ext._kernels",
            _sources("csrc/*.cpp"),
            extra_compile_args={"cxx": [*flags.CPU_CFLAGS, "-g0", *openmp]},
            extra_link_args=openmp,
        )
    ]
    problem = _cuda_problem(torch, CUDA_HOME)
    if problem is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        _say(f"building the CUDA extension for TORCH_CUDA_ARCH_LIST="
             f"{os.environ['TORCH_CUDA_ARCH_LIST']} with {CUDA_HOME}")
        extensions.append(
            CUDAExtension(
                "imaml_ext._kernels_cuda",
                _sources("csrc/cuda/*.cu"),
                extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3"]},
            )
        )
    elif _flag("IMAML_EXT_REQUIRE_CUDA"):
        raise RuntimeError(f"IMAML_EXT_REQUIRE_CUDA=1 but the CUDA extension cannot be built: "
                           f"{problem}")
    else:
        _say(f"skipping the CUDA extension: {problem}")
    return extensions, {"build_ext": _make_build_ext(BuildExtension)}


_ext_modules, _cmdclass = _extensions()
setup(ext_modules=_ext_modules, cmdclass={"build_py": BuildPy, **_cmdclass})
