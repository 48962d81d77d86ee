"""The compiled CPU kernels' AVX2 build against their baseline build (csrc/cpu/isa.h).

1. The operators alone, each in fresh processes that alternate between the
   two builds (``ATEN_CPU_CAPABILITY=default`` picks the baseline build; it
   also slows PyTorch's own kernels, which are not timed here): the [T, P]
   vector ops at the iMAML benchmark's size (T = 32, P = 113,221, the
   stride-2 net) and the fused batch-norm → ReLU layer's channels-last row
   kernels on the stride-2 net's largest activation (``[5, 32·64, 14, 14]``,
   T = 32 tasks of 5 support images), medians in ms.
2. With ``--against DIR`` (a checkout of another commit, built in place),
   the iMAML meta-gradient of ``compare_peers.py`` (stride-2 net, real
   Omniglot, T = 32) in fresh processes alternating between this checkout
   and DIR: the whole effect, where (1) cannot switch PyTorch's kernels
   apart from this library's.

    python benchmarks/bench_cpu_isa.py --threads 2 --rounds 5
    python benchmarks/bench_cpu_isa.py --threads 2 --rounds 5 --against /tmp/before --meta-rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T, P = 32, 113_221
ROWS = (5, 32 * 64, 14, 14)


def operator_times(repeats: int) -> dict:
    """{operator: median ms} in this process, with ``"isa"`` the build that ran."""
    import torch
    import imaml_ext as im
    from imaml_ext import fused_layers as fl
    from imaml_ext import ops
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ops import time_ms
    g = torch.Generator().manual_seed(0)
    x, r, p, hp = (torch.randn(T, P, generator=g) for _ in range(4))
    rs, th = (r * r).sum(1), torch.zeros(T)
    state = torch.zeros(T, dtype=torch.int32)
    theta = torch.randn(P, generator=g)
    a = torch.randn(ROWS, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(ROWS[1], generator=g), torch.randn(ROWS[1], generator=g)
    grad, u = (torch.randn(ROWS, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(2))
    saved = fl._op(a, w, b, 1e-5, 1)[1:]
    calls = {
        "cg_step_": lambda: ops.cg_step_(x, r, p, hp, rs, state, th, 1.0, 0.5),
        "prox_sgd_step_": lambda: ops.prox_sgd_step_(x, p, theta, 1e-3, 2.0, 0.0),
        "batched_sq_norm": lambda: ops.batched_sq_norm(x),
        "batched_dot": lambda: ops.batched_dot(x, r),
        "rows forward": lambda: fl._op(a, w, b, 1e-5, 1),
        "rows backward": lambda: fl._backward_op(grad, a, w, *saved, 1),
        "rows double backward": lambda: fl._double_backward_op(u, w, None, grad, a, w, *saved, 1),
    }
    resets = {"cg_step_": state.zero_}  # every task running again
    out = {name: time_ms(call, resets.get(name, lambda: None), torch.device("cpu"), repeats, 1)[0]
           for name, call in calls.items()}
    out["isa"] = im.backend().cpu_isa
    return out


def meta_gradient_seconds(rounds: int) -> float:
    """Median seconds of compare_peers' iMAML meta-gradient in this process (one warm-up)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import compare_peers as cp
    import peer_loops as pl
    model, batch = cp.build_problem("omniglot", T, cp.parse([]))  # its data root and seed
    times = []
    for k in range(rounds + 1):
        start = time.perf_counter()
        pl.imaml_ext_imaml(model, *batch, **cp.SETTINGS["imaml"])
        if k:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def _child(root: Path, env: dict, args, what: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", what, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--meta-rounds", str(args.meta_rounds)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root,
                         env=dict(os.environ, PYTHONPATH=str(root), **env))
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} in {root} failed: {out.stderr.strip()[-1500:]}")
    return json.loads(lines[-1][7:])


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    ap.add_argument("--rounds", type=int, default=5, help="process pairs per comparison")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per operator per process")
    ap.add_argument("--against", type=Path, help="a checkout of another commit, built in place: also "
                    "time the iMAML meta-gradient there and here")
    ap.add_argument("--meta-rounds", type=int, default=3, help="timed meta-gradients per process")
    ap.add_argument("--child", choices=("operators", "meta"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.child:
        import torch
        torch.set_num_threads(args.threads)
        result = (operator_times(args.repeats) if args.child == "operators"
                  else {"seconds": meta_gradient_seconds(args.meta_rounds)})
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch
    import imaml_ext as im
    print(f"`python benchmarks/bench_cpu_isa.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"{im._build._cpu_name()}, {args.threads} torch threads, torch {torch.__version__}, "
          f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, load average "
          f"{os.getloadavg()[0]:.1f}; {args.rounds} process pairs, alternating\n")
    builds = {"baseline": {"ATEN_CPU_CAPABILITY": "default"}, "mine": {}}
    runs = {name: [] for name in builds}
    for k in range(args.rounds):
        for name in (list(builds) if k % 2 == 0 else list(builds)[::-1]):
            runs[name].append(_child(ROOT, builds[name], args, "operators"))
    isa = {name: {r.pop("isa") for r in rs} for name, rs in runs.items()}
    names = {name: "/".join(map(str, sorted(isa[name], key=str))) for name in builds}
    print(f"| operator | baseline build ({names['baseline']}) ms | this CPU's build ({names['mine']}) ms "
          "| speed-up |")
    print("|---|---:|---:|---:|")
    for op in runs["baseline"][0]:
        base = statistics.median(r[op] for r in runs["baseline"])
        mine = statistics.median(r[op] for r in runs["mine"])
        print(f"| {op} | {base:.3f} | {mine:.3f} | {base / mine:.2f}× |")

    if args.against:
        seconds = {"here": [], "against": []}
        for k in range(args.rounds):
            for name in (("here", "against") if k % 2 == 0 else ("against", "here")):
                root = ROOT if name == "here" else args.against.resolve()
                seconds[name].append(_child(root, {}, args, "meta")["seconds"])
        here, there = (statistics.median(seconds[n]) for n in ("here", "against"))
        print(f"\niMAML meta-gradient (stride-2 net, T = {T}): {args.against} {there:.3f} s, "
              f"this checkout {here:.3f} s: {there / here:.2f}× "
              f"(per process: {', '.join(f'{s:.2f}' for s in seconds['against'])} against "
              f"{', '.join(f'{s:.2f}' for s in seconds['here'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
