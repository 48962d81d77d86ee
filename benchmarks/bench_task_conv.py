"""Per-task convolutions under vmap: one grouped convolution (vmap's rule) vs T
ordinary ones (:class:`imaml_ext.batching._TaskConv2d`), layer by layer.

For each layer shape of the stride-2 Omniglot net and of the max-pool Conv-4,
the two forms run in turn in one process (``--rounds`` rounds after a warm-up)
on T tasks with per-task weights, each timed for

* ``backward``: output and the gradients of ⟨output, v⟩ for input and weight;
* ``double``: those gradients with ``create_graph=True``, then the gradient of
  their squared norm (the second-order pass of MAML and of iMAML's HVPs).

Printed: the median seconds of each form and grouped / looped.

    python benchmarks/bench_task_conv.py --threads 1 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imaml_ext import batching  # noqa: E402

# (name, input channels, side, stride): the layers of OmniglotConvNet and Conv4 (28 and 84).
LAYERS = (("stride2 layer 1", 1, 28, 2), ("stride2 layer 2", 64, 14, 2), ("stride2 layer 4", 64, 4, 2),
          ("conv4 layer 1", 1, 28, 1), ("conv4 layer 2", 64, 14, 1), ("conv4 layer 4", 64, 3, 1),
          ("conv4-84 layer 1", 3, 84, 1), ("conv4-84 layer 2", 64, 42, 1))
FEWER_TASKS = 8  # the 84×84 layers run T / 8 tasks
MODES = ("backward", "double")


def run(form: str, mode: str, x: torch.Tensor, w: torch.Tensor, stride: int) -> float:
    table = dict(batching._FOLDED)
    if form == "grouped":
        batching._FOLDED.pop(F.conv2d)
    try:
        start = time.perf_counter()
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with batching._BatchedLayers():
            out = torch.func.vmap(lambda a, b: F.conv2d(a, b, stride=stride, padding=1))(xx, ww)
        v = torch.ones_like(out)
        if mode == "backward":
            torch.autograd.grad(out, (xx, ww), v)
        else:
            gx, gw = torch.autograd.grad(out, (xx, ww), v, create_graph=True)
            torch.autograd.grad((gx * gx).sum() + (gw * gw).sum(), (xx, ww))
        return time.perf_counter() - start
    finally:
        batching._FOLDED.clear()
        batching._FOLDED.update(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=32, help="T (the 84×84 layers use T/8)")
    ap.add_argument("--examples", type=int, default=80,
                    help="images per task (80: 5-way 1-shot support + 75 queries; 5: the support set alone)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"T = {args.tasks}, n = {args.examples}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| layer | T | pass | grouped s | looped s | grouped / looped |\n|---|---:|---|---:|---:|---:|")
    for name, channels, side, stride in LAYERS:
        T = max(1, args.tasks // FEWER_TASKS) if name.startswith("conv4-84") else args.tasks
        x = torch.randn(T, args.examples, channels, side, side)
        w = torch.randn(T, 64, channels, 3, 3) * 0.05
        for mode in MODES:
            times = {"grouped": [], "looped": []}
            for r in range(args.rounds + 1):
                for form in times:
                    seconds = run(form, mode, x, w, stride)
                    if r:
                        times[form].append(seconds)
            g, lp = (statistics.median(times[f]) for f in ("grouped", "looped"))
            print(f"| {name} | {T} | {mode} | {g:.3f} | {lp:.3f} | {g / lp:.2f} |", flush=True)


if __name__ == "__main__":
    main()
