"""The fused batch-norm → ReLU → max-pool layer in the passes that are
differentiated twice (full MAML's inner loop, the checkpointed adjoint's
recomputed steps, iMAML's reverse Hessian-vector products), against PyTorch's
three layers there.

1. The layer alone: forward, a ``create_graph=True`` backward and the backward
   of that gradient (a Hessian-vector product's pattern) on the activations of
   the max-pool Conv-4 at T = 32 tasks folded into one call
   (``[n, 32·64, H, W]``, n = 5 support images per task, H = 28, 14, 7, 3;
   k = 2) and, without pooling (k = 1), on those of the stride-2 net (H = 14,
   7, 4, 2; planes below ``fused_layers.MIN_UNPOOLED_PLANE`` run PyTorch's
   layers both ways): the fused operators (compiled CPU kernels, the second
   derivative ``bn_relu_pool_double_backward``) and the three (two) layers
   alternated, medians (``bench_fused_layers.layer_table``).
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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_peers as cp  # noqa: E402
import bench_fused_layers as bfl  # noqa: E402


def main(argv=None) -> int:
    prepared = bfl.prepare(__doc__, ["conv4"], argv)
    if prepared is None:
        return 1
    args, problem = prepared
    from imaml_ext import unrolled
    from imaml_ext import fused_layers as fl
    if not args.no_layers:
        bfl.layer_table(args, examples=(5,), second=True)

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
    cp.ab_table(switch, problem, args, "fused twice-differentiated passes", "PyTorch's layers there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
