"""Memory soak (process RSS over many iMAML meta-iterations must stay flat), and a fault run.

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

Fault run (``--kills N``): a small sinusoid training (``imaml-ext train`` in
a subprocess, one thread) is killed with SIGKILL at a random moment N times
and continued each time (``--resume`` while a checkpoint exists, else
started again); the last attempt runs to the end.  Checks: the final
parameters and optimizer state equal, bit for bit, those of an uninterrupted
run of the same command; the metrics file's train lines tile steps 1..M
(no step twice, none missing: each line's step minus the previous one's is
its window) and each line's loss is the mean of the uninterrupted run's
per-step losses over its window; no temporary file is left.  Exits 1 on a
failed check.

    python benchmarks/soak.py --kills 20
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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
    fault = parser.add_argument_group("fault run")
    fault.add_argument("--kills", type=int, default=0, help="run the fault run with this many SIGKILLs instead")
    fault.add_argument("--meta-steps", type=int, default=100, help="fault run: training length (default 100)")
    fault.add_argument("--seed", type=int, default=0, help="fault run: seed of the kill moments (default 0)")
    fault.add_argument("--out", help="fault run: folder for the two runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.kills:
        return fault_run(args)
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


# ----------------------------------------------------------------------------- fault run

REPO = Path(__file__).resolve().parents[1]
PHASES = ("start-up", "resume", "training")
# Tiny sinusoid training; checkpoints every 5 steps and every 0.6 s, so kills land in all phases.
FAULT_TRAIN = ["--dataset", "sinusoid", "--method", "imaml-gd", "--meta-batch", "4", "--inner-steps", "2",
               "--shots", "5", "--queries", "5", "--threads", "1", "--no-progress",
               "--checkpoint-every", "5", "--checkpoint-minutes", "0.01"]


def _cli(args, **popen):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "imaml_ext", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def _train_lines(run: Path):
    from imaml_ext.training.metrics import read_metrics
    return read_metrics(run / "metrics.jsonl")["train"]


def _wait_for_training(run: Path, proc, step: int, started_ns: int) -> None:
    """Until ``proc`` (started at ``started_ns``) has logged a metrics line after ``step`` (it runs
    meta-steps) or has ended.  Lines of a killed attempt do not count: the metrics file must have
    been written since the start (a resumed run rewrites it first)."""
    metrics = run / "metrics.jsonl"
    while proc.poll() is None:
        fresh = metrics.is_file() and metrics.stat().st_mtime_ns > started_ns
        lines = metrics.read_text().splitlines() if fresh else []
        try:
            if lines and json.loads(lines[-1])["step"] > step:
                return
        except (ValueError, KeyError):  # a line being written
            pass
        time.sleep(0.02)


def _wait_for_lock(run: Path, proc) -> None:
    """Until ``proc`` holds the run folder's lock (its PID in run.lock) or has ended."""
    lock = run / "run.lock"
    while proc.poll() is None:
        if lock.is_file() and lock.read_text().strip() == str(proc.pid):
            return
        time.sleep(0.02)


def fault_run(args) -> int:
    import torch

    from imaml_ext.training.checkpoint import load_checkpoint
    from imaml_ext.data.paths import partial_files

    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="imaml_ext_fault_"))
    ref, run = base / "uninterrupted", base / "killed"
    command = FAULT_TRAIN + ["--meta-steps", str(args.meta_steps)]

    start = time.perf_counter()
    proc = _cli(command + ["--log-every", "1", "--out", str(ref)])
    _, err = proc.communicate()
    total = time.perf_counter() - start
    if proc.returncode != 0:
        print(err, file=sys.stderr)
        return 1
    training = _train_lines(ref)[-1]["seconds"]
    startup = total - training
    # Kill moments, in three phases: "start-up" uniform in [0, start-up time] from the process's
    # start (imports, data); "resume" uniform in [0, 0.5 s] once it holds the run folder's lock
    # (clean-up, checkpoint and metrics read, metrics rewrite); "training" uniform in
    # [0, training time / training kills] once it has run a step (steps, metrics lines,
    # checkpoint writes), so the run advances from kill to kill and about half of it is left
    # for the last attempt.
    rng = random.Random(args.seed)
    phases = [rng.choices(PHASES, weights=(1, 1, 3))[0] for _ in range(args.kills)]
    training_window = training / max(1, phases.count("training"))
    kills = []
    for phase in phases:
        resume = (run / "checkpoint.pt").is_file()
        before = load_checkpoint(run)["step"] if resume else 0
        started_ns = time.time_ns()
        proc = _cli(["--resume", str(run)] if resume else command + ["--log-every", "3", "--out", str(run)])
        delay = rng.uniform(0, {"start-up": startup, "resume": 0.5, "training": training_window}[phase])
        if phase != "start-up":
            _wait_for_lock(run, proc)
        if phase == "training":
            _wait_for_training(run, proc, before, started_ns)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        if proc.returncode not in (0, -signal.SIGKILL):
            print(f"attempt failed (exit {proc.returncode}):\n{err}", file=sys.stderr)
            return 1
        after = load_checkpoint(run)["step"] if (run / "checkpoint.pt").is_file() else 0
        kills.append({"resumed": resume, "phase": phase,
                      "delay_s": round(delay, 2), "checkpoint_step_before": before,
                      "checkpoint_step_after": after, "killed": proc.returncode == -signal.SIGKILL})
    proc = _cli(["--resume", str(run)] if (run / "checkpoint.pt").is_file()
                else command + ["--log-every", "3", "--out", str(run)])
    _, err = proc.communicate()
    if proc.returncode != 0:
        print(f"final attempt failed (exit {proc.returncode}):\n{err}", file=sys.stderr)
        return 1

    problems = []
    whole, split = load_checkpoint(ref), load_checkpoint(run)
    if split["step"] != args.meta_steps:
        problems.append(f"final step {split['step']} != {args.meta_steps}")
    for name, value in whole["model"].items():
        if not torch.equal(value, split["model"][name]):
            problems.append(f"parameter {name} differs from the uninterrupted run's")
    for key, a in whole["optimizer"]["state"].items():
        b = split["optimizer"]["state"][key]
        if not all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a):
            problems.append(f"optimizer state {key} differs")
    per_step = {r["step"]: r["loss"] for r in _train_lines(ref)}
    lines = _train_lines(run)
    previous = 0
    for line in lines:
        if line["step"] - previous != line["window"]:
            problems.append(f"metrics line at step {line['step']} covers {line['window']} steps after step "
                            f"{previous} (a step twice or missing)")
        expected = statistics.fmean(per_step[s] for s in range(previous + 1, line["step"] + 1))
        if abs(line["loss"] - expected) > 1e-5 * max(1.0, abs(expected)):
            problems.append(f"metrics line at step {line['step']}: loss {line['loss']} != {expected}")
        previous = line["step"]
    if previous != args.meta_steps:
        problems.append(f"last metrics line at step {previous}")
    leftovers = [p.name for p in partial_files(run)]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    result = {
        "kills": sum(k["killed"] for k in kills), "attempts": len(kills) + 1, "meta_steps": args.meta_steps,
        "kills_per_phase": {phase: sum(k["killed"] and k["phase"] == phase for k in kills) for phase in PHASES},
        "metrics_lines": len(lines), "files": sorted(p.name for p in run.iterdir()),
        "uninterrupted_seconds": round(total, 1), "seconds": round(time.perf_counter() - start, 1),
        "attempt_log": kills, "problems": problems, "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"fault run: {result['kills']} SIGKILLs in {len(kills) + 1} attempts of a {args.meta_steps}-step run; "
          + ("final state bit-identical to the uninterrupted run, metrics complete, no temporary file"
             if not problems else f"{len(problems)} problem(s): " + "; ".join(problems[:5])))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
