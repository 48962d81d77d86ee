"""imaml_ext.cpu_malloc: large CPU tensors come from malloc's heap, not from fresh mmaps."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocates a 100 MiB tensor after building a CPU TaskLoss and prints whether the
# C library is glibc, what reuse_freed_memory() returned, the bytes that glibc
# serves from mmap (mallinfo2's hblkhd) before and after the allocation, and the
# free bytes malloc keeps in its heap (fordblks) after a 512 MiB block is freed
# (torch.empty touches no page, so the block costs address space only; whether
# the block ends at the heap's top depends on the small allocations around it,
# hence the heap's free total rather than its top), and the bytes in use that
# the 100 MiB tensor added.
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
          cpu_malloc.heap_stats()["fordblks"], after["in_use"] - before["in_use"])
""")


def probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), **env), timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_cpu_task_loss_makes_large_tensors_come_from_the_heap():
    result = probe(IMAML_EXT_SYSTEM_MALLOC="")
    if result == ["not-glibc"]:
        pytest.skip("the C library is not glibc: cpu_malloc does nothing there")
    applied, mmapped, kept, in_use = result
    assert applied == "True" and int(mmapped) < 2 ** 20
    assert int(kept) >= 512 * 2 ** 20  # kept for reuse, not given back
    assert 100 * 2 ** 20 <= int(in_use) < 101 * 2 ** 20  # the tensor, wherever it came from


def test_the_environment_variable_keeps_glibc_defaults():
    result = probe(IMAML_EXT_SYSTEM_MALLOC="1")
    if result == ["not-glibc"]:
        pytest.skip("the C library is not glibc: cpu_malloc does nothing there")
    applied, mmapped, kept, in_use = result
    assert applied == "False" and int(mmapped) >= 100 * 2 ** 20 and int(kept) < 256 * 2 ** 20
    assert 100 * 2 ** 20 <= int(in_use) < 101 * 2 ** 20
