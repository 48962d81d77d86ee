"""imaml_ext.cpu_malloc: large CPU tensors come from malloc's heap, not from fresh mmaps,
and a freed block is a hole that the next block of its size fits."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import imaml_ext as im

ROOT = Path(__file__).resolve().parents[1]
needs_compiled_cpu = pytest.mark.skipif(not im.backend().cpu, reason="the exact-fit allocator is in the "
                                        "compiled CPU library (imaml_ext.backend())")

# Allocates a 100 MiB tensor after building a CPU TaskLoss and prints whether the
# C library is glibc, what reuse_freed_memory() returned, the bytes that glibc
# serves from mmap (mallinfo2's hblkhd) before and after the allocation, and the
# free bytes malloc keeps in its heap (fordblks) after a 512 MiB block is freed
# (torch.empty touches no page, so the block costs address space only; whether
# the block ends at the heap's top depends on the small allocations around it,
# hence the heap's free total rather than its top), and the bytes in use that
# the 100 MiB tensor added, and whether the exact-fit allocator is PyTorch's CPU allocator.
PROBE = textwrap.dedent("""
    import torch
    from torch import nn
    from imaml_ext import cpu_malloc
    from imaml_ext.functional import TaskLoss
    if cpu_malloc.heap_stats() is None:
        print("not-glibc"); raise SystemExit
    TaskLoss(nn.Linear(2, 2), torch.nn.functional.mse_loss)
    before = cpu_malloc.heap_stats()
    t = torch.ones(100 * 2 ** 20 // 4)
    after = cpu_malloc.heap_stats()
    big = torch.empty(512 * 2 ** 20, dtype=torch.uint8)
    del big
    print(cpu_malloc.reuse_freed_memory(), after["hblkhd"] - before["hblkhd"],
          cpu_malloc.heap_stats()["fordblks"], after["in_use"] - before["in_use"],
          cpu_malloc.exact_fit_allocator())
""")

# In a fresh heap: a 64 MiB block with a 1 MiB block after it (so that freeing the
# first leaves a hole inside the heap, not at its top), then the first freed and
# allocated again, 5 times; prints how many times the new block took the hole.
HOLE = textwrap.dedent("""
    import torch
    from imaml_ext import cpu_malloc
    assert cpu_malloc.reuse_freed_memory()
    same = 0
    for _ in range(5):
        a = torch.empty(64 * 2 ** 20, dtype=torch.uint8)
        b = torch.empty(2 ** 20, dtype=torch.uint8)
        where = a.data_ptr()
        del a
        a = torch.empty(64 * 2 ** 20, dtype=torch.uint8)
        same += a.data_ptr() == where
        del a, b
    print(cpu_malloc.exact_fit_allocator(), same)
""")


def probe(code=PROBE, **env):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), **env), timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_cpu_task_loss_makes_large_tensors_come_from_the_heap():
    result = probe(IMAML_EXT_SYSTEM_MALLOC="")
    if result == ["not-glibc"]:
        pytest.skip("the C library is not glibc: cpu_malloc does nothing there")
    applied, mmapped, kept, in_use, allocator = result
    assert applied == "True" and int(mmapped) < 2 ** 20
    assert int(kept) >= 512 * 2 ** 20  # kept for reuse, not given back
    assert 100 * 2 ** 20 <= int(in_use) < 101 * 2 ** 20  # the tensor, wherever it came from
    assert allocator == str(im.backend().cpu)  # the compiled library holds the allocator


def test_the_environment_variable_keeps_glibc_defaults():
    result = probe(IMAML_EXT_SYSTEM_MALLOC="1")
    if result == ["not-glibc"]:
        pytest.skip("the C library is not glibc: cpu_malloc does nothing there")
    applied, mmapped, kept, in_use, allocator = result
    assert applied == "False" and int(mmapped) >= 100 * 2 ** 20 and int(kept) < 256 * 2 ** 20
    assert 100 * 2 ** 20 <= int(in_use) < 101 * 2 ** 20
    assert allocator == "False"


@needs_compiled_cpu
def test_a_freed_block_is_a_hole_that_the_next_block_of_its_size_takes():
    """PyTorch's allocator (posix_memalign) leaves a hole a little too small for the
    next request of the same size under glibc 2.36, so that request grows the heap;
    the exact-fit allocator's block takes the hole every time."""
    result = probe(HOLE, IMAML_EXT_SYSTEM_MALLOC="")
    if result == ["not-glibc"]:
        pytest.skip("the C library is not glibc: cpu_malloc does nothing there")
    assert result == ["True", "5"]


@needs_compiled_cpu
def test_exact_fit_blocks_are_aligned_freed_by_their_own_allocator_and_seen_by_the_profiler():
    from torch.profiler import ProfilerActivity, profile
    from imaml_ext import cpu_malloc
    was = cpu_malloc.exact_fit_allocator()
    try:
        assert cpu_malloc.exact_fit_allocator(True)
        kept = [torch.full((n,), float(n), dtype=torch.float64) for n in (1, 3, 1000, 3 * 2 ** 17 + 1)]
        assert all(t.data_ptr() % 64 == 0 for t in kept)
        empty = torch.empty(0)
        assert not cpu_malloc.exact_fit_allocator(False)  # blocks made by it are freed by it
        kept.append(torch.full((5,), 5.0, dtype=torch.float64))  # one of PyTorch's
        assert all(bool((t == t.numel()).all()) for t in kept)
        del kept, empty
        assert cpu_malloc.exact_fit_allocator(True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            torch.ones(1000, 1000)
        ones = [e for e in prof.key_averages() if e.key == "aten::ones"]
        assert ones and ones[0].cpu_memory_usage == 4 * 1000 * 1000
    finally:
        cpu_malloc.exact_fit_allocator(was)


# A 256 MiB tensor, written (so its pages are resident), then freed; prints the
# resident set in KiB with the tensor, after freeing it, and after
# release_freed_memory(), and what that returned.
RELEASE = textwrap.dedent("""
    import torch
    from imaml_ext import cpu_malloc
    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert cpu_malloc.reuse_freed_memory()
    t = torch.ones(256 * 2 ** 20 // 4)
    held = rss()
    del t
    freed = rss()
    released = cpu_malloc.release_freed_memory()
    print(held, freed, rss(), released)
""")


def test_freed_memory_stays_resident_until_released():
    if im.cpu_malloc.heap_stats() is None:
        pytest.skip("the C library is not glibc: cpu_malloc does nothing there")
    held, freed, after, released = probe(RELEASE, IMAML_EXT_SYSTEM_MALLOC="")
    mib = 1024  # KiB
    assert int(freed) > int(held) - 16 * mib  # kept for reuse: still resident
    assert int(freed) - int(after) > 240 * mib and released == "True"
