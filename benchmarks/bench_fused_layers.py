"""The fused batch-norm → ReLU → max-pool layer (``imaml_ext.fused_layers``) against
PyTorch's three layers.

1. The layer alone, forward and backward, on the activations of the max-pool
   Conv-4 at T = 32 tasks folded into one call (``[n, 32·64, H, W]``, n = 5
   support or 75 query images per task, H = 28, 14, 7, 3; k = 2) and, without
   pooling (k = 1), on those of the stride-2 net (H = 14, 7, 4, 2; planes below
   ``fused_layers.MIN_UNPOOLED_PLANE`` run PyTorch's layers both ways): the
   fused operator (compiled CPU kernel) and the three (two) layers alternated,
   medians.
2. imaml_ext's whole meta-gradients (``compare_peers.py``'s problems) with
   fusion on and off (``IMAML_EXT_NO_FUSION``) before every meta-batch,
   alternated round by round in one process (``compare_peers.alternate``).

    python benchmarks/bench_fused_layers.py --threads 2 --rounds 5 --models conv4 omniglot
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_peers as cp  # noqa: E402

# pooling window k -> the sides H = W of the activations: Conv-4's, the stride-2 net's
SIDES = {2: (28, 14, 7, 3), 1: (14, 7, 4, 2)}


def layer_seconds(n: int, side: int, k: int, tasks: int, rounds: int, second: bool = False):
    """Median seconds of forward + backward (``second``: forward, a ``create_graph=True``
    backward and the backward of that gradient), (fused, three layers), alternated."""
    import torch
    from imaml_ext import fused_layers as fl
    channels = tasks * 64
    x = torch.randn(n, channels, side, side, requires_grad=True)
    weight = torch.randn(channels, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)

    def run(fused: bool) -> float:
        start = time.perf_counter()
        with torch.enable_grad() if fused else fl.unfused():
            out = fl.bn_relu_pool(x, weight, bias, 1e-5, k)
            found = torch.autograd.grad(out, (x, weight, bias), torch.ones_like(out), create_graph=second)
        if second:
            torch.autograd.grad(found[:2], (x, weight), found[:2])
        return time.perf_counter() - start

    seconds = {True: [], False: []}
    for r in range(rounds + 1):
        for fused in ((True, False) if r % 2 == 0 else (False, True)):
            elapsed = run(fused)
            if r:
                seconds[fused].append(elapsed)
    return statistics.median(seconds[True]), statistics.median(seconds[False])


def layer_table(args, examples=(5, 75), second: bool = False) -> None:
    """Prints :func:`layer_seconds` for every k and side of :data:`SIDES`, n in ``examples``."""
    print("\n| k | input [n, T·64, H, W] | fused s | PyTorch's layers s | layers / fused |\n"
          "|---:|---|---:|---:|---:|")
    for k, sides in SIDES.items():
        for n in examples:
            for side in sides:
                fused_s, plain_s = layer_seconds(n, side, k, args.tasks, args.rounds, second)
                print(f"| {k} | [{n}, {args.tasks * 64}, {side}, {side}] | {fused_s:.4f} | "
                      f"{plain_s:.4f} | {plain_s / fused_s:.2f} |", flush=True)


def prepare(description: str, models, argv=None):
    """(args, problem) of a fused-layer benchmark: its command line (``--no-layers``
    skips the layer table), threads and heap settings; None without the compiled
    CPU kernels (nothing is fused then)."""
    ap = cp.ab_parser(description, models, rounds=5)
    ap.add_argument("--no-layers", action="store_true", help="skip part 1 (the layer alone)")
    args = ap.parse_args(argv)
    import torch
    from imaml_ext import _build, cpu_malloc
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_malloc.reuse_freed_memory()
    if not _build.backend().cpu:
        print(f"no compiled CPU kernels, so nothing is fused here ({_build.describe()})", file=sys.stderr)
        return None
    problem = cp.parse(["--models", *args.models, "--tasks", str(args.tasks)])
    print(f"{cp.machine(problem)}; T = {args.tasks}; medians of {args.rounds} rounds after a warm-up")
    return args, problem


def main(argv=None) -> int:
    prepared = prepare(__doc__, ["conv4"], argv)
    if prepared is None:
        return 1
    args, problem = prepared
    from imaml_ext import fused_layers as fl
    if not args.no_layers:
        layer_table(args)

    def switch(on: bool) -> None:
        os.environ[fl.DISABLE_ENV] = "0" if on else "1"

    print()
    cp.ab_table(switch, problem, args, "fused", "unfused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
