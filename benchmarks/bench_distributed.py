"""Meta-steps per second of data-parallel iMAML training on 1, 2 (, 4) processes.

Setting: iMAML-GD on the Omniglot conv net (64 filters), the problem of
``bench_imaml.py`` (5-way 1-shot, 15 queries per class, T = 32 tasks per
meta-step, 16 inner steps, λ = 2, 5 CG steps, float32, random 28×28 images:
the same meta-batch every step, so data loading is not timed), Adam.  Each process runs one torch thread and the
application's meta-step (:class:`imaml_ext.training.train.MetaStep` with
:class:`~imaml_ext.training.parallel.GradientSync`: T/N tasks per process,
one all-reduce of the flat meta-gradient per step).  Processes are started
with ``torch.multiprocessing`` and join a gloo (CPU) or NCCL (CUDA) group on
a free local port.

The process counts are interleaved (1, 2, 1, 2, ...) for ``--rounds``
rounds; each round times ``--steps`` meta-steps after ``--warmup``, and the
median over rounds is reported: meta-steps/s, speed-up over 1 process,
scaling efficiency throughput_N / (N · throughput_1), and the seconds per
step spent in the all-reduce (on rank 0; it includes waiting for the
slowest rank).

    python benchmarks/bench_distributed.py                     # CPU, 1 and 2 processes
    python benchmarks/bench_distributed.py --procs 1 2 4 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_imaml import add_problem_args, machine, make_problem  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, size: int, port: int, args, results) -> None:
    """One process: join the group (if several), time the meta-steps, put rank 0's numbers in ``results``."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from imaml_ext.training.experiment import build_model, build_outer_optimizer, make_config
    from imaml_ext.training.parallel import GradientSync, process_group, rank_device
    from imaml_ext.training.train import MetaStep

    reduce_seconds = [0.0]
    original = dist.all_reduce

    def timed_all_reduce(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        reduce_seconds[0] += time.perf_counter() - start
        return out

    dist.all_reduce = timed_all_reduce
    with process_group(rank_device(args.device)) as ranks:
        cfg = make_config("omniglot", method="imaml-gd", ways=args.ways, shots=args.shots, queries=args.queries,
                          meta_batch=args.tasks, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                          lam=args.lam, cg_steps=args.cg_steps)
        args.device = ranks.device
        _, *batch = make_problem(args)  # the same tasks on every process
        torch.manual_seed(0)
        model = build_model(cfg).to(ranks.device)
        step = MetaStep(cfg, model, build_outer_optimizer(cfg, model),
                        GradientSync(cfg.meta_batch) if size > 1 else None)
        sync = torch.cuda.synchronize if ranks.device.startswith("cuda") else (lambda: None)
        for _ in range(args.warmup):
            step(batch)
        sync()
        reduce_seconds[0] = 0.0
        start = time.perf_counter()
        for _ in range(args.steps):
            step(batch)
        sync()
        seconds = time.perf_counter() - start
        if ranks.is_main:
            results.put({"procs": size, "steps_per_s": args.steps / seconds,
                         "reduce_s_per_step": reduce_seconds[0] / args.steps})


def run(size: int, args) -> dict:
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(worker, args=(size, free_port(), args, results), nprocs=size, start_method="spawn")
    return results.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    add_problem_args(p)  # --device cpu (gloo) or cuda (NCCL, one GPU per process), --tasks, ...
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    import torch
    runs = {n: [] for n in args.procs}
    for r in range(args.rounds):
        for n in args.procs:
            runs[n].append(run(n, args))
            print(f"round {r + 1}: {n} process(es): {runs[n][-1]['steps_per_s']:.3f} meta-steps/s", flush=True)
    summary = {}
    for n in args.procs:
        summary[n] = {"steps_per_s": statistics.median(x["steps_per_s"] for x in runs[n]),
                      "reduce_s_per_step": statistics.median(x["reduce_s_per_step"] for x in runs[n])}
    base = summary[args.procs[0]]["steps_per_s"] * (1 / args.procs[0])
    print(f"\n{machine(args.device).split(',')[0]}, {os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread per process; "
          f"iMAML-GD, Omniglot conv net, T = {args.tasks}; median of {args.rounds} rounds of {args.steps} steps")
    print(f"{'processes':>9} {'meta-steps/s':>12} {'speed-up':>8} {'efficiency':>10} {'all-reduce s/step':>17}")
    for n in args.procs:
        s = summary[n]
        speedup = s["steps_per_s"] / summary[args.procs[0]]["steps_per_s"] * args.procs[0]
        s.update(speedup=speedup, efficiency=s["steps_per_s"] / (n * base))
        print(f"{n:>9} {s['steps_per_s']:>12.3f} {speedup:>7.2f}× {s['efficiency']:>10.2f} "
              f"{s['reduce_s_per_step']:>17.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(args.device).split(",")[0], "args": vars(args), "runs": runs, "summary": summary},
                      f, indent=2)


if __name__ == "__main__":
    main()
