"""Seconds per iMAML meta-gradient on a conv net: imaml_ext vs a per-task loop.

Networks (``--model``): ``stride2-28``, the stride-2 Omniglot net (default),
``conv4-28`` and ``conv4-84``, the max-pool Conv-4 at 1×28×28 and 3×84×84.
Setting (the project's core benchmark): 5-way 1-shot, 15 queries per class,
T = 32 tasks, 16 inner GD steps, λ = 2, 5 CG steps, float32 (``--dtype``).  Each variant
runs in its own subprocess (so the PyTorch-fallback variant really loads no
compiled ops); each reports the median of ``--repeats`` timed runs after one
warm-up.  The baseline is ``reference_imaml.reference_meta_grad``, checked to
give the same meta-gradient first.

    python benchmarks/bench_imaml.py                   # CPU, all variants
    python benchmarks/bench_imaml.py --model conv4-28  # the max-pool Conv-4
    python benchmarks/bench_imaml.py --device cuda --tasks 32

On CUDA the variant ``imaml_ext-cuda-graph`` also runs: the whole
meta-gradient (inner loop, CG loop, backward) captured once in a CUDA graph
(``torch.cuda.CUDAGraph``) and replayed, which removes the host's launch cost
from the CG loop's many small kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("reference-loop", "imaml_ext-pytorch-ops", "imaml_ext", "imaml_ext-cuda-graph")
CUDA_ONLY = ("imaml_ext-cuda-graph",)


def standard_models():
    """The standard networks: name -> (build(ways), per-example input shape)."""
    from imaml_ext.models import Conv4, OmniglotConvNet
    return {
        "stride2-28": (lambda ways: OmniglotConvNet(ways=ways), (1, 28, 28)),
        "conv4-28": (lambda ways: Conv4(ways=ways, in_channels=1, image_size=28), (1, 28, 28)),
        "conv4-84": (lambda ways: Conv4(ways=ways, in_channels=3, image_size=84), (3, 84, 84)),
    }




def machine(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    from imaml_ext._build import _cpu_name
    model = _cpu_name()
    return f"{model}, {torch.get_num_threads()} threads"


def make_problem(args):
    import torch
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    build, shape = standard_models()[args.model]
    model = build(args.ways).to(dev, dtype)
    n, m = args.ways * args.shots, args.ways * args.queries
    xs = torch.rand(args.tasks, n, *shape, device=dev, dtype=dtype)
    ys = torch.arange(args.ways, device=dev).repeat_interleave(args.shots).repeat(args.tasks, 1)
    xq = torch.rand(args.tasks, m, *shape, device=dev, dtype=dtype)
    yq = torch.arange(args.ways, device=dev).repeat_interleave(args.queries).repeat(args.tasks, 1)
    return model, xs, ys, xq, yq


def one_variant(args) -> dict:
    """Runs in the child process: time one variant, return its numbers."""
    import torch
    import torch.nn.functional as F
    import imaml_ext as im
    sys.path.insert(0, HERE)
    from reference_imaml import reference_meta_grad

    model, xs, ys, xq, yq = make_problem(args)
    kw = dict(lam=args.lam, inner_steps=args.inner_steps, inner_lr=args.inner_lr, cg_steps=args.cg_steps)

    def ours():
        model.zero_grad(set_to_none=True)
        adapted = im.imaml(model, xs, ys, F.cross_entropy, hvp_mode=args.hvp_mode, **kw)
        F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten()).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    def reference():
        return reference_meta_grad(model, xs, ys, xq, yq, **kw)

    fn = reference if args.variant == "reference-loop" else ours
    if args.variant == "imaml_ext-cuda-graph":
        fn = cuda_graphed(ours)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    result = fn()  # warm-up (and the gradient for the equality check)
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    if args.check and args.variant != "reference-loop":
        ref = reference()
        rel = float((result - ref).norm() / ref.norm())
    else:
        rel = None
    return dict(variant=args.variant, backend=im.backend().name, median_s=statistics.median(times),
                times_s=times, rel_diff_vs_reference=rel)


def cuda_graphed(fn):
    """fn captured in a CUDA graph after warm-up on a side stream (as torch's
    whole-network capture does); the returned callable replays it and returns
    fn's (static) output."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def add_problem_args(ap: argparse.ArgumentParser) -> None:
    """The benchmark problem's options (device, task shape, iMAML settings, dtype, seed)."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="stride2-28", choices=list(standard_models()))
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--inner-steps", type=int, default=16)
    ap.add_argument("--inner-lr", type=float, default=0.1)
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--cg-steps", type=int, default=5)
    ap.add_argument("--hvp-mode", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="float64 checks that the meta-gradients agree to rounding")
    ap.add_argument("--seed", type=int, default=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_problem_args(ap)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.variant:  # child process
        print("RESULT " + json.dumps(one_variant(args)))
        return 0

    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            ap.error(f"unknown variant {variant!r}; choose from {VARIANTS}")
        if variant in CUDA_ONLY and args.device != "cuda":
            continue
        env = dict(os.environ)
        if variant == "imaml_ext-pytorch-ops":
            env["IMAML_EXT_NO_EXT"] = "1"
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
               "--variant", variant, "--check"]
        print(f"[bench_imaml] {variant} ...", flush=True)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stdout, out.stderr, file=sys.stderr)
            if variant in CUDA_ONLY:  # report the others all the same
                print(f"[bench_imaml] {variant} failed (above); skipped", flush=True)
                continue
            return out.returncode
        rows.append(json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:]))

    base = next((r["median_s"] for r in rows if r["variant"] == "reference-loop"), None)
    print(f"\nmachine: {machine(args.device)}; device {args.device}; {args.model}; T={args.tasks}, "
          f"{args.ways}-way {args.shots}-shot, {args.inner_steps} inner steps, {args.cg_steps} CG steps, "
          f"{args.dtype}; "
          f"median of {args.repeats}")
    print(f"| variant | backend | median s / meta-batch | speed-up vs reference loop | rel. diff of meta-grad |")
    print("|---|---|---|---|---|")
    for r in rows:
        speed = f"{base / r['median_s']:.2f}x" if base else "-"
        diff = "-" if r["rel_diff_vs_reference"] is None else f"{r['rel_diff_vs_reference']:.1e}"
        print(f"| {r['variant']} | {r['backend']} | {r['median_s']:.3f} | {speed} | {diff} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(args.device), args=vars(args), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
