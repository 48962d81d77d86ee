"""Memory soak: process RSS over many iMAML meta-iterations must stay flat.

Runs ``--iterations`` meta-steps of :class:`imaml_ext.training.train.MetaStep` (iMAML-GD,
Adam outer optimizer, fresh tasks every step) and records the resident set
size after each one.  Reports the median RSS of the first and of the last
100 iterations, their difference, and the least-squares slope over the
second half; exits 1 if the growth exceeds ``--max-growth-mib``.

Settings: ``sinusoid`` (default): 1-40-40-1 MLP, 10-shot, T = 25, 10 inner
steps, 5 CG steps; ``omniglot``: 5-way 1-shot, 32-filter conv net, T = 4,
5 inner steps, 3 CG steps (needs the data, see ``--data``).

    python benchmarks/soak.py                       # 1,000 sinusoid iterations
    python benchmarks/soak.py --dataset omniglot --data ../shared/data
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc, else psutil)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil  # not a dependency: only needed off Linux
        return psutil.Process().memory_info().rss


def slope(values):
    """Least-squares slope of ``values`` against their index."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(values)
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--dataset", choices=("sinusoid", "omniglot"), default="sinusoid")
    parser.add_argument("--data", help="data root for omniglot (default $IMAML_EXT_DATA)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--window", type=int, default=100, help="iterations per median (default 100)")
    parser.add_argument("--max-growth-mib", type=float, default=20.0,
                        help="fail if last-window median RSS exceeds the first by more (default 20)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.iterations < 2 * args.window:
        parser.error(f"--iterations must be at least twice --window ({2 * args.window})")

    import torch

    from imaml_ext.training.experiment import build_model, build_outer_optimizer, make_config, make_sampler
    from imaml_ext.training.train import MetaStep

    torch.set_num_threads(args.threads)
    if args.dataset == "sinusoid":
        cfg = make_config("sinusoid", method="imaml-gd", meta_batch=25, inner_steps=10, cg_steps=5)
    else:
        cfg = make_config("omniglot", method="imaml-gd", ways=5, shots=1, queries=5, hidden=32,
                          inner_steps=5, inner_lr=0.05, cg_steps=3, meta_batch=4)
    torch.manual_seed(0)
    model = build_model(cfg)
    step = MetaStep(cfg, model, build_outer_optimizer(cfg, model))
    sampler = make_sampler(cfg, "train", 0, root=args.data)

    rss = []
    start = time.perf_counter()
    for _ in range(args.iterations):
        loss, _ = step(sampler.sample(cfg.meta_batch))
        loss.item()
        rss.append(rss_bytes())
    seconds = time.perf_counter() - start

    mib = 2 ** 20
    first = statistics.median(rss[:args.window]) / mib
    last = statistics.median(rss[-args.window:]) / mib
    half = [r / mib for r in rss[len(rss) // 2:]]
    result = {
        "dataset": args.dataset, "iterations": args.iterations, "meta_batch": cfg.meta_batch,
        "inner_steps": cfg.inner_steps, "cg_steps": cfg.cg_steps,
        "first_window_median_mib": round(first, 2), "last_window_median_mib": round(last, 2),
        "growth_mib": round(last - first, 2), "growth_percent": round(100 * (last - first) / first, 2),
        "second_half_slope_kib_per_iter": round(1024 * slope(half), 3),
        "peak_mib": round(max(rss) / mib, 2), "seconds": round(seconds, 1),
        "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    ok = result["growth_mib"] <= args.max_growth_mib
    print(f"RSS median, first {args.window} vs last {args.window} of {args.iterations} iterations: "
          f"{first:.1f} -> {last:.1f} MiB ({last - first:+.2f} MiB); "
          f"{'flat' if ok else 'GROWING'} (limit {args.max_growth_mib} MiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
