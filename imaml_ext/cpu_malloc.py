"""CPU memory settings under which large freed CPU tensors are reused, not unmapped or re-faulted.

PyTorch allocates CPU tensors with ``malloc``.  glibc serves every block above
its mmap threshold (32 MiB at most) with a fresh ``mmap`` and gives it back
with ``munmap`` when the tensor is freed, so the next tensor of that size is
page-faulted and zeroed by the kernel again, page by page.  A per-task loop
allocates tensors of one task (a few MB, below the threshold, recycled by
malloc); the batched path allocates ``[T, n, C, H, W]`` tensors of hundreds of
MB, and paid that cost on each: on the max-pool Conv-4 (T = 8, full MAML, one
thread) the full-MAML meta-gradient took 1.29–1.50× higher's time with
glibc's defaults and 1.00–1.11× with the settings below
(benchmarks/RESULTS.md, "malloc").

:func:`reuse_freed_memory` sets ``M_MMAP_MAX = 0`` (large blocks come from
the heap, where freed blocks are reused) and ``M_TRIM_THRESHOLD = -1`` (freed
memory at the top of the heap is kept for reuse instead of returned, however
large: with a 2 GiB threshold, a full-MAML meta-batch of the Conv-4 at
3×84×84, T = 4 (peak 6–7 GB), run after a per-task loop in the same process
page-faulted 595,000 pages back in; with trimming off, 1).

It also makes the compiled library's exact-fit allocator PyTorch's CPU
allocator (csrc/exact_fit_allocator.cpp; :func:`exact_fit_allocator`).
PyTorch's own takes blocks from ``posix_memalign``, and glibc's memalign
asks its heap for more than the block it keeps, so a freed block is a hole
too small for the next request of the same size: the heap grew by one
activation's worth and page-faulted it in (the Conv-4 at 28×28, T = 32,
first-order MAML: 117,600 faults of its 481 MB query activation, in
meta-batches after the first).  The exact-fit allocator mallocs the block
with room to align it inside, so its hole fits the next request of that
size: the heap grows more rarely and the peak resident memory of a Conv-4
meta-batch was 28–44 % lower (RESULTS.md, "exact-fit").  Without the
compiled CPU ops only the malloc settings apply.

The cost is memory: the process's resident memory stays near its peak
instead of falling after each meta-batch; :func:`release_freed_memory`
gives the freed part back to the system when that matters (after training,
or before measuring a peak).  :class:`imaml_ext.functional.TaskLoss`
calls :func:`reuse_freed_memory` once per process for models on the CPU; setting the environment
variable ``IMAML_EXT_SYSTEM_MALLOC=1`` keeps glibc's defaults and PyTorch's
allocator.  On a C library other than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Optional

__all__ = ["reuse_freed_memory", "release_freed_memory", "exact_fit_allocator", "heap_stats",
           "DISABLE_ENV"]

DISABLE_ENV = "IMAML_EXT_SYSTEM_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>
_NEVER_TRIM = -1                         # mallopt(M_TRIM_THRESHOLD, -1): trimming off

_applied: Optional[bool] = None


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (<malloc.h>, glibc ≥ 2.33), in bytes."""
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc ≥ 2.33
        libc.mallinfo2.restype = _MallInfo2
    return libc


def reuse_freed_memory() -> bool:
    """Apply the settings above once per process; True if the malloc settings
    are in effect (:func:`exact_fit_allocator` says whether the allocator is).

    False where the C library is not glibc, where ``mallopt`` refuses, or where
    ``IMAML_EXT_SYSTEM_MALLOC`` is set to anything but ``""`` or ``"0"``.
    """
    global _applied
    if _applied is None:
        if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            _applied = False
        else:
            libc = _glibc()
            _applied = bool(libc is not None and libc.mallopt(_M_MMAP_MAX, 0) == 1
                            and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1)
            if _applied:
                exact_fit_allocator(True)
    return _applied


def release_freed_memory() -> bool:
    """Give the memory that malloc keeps for reuse back to the system
    (glibc's ``malloc_trim(0)``, which also releases the free pages inside the
    heap, not only at its top); True if any was released.  The next tensors
    that need it page-fault it in again.  False without glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def exact_fit_allocator(on: Optional[bool] = None) -> bool:
    """Whether the exact-fit allocator is PyTorch's CPU allocator, after making it
    so (``on=True``) or putting back the one it replaced (``on=False``); None only
    asks.  False without the compiled CPU ops (:func:`imaml_ext.backend`), whose
    library holds it.  Tensors keep the allocator that made them, so switching
    at any time is safe (benchmarks switch it for an A/B)."""
    switch = _exact_fit_switch()
    return switch is not None and bool(switch(-1 if on is None else int(on)))


@functools.lru_cache(maxsize=None)
def _exact_fit_switch():
    """The compiled CPU library's ``imaml_ext_exact_fit_cpu_allocator``, or None without it."""
    from . import _build
    path = _build.backend().cpu_library
    if path is None:
        return None
    switch = ctypes.CDLL(path).imaml_ext_exact_fit_cpu_allocator
    switch.argtypes, switch.restype = [ctypes.c_int], ctypes.c_int
    return switch


def heap_stats() -> Optional[dict]:
    """glibc's ``mallinfo2()`` as a dict of bytes, with ``"in_use"``: the bytes the
    program holds (``uordblks`` from the heap + ``hblkhd`` from mmap), which,
    unlike the resident set, does not count freed memory malloc keeps.
    None without glibc ≥ 2.33."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    info = libc.mallinfo2()
    stats = {name: int(getattr(info, name)) for name, _ in _MallInfo2._fields_}
    stats["in_use"] = stats["uordblks"] + stats["hblkhd"]
    return stats
