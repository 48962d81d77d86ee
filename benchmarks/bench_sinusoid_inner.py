"""How well the demo's iMAML inner problem is solved: residual of each inner solver on the sinusoid MLP.

The demo's network (1-40-40-1, ReLU) at its initialisation (seed 0), 25
sinusoid training tasks of 10 points, MSE: each inner solver runs from θ
and the stationarity residual ‖∇L̂(φ) + λ(φ − θ)‖/‖∇L̂(θ)‖ at the returned φ
is taken with one extra gradient; also the mean query MSE of φ.  With
``--activation tanh`` the same network with tanh (a smooth loss), to tell
non-smoothness from slow convergence.

    python benchmarks/bench_sinusoid_inner.py [--lam 1] [--activation relu|tanh]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from imaml_ext.functional import TaskLoss
from imaml_ext.inner import solve_gd, solve_hf, solve_nesterov
from imaml_ext.training.experiment import build_model, make_config, make_sampler

SOLVERS = (
    ("gd lr 0.01 K 10", solve_gd, dict(steps=10, lr=0.01)),
    ("gd lr 0.01 K 100", solve_gd, dict(steps=100, lr=0.01)),
    ("gd lr 0.003 K 1000", solve_gd, dict(steps=1000, lr=0.003)),
    ("nesterov lr 0.01 K 20", solve_nesterov, dict(steps=20, lr=0.01)),
    ("nesterov lr 0.01 K 50", solve_nesterov, dict(steps=50, lr=0.01)),
    ("nesterov lr 0.005 K 100", solve_nesterov, dict(steps=100, lr=0.005)),
    ("hf K 3, 5 CG", solve_hf, dict(steps=3, cg_steps=5)),
    ("hf K 10, 20 CG", solve_hf, dict(steps=10, cg_steps=20)),
    ("hf gauss-newton K 3, 5 CG", solve_hf, dict(steps=3, cg_steps=5, curvature="gauss_newton")),
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--activation", choices=("relu", "tanh"), default="relu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = make_config("sinusoid", method="imaml-gd")
    sx, sy, qx, qy = make_sampler(cfg, "train", 0).sample(25)
    torch.manual_seed(0)
    model = build_model(cfg)
    if args.activation == "tanh":
        model.net[1], model.net[3] = nn.Tanh(), nn.Tanh()
    tl = TaskLoss(model, F.mse_loss)
    theta = tl.theta().detach()
    g0, _ = tl.grad(theta.expand(25, -1).contiguous(), sx, sy)
    print(f"# SinusoidMLP ({args.activation}) at its initialisation, 25 tasks, λ = {args.lam}")
    print("solver                        residual median  residual max  query MSE  seconds")
    for name, solver, kw in SOLVERS:
        t0 = time.perf_counter()
        phi = solver(tl, theta, sx, sy, lam=args.lam, **kw)
        seconds = time.perf_counter() - t0
        g, _ = tl.grad(phi, sx, sy)
        r = (g + args.lam * (phi - theta)).norm(dim=1) / g0.norm(dim=1)
        query = float(tl.losses(phi, qx, qy).mean())
        print(f"{name:<29} {float(r.median()):>15.4f}  {float(r.max()):>12.4f}  {query:>9.3f}  {seconds:>7.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
