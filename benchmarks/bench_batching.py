"""Seconds per meta-gradient: imaml_ext's task batching vs a per-task loop, interleaved.

For each network and method, in ONE process, the variants run in turn
(``--repeats`` rounds after a warm-up of each), and the median of each is
reported with its ratio to the per-task loop:

* ``loop-baseline``: the tasks one at a time in plain PyTorch (``torch.func.functional_call``
  and ``torch.autograd``): full MAML differentiates through the K steps
  (``create_graph=True``), first-order MAML takes the query gradient at φ_K,
  iMAML runs GD on the regularised support loss, then CG on (I + H/λ) with
  Hessian-vector products through one retained gradient graph per task.
* ``imaml_ext-vmap``: ``batching="vmap"`` (batch-norm and max-pooling folded, the default);
* ``imaml_ext-vmap-generic``: the same with the folding switched off (vmap's own rules);
* ``imaml_ext-loop``: ``batching="loop"``.

Networks: ``conv4-28`` (max-pool Conv-4, 1×28×28), ``conv4-84`` (3×84×84),
``stride2-28`` (the stride-2 Omniglot net).  5-way 1-shot, 15 queries per class.

    python benchmarks/bench_batching.py --models conv4-28,stride2-28 --tasks 32
    python benchmarks/bench_batching.py --models conv4-84 --tasks 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import imaml_ext as im  # noqa: E402
from imaml_ext import batching  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_imaml import standard_models  # noqa: E402

METHODS = ("full", "first_order", "imaml")
VARIANTS = ("loop-baseline", "imaml_ext-vmap", "imaml_ext-vmap-generic", "imaml_ext-loop")


def loop_baseline(model, xs, ys, xq, yq, method, a):
    """The meta-gradient ``[P]`` of the mean query loss, one task at a time."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p for _, p in model.named_parameters()]
    T = xs.shape[0]

    def loss(w, x, y):
        return F.cross_entropy(functional_call(model, dict(zip(names, w)), (x,)), y)

    total = [torch.zeros_like(p) for p in theta]
    for t in range(T):
        if method == "imaml":
            w = [p.detach() for p in theta]
            for _ in range(a.inner_steps):
                w = [p.requires_grad_(True) for p in w]
                g = torch.autograd.grad(loss(w, xs[t], ys[t]), w)
                w = [(p - a.imaml_lr * (gi + a.lam * (p - th))).detach() for p, gi, th in zip(w, g, theta)]
            w = [p.requires_grad_(True) for p in w]
            b = torch.autograd.grad(loss(w, xq[t], yq[t]) / T, w)
            gs = torch.autograd.grad(loss(w, xs[t], ys[t]), w, create_graph=True)

            def A(v):
                hv = torch.autograd.grad(gs, w, v, retain_graph=True)
                return [vi + hi / a.lam for vi, hi in zip(v, hv)]

            def dot(u, v):
                return sum((ui * vi).sum() for ui, vi in zip(u, v))

            x = [torch.zeros_like(bi) for bi in b]
            r = [bi.clone() for bi in b]
            d = [ri.clone() for ri in r]
            rs = float(dot(r, r))
            for _ in range(a.cg_steps):
                Ad = A(d)
                curv = float(dot(d, Ad))
                if curv <= 0:
                    break
                alpha = rs / curv
                x = [xi + alpha * di for xi, di in zip(x, d)]
                r = [ri - alpha * adi for ri, adi in zip(r, Ad)]
                rs_new = float(dot(r, r))
                d = [ri + (rs_new / rs) * di for ri, di in zip(r, d)]
                rs = rs_new
            grads = x
        else:
            w = theta if method == "full" else [p.detach().requires_grad_(True) for p in theta]
            for _ in range(a.inner_steps):
                g = torch.autograd.grad(loss(w, xs[t], ys[t]), w, create_graph=method == "full")
                w = [p - a.maml_lr * gi for p, gi in zip(w, g)]
                if method != "full":
                    w = [p.detach().requires_grad_(True) for p in w]
            grads = torch.autograd.grad(loss(w, xq[t], yq[t]) / T, theta if method == "full" else w)
        total = [s + gi for s, gi in zip(total, grads)]
    return torch.cat([g.reshape(-1) for g in total])


def ours(model, xs, ys, xq, yq, method, a, mode):
    model.zero_grad(set_to_none=True)
    if method == "imaml":
        adapted = im.imaml(model, xs, ys, lam=a.lam, inner_steps=a.inner_steps, inner_lr=a.imaml_lr,
                           cg_steps=a.cg_steps, batching=mode)
    else:
        adapted = im.maml(model, xs, ys, inner_steps=a.inner_steps, inner_lr=a.maml_lr, mode=method,
                          batching=mode)
    F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten()).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def runner(variant, model, data, method, a):
    folded = dict(batching._FOLDED)

    def run():
        batching._FOLDED.clear()
        if variant != "imaml_ext-vmap-generic":
            batching._FOLDED.update(folded)
        try:
            if variant == "loop-baseline":
                return loop_baseline(model, *data, method, a)
            return ours(model, *data, method, a, "loop" if variant == "imaml_ext-loop" else "vmap")
        finally:
            batching._FOLDED.clear()
            batching._FOLDED.update(folded)

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="conv4-28,stride2-28")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--inner-steps", type=int, default=None, help="default: 5 (MAML), 16 (iMAML)")
    ap.add_argument("--maml-lr", type=float, default=0.4)
    ap.add_argument("--imaml-lr", type=float, default=0.1)
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--cg-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU time (time.process_time), steadier than wall time "
                         "on a machine loaded by other processes; meaningful with --threads 1")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; "
          f"T={args.tasks}, {args.ways}-way 1-shot, {args.queries} queries/class; {args.clock} seconds, "
          f"median of {args.repeats}")
    print("| network | method | " + " | ".join(f"{v} s" for v in variants) +
          " | loop-baseline / imaml_ext-vmap | rel. diff vmap vs baseline |")
    print("|---|---|" + "---:|" * (len(variants) + 2))
    for name in args.models.split(","):
        build, shape = standard_models()[name]
        torch.manual_seed(0)
        model = build(args.ways)
        n, m = args.ways, args.ways * args.queries
        data = (torch.rand(args.tasks, n, *shape), torch.arange(args.ways).repeat(args.tasks, 1),
                torch.rand(args.tasks, m, *shape),
                torch.arange(args.ways).repeat_interleave(args.queries).repeat(args.tasks, 1))
        for method in args.methods.split(","):
            a = argparse.Namespace(**vars(args))
            a.inner_steps = args.inner_steps or (16 if method == "imaml" else 5)
            runs = {v: runner(v, model, data, method, a) for v in variants}
            first = {v: run() for v, run in runs.items()}  # warm-up, and the gradients to compare
            times = {v: [] for v in variants}
            for _ in range(args.repeats):
                for v, run in runs.items():
                    start = clock()
                    run()
                    times[v].append(clock() - start)
            med = {v: statistics.median(t) for v, t in times.items()}
            ratio = (f"{med['loop-baseline'] / med['imaml_ext-vmap']:.2f}x"
                     if {"loop-baseline", "imaml_ext-vmap"} <= set(med) else "-")
            diff = (f"{float((first['imaml_ext-vmap'] - first['loop-baseline']).norm() / first['loop-baseline'].norm()):.1e}"
                    if {"loop-baseline", "imaml_ext-vmap"} <= set(med) else "-")
            print(f"| {name} | {method} | " + " | ".join(f"{med[v]:.3f}" for v in variants) +
                  f" | {ratio} | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
