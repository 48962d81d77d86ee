"""Training speed under CPU oversubscription: OpenMP wait policy and thread count.

Runs the training command line (``python -m imaml_ext train``, Omniglot 5-way
1-shot iMAML-GD, a small meta-batch) once per variant per round, variants
interleaved round by round, while ``--spinners`` busy Python processes (``while
True: pass``) load the CPUs, and reports the median seconds per meta-step
(from metrics.jsonl, first step excluded) of each variant and its ratio to the
first variant.  Each variant is a fresh process because OpenMP reads its
environment when torch loads it.

    python benchmarks/bench_threads.py --data ../shared/data --rounds 3 --steps 4 --spinners 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name -> (environment changes (None: unset), extra flags)
VARIANTS = {
    "OMP_WAIT_POLICY unset (libgomp spins), torch's threads": ({"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000"}, []),
    "OMP_WAIT_POLICY=PASSIVE, torch's threads": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "--threads 1": ({"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000"}, ["--threads", "1"]),
    "no variable set (the application's default)": ({"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}, []),
}


def seconds_per_step(data: str, env_changes, flags, steps: int, train_args) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for key, value in env_changes.items():
        env.pop(key, None)
        if value is not None:
            env[key] = value
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "imaml_ext", "train", "--data", data, *train_args,
               "--meta-steps", str(steps), "--log-every", "1", "--checkpoint-every", "0", "--no-progress",
               "--out", out, *flags]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        seconds = [json.loads(line)["seconds"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(b - a for a, b in zip(seconds, seconds[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data root holding omniglot/")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="meta-steps per run")
    parser.add_argument("--train-args", default="--meta-batch 4 --inner-steps 4",
                        help="more flags of the training command (default: %(default)s)")
    parser.add_argument("--spinners", type=int, default=1, help="busy processes loading the CPUs")
    parser.add_argument("--only", nargs="+", help="variant names to run (default all)")
    args = parser.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.spinners)]
    times = {name: [] for name in variants}
    try:
        for round_ in range(args.rounds):
            for name, (env_changes, flags) in variants.items():
                times[name].append(seconds_per_step(args.data, env_changes, flags, args.steps, args.train_args.split()))
                print(f"round {round_ + 1} {name}: {times[name][-1]:.3f} s/step", flush=True)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, load average {os.getloadavg()}, "
          f"{args.spinners} spinner(s), train {args.train_args}, {args.steps} steps, {args.rounds} rounds")
    base = statistics.median(next(iter(times.values())))
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:50s} median {median:7.3f} s/step  x{median / base:5.2f}  runs {[round(v, 2) for v in values]}")


if __name__ == "__main__":
    main()
