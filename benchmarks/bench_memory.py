"""Peak memory and seconds per meta-gradient against the number of inner steps.

Methods: full second-order MAML and checkpointed MAML (``imaml_ext.maml``),
iMAML (``imaml_ext.imaml``: its memory should not depend on the number of
steps) and, when the optional package ``torch_maml`` is importable, its
``GradientCheckpointMAML`` on the same model and data (one task at a time:
it has no task dimension).

Each (method, steps) point runs in a fresh subprocess, which times
``--repeats`` meta-gradients after ``--warmup`` untimed ones of at most
``--warmup-steps`` inner steps (median reported) and reports its peak memory:

* CPU: peak resident set size (``ru_maxrss``) minus that of a baseline
  process that imports everything and builds the model and data but computes
  no meta-gradient;
* CUDA: ``torch.cuda.max_memory_allocated()`` minus what was allocated
  before the first meta-gradient (model and data).

Presets:

* ``cnn`` (CPU default): the Omniglot conv net (4 × [conv 3×3, 64, stride 2,
  BN → ReLU], 113,221 parameters), 5-way 5-shot support and query sets of
  25 images 28×28, T = 1 task, SGD with α = 0.1.
* ``resnet18``: torch_maml's notebook setting — torchvision ResNet18 (10
  classes; batch-norm switched to batch statistics), a batch of 16 × 3 × 224²
  used as support and query, SGD with α = 0.01, T = 1.  Meant for a GPU.

Checkpointed MAML snapshots every c = round(√K) steps by default;
``--checkpoint-every 0 1`` adds a row with c = 1 (every φ_k kept: no
recomputation of the trajectory, K·P more memory), and so on (c is capped at
K).  A point whose memory, extrapolated linearly from the method's previous
point, would exceed ``--mem-limit-gb`` is skipped rather than run.  On a
loaded machine, ``--threads 1`` keeps the timings stable.

    python benchmarks/bench_memory.py                                  # CPU, cnn preset
    python benchmarks/bench_memory.py --steps 10 50 100 --methods full checkpointed --checkpoint-every 0 1
    python benchmarks/bench_memory.py --device cuda --preset resnet18
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("full", "checkpointed", "imaml", "torch_maml")
PRESETS = {
    "cnn": dict(tasks=1, lr=0.1, ways=5, shots=5, hidden=64),
    "resnet18": dict(tasks=1, lr=0.01, batch=16, image=224, classes=10),
}
MB = 2.0 ** 20


# --- the problem (built identically by every subprocess) ------------------------------

def build_problem(args):
    """model, support x [T, n, ...], y [T, n], query x, y."""
    import torch
    from torch import nn
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    T = args.tasks
    if args.preset == "cnn":
        from imaml_ext.models import OmniglotConvNet
        p = PRESETS["cnn"]
        n = p["ways"] * p["shots"]
        model = OmniglotConvNet(ways=p["ways"], hidden=p["hidden"]).to(dev)
        labels = torch.arange(p["ways"], device=dev).repeat_interleave(p["shots"]).repeat(T, 1)
        xs, xq = (torch.rand(T, n, 1, 28, 28, device=dev) for _ in range(2))
        return model, xs, labels, xq, labels.clone()
    try:
        import torchvision
    except ImportError as e:
        raise SystemExit(f"--preset resnet18 needs torchvision ({e})")
    p = PRESETS["resnet18"]
    model = torchvision.models.resnet18(num_classes=p["classes"])
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # batch statistics, as in MAML
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    model = model.to(dev)
    xs = torch.randn(T, p["batch"], 3, p["image"], p["image"], device=dev)
    ys = torch.randint(0, p["classes"], (T, p["batch"]), device=dev)
    return model, xs, ys, xs, ys


def meta_gradient(method: str, problem, steps: int, args) -> None:
    """One meta-gradient of the mean query cross-entropy into the model's .grad."""
    import torch.nn.functional as F
    import imaml_ext as im
    from imaml_ext.unrolled import maml
    model, xs, ys, xq, yq = problem
    if method == "torch_maml":
        return torch_maml_meta_gradient(problem, steps, args)
    if method == "imaml":
        adapted = im.imaml(model, xs, ys, F.cross_entropy, lam=2.0, inner_steps=steps, inner_lr=args.lr,
                           cg_steps=5)
    else:
        every = min(args.point_every, steps) if method == "checkpointed" and args.point_every else None
        adapted = maml(model, xs, ys, F.cross_entropy, inner_steps=steps, inner_lr=args.lr, mode=method,
                       checkpoint_every=every)
    F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten()).backward()


def torch_maml_meta_gradient(problem, steps: int, args) -> None:
    """torch_maml's GradientCheckpointMAML, task by task (it has no task dimension):
    benchmarks/peer_loops.py's loop, tested equal to imaml_ext's checkpointed MAML."""
    sys.path.insert(0, HERE)
    import peer_loops
    model, xs, ys, xq, yq = problem
    every = args.point_every or max(1, round(steps ** 0.5))
    peer_loops.torch_maml_checkpointed(model, xs, ys, xq, yq, steps=steps, lr=args.lr, checkpoint_steps=every)


def torch_maml_status() -> str:
    """'' when torch_maml is usable, else why not."""
    sys.path.insert(0, HERE)
    import peer_loops
    return peer_loops.peer_status("torch_maml")


# --- one point, in a child process ------------------------------------------------------

def run_point(args) -> dict:
    import torch
    import imaml_ext as im
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    problem = build_problem(args)
    out = dict(method=args.point, steps=args.point_steps, backend=str(im.backend()))
    if args.point == "baseline":
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_alloc = torch.cuda.memory_allocated()
    times = []
    for i in range(args.warmup + args.repeats):
        # Warm-ups (allocator, kernels, cuDNN) take at most --warmup-steps inner steps.
        steps = min(args.point_steps, args.warmup_steps) if i < args.warmup else args.point_steps
        problem[0].zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        meta_gradient(args.point, problem, steps, args)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    out["seconds"] = statistics.median(times)
    out["times_s"] = times
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        out["peak_cuda_mb"] = (torch.cuda.max_memory_allocated() - start_alloc) / MB
    return out


def child(args, method: str, steps: int, every: int = 0) -> dict:
    """Run one point in a fresh interpreter; {'error': ...} on failure."""
    cmd = [sys.executable, os.path.abspath(__file__), *args.argv, "--point", method, "--point-steps", str(steps),
           "--point-every", str(every)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout after {args.timeout} s")
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
    if any("out of memory" in line.lower() for line in tail):
        return dict(error="out of memory")
    return dict(error=f"exit {res.returncode}: {' | '.join(tail)}")


# --- the sweep ---------------------------------------------------------------------------------

def machine(device: str, threads: int) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    from imaml_ext._build import _cpu_name
    model = _cpu_name()
    return f"{model}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch threads"


def default_mem_limit_gb(device: str) -> float:
    if device == "cuda":
        import torch
        return 0.9 * torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    return 0.7 * avail / 2 ** 20


def expand_methods(args):
    """(row label, method, c) per measured variant: one checkpointed row per --checkpoint-every value."""
    out = []
    for method in args.methods:
        if method == "checkpointed":
            out += [("checkpointed" if c == 0 else f"checkpointed c={c}", method, c) for c in args.checkpoint_every]
        else:
            out.append((method, method, args.checkpoint_every[0] if method == "torch_maml" else 0))
    return out


def sweep(args, save) -> dict:
    cuda = args.device == "cuda"
    limit_mb = args.mem_limit_gb * 1024
    base = None
    if not cuda:
        base = child(args, "baseline", 0)
        if "error" in base:
            raise SystemExit(f"baseline process failed: {base['error']}")
        print(f"[bench_memory] baseline process: peak RSS {base['peak_rss_mb']:.0f} MB", flush=True)
    variants = expand_methods(args)
    skip = {m: torch_maml_status() if m == "torch_maml" else "" for m in args.methods}
    last = {}
    rows, total = [], len(variants) * len(args.steps)
    import torch
    result = dict(device=args.device, machine=machine(args.device, args.threads), torch=torch.__version__,
                  preset=args.preset, tasks=args.tasks, lr=args.lr, checkpoint_every=args.checkpoint_every,
                  warmup=args.warmup, warmup_steps=args.warmup_steps, repeats=args.repeats,
                  memory="peak CUDA allocation" if cuda else "peak RSS minus baseline process",
                  baseline_rss_mb=None if base is None else base["peak_rss_mb"], rows=rows)
    # Steps outer, methods inner: the methods compared at one K run close together in time.
    for steps in args.steps:
        for label, method, every in variants:
            row = dict(method=label, steps=steps)
            tag = f"[bench_memory] ({len(rows) + 1}/{total}) {label:>16}  K={steps:<4}"
            prev = last.get(label)
            if skip[method]:
                row["error"] = f"skipped: {skip[method]}"
            elif prev is not None and prev["mb"] * steps / prev["steps"] > limit_mb:
                row["error"] = (f"skipped: ~{prev['mb'] * steps / prev['steps'] / 1024:.1f} GB expected "
                                f"> --mem-limit-gb {args.mem_limit_gb:.1f}")
            else:
                print(tag + " ...", end="", flush=True)
                row.update(child(args, method, steps, every))
                row["method"] = label
                if "error" in row:
                    print(f" {row['error']}", flush=True)
                else:
                    row["memory_mb"] = row["peak_cuda_mb"] if cuda else row["peak_rss_mb"] - base["peak_rss_mb"]
                    last[label] = dict(mb=max(row["memory_mb"], 1.0), steps=steps)
                    print(f" {row['seconds']:8.3f} s  {row['memory_mb']:9.1f} MB", flush=True)
            if row.get("error", "").startswith("skipped"):
                print(f"{tag} {row['error']}", flush=True)
            rows.append(row)
            save(result)
    return result


def table(result: dict) -> str:
    steps = sorted({r["steps"] for r in result["rows"]})
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    cell = {(r["method"], r["steps"]): r for r in result["rows"]}

    def fmt(r, key, spec):
        if r is None:
            return "-"
        if "error" in r:
            return "skipped" if r["error"].startswith("skipped") else r["error"].split(":")[0]
        return format(r[key], spec)

    head = "| method | " + " | ".join(f"K={k}" for k in steps) + " |"
    sep = "|---|" + "---|" * len(steps)
    lines = [f"Peak memory (MB, {result['memory']}):", "", head, sep]
    lines += [f"| {m} | " + " | ".join(fmt(cell.get((m, k)), "memory_mb", ".0f") for k in steps) + " |"
              for m in methods]
    lines += ["", f"Seconds per meta-gradient (median of {result['repeats']}):", "", head, sep]
    lines += [f"| {m} | " + " | ".join(fmt(cell.get((m, k)), "seconds", ".3f") for k in steps) + " |"
              for m in methods]
    notes = sorted({f"{r['method']}: {r['error']}" for r in result["rows"] if "error" in r})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib not installed (pip install 'imaml_ext[train]'); no plot written"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        ok = [r for r in result["rows"] if r["method"] == method and "error" not in r]
        if ok:
            ks = [r["steps"] for r in ok]
            axes[0].plot(ks, [r["memory_mb"] for r in ok], "o-", label=method)
            axes[1].plot(ks, [r["seconds"] for r in ok], "o-", label=method)
    for ax, label in zip(axes, ["peak memory (MB)", "seconds per meta-gradient"]):
        ax.set_xlabel("inner steps K")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['preset']}, T={result['tasks']}, {result['device']}: {result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="problem; default cnn on CPU, resnet18 on CUDA")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50, 100, 200, 500])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--tasks", type=int, default=None, help="T (default: the preset's)")
    ap.add_argument("--lr", type=float, default=None, help="inner learning rate (default: the preset's)")
    ap.add_argument("--checkpoint-every", type=int, nargs="+", default=[0],
                    help="c for checkpointed MAML, 0 meaning round(sqrt(K)); several values give one "
                         "checkpointed row each; torch_maml uses the first (default 0)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--warmup-steps", type=int, default=5, help="inner steps of each warm-up run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each point (0: default)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per point")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="skip points expected above this (default: 70%% of available RAM, 90%% of the GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="default benchmarks/bench_memory_<preset>_<device>.json")
    ap.add_argument("--plot", default=None, help="default benchmarks/bench_memory_<preset>_<device>.png")
    ap.add_argument("--point", help=argparse.SUPPRESS)
    ap.add_argument("--point-steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--point-every", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = argv
    args.preset = args.preset or ("resnet18" if args.device == "cuda" else "cnn")
    args.tasks = args.tasks or PRESETS[args.preset]["tasks"]
    args.lr = args.lr if args.lr is not None else PRESETS[args.preset]["lr"]
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.point:  # child process
        print("RESULT " + json.dumps(run_point(args)), flush=True)
        return 0
    if args.mem_limit_gb is None:
        args.mem_limit_gb = default_mem_limit_gb(args.device)
    stem = os.path.join(HERE, f"bench_memory_{args.preset}_{args.device}")
    json_path = args.json or stem + ".json"

    def save(result):  # after every point, so an interrupted sweep keeps what it measured
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)

    result = sweep(args, save)
    print(f"\nmachine: {result['machine']}; torch {result['torch']}; preset {args.preset}, T={args.tasks}, "
          f"lr {args.lr}; checkpoint every c steps, c = {' or '.join(map(str, args.checkpoint_every))} "
          f"(0: round(sqrt(K)))\n")
    print(table(result))
    print(f"\nresults written to {json_path}")
    print(plot(result, args.plot or stem + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
