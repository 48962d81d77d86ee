"""Loading of the compiled imaml_ext kernels.

The operators are declared in :mod:`imaml_ext.ops`; the compiled libraries
only register kernels for them (CPU, CUDA). :func:`backend` loads the
libraries on first use (never at import; the first call of an op calls it), in
this order, for the CPU library and then the CUDA library:

1. the ahead-of-time build installed with the package:
   ``imaml_ext._kernels`` (CPU kernels) and ``imaml_ext._kernels_cuda`` (CUDA
   kernels), two shared libraries so that a CPU-only torch still loads the CPU ops and a
   missing or broken CUDA build only costs the CUDA path;
2. else a just-in-time build of csrc/ with ``torch.utils.cpp_extension.load``
   (ninja), cached under ``IMAML_EXT_BUILD_DIR`` or torch's extension cache;
   the CUDA kernels only when a GPU is visible and a CUDA toolkit is found;
3. else nothing: :mod:`imaml_ext.ops` registers its pure-PyTorch reference
   kernels for that device, and this module warns once, saying why and how to
   fix it.

This module does not import :mod:`imaml_ext.ops`: it checks the kernels of
whatever operators the ``imaml_ext`` namespace declares.

Environment variables:

``IMAML_EXT_NO_EXT=1``
    load nothing and use the PyTorch reference ops (no warning).
``IMAML_EXT_JIT=1``
    ignore the ahead-of-time build and compile just in time.
``IMAML_EXT_BUILD_DIR=DIR``
    cache directory of the just-in-time build (default: torch's,
    ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``).
``IMAML_EXT_REQUIRE_COMPILED=1``
    raise instead of falling back: always for the CPU ops, and for the CUDA
    ops when a GPU is visible (CI sets this).
``IMAML_EXT_VERBOSE_BUILD=1``
    show the just-in-time compiler output.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import importlib.util
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from ._compile_flags import CPU_CFLAGS, openmp_flags

__all__ = ["Backend", "backend", "describe"]

_PKG_DIR = Path(__file__).resolve().parent
_NAMESPACE = "imaml_ext"


@dataclasses.dataclass(frozen=True)
class Backend:
    """Which implementation of the fused ops runs, and why.

    name: "compiled-cuda+cpu", "compiled-cpu" or "pytorch".
    cpu, cuda: whether compiled kernels serve tensors on that device (other
    devices use the PyTorch reference ops).
    source: where the CPU library came from: "aot" (installed ahead-of-time
    build), "jit" (compiled on first use) or None.
    reason: how the backend was chosen, and what is missing if anything.
    cpu_library: the path of the loaded CPU library, or None.
    cpu_isa: the instruction set its vector kernels run (csrc/cpu/isa.h):
    "avx2" where ATen reports AVX2 or AVX-512, else "default" (the
    compiler's baseline; ``ATEN_CPU_CAPABILITY=default`` forces it); None
    without the library or for one built before it chose.
    """

    name: str
    cpu: bool
    cuda: bool
    source: Optional[str]
    reason: str
    cpu_library: Optional[str] = None
    cpu_isa: Optional[str] = None

    def __str__(self) -> str:
        source = f" ({self.source})" if self.source else ""
        return f"{self.name}{source}: {self.reason}"


_lock = threading.Lock()
_backend: Optional[Backend] = None


def backend() -> Backend:
    """Loads the compiled ops on first call; returns the :class:`Backend`."""
    global _backend
    if _backend is None:
        with _lock:
            if _backend is None:
                _backend = _load()
    return _backend


def describe() -> str:
    """Multi-line report: backend, torch and devices."""
    b = backend()
    cpu = ("yes" + (f" ({b.cpu_isa} vector kernels)" if b.cpu_isa else "")) if b.cpu else "no"
    lines = [
        f"imaml_ext ops backend: {b.name}" + (f" ({b.source})" if b.source else ""),
        f"  reason: {b.reason}",
        f"  torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}",
        f"  compiled CPU ops: {cpu}; "
        f"compiled CUDA ops: {'yes' if b.cuda else 'no'}",
        f"  CPU: {_cpu_name()}, {torch.get_num_threads()} threads",
    ]
    from . import fused_layers  # imports this module
    lines.append(f"  fused batch-norm → ReLU → max-pool layer: {fused_layers.status()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"  cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("  CUDA devices: none visible")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


# ---------------------------------------------------------------------------
# Loading.


class _Unavailable(Exception):
    """A library could not be loaded; the message says why."""


def _load() -> Backend:
    if _flag("IMAML_EXT_NO_EXT"):
        return Backend("pytorch", False, False, None,
                       "IMAML_EXT_NO_EXT=1 is set: using the PyTorch reference ops")
    try:
        cpu_source, cpu_note, cpu_library = _load_library("cpu")
    except _Unavailable as e:
        reason = f"compiled ops unavailable: {e}"
        _fallback(
            f"imaml_ext: {reason}. Using the slower PyTorch reference ops. To fix: install "
            "a C++ compiler and ninja (pip install ninja), then reinstall with "
            "`pip install --no-build-isolation .` or let the ops compile on first use; "
            "set IMAML_EXT_NO_EXT=1 to use the reference ops without this warning.")
        return Backend("pytorch", False, False, None, reason)

    notes = [cpu_note]
    cuda = False
    if torch.version.cuda is None:
        notes.append("no CUDA ops (torch is a CPU-only build)")
    elif not torch.cuda.is_available():
        notes.append("no CUDA ops (no CUDA device visible)")
    else:
        try:
            notes.append(_load_library("cuda")[1])
            cuda = True
        except _Unavailable as e:
            notes.append(f"CUDA ops unavailable: {e}")
            _fallback(
                f"imaml_ext: compiled CUDA ops unavailable: {e}. CUDA tensors use the slower "
                "PyTorch reference ops. To fix: install a CUDA toolkit matching torch "
                f"(CUDA {torch.version.cuda}), set CUDA_HOME, and reinstall with "
                "`pip install --no-build-isolation .` (or let the ops compile on first use).")
    name = "compiled-cuda+cpu" if cuda else "compiled-cpu"
    return Backend(name, True, cuda, cpu_source, "; ".join(notes), cpu_library, _cpu_isa(cpu_library))


def _cpu_isa(path: str) -> Optional[str]:
    """The instruction set the CPU library's vector kernels run (csrc/cpu_isa.cpp);
    None for a library built before it chose one."""
    try:
        isa = ctypes.CDLL(path).imaml_ext_cpu_isa
    except (OSError, AttributeError):
        return None
    isa.restype = ctypes.c_char_p
    return isa().decode()


def _fallback(message: str) -> None:
    if _flag("IMAML_EXT_REQUIRE_COMPILED"):
        raise RuntimeError(message + " (IMAML_EXT_REQUIRE_COMPILED=1 forbids the fallback)")
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _load_library(device: str) -> tuple[str, str, str]:
    """Loads the ``"cpu"`` or ``"cuda"`` kernels: the ahead-of-time build, else a
    just-in-time one.  Returns (source: ``"aot"`` or ``"jit"``, a note on where
    they came from, the library's path)."""
    label, module = {"cpu": ("CPU", "_kernels"), "cuda": ("CUDA", "_kernels_cuda")}[device]

    def verify(kind: str) -> None:
        _check_kernels(label, kind)
        if device == "cuda":
            _smoke_test_cuda(kind)

    problems = []
    if _flag("IMAML_EXT_JIT"):
        problems.append("IMAML_EXT_JIT=1 skips the ahead-of-time build")
    else:
        try:
            path = _load_aot(module)
        except _Unavailable as e:
            problems.append(str(e))
        else:
            verify("ahead-of-time")
            return "aot", f"{label} ops from the ahead-of-time build", path
    try:
        path = _load_jit(device)
    except _Unavailable as e:
        problems.append(str(e))
        raise _Unavailable("; ".join(problems)) from None
    verify("just-in-time")
    return "jit", f"{'; '.join(problems)}; {label} ops compiled just in time in {Path(path).parent}", path


def _load_aot(module: str) -> str:
    """Loads ``imaml_ext.<module>``; returns its path."""
    spec = importlib.util.find_spec(f"imaml_ext.{module}")
    if spec is None or not spec.origin:
        raise _Unavailable(f"no ahead-of-time build installed (imaml_ext.{module})")
    try:
        torch.ops.load_library(spec.origin)
    except Exception as e:  # undefined symbols, a wrong architecture, ...
        raise _Unavailable(
            f"the ahead-of-time build {Path(spec.origin).name} does not load ({e}); "
            "it was probably built against another torch: reinstall with "
            "`pip install --no-build-isolation .`") from None
    return spec.origin


def _check_kernels(dispatch_key: str, kind: str) -> None:
    """Every op has a kernel for the device: catches a stale build. (A library
    once loaded cannot be replaced in this process, so there is no retry.)"""
    missing = [name.split("::", 1)[1] for name in _declared_ops()
               if not torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)]
    if missing:
        raise _Unavailable(
            f"the {kind} build lacks {dispatch_key} kernels for {', '.join(missing)} (stale "
            "build?): rebuild with `pip install --no-build-isolation .`")


def _declared_ops() -> list[str]:
    """The qualified names of the operators in the imaml_ext namespace."""
    return sorted(name for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith(f"{_NAMESPACE}::"))


def _smoke_test_cuda(kind: str) -> None:
    """Launches one tiny kernel: catches a build lacking this GPU's architecture."""
    try:
        torch.ops.imaml_ext.batched_sq_norm.default(torch.ones(1, 1, device="cuda"))
    except RuntimeError as e:
        major, minor = torch.cuda.get_device_capability()
        raise _Unavailable(
            f"the {kind} CUDA build does not run on this GPU (sm_{major}{minor}): "
            f"{_first_lines(str(e), 2)}; rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}"
        ) from None


def _source_dir() -> Path:
    # csrc/ is shipped inside the package as _csrc (see setup.py); in a source
    # checkout (editable install) it sits next to the package.
    for candidate in (_PKG_DIR / "_csrc", _PKG_DIR.parent / "csrc"):
        if (candidate / "checks.h").is_file():
            return candidate
    raise _Unavailable("the C++ sources (csrc/) are not installed, so nothing can be compiled")


def _load_jit(kind: str) -> str:
    """Compiles and loads the CPU or CUDA library; returns its path."""
    from torch.utils import cpp_extension

    src = _source_dir()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise _Unavailable(
            f"no C++ compiler found for the just-in-time build ({compiler!r} is not on PATH; "
            "install g++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise _Unavailable("ninja is not installed, so the just-in-time build cannot run "
                           "(pip install ninja)")
    name = f"imaml_ext_{kind}"
    kwargs = {}
    if kind == "cpu":
        kwargs["sources"] = sorted(glob.glob(str(src / "*.cpp")))
        kwargs["extra_cflags"] = [*CPU_CFLAGS, *openmp_flags(torch)]
        kwargs["extra_ldflags"] = openmp_flags(torch)
    else:
        cuda_home = cpp_extension.CUDA_HOME
        nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
        if nvcc is None or not os.path.exists(nvcc):
            raise _Unavailable("no CUDA toolkit found for the just-in-time build "
                               "(set CUDA_HOME to a toolkit containing bin/nvcc)")
        kwargs["sources"] = sorted(glob.glob(str(src / "cuda" / "*.cu")))
        kwargs["extra_cflags"] = ["-O3"]
        kwargs["extra_cuda_cflags"] = ["-O3"]
    build_root = os.environ.get("IMAML_EXT_BUILD_DIR")
    if build_root:
        kwargs["build_directory"] = os.path.join(build_root, name)
        os.makedirs(kwargs["build_directory"], exist_ok=True)
    try:
        path = cpp_extension.load(
            name=name, is_python_module=False, verbose=_flag("IMAML_EXT_VERBOSE_BUILD"),
            **kwargs)
    except Exception as e:  # compiler errors, missing headers, bad toolkit, ...
        raise _Unavailable(
            f"the just-in-time {kind.upper()} build failed: {_first_lines(str(e), 8)}"
        ) from None
    return str(path)


def _first_lines(text: str, n: int) -> str:
    """The first n error lines of a compiler log (or its first n lines)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return " | ".join((errors or lines)[:n]).rstrip(".")
