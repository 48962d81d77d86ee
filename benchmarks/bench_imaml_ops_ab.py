"""End-to-end effect of the compiled ops on one iMAML meta-batch, A/B in one process.

The same problem as ``bench_imaml.py`` (Omniglot conv net, 5-way 1-shot,
T = 32, 16 inner GD steps, 5 CG steps).  Each repetition times one
meta-batch with the compiled ops and one with the PyTorch reference ops
(``imaml_ext.ops.reference``, registered over the compiled kernels inside
``imaml_ext.ops.use_reference()``), in alternating order, so that drift in the machine's speed hits
both alike.  Reports the median of each and the median of the per-pair
ratios (reference / compiled: > 1 means the compiled ops are faster).

    python benchmarks/bench_imaml_ops_ab.py [--device cuda] [--pairs 15]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import imaml_ext as im  # noqa: E402
from imaml_ext import ops  # noqa: E402
from bench_imaml import add_problem_args, machine, make_problem  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_problem_args(ap)
    ap.add_argument("--pairs", type=int, default=15)
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    b = im.backend()
    if not (b.cuda if dev.type == "cuda" else b.cpu):
        print(f"no compiled ops for {dev} ({im.backend()}): nothing to compare", file=sys.stderr)
        return 1
    model, xs, ys, xq, yq = make_problem(args)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def meta_batch(use_compiled: bool) -> float:
        with contextlib.nullcontext() if use_compiled else ops.use_reference():
            model.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            adapted = im.imaml(model, xs, ys, F.cross_entropy, lam=args.lam, inner_steps=args.inner_steps,
                               inner_lr=args.inner_lr, cg_steps=args.cg_steps, hvp_mode=args.hvp_mode)
            F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten()).backward()
            sync()
            return time.perf_counter() - start

    meta_batch(True), meta_batch(False)  # warm-up
    times = {True: [], False: []}
    ratios = []
    for i in range(args.pairs):
        order = (True, False) if i % 2 == 0 else (False, True)
        pair = {use: meta_batch(use) for use in order}
        for use, t in pair.items():
            times[use].append(t)
        ratios.append(pair[False] / pair[True])
    print(f"machine: {machine(args.device)}; T={args.tasks}, {args.ways}-way {args.shots}-shot, "
          f"{args.inner_steps} inner steps, {args.cg_steps} CG steps, {args.dtype}; {args.pairs} pairs")
    print("| ops | median s / meta-batch |")
    print("|---|---:|")
    print(f"| compiled | {statistics.median(times[True]):.3f} |")
    print(f"| PyTorch reference | {statistics.median(times[False]):.3f} |")
    q = statistics.quantiles(ratios, n=4)
    print(f"per-pair ratio reference / compiled: median {statistics.median(ratios):.3f} "
          f"(quartiles {q[0]:.3f} to {q[2]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
