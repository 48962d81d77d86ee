"""Is iMAML's backward solve a solve?  Hessian vs Gauss–Newton curvature on a batch-norm conv net.

On the Omniglot conv net (batch statistics, ``--hidden`` filters) and real
5-way 1-shot Omniglot training tasks, runs iMAML-GD's inner loop
(``--inner-steps`` steps of lr ``--inner-lr``, λ = ``--lam``), then the
backward CG with 5, 10 and 20 steps for ``curvature="hessian"`` and
``"gauss_newton"``, and reports per curvature: the inner residual, how many
tasks' CG stopped on pᵀAp ≤ 0, the smallest Rayleigh quotient seen, and
the relative change of the meta-gradient ‖g_k − g_20‖/‖g_20‖.

    python benchmarks/bench_curvature.py [--hidden 16] [--tasks 4] [--seeds 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

import imaml_ext as im
from imaml_ext.models import OmniglotConvNet
from imaml_ext.training.experiment import make_config, make_sampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_imaml import machine  # noqa: E402

CG_STEPS = (5, 10, 20)


def meta_gradient(model, batch, args, curvature, cg_steps):
    sx, sy, qx, qy = batch
    model.zero_grad(set_to_none=True)
    adapted = im.imaml(model, sx, sy, F.cross_entropy, lam=args.lam, inner_steps=args.inner_steps,
                       inner_lr=args.inner_lr, cg_steps=cg_steps, curvature=curvature)
    F.cross_entropy(adapted(qx).flatten(0, 1), qy.flatten()).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return grad, adapted.info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3, help="independent (init, meta-batch) draws")
    ap.add_argument("--inner-steps", type=int, default=16)
    ap.add_argument("--inner-lr", type=float, default=0.1)
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", im.ImplicitGradientWarning)
    cfg = make_config("omniglot", method="imaml-gd")
    print(f"# {machine('cpu')}; OmniglotConvNet(hidden={args.hidden}), batch-statistics BN; "
          f"{args.tasks} tasks 5-way 1-shot; {args.inner_steps} inner GD steps lr {args.inner_lr}, λ {args.lam}")
    print("seed  curvature     residual(median)  nonpos@5/10/20  min pᵀAp/pᵀp@20  change 5→20  change 10→20")
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = OmniglotConvNet(hidden=args.hidden)
        batch = make_sampler(cfg, "train", seed, root=args.data_root).sample(args.tasks)
        for curvature in ("hessian", "gauss_newton"):
            grads, infos = {}, {}
            for k in CG_STEPS:
                grads[k], infos[k] = meta_gradient(model, batch, args, curvature, k)
            ref = grads[CG_STEPS[-1]]
            change = {k: float((grads[k] - ref).norm() / ref.norm()) for k in CG_STEPS}
            nonpos = "/".join(str(int(infos[k]["nonpositive_curvature"].sum())) for k in CG_STEPS)
            print(f"{seed:<5} {curvature:<13} {float(infos[20]['residual'].median()):>16.3f}  {nonpos:>14}  "
                  f"{float(infos[20]['min_rayleigh'].min()):>16.4f}  {change[5]:>11.2%}  {change[10]:>12.3%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
