"""imaml_ext's meta-gradients with the folded convolution's own second derivative
(``batching._GroupedConv2dGrad``: three native grouped convolutions) and with
PyTorch's (``F.conv2d`` in its place, whose double backward loops over the
groups), switched before every meta-batch and alternated round by round in one
process (``compare_peers.alternate``).  First-order MAML takes no second
derivative, so it is the control.

    python benchmarks/bench_grouped_conv.py --threads 2 --rounds 3 --models omniglot conv4
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_peers as cp  # noqa: E402


def main(argv=None) -> int:
    ap = cp.ab_parser(__doc__, ["omniglot", "conv4"], rounds=3)
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from imaml_ext import batching, cpu_malloc
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_malloc.reuse_freed_memory()
    own = batching._GroupedConv2d

    class PyTorchs:
        """F.conv2d with the folded convolution's arguments: PyTorch's own derivatives."""

        @staticmethod
        def apply(x, weight, bias, conf):
            return F.conv2d(x, weight, bias, *conf)

    def switch(on: bool) -> None:
        batching._GroupedConv2d = own if on else PyTorchs

    problem = cp.parse(["--models", *args.models, "--tasks", str(args.tasks)])
    print(f"{cp.machine(problem)}; T = {args.tasks}; medians of {args.rounds} rounds after a warm-up")
    cp.ab_table(switch, problem, args, "own second derivative", "PyTorch's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
