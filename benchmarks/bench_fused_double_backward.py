"""The fused batch-norm → ReLU → max-pool layer in the passes that are
differentiated twice (full MAML's inner loop, the checkpointed adjoint's
recomputed steps, iMAML's reverse Hessian-vector products), against PyTorch's
three layers there.

1. The layer alone: forward, a ``create_graph=True`` backward and the backward
   of that gradient (a Hessian-vector product's pattern) on the activations of
   the max-pool Conv-4 at T = 32 tasks folded into one call
   (``[n, 32·64, H, W]``, n = 5 support images per task, H = 28, 14, 7, 3;
   k = 2) and, without pooling (k = 1, which ``fused_layers.fuse`` does not
   use), on those of the stride-2 net (H = 14, 7, 4, 2): the fused operators
   (compiled CPU kernels, the second derivative ``bn_relu_pool_double_backward``)
   and the three (two) layers alternated, medians.
2. imaml_ext's whole meta-gradients (``compare_peers.py``'s problems) with the
   fused layer in those passes and with those passes run as the three layers
   (``fused_layers.unfused`` around them), switched before every meta-batch and
   alternated round by round in one process (``compare_peers.alternate``); the
   rest runs fused both ways.  First-order MAML takes no second derivative, so
   it is the control.

    python benchmarks/bench_fused_double_backward.py --threads 2 --rounds 5 --models conv4
"""
from __future__ import annotations

import functools
import importlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_peers as cp  # noqa: E402
from bench_fused_layers import SIDES  # noqa: E402


def layer_seconds(n: int, side: int, k: int, tasks: int, rounds: int):
    """Median seconds of forward + create_graph backward + backward of the gradient,
    (fused, three layers), alternated."""
    import torch
    from imaml_ext import fused_layers as fl
    channels = tasks * 64
    x = torch.randn(n, channels, side, side, requires_grad=True)
    weight = torch.randn(channels, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)

    def run(fused: bool) -> float:
        start = time.perf_counter()
        with fl.unfused() if not fused else torch.enable_grad():
            out = fl.bn_relu_pool(x, weight, bias, 1e-5, k)
            first = torch.autograd.grad(out, (x, weight, bias), torch.ones_like(out), create_graph=True)
        torch.autograd.grad(first[:2], (x, weight), first[:2])
        return time.perf_counter() - start

    seconds = {True: [], False: []}
    for r in range(rounds + 1):
        for fused in ((True, False) if r % 2 == 0 else (False, True)):
            elapsed = run(fused)
            if r:
                seconds[fused].append(elapsed)
    return statistics.median(seconds[True]), statistics.median(seconds[False])


def main(argv=None) -> int:
    ap = cp.ab_parser(__doc__, ["conv4"], rounds=5)
    ap.add_argument("--no-layers", action="store_true", help="skip part 1 (the layer alone)")
    args = ap.parse_args(argv)
    import torch
    from imaml_ext import _build, cpu_malloc, unrolled
    from imaml_ext import fused_layers as fl
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_malloc.reuse_freed_memory()
    if not _build.backend().cpu:
        print(f"no compiled CPU kernels, so nothing is fused here ({_build.describe()})", file=sys.stderr)
        return 1
    problem = cp.parse(["--models", *args.models, "--tasks", str(args.tasks)])
    print(f"{cp.machine(problem)}; T = {args.tasks}; medians of {args.rounds} rounds after a warm-up")
    if not args.no_layers:
        print("\n| k | input [n, T·64, H, W] | fused s | PyTorch's layers s | layers / fused |\n"
              "|---:|---|---:|---:|---:|")
        for k, sides in SIDES.items():
            for side in sides:
                fused_s, plain_s = layer_seconds(5, side, k, args.tasks, args.rounds)
                print(f"| {k} | [5, {args.tasks * 64}, {side}, {side}] | {fused_s:.4f} | {plain_s:.4f} | "
                      f"{plain_s / fused_s:.2f} |", flush=True)

    # the functions whose forward passes are differentiated twice
    hvp = importlib.import_module("imaml_ext.hvp")  # the package exports a function of that name
    twice = [(unrolled, "_full_maml"), (unrolled, "_adjoint_vjp"), (hvp, "_reverse_graph")]
    own = {name: getattr(module, name) for module, name in twice}

    def in_layers(fn):
        @functools.wraps(fn)
        def wrapped(*a, **kw):
            with fl.unfused():
                return fn(*a, **kw)
        return wrapped

    def switch(on: bool) -> None:
        for module, name in twice:
            setattr(module, name, own[name] if on else in_layers(own[name]))

    print()
    try:
        cp.ab_table(switch, problem, args, "fused twice-differentiated passes", "PyTorch's layers there")
    finally:
        switch(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
