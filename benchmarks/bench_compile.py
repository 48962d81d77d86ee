"""A compiled path, measured: ``torch.compile`` (inductor, CPU) over the
per-task functions of an iMAML meta-gradient, against imaml_ext's own.

imaml_ext runs its tasks under ``vmap`` with the folded convolution and
batch-norm and the fused batch-norm → ReLU layer (``imaml_ext.batching``,
``imaml_ext.fused_layers``).  The compiled forms are the plain
``torch.func`` functions over the same flat ``[T, P]`` parameters:

* inner step: ``vmap(grad(loss))`` on the support set (imaml_ext:
  ``TaskLoss.grad``), 16 per meta-gradient;
* query gradient: the same on the query set (imaml_ext: ``TaskLoss.grad``),
  one per meta-gradient;
* Hessian-vector product: ``vmap`` of forward-over-reverse
  ``jvp(grad(loss))`` (imaml_ext: the reverse-mode product through one
  retained gradient graph, ``hvp._reverse_graph``; the graph's own cost is
  printed apart), 5 per meta-gradient.

Each is compiled once, into a fresh inductor cache (the first call's seconds,
compilation included, are printed), checked against
imaml_ext's in float64 (‖a − b‖ / ‖b‖) and then timed, the variants
alternated round by round in this process; medians.  Model and data:
``compare_peers.py``'s (real Omniglot, 5-way 1-shot, 15 queries per class).

    python benchmarks/bench_compile.py --threads 2 --rounds 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_peers as cp  # noqa: E402
from peer_loops import relative_difference  # noqa: E402


def compiled_functions(task_loss):
    """(inner step / query gradient, Hessian-vector product): the compiled
    ``torch.func`` forms over flat ``[T, P]`` parameters."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, jvp, vmap

    def loss(p, x, y):
        return F.cross_entropy(functional_call(task_loss.model, task_loss.layout.unflatten(p), (x,)), y)

    def hvp(p, v, x, y):
        return jvp(lambda q: grad(loss)(q, x, y), (p,), (v,))[1]

    return torch.compile(vmap(grad(loss))), torch.compile(vmap(hvp))


def problem_tensors(model_name: str, args, dtype):
    """(TaskLoss, φ ``[T, P]`` near θ, v ``[T, P]``, support x/y, query x/y)."""
    import torch
    import torch.nn.functional as F
    from imaml_ext.functional import TaskLoss
    model, (xs, ys, xq, yq) = cp.build_problem(model_name, args.tasks, args.problem, dtype)
    task_loss = TaskLoss(model, F.cross_entropy)
    theta = task_loss.layout.flatten(dict(model.named_parameters())).detach()
    generator = torch.Generator().manual_seed(0)
    phi = theta.expand(args.tasks, -1) + 0.01 * torch.randn(args.tasks, theta.numel(), generator=generator,
                                                           dtype=dtype)
    v = torch.randn(args.tasks, theta.numel(), generator=generator, dtype=dtype)
    return task_loss, phi, v, xs, ys, xq, yq


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["omniglot"], choices=cp.MODELS)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args(argv)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_compile_")  # compile cold
    import torch
    from imaml_ext import cpu_malloc
    from imaml_ext.hvp import _reverse_graph
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_malloc.reuse_freed_memory()
    args.problem = cp.parse(["--models", *args.models, "--tasks", str(args.tasks)])
    print(f"{cp.machine(args.problem)}; T = {args.tasks}; medians of {args.rounds} rounds after a warm-up")
    for model_name in args.models:
        for dtype in (torch.float64, torch.float32):
            task_loss, phi, v, xs, ys, xq, yq = problem_tensors(model_name, args, dtype)
            step, hvp = compiled_functions(task_loss)
            _, matvec = _reverse_graph(task_loss.per_task, phi, xs, ys, "vmap")
            first = {}
            for name, call in (("inner step", lambda: step(phi, xs, ys)), ("query gradient", lambda: step(phi, xq, yq)),
                               ("Hessian-vector product", lambda: hvp(phi, v, xs, ys))):
                start = time.perf_counter()
                call()
                first[name] = time.perf_counter() - start
            if dtype == torch.float64:
                print(f"\n{model_name}, float64, compiled vs imaml_ext (‖a − b‖ / ‖b‖): "
                      f"inner step {relative_difference(step(phi, xs, ys), task_loss.grad(phi, xs, ys)[0]):.1e}, "
                      f"query gradient {relative_difference(step(phi, xq, yq), task_loss.grad(phi, xq, yq)[0]):.1e}, "
                      f"Hessian-vector product {relative_difference(hvp(phi, v, xs, ys), matvec(v)):.1e}; first calls "
                      + ", ".join(f"{k} {s:.1f} s" for k, s in first.items()))
                continue
            pairs = {"inner step": (lambda: task_loss.grad(phi, xs, ys), lambda: step(phi, xs, ys)),
                     "query gradient": (lambda: task_loss.grad(phi, xq, yq), lambda: step(phi, xq, yq)),
                     "Hessian-vector product": (lambda: matvec(v), lambda: hvp(phi, v, xs, ys)),
                     "its gradient graph (imaml_ext)": (lambda: _reverse_graph(task_loss.per_task, phi, xs, ys,
                                                                               "vmap"), None)}
            seconds = {(k, i): [] for k, pair in pairs.items() for i, f in enumerate(pair) if f is not None}
            for r in range(args.rounds + 1):
                for (k, i) in (seconds if r % 2 else reversed(list(seconds))):
                    start = time.perf_counter()
                    pairs[k][i]()
                    if r:
                        seconds[(k, i)].append(time.perf_counter() - start)
            print(f"\n{model_name}, float32; first calls " + ", ".join(f"{k} {s:.1f} s" for k, s in first.items()))
            print("\n| function | imaml_ext ms | compiled ms | imaml_ext / compiled |\n|---|---:|---:|---:|")
            for k, pair in pairs.items():
                ours = statistics.median(seconds[(k, 0)]) * 1e3
                if pair[1] is None:
                    print(f"| {k} | {ours:.1f} | | |")
                    continue
                theirs = statistics.median(seconds[(k, 1)]) * 1e3
                print(f"| {k} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
