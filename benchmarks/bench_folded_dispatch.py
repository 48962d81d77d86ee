"""imaml_ext's iMAML meta-gradient with the folded layers' rules called directly one
vmap level down (``batching._UnderVmapOnly.run``) and through torch.func's
``autograd.Function`` path (a Function whose vmap staticmethod is the same rule),
switched before every meta-batch and alternated round by round in one process
(``compare_peers.alternate``).

Two problems: the Omniglot net on real data (``compare_peers``' problem, T = 32),
and the same net with 2 channels on random images, where the convolutions cost
next to nothing and the difference is the per-call overhead.  Prints the medians,
their difference and the median (quartiles) of the per-round ratios.

    python benchmarks/bench_folded_dispatch.py --threads 2 --rounds 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_peers as cp  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args(argv)
    import torch
    from imaml_ext import batching, cpu_malloc, models
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_malloc.reuse_freed_memory()
    direct = batching._UnderVmapOnly.__dict__["run"]
    functions = {}

    def via_function(cls, *call):
        fn = functions.get(cls)
        if fn is None:
            class Folded(torch.autograd.Function):
                @staticmethod
                def forward(*_):
                    raise RuntimeError("applied only under vmap")

                @staticmethod
                def setup_context(ctx, inputs, output):
                    pass

                @staticmethod
                def vmap(info, in_dims, *rest):
                    return cls.folded(info.batch_size, in_dims, *rest)

            fn = functions[cls] = Folded
        return fn.apply(*call)

    def switch(on: bool) -> None:
        batching._UnderVmapOnly.run = direct if on else classmethod(via_function)

    T = 32
    problem = cp.parse(["--models", "omniglot"])
    omniglot = cp.build_problem("omniglot", T, problem)
    torch.manual_seed(0)
    small = (models.OmniglotConvNet(ways=5, hidden=2),
             (torch.randn(T, 5, 1, 28, 28), torch.arange(5).repeat(T, 1),
              torch.randn(T, 5, 1, 28, 28), torch.randint(0, 5, (T, 5))))
    print(f"{cp.machine(problem)}; iMAML, T = {T}, {cp.SETTINGS['imaml']}; {args.rounds} rounds after a warm-up\n")
    print("| problem | direct ms | Function path ms | difference ms | Function path / direct, per round: "
          "median (quartiles) |\n|---|---:|---:|---:|---|")
    try:
        for name, (model, batch) in (("Omniglot net, 5 + 75 images per task", omniglot),
                                     ("2-channel net, 5 + 5 random images per task", small)):
            seconds = cp.alternate(switch, model, batch, "imaml", args.rounds)
            d, f = (statistics.median(seconds[on]) for on in (True, False))
            ratios = sorted(b / a for a, b in zip(seconds[True], seconds[False]))
            q = len(ratios) // 4
            print(f"| {name} | {1e3 * d:.1f} | {1e3 * f:.1f} | {1e3 * (f - d):.1f} | "
                  f"{statistics.median(ratios):.3f} ({ratios[q]:.3f}–{ratios[-1 - q]:.3f}) |", flush=True)
    finally:
        switch(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
