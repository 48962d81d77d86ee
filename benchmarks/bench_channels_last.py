"""Channels-last activations for the stride-2 net: the fused batch-norm → ReLU
layer's row kernels (csrc/cpu/bn_relu_rows.h) and the folded convolutions on
``[n, H, W, T·C]`` storage, against the contiguous layout.

1. The operator alone without pooling (k = 1) on the stride-2 net's
   activations at T tasks folded into one call (``[n, T·64, H, W]``, n = 5
   support and 75 query images per task, H = 14, 7, 4, 2): forward, backward
   and double backward, contiguous x (the plane kernels) against
   channels-last x (the row kernels), alternated, medians in ms.
2. imaml_ext's whole meta-gradients (``compare_peers.py``'s problems) with the
   model's folded layers channels-last (``fused_layers.runs_channels_last``,
   the default for the stride-2 net) and contiguous, switched before every
   meta-batch and alternated round by round in one process
   (``compare_peers.alternate``).

    python benchmarks/bench_channels_last.py --threads 2 --rounds 9 --models omniglot
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_peers as cp  # noqa: E402
import bench_fused_layers as bfl  # noqa: E402

SIDES = (14, 7, 4, 2)


def operator_ms(n: int, side: int, tasks: int, rounds: int):
    """{layout: (forward, backward, double backward) median ms} of the fused operator."""
    import torch
    from imaml_ext import fused_layers as fl
    x = torch.randn(n, tasks * 64, side, side)
    w, b = torch.randn(x.shape[1]), torch.randn(x.shape[1])
    grad, u = torch.randn_like(x), torch.randn_like(x)
    layouts = (torch.contiguous_format, torch.channels_last)
    calls = {}
    for layout in layouts:
        xl, gl, ul = (t.contiguous(memory_format=layout) for t in (x, grad, u))
        saved = fl._op(xl, w, b, 1e-5, 1)[1:]
        calls[layout] = (lambda xl=xl: fl._op(xl, w, b, 1e-5, 1),
                         lambda xl=xl, gl=gl, s=saved: fl._backward_op(gl, xl, w, *s, 1),
                         lambda xl=xl, gl=gl, ul=ul, s=saved: fl._double_backward_op(ul, w, None, gl, xl, w, *s, 1))
    ms = {layout: [[], [], []] for layout in layouts}
    for r in range(rounds + 1):
        for layout in (layouts if r % 2 == 0 else layouts[::-1]):
            for i, call in enumerate(calls[layout]):
                start = time.perf_counter()
                call()
                if r:
                    ms[layout][i].append((time.perf_counter() - start) * 1e3)
    return {layout: tuple(statistics.median(t) for t in ms[layout]) for layout in layouts}


def operator_table(args) -> None:
    import torch
    print("\n| input [n, T·64, H, W] | contiguous fwd / bwd / double bwd ms | channels-last ms | "
          "contiguous / channels-last (fwd, bwd, double bwd) |\n|---|---|---|---|")
    for n in (5, 75):
        for side in SIDES:
            found = operator_ms(n, side, args.tasks, max(args.rounds, 9))
            plane, rows = found[torch.contiguous_format], found[torch.channels_last]
            print(f"| [{n}, {args.tasks * 64}, {side}, {side}] | {' / '.join(f'{t:.2f}' for t in plane)} | "
                  f"{' / '.join(f'{t:.2f}' for t in rows)} | "
                  f"{', '.join(f'{p / c:.2f}' for p, c in zip(plane, rows))} |", flush=True)


def main(argv=None) -> int:
    prepared = bfl.prepare(__doc__, ["omniglot"], argv)
    if prepared is None:
        return 1
    args, problem = prepared
    from imaml_ext import functional
    if not args.no_layers:
        operator_table(args)
    chosen = functional.runs_channels_last

    def switch(on: bool) -> None:
        functional.runs_channels_last = chosen if on else (lambda runner: False)

    print()
    cp.ab_table(switch, problem, args, "channels-last", "contiguous")
    return 0


if __name__ == "__main__":
    sys.exit(main())
