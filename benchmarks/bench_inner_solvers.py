"""Inner-problem residual against cost: iMAML-GD, Nesterov-accelerated GD and Hessian-free Newton.

On the Omniglot conv net and real 5-way 1-shot Omniglot training tasks
(``--tasks`` per meta-batch), each inner solver runs from θ with several step
budgets; after each run one extra gradient (taken here, not by the library)
gives the stationarity residual ‖∇L̂(φ) + λ(φ − θ)‖/‖∇L̂(θ)‖ at the returned
φ.  Cost is counted in passes: a gradient is one forward–backward pass; a
Hessian-vector product (reverse-over-reverse) is counted as two; a
line-search trial as one forward (counted as 1/2).  Wall time is the median
of ``--repeats`` runs, solvers interleaved in one process.

    python benchmarks/bench_inner_solvers.py [--tasks 8] [--threads 1] [--data-root DIR]
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
from imaml_ext.inner import nesterov_momentum, solve_gd, solve_hf, solve_nesterov
from imaml_ext.models import OmniglotConvNet
from imaml_ext.training.experiment import make_config, make_sampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_imaml import machine  # noqa: E402


def residual(tl, phi, theta, x, y, lam):
    g, _ = tl.grad(phi, x, y)
    g0, _ = tl.grad(theta.expand_as(phi).contiguous(), x, y)
    return ((g + lam * (phi - theta)).norm(dim=1) / g0.norm(dim=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=0.1, help="GD / Nesterov step")
    ap.add_argument("--gd-steps", default="4,8,16,32,64")
    ap.add_argument("--newton-steps", default="1,2,4,8")
    ap.add_argument("--newton-cg", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = OmniglotConvNet(hidden=args.hidden)
    cfg = make_config("omniglot", method="imaml-gd")
    sx, sy, _, _ = make_sampler(cfg, "train", args.seed, root=args.data_root).sample(args.tasks)
    tl = TaskLoss(model, F.cross_entropy)
    theta = tl.theta().detach()
    lam, lr = args.lam, args.lr
    runs = []
    for k in map(int, args.gd_steps.split(",")):
        runs.append(("gd", k, k, lambda k=k: solve_gd(tl, theta, sx, sy, lam=lam, steps=k, lr=lr)))
        runs.append(("nesterov", k, k, lambda k=k: solve_nesterov(tl, theta, sx, sy, lam=lam, steps=k, lr=lr)))
    for k in map(int, args.newton_steps.split(",")):
        # per Newton step: 1 gradient, newton_cg HVPs (2 passes each), ≥ 1 line-search forward (1/2)
        passes = k * (1 + 2 * args.newton_cg + 0.5)
        runs.append(("hf", k, passes, lambda k=k: solve_hf(tl, theta, sx, sy, lam=lam, steps=k,
                                                              cg_steps=args.newton_cg)))
    times = {i: [] for i in range(len(runs))}
    results = {}
    for _ in range(args.repeats):
        for i, (_, _, _, run) in enumerate(runs):
            t0 = time.perf_counter()
            results[i] = run()
            times[i].append(time.perf_counter() - t0)
    print(f"# {machine('cpu')}; OmniglotConvNet(hidden={args.hidden}), {args.tasks} tasks 5-way 1-shot, "
          f"λ {lam}, lr {lr} (Nesterov β = {nesterov_momentum(lam, lr):.3f}), HF {args.newton_cg} CG steps")
    print("solver     steps  passes  seconds  residual median  residual max")
    for i, (name, k, passes, _) in enumerate(runs):
        r = residual(tl, results[i], theta, sx, sy, lam)
        print(f"{name:<10} {k:>5}  {passes:>6.1f}  {statistics.median(times[i]):>7.3f}  "
              f"{float(r.median()):>15.4f}  {float(r.max()):>12.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
