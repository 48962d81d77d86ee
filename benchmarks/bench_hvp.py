"""Batched Hessian-vector products: reverse-over-reverse vs forward-over-reverse.

On the Omniglot conv net (5-way 1-shot support sets, T tasks), times what the
iMAML backward needs: building the product at φ and applying it ``--products``
times (one per CG step).  Median of ``--repeats`` runs after a warm-up, both
modes in the same process.  The faster mode per device is the default of
``imaml_ext.hvp.default_mode``.

    python benchmarks/bench_hvp.py [--device cuda] [--tasks 32] [--products 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from imaml_ext.functional import TaskLoss
from imaml_ext.hvp import HVP_MODES, make_hvp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_imaml import add_problem_args, machine, make_problem  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_problem_args(ap)  # the support sets of bench_imaml.py's problem
    ap.add_argument("--products", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    model, x, y, _, _ = make_problem(args)
    tl = TaskLoss(model, F.cross_entropy)
    noise = torch.randn(args.tasks, tl.layout.numel, device=dev, dtype=tl.dtype)
    phi = tl.theta().detach().expand(args.tasks, -1) + 0.01 * noise
    v = torch.randn_like(phi)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run(mode):
        matvec = make_hvp(tl.per_task, phi, x, y, mode)
        out = v
        for _ in range(args.products):
            out = matvec(v)
        return out

    ref = {m: run(m) for m in HVP_MODES}  # warm-up, and both must agree
    rel = float((ref["reverse"] - ref["forward"]).norm() / ref["forward"].norm())
    medians = {}
    for mode in HVP_MODES:
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            run(mode)
            sync()
            times.append(time.perf_counter() - t0)
        medians[mode] = statistics.median(times)
    print(f"machine: {machine(args.device)}; T={args.tasks}, {args.ways}-way {args.shots}-shot, {args.products} products; "
          f"median of {args.repeats}; modes agree to {rel:.1e}")
    print("| mode | median s | relative |")
    print("|---|---|---|")
    best = min(medians.values())
    for mode, t in medians.items():
        print(f"| {mode} | {t:.3f} | {t / best:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
