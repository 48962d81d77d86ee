"""Fused ops (imaml_ext.ops) against eager PyTorch.

For each op and shape [T, P] three variants are timed on the same values:
  eager    the PyTorch reference (imaml_ext.ops.reference) on the flat [T, P]
           buffers: what runs without the extension
  foreach  the same math over per-parameter lists of [T, *shape] tensors with
           torch._foreach_* ops and one reduction per tensor (the running-task
           mask of cg_step_ only zeroes alpha and beta: a timing baseline, not
           a drop-in replacement)
  fused    the compiled kernel through imaml_ext.ops
Mutated inputs are restored before every repetition, outside the timed region.

Parameter layouts: "omniglot" is the iMAML Omniglot conv net (4 x [conv 3x3,
64 channels, BN], linear 256 -> 5; P = 113,221); "resnet18" is torchvision's
ResNet-18 (P = 11,689,512). CUDA times use CUDA events (median of --reps,
default 20); CPU times use perf_counter (median of --reps, default 7).

On CUDA, one call between two syncs is mostly host latency at the Omniglot
size, so the fused op is also timed in bursts: --burst calls back to back
between two events, each on its own set of inputs (so that no call finds the
previous one's data in L2), restored outside the timed region. Each burst's
time per call gives the op's bandwidth, GB/s = the bytes it must move (each
[T, P] input read once, each output written once: BYTES) / time, printed next
to a same-size copy_ timed the same way in the same run (its bytes: one read
and one write), and the fraction of that copy rate.

    python benchmarks/bench_ops.py --device cpu --skip-large
    python benchmarks/bench_ops.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from imaml_ext import _build, ops

OPS = ["cg_step_", "prox_sgd_step_", "adjoint_sgd_step_", "batched_dot", "batched_sq_norm"]


def omniglot_shapes():
    shapes = []
    for c_in in (1, 64, 64, 64):
        shapes += [(64, c_in, 3, 3), (64,), (64,), (64,)]  # conv weight, bias, BN weight, bias
    shapes += [(5, 256), (5,)]
    return shapes


def resnet18_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += [(c_out, c_in, 3, 3), (c_out,), (c_out,), (c_out, c_out, 3, 3), (c_out,),
                       (c_out,)]
            if block == 0 and (stride != 1 or c_in != c_out):
                shapes += [(c_out, c_in, 1, 1), (c_out,), (c_out,)]
            c_in = c_out
    shapes += [(1000, 512), (1000,)]
    return shapes


LAYOUTS = {"omniglot": omniglot_shapes, "resnet18": resnet18_shapes}


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


class Buffers:
    """Named [T, P] buffers, each also held as a list of per-parameter
    [T, *shape] tensors with the same values, restorable to their start values."""

    def __init__(self, T, shapes, dtype, device, gen):
        self.T, self.shapes, self.dtype, self.device, self.gen = T, shapes, dtype, device, gen
        self.P = sum(numel(s) for s in shapes)
        self.flat, self.lists, self.saved = {}, {}, {}

    def add(self, name, values):
        self.flat[name] = values
        self.saved[name] = values.clone()
        self.lists[name] = [piece.clone() for piece in self.split(values)]

    def normal(self, *shape):
        return torch.randn(*shape, generator=self.gen, dtype=self.dtype, device=self.device)

    def randn(self, name):
        values = self.normal(self.T, self.P)
        self.add(name, values)
        return values

    def split(self, flat):
        pieces, offset = [], 0
        for shape in self.shapes:
            n = numel(shape)
            pieces.append(flat[:, offset:offset + n].reshape(flat.shape[0], *shape))
            offset += n
        return pieces

    def reset(self, *names):
        for name in names:
            self.flat[name].copy_(self.saved[name])
            for piece, src in zip(self.lists[name], self.split(self.saved[name])):
                piece.copy_(src)


def per_task_sum(products):
    """Per-task sums of a list of [T, ...] tensors: [T]."""
    return torch.stack([t.flatten(1).sum(1) for t in products]).sum(0)


def task_views(v, like):
    """[T] -> [T, 1, ...] views broadcasting against each tensor of `like`."""
    return [v.view(-1, *([1] * (t.dim() - 1))) for t in like]


def make_case(op, bufs):
    """{variant: fn} and a reset() restoring the inputs, for one op."""
    T, dtype, device = bufs.T, bufs.dtype, bufs.device
    L = bufs.lists
    if op == "cg_step_":
        a, b = 1.0, 0.5
        x, r, p = bufs.randn("x"), bufs.randn("r"), bufs.randn("p")
        Hp = 0.5 * p + 0.1 * bufs.normal(T, bufs.P)
        bufs.add("Hp", Hp)
        rs0 = (r * r).sum(1)
        rs, state = rs0.clone(), torch.zeros(T, dtype=torch.int32, device=device)
        thr = torch.zeros(T, dtype=dtype, device=device)

        def reset():
            bufs.reset("x", "r", "p")
            rs.copy_(rs0)
            state.zero_()

        def foreach():
            Ap = torch._foreach_add(torch._foreach_mul(L["p"], a), torch._foreach_mul(L["Hp"], b))
            pAp = per_task_sum(torch._foreach_mul(L["p"], Ap))
            running = state == 0
            step = running & torch.isfinite(pAp) & (pAp > 0)
            alpha = torch.where(step, rs / pAp, 0)
            alphas = task_views(alpha, L["x"])
            torch._foreach_addcmul_(L["x"], L["p"], alphas)
            torch._foreach_addcmul_(L["r"], Ap, alphas, value=-1)
            rs_new = per_task_sum(torch._foreach_mul(L["r"], L["r"]))
            beta = torch.where(step, rs_new / rs, 0)
            torch._foreach_mul_(L["p"], task_views(beta, L["p"]))
            torch._foreach_add_(L["p"], L["r"])
            state.copy_(torch.where(step & (rs_new <= thr), 1, state))
            rs.copy_(torch.where(step, rs_new, rs))

        args = (x, r, p, Hp, rs, state, thr, a, b)
        return {"eager": lambda: ops.reference.cg_step_(*args), "foreach": foreach,
                "fused": lambda: ops.cg_step_(*args)}, reset

    if op == "prox_sgd_step_":
        lr, lam, max_norm = 0.1, 2.0, 1.0
        phi, g = bufs.randn("phi"), bufs.randn("g")
        theta = bufs.normal(bufs.P)
        thetas = [t[0].clone() for t in bufs.split(theta.unsqueeze(0))]

        def foreach():
            norm = per_task_sum(torch._foreach_mul(L["g"], L["g"])).sqrt()
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            step = torch._foreach_sub(L["phi"], thetas)
            torch._foreach_mul_(step, lam)
            torch._foreach_addcmul_(step, L["g"], task_views(scale, L["g"]))
            torch._foreach_add_(L["phi"], step, alpha=-lr)

        args = (phi, g, theta, lr, lam, max_norm)
        return {"eager": lambda: ops.reference.prox_sgd_step_(*args), "foreach": foreach,
                "fused": lambda: ops.prox_sgd_step_(*args)}, lambda: bufs.reset("phi")

    if op == "adjoint_sgd_step_":
        lr = 0.1
        adj, Ha, g = bufs.randn("adj"), bufs.randn("Ha"), bufs.randn("g")
        lr_grad = torch.zeros(T, dtype=dtype, device=device)

        def foreach():
            lr_grad.sub_(per_task_sum(torch._foreach_mul(L["g"], L["adj"])))
            torch._foreach_add_(L["adj"], L["Ha"], alpha=-lr)

        def reset():
            bufs.reset("adj")
            lr_grad.zero_()

        args = (adj, Ha, g, lr_grad, lr)
        return {"eager": lambda: ops.reference.adjoint_sgd_step_(*args), "foreach": foreach,
                "fused": lambda: ops.adjoint_sgd_step_(*args)}, reset

    if op == "batched_dot":
        x, y = bufs.randn("x"), bufs.randn("y")
        return {"eager": lambda: ops.reference.batched_dot(x, y),
                "foreach": lambda: per_task_sum(torch._foreach_mul(L["x"], L["y"])),
                "fused": lambda: ops.batched_dot(x, y)}, lambda: None

    if op == "batched_sq_norm":
        x = bufs.randn("x")
        return {"eager": lambda: ops.reference.batched_sq_norm(x),
                "foreach": lambda: per_task_sum(torch._foreach_mul(L["x"], L["x"])),
                "fused": lambda: ops.batched_sq_norm(x)}, lambda: None
    raise ValueError(op)


# [T, P] passes each op must make at the least (reads + writes), and whether
# it also reads a [P] vector: cg_step_ reads x, r, p, Hp and writes x, r, p;
# prox_sgd_step_ reads phi, g (and theta) and writes phi; adjoint_sgd_step_
# reads adj, Ha, g and writes adj; the reductions read their inputs.
BYTES = {"cg_step_": (7, False), "prox_sgd_step_": (3, True), "adjoint_sgd_step_": (4, False),
         "batched_dot": (2, False), "batched_sq_norm": (1, False)}


def op_bytes(op, T, P, element_size):
    passes, per_param = BYTES[op]
    return (passes * T * P + (P if per_param else 0)) * element_size


def burst_ms(calls, resets, reps):
    """Median CUDA-event time per call of calls[0](), ..., calls[-1]() run back
    to back, resets (outside the timed region) before each burst."""
    for fn in calls:  # warm-up
        fn()
    times = []
    for _ in range(reps):
        for reset in resets:
            reset()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for fn in calls:
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def fused_bandwidth(op, T, shapes, dtype, device, burst, reps):
    """(ms per call, GB/s) of the fused op and of a same-size copy_, timed in
    bursts over `burst` input sets, in this order, in one process."""
    sets = []
    for k in range(burst):
        gen = torch.Generator(device=device).manual_seed(k)
        bufs = Buffers(T, shapes, dtype, device, gen)
        fns, reset = make_case(op, bufs)
        bufs.lists.clear()  # the foreach copies are not needed here
        sets.append((fns["fused"], reset))
    P = sum(numel(s) for s in shapes)
    nbytes = op_bytes(op, T, P, torch.empty((), dtype=dtype).element_size())
    op_ms = burst_ms([fn for fn, _ in sets], [reset for _, reset in sets], reps)
    del sets
    pairs = [(torch.randn(T, P, dtype=dtype, device=device), torch.empty(T, P, dtype=dtype,
                                                                          device=device))
             for _ in range(burst)]
    copy_ms = burst_ms([lambda d=d, s=s: d.copy_(s) for s, d in pairs], [], reps)
    copy_bytes = 2 * pairs[0][0].numel() * pairs[0][0].element_size()
    del pairs
    return op_ms, nbytes / op_ms / 1e6, copy_ms, copy_bytes / copy_ms / 1e6


def time_ms(fn, reset, device, reps, warmup):
    """Median and minimum wall time of fn() in milliseconds."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        reset()
        fn()
    times = []
    for _ in range(reps):
        reset()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def machine(device):
    info = {
        "cpu": _build._cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backend": str(_build.backend()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--layouts", default="omniglot,resnet18",
                    help=f"comma-separated subset of {list(LAYOUTS)}")
    ap.add_argument("--skip-large", action="store_true", help="skip the resnet18 layout")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of the ops")
    ap.add_argument("--reps", type=int, help="timed repetitions (default: 20 CUDA, 7 CPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--burst", type=int, default=4,
                    help="CUDA: calls per back-to-back burst, each on its own inputs")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    reps = args.reps or (20 if device.type == "cuda" else 7)
    layouts = [name for name in args.layouts.split(",") if name]
    if args.skip_large:
        layouts = [name for name in layouts if name != "resnet18"]
    b = _build.backend()
    compiled = b.cuda if device.type == "cuda" else b.cpu

    info = machine(device)
    print(" | ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    if not compiled:
        print(f"WARNING: no compiled ops for {device.type}: 'fused' runs the PyTorch fallback",
              flush=True)
    header = (f"{'op':<18} {'device':<6} {'dtype':<8} {'shape':<14} {'eager ms':>9} "
              f"{'foreach ms':>10} {'fused ms':>9} {'vs eager':>9} {'vs foreach':>10}")
    print(header)
    print("-" * len(header), flush=True)
    rows, bandwidth = [], []
    for layout in layouts:
        shapes = LAYOUTS[layout]()
        for op in [o for o in args.ops.split(",") if o]:
            gen = torch.Generator(device=device).manual_seed(0)
            bufs = Buffers(args.tasks, shapes, dtype, device, gen)
            fns, reset = make_case(op, bufs)
            row = {"op": op, "device": device.type, "dtype": args.dtype, "layout": layout,
                   "shape": [args.tasks, bufs.P], "compiled": compiled}
            for variant, fn in fns.items():
                row[f"{variant}_ms"], row[f"{variant}_min_ms"] = time_ms(
                    fn, reset, device, reps, args.warmup)
            row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
            row["speedup_vs_foreach"] = row["foreach_ms"] / row["fused_ms"]
            rows.append(row)
            shape = f"{args.tasks}x{bufs.P}"
            print(f"{op:<18} {device.type:<6} {args.dtype:<8} {shape:<14} "
                  f"{row['eager_ms']:>9.3f} {row['foreach_ms']:>10.3f} {row['fused_ms']:>9.3f} "
                  f"{row['speedup_vs_eager']:>8.1f}x {row['speedup_vs_foreach']:>9.1f}x",
                  flush=True)
            del bufs, fns, reset
            if device.type == "cuda":
                torch.cuda.empty_cache()
                (row["burst_ms"], row["gbps"], row["copy_burst_ms"],
                 row["copy_gbps"]) = fused_bandwidth(op, args.tasks, shapes, dtype, device,
                                                     args.burst, reps)
                row["fraction_of_copy"] = row["gbps"] / row["copy_gbps"]
                bandwidth.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if bandwidth:
        print(f"\nfused ops in bursts of {args.burst} back-to-back calls (own inputs each), "
              "against copy_ of one [T, P] buffer timed the same way:")
        print(f"{'op':<18} {'shape':<14} {'ms/call':>9} {'GB/s':>8} {'copy GB/s':>10} "
              f"{'of copy':>8}")
        for row in bandwidth:
            shape = "x".join(map(str, row["shape"]))
            print(f"{row['op']:<18} {shape:<14} {row['burst_ms']:>9.4f} {row['gbps']:>8.0f} "
                  f"{row['copy_gbps']:>10.0f} {row['fraction_of_copy']:>7.0%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "command": " ".join(sys.argv), "reps": reps,
                       "burst": args.burst, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
