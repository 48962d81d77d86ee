"""Two checkouts of imaml_ext on the same iMAML meta-batch, interleaved: is one slower?

Runs ``bench_imaml.py``'s ``imaml_ext`` variant (Omniglot conv net, 5-way
1-shot, T = 32, 16 inner GD steps, 5 CG steps) from each checkout in turn,
each in a fresh process that imports that checkout (``PYTHONPATH``), for
``--rounds`` rounds, alternating which goes first.  Each process reports the
median of ``--repeats`` timed meta-batches after one warm-up.  Prints the
median per checkout and the median and quartiles of the per-round ratios
(after / before: > 1 means the "after" checkout is slower).

Both checkouts need their compiled ops built in place
(``python setup.py build_ext --inplace``) or installed.

    python benchmarks/bench_imaml_trees.py --before ../old --after . --rounds 7
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def run_once(tree: str, repeats: int, extra) -> dict:
    """Median seconds per meta-batch of the checkout at ``tree``, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cmd = [sys.executable, os.path.join(tree, "benchmarks", "bench_imaml.py"), "--variant", "imaml_ext",
           "--repeats", str(repeats), *extra]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: bench_imaml.py failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="checkout to compare against")
    ap.add_argument("--after", required=True, help="checkout under test")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3, help="timed meta-batches per process")
    args, extra = ap.parse_known_args(argv)  # the rest goes to bench_imaml.py (problem options)
    trees = {"before": args.before, "after": args.after}
    times = {name: [] for name in trees}
    ratios = []
    for i in range(args.rounds):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        got = {name: run_once(trees[name], args.repeats, extra) for name in order}
        for name, result in got.items():
            times[name].append(result["median_s"])
        ratios.append(got["after"]["median_s"] / got["before"]["median_s"])
        print(f"round {i + 1}: before {got['before']['median_s']:.3f} s ({got['before']['backend']}), "
              f"after {got['after']['median_s']:.3f} s ({got['after']['backend']}), "
              f"ratio {ratios[-1]:.3f}", flush=True)
    print("| checkout | median s / meta-batch |")
    print("|---|---:|")
    for name in trees:
        print(f"| {name} ({trees[name]}) | {statistics.median(times[name]):.3f} |")
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"per-round ratio after / before: median {statistics.median(ratios):.3f} "
          f"(quartiles {q[0]:.3f} to {q[2]:.3f}), {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
