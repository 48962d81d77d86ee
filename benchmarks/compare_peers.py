"""imaml_ext against the libraries people use today, on the same meta-gradients.

Works (meta-gradient of the summed query cross-entropy of T tasks, real
Omniglot 5-way 1-shot, 15 queries per class, from ``imaml_ext.data``):

* ``imaml``: 16 inner GD steps (lr 0.1), λ = 2, 5 CG steps — vs TorchOpt's
  implicit differentiation (``custom_root`` + ``solve_cg``) as its iMAML
  example writes it (``torchopt-example``) and in its fastest per-task form
  found (``torchopt-flat``), and vs ``reference-loop``, the official
  algorithm one task at a time in plain PyTorch
  (``benchmarks/reference_imaml.py``, ``bench_imaml.py``'s baseline);
* ``full``: second-order MAML, K = 5 SGD steps (lr 0.4) — vs higher's
  ``innerloop_ctx`` and TorchOpt's ``MetaSGD``;
* ``first_order``: first-order MAML, K = 5 — vs higher with
  ``track_higher_grads=False``;
* ``checkpointed``: K = 100 (lr 0.1), a snapshot every round(√K) steps — vs
  torch_maml's ``GradientCheckpointMAML`` with the same interval.

The peers' code is ``benchmarks/peer_loops.py`` (one task at a time, as their
documentation and examples use them); tests/test_peers.py checks it against
imaml_ext to 1e-12.  Models: ``omniglot``, the stride-2 conv net
(``imaml_ext.models.OmniglotConvNet``), ``conv4``, the max-pool Conv-4
(``imaml_ext.models.Conv4``; skipped with a message where that model is absent),
and ``conv4-84``, the Conv-4 at MiniImageNet's 3×84×84 (the Omniglot
characters resized and repeated over 3 channels: MiniImageNet's images are
not in the data folder).

Before timing, every variant's meta-gradient is computed in float64 on the
first ``--check-tasks`` tasks and compared with imaml_ext's (relative
difference printed; the run stops above ``--check-tol`` unless
``--no-check``).  imaml_ext's CG stops a task at non-positive curvature and
TorchOpt's does not, so where a task stops the iMAML gradients differ by
definition; the check says so instead of failing.  The peers run PyTorch's
batch-norm, ReLU and max-pool, so they are compared with imaml_ext with its
fused layer off (``imaml_ext.fused_layers``; the same arithmetic); the fused
layer's own difference is printed in imaml_ext's row and not
held to ``--check-tol``: its batch-norm statistics are more accurate than
PyTorch's (benchmarks/RESULTS.md, "fused"), and an ill-conditioned iMAML
system amplifies the difference.

imaml_ext runs its tasks as ``--batching`` says (``vmap``, the library's
default; ``loop``; ``compiled``, vmap with the graph-free inner steps compiled
by ``torch.compile``, timed next to an ``imaml_ext vmap`` row, its compilation
in the warm-up round; ``auto``, which times vmap and loop once and picks); the
table names what it ran.

Timing: ``--rounds`` rounds after one warm-up round; in each round every
variant of a work runs once, the order rotating between rounds, all in this
process.  Reported: the median seconds per meta-batch and the median (and
range) of the per-round ratio peer / imaml_ext.

Memory (``--memory``): each variant runs in a fresh process that first
builds the model and data; reported is the peak above what the process held
then: on the CPU the peak RSS of a first meta-batch (Linux VmHWM, reset
through /proc/self/clear_refs just before, after the memory that malloc
kept from building the data is given back) and, with glibc, the peak of the
bytes malloc holds for the program during a second one, sampled after every
PyTorch operator (``imaml_ext.cpu_malloc.heap_stats``: it leaves out
freed memory that malloc keeps, which the RSS counts); on CUDA
``torch.cuda.max_memory_allocated`` minus what was allocated before.

Profile (``--profile``): ``torch.profiler`` over one meta-batch of each
variant, the ops with the most self time; on the CPU also the copies by the
op that called them and oneDNN's own primitive times (its weight reorders
happen inside the convolution calls).

    python benchmarks/compare_peers.py --threads 2 --rounds 5
    python benchmarks/compare_peers.py --works imaml --models omniglot conv4 --memory
    python benchmarks/compare_peers.py --device cuda --rounds 7 --memory
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
from typing import Callable, Dict, List, NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import peer_loops as pl  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from imaml_ext.batching import BATCHING_MODES  # noqa: E402
from imaml_ext.cpu_malloc import heap_stats, release_freed_memory  # noqa: E402

MB = 2.0 ** 20
WORKS = ("imaml", "full", "first_order", "checkpointed")
MODELS = ("omniglot", "conv4", "conv4-84")
# The settings: inner steps, inner learning rate and the method's own options.
SETTINGS = {
    "imaml": dict(steps=16, lr=0.1, lam=2.0, cg_steps=5),
    "full": dict(steps=5, lr=0.4),
    "first_order": dict(steps=5, lr=0.4),
    "checkpointed": dict(steps=100, lr=0.1),
}


class Variant(NamedTuple):
    name: str        # "imaml_ext" is the baseline of its work
    peer: str        # the package it needs ("" for imaml_ext)
    fn: Callable[..., None]
    options: Dict[str, object]


def variants(work: str, steps: int, task_chunk: int, budget_mb: float = 0.0,
             batching: str = "vmap") -> List[Variant]:
    """imaml_ext first (its tasks run as ``batching`` says; full MAML, which has no
    graph-free steps to compile, runs ``"compiled"`` as ``"vmap"``), with
    ``"compiled"`` imaml_ext with ``"vmap"`` next, then the peers that implement
    ``work`` (and, for checkpointed MAML with ``budget_mb``, imaml_ext with that
    memory_budget)."""
    every = max(1, round(steps ** 0.5))
    if work == "full" and batching == "compiled":
        batching = "vmap"
    ours = {"batching": batching}

    def imaml_ext(fn, options):
        eager = [Variant("imaml_ext vmap", "", fn, dict(options, batching="vmap"))] if batching == "compiled" else []
        return [Variant("imaml_ext", "", fn, options), *eager]

    if work == "imaml":
        chunk = {"task_chunk": task_chunk} if task_chunk else {}
        return [*imaml_ext(pl.imaml_ext_imaml, dict(ours, **chunk)),
                Variant("torchopt-flat", "torchopt", pl.torchopt_imaml_flat, {}),
                Variant("torchopt-example", "torchopt", pl.torchopt_imaml_example, {}),
                Variant("reference-loop", "", pl.reference_imaml_loop, {})]
    maml = dict(ours, mode=work)
    if work == "full":
        return [*imaml_ext(pl.imaml_ext_maml, maml),
                Variant("higher", "higher", pl.higher_maml, {}),
                Variant("torchopt-MetaSGD", "torchopt", pl.torchopt_metasgd_maml, {})]
    if work == "first_order":
        return [*imaml_ext(pl.imaml_ext_maml, maml),
                Variant("higher", "higher", pl.higher_maml, dict(first_order=True))]
    budget = [Variant(f"imaml_ext budget {budget_mb:g} MB", "", pl.imaml_ext_maml,
                      dict(maml, memory_budget=int(budget_mb * MB)))] if budget_mb else []
    return [*imaml_ext(pl.imaml_ext_maml, dict(maml, checkpoint_every=every)),
            *budget,
            Variant("torch_maml", "torch_maml", pl.torch_maml_checkpointed, dict(checkpoint_steps=every))]


def build_problem(model_name: str, tasks: int, args, dtype=None):
    """(model, (support_x, support_y, query_x, query_y)) on ``args.device``; None if the model is absent."""
    import torch
    import imaml_ext.models as models
    from imaml_ext.data import Omniglot, TaskSampler
    torch.manual_seed(args.seed)
    side = 84 if model_name == "conv4-84" else 28
    if model_name == "omniglot":
        model = models.OmniglotConvNet(ways=5)
    else:
        if not hasattr(models, "Conv4"):
            return None
        model = models.Conv4(ways=5, in_channels=3 if side == 84 else 1, image_size=side)
    dtype = dtype or torch.float32
    data = Omniglot(args.data, subset="train")
    batch = tuple(TaskSampler(data.images, ways=5, shots=1, queries=15, seed=args.seed, device=args.device,
                              dtype=dtype).sample(tasks))
    if side == 84:  # MiniImageNet's shape: the characters resized and repeated over 3 channels
        batch = tuple(_resized(x, side, 3) if x.is_floating_point() else x for x in batch)
    return model.to(args.device, dtype), batch


def _resized(images, side: int, channels: int):
    """``[T, n, 1, h, w]`` images bilinearly resized to ``side`` and repeated to ``channels``."""
    import torch.nn.functional as F
    T, n = images.shape[:2]
    out = F.interpolate(images.flatten(0, 1), size=(side, side), mode="bilinear", align_corners=False)
    return out.expand(-1, channels, -1, -1).reshape(T, n, channels, side, side).contiguous()


def run_variant(v: Variant, model, batch, settings):
    """One meta-gradient of ``v``; imaml_ext's variants return their ``adapted.info``."""
    return v.fn(model, *batch, **settings, **v.options)


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


# --- the float64 check -------------------------------------------------------------------------

def check(work: str, model_name: str, vs: List[Variant], settings, args) -> Dict[str, str]:
    """Relative difference of each peer's float64 meta-gradient to imaml_ext's with its
    fused layer off, and of imaml_ext's with it to without it, as text."""
    import torch
    import imaml_ext as im
    import torch.nn.functional as F
    from imaml_ext import fused_layers
    model, batch = build_problem(model_name, args.check_tasks, args, torch.float64)
    note = ""
    if work == "imaml":
        # imaml_ext's CG stops a task at non-positive curvature (pᵀAp ≤ 0) and
        # TorchOpt's does not: the gradients are compared on the tasks whose CG
        # runs all its steps in imaml_ext.
        adapted = im.imaml(model, batch[0], batch[1], F.cross_entropy, lam=settings["lam"],
                           inner_steps=settings["steps"], inner_lr=settings["lr"], cg_steps=settings["cg_steps"])
        adapted.loss(batch[2], batch[3]).sum().backward()
        full_run = (adapted.info["cg"].state == im.ops.CGState.RUNNING).nonzero().flatten()
        if len(full_run) < args.check_tasks:
            note = (f" (on the {len(full_run)} of {args.check_tasks} tasks whose CG runs all steps; the "
                    f"others stop at non-positive curvature, which TorchOpt's CG does not)")
            if not len(full_run):
                return {v.name: "not compared" + note for v in vs[1:]}
            batch = tuple(t[full_run] for t in batch)
    fused = pl.meta_gradient(vs[0].fn, model, batch, **settings, **vs[0].options)
    with fused_layers.unfused():
        base = pl.meta_gradient(vs[0].fn, model, batch, **settings, **vs[0].options)
    out = {vs[0].name: f"fused layer vs unfused {pl.relative_difference(fused, base):.1e}"}
    for v in vs[1:]:
        diff = pl.relative_difference(pl.meta_gradient(v.fn, model, batch, **settings, **v.options), base)
        out[v.name] = f"{diff:.1e}" + note
        if diff > args.check_tol:
            raise SystemExit(f"{work}/{model_name}: {v.name}'s float64 meta-gradient differs from imaml_ext's "
                             f"by {diff:.2e} > --check-tol {args.check_tol:g}; not timing unequal work")
    return out


# --- timing, interleaved -------------------------------------------------------------------------

def _minor_faults() -> int:
    """Page faults of this process served without I/O so far (fresh pages, zeroed)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_work(vs: List[Variant], model, batch, settings, args):
    """Seconds and page faults of each variant per round, and the last ``adapted.info``
    of imaml_ext's.  The faults show where a variant paid for fresh memory: one whose
    large blocks no longer fit the heap's holes after the others ran grows the heap."""
    times: Dict[str, List[float]] = {v.name: [] for v in vs}
    faults: Dict[str, List[int]] = {v.name: [] for v in vs}
    info = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        shift = r % len(vs)
        for v in vs[shift:] + vs[:shift]:
            sync(args.device)
            f0, t0 = _minor_faults(), time.perf_counter()
            out = run_variant(v, model, batch, settings)
            sync(args.device)
            if r:
                times[v.name].append(time.perf_counter() - t0)
                faults[v.name].append(_minor_faults() - f0)
            if v.name == "imaml_ext":
                info = out
            model.zero_grad(set_to_none=True)
    return times, faults, info


#: The works an in-process A/B of imaml_ext (:func:`alternate`) times.
AB_WORKS = ("first_order", "full", "imaml")


def ab_parser(description: str, models: List[str], rounds: int) -> argparse.ArgumentParser:
    """The command line of an A/B benchmark built on :func:`alternate`."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=models, choices=MODELS)
    ap.add_argument("--works", nargs="+", default=list(AB_WORKS), choices=AB_WORKS)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=rounds, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    return ap


def alternate(switch: Callable[[bool], None], model, batch, work: str, rounds: int) -> Dict[bool, List[float]]:
    """imaml_ext's meta-gradient of ``work`` with ``switch(True)`` and with ``switch(False)``
    called before every meta-batch, the two alternated round by round (their order
    swapped every other round), all in this process; the seconds of each of the
    ``rounds`` rounds after a warm-up round, in round order."""
    settings = SETTINGS[work]
    ours = variants(work, settings["steps"], task_chunk=0)[0]  # imaml_ext, batching="vmap"
    seconds: Dict[bool, List[float]] = {True: [], False: []}
    for r in range(rounds + 1):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            switch(on)
            start = time.perf_counter()
            run_variant(ours, model, batch, settings)
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if r:
                seconds[on].append(elapsed)
    return seconds


def ab_table(switch: Callable[[bool], None], problem, args, on: str, off: str) -> None:
    """Prints the A/B of :func:`alternate` over ``args.models`` × ``args.works``: median
    seconds with ``switch(True)`` (named ``on``) and ``switch(False)`` (``off``), and off / on;
    ``switch(True)`` again at the end, however it ends."""
    print(f"| model | work | {on} s | {off} s | {off} / {on} |\n|---|---|---:|---:|---:|")
    try:
        for model_name in args.models:
            model, batch = build_problem(model_name, args.tasks, problem)
            for work in args.works:
                median = {on: statistics.median(s)
                          for on, s in alternate(switch, model, batch, work, args.rounds).items()}
                print(f"| {model_name} | {work} | {median[True]:.3f} | {median[False]:.3f} | "
                      f"{median[False] / median[True]:.3f} |", flush=True)
    finally:
        switch(True)


def profile(vs: List[Variant], model, batch, settings, args) -> str:
    """Per variant: the ops with the most self time; on the CPU also the copies by
    the op that called them (:func:`copies_by_caller`) and oneDNN's primitives
    (:func:`onednn_primitives`), each over one meta-batch after a warm-up."""
    import torch
    from torch.profiler import ProfilerActivity, profile as prof
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    out = []
    for v in vs:
        run_variant(v, model, batch, settings)  # warm
        model.zero_grad(set_to_none=True)
        with prof(activities=activities, record_shapes=True) as p:
            run_variant(v, model, batch, settings)
            sync(args.device)
        model.zero_grad(set_to_none=True)
        key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        out.append(f"#### {v.name}\n\n```\n{p.key_averages().table(sort_by=key, row_limit=args.profile_rows)}\n```")
        if args.device == "cpu":
            out.append(copies_by_caller(p.events(), args.profile_rows))
            out.append(onednn_primitives(lambda: run_variant(v, model, batch, settings)))
            model.zero_grad(set_to_none=True)
    return "\n\n".join(out)


COPY_OPS = ("aten::copy_", "aten::cat")


def copies_by_caller(events, rows: int) -> str:
    """Self time of the copying ops (:data:`COPY_OPS`) grouped by op, first input's
    shape and the chain of ops above them: which layout changes a meta-batch pays."""
    groups: Dict[tuple, List[float]] = {}
    for e in events:
        if e.name not in COPY_OPS:
            continue
        chain, parent = [], e.cpu_parent
        while parent is not None and len(chain) < 3:
            chain.append(parent.name.replace("aten::", ""))
            parent = parent.cpu_parent
        shape = list(e.input_shapes[0]) if e.input_shapes and e.input_shapes[0] else []
        entry = groups.setdefault((e.name, str(shape), " < ".join(chain)), [0.0, 0])
        entry[0] += e.self_cpu_time_total / 1e3
        entry[1] += 1
    total = sum(ms for ms, _ in groups.values())
    lines = [f"copies by caller: {total:.1f} ms in all", "", "| ms | calls | op | shape | called from |",
             "|---:|---:|---|---|---|"]
    for (name, shape, chain), (ms, calls) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"| {ms:.1f} | {calls} | {name} | {shape} | {chain} |")
    return "\n".join(lines)


def onednn_primitives(run: Callable[[], object]) -> str:
    """:func:`onednn_table` of oneDNN's verbose output over ``run()``.  The weight
    reorders that oneDNN does inside a convolution call show up there and in no
    ``torch.profiler`` row of their own."""
    import tempfile
    import torch
    with tempfile.TemporaryFile(mode="w+") as captured:
        # oneDNN prints from C++ to file descriptor 1: it is pointed at the file meanwhile
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(captured.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                run()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        return onednn_table(captured.read())


def onednn_table(verbose: str) -> str:
    """oneDNN's execution times in its verbose output ``verbose``, summed by primitive,
    propagation kind and problem (oneDNN's shape string), reorders by source and
    destination format and shape; the totals per primitive and propagation kind first."""
    groups: Dict[str, List[float]] = {}
    for line in verbose.splitlines():
        # onednn_verbose,v1,primitive,exec,cpu,<primitive>,<implementation>,<propagation>,
        # <memory descriptors>,<attributes>,<auxiliary>,<problem>,<milliseconds>
        fields = line.split(",")
        if len(fields) < 13 or fields[2:4] != ["primitive", "exec"]:
            continue
        kind, problem = fields[5], fields[-2]
        if kind == "reorder":  # descriptors "src:f32::blocked:<format>:..." and "dst:..."
            what = f"reorder {' -> '.join(d.split(':')[4] for d in fields[8].split())} {problem}"
        else:
            what = f"{kind} {fields[7]} {problem}"
        entry = groups.setdefault(what, [0.0, 0])
        entry[0] += float(fields[-1])
        entry[1] += 1
    kinds: Dict[str, List[float]] = {}
    for what, (ms, calls) in groups.items():
        entry = kinds.setdefault(" ".join(what.split()[:2]) if not what.startswith("reorder") else "reorder",
                                 [0.0, 0])
        entry[0] += ms
        entry[1] += calls
    total = sum(ms for ms, _ in groups.values())
    lines = [f"oneDNN primitives: {total:.1f} ms in all", "", "| ms | calls | primitive |", "|---:|---:|---|"]
    for table in (kinds, groups):
        for what, (ms, calls) in sorted(table.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"| {ms:.1f} | {calls} | {what} |")
    return "\n".join(lines)


# --- memory, one fresh process per variant -------------------------------------------------------

def _vm(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


class _HeapPeak(TorchDispatchMode):
    """Inside it, ``bytes`` is the most that malloc held for the program
    (:func:`imaml_ext.cpu_malloc.heap_stats`) after any PyTorch operator, forward or
    backward; ``start`` what it held on entry."""

    def __enter__(self):
        self.start = self.bytes = heap_stats()["in_use"]
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.bytes = max(self.bytes, heap_stats()["in_use"])
        return out


def run_point(args) -> dict:
    """One meta-batch of one variant in this (fresh) process; its peak memory above what
    the process held before it: on the CPU the peak RSS (VmHWM, reset just before) and,
    with glibc, the peak of the bytes malloc holds for the program during a second
    meta-batch, sampled after every operator (freed memory that malloc keeps and the
    first run's one-time allocations are in the first and not in the second; the second
    is sampled, not the first, because sampling changed the order of allocations and
    with it the RSS); on CUDA the peak allocation."""
    import gc
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    work, model_name, name = args.point.split(":")
    settings = dict(SETTINGS[work], steps=args.steps.get(work, SETTINGS[work]["steps"]))
    model, batch = build_problem(model_name, args.tasks_of[work], args)
    v = next(v for v in variants(work, settings["steps"], args.task_chunk, args.budget_mb, args.batching)
             if v.name == name)
    cuda = args.device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        # what building the data freed and malloc keeps would otherwise be reused without
        # counting: more of it at small T, where the data took less (RESULTS.md, "trim")
        release_freed_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        start = _vm("VmRSS")
    t0 = time.perf_counter()
    run_variant(v, model, batch, settings)
    sync(args.device)
    seconds = time.perf_counter() - t0
    if cuda:
        return dict(seconds=seconds, memory_mb=(torch.cuda.max_memory_allocated() - start) / MB)
    out = dict(seconds=seconds, memory_mb=_vm("VmHWM") - start)
    if heap_stats() is not None:  # a second meta-batch, sampled: the steady state
        model.zero_grad(set_to_none=True)
        gc.collect()
        with _HeapPeak() as heap:
            run_variant(v, model, batch, settings)
        out["heap_mb"] = (heap.bytes - heap.start) / MB
    return out


def child(args, point: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args.argv, "--point", point]
    res = subprocess.run(cmd, capture_output=True, text=True)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
    return dict(error=f"exit {res.returncode}: {' | '.join(tail)}")


def memory(work: str, model_name: str, vs: List[Variant], args) -> Dict[str, dict]:
    """Per variant ``{"memory_mb": ..., "heap_mb": ...}`` (or ``{"memory_mb": error}``)."""
    out = {}
    for v in vs:
        r = child(args, f"{work}:{model_name}:{v.name}")
        out[v.name] = {k: r[k] for k in ("memory_mb", "heap_mb") if k in r} or {"memory_mb": r.get("error")}
    return out


# --- report ----------------------------------------------------------------------------------

def machine(args) -> str:
    import torch
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    from imaml_ext._build import _cpu_name
    from imaml_ext.cpu_malloc import exact_fit_allocator
    allocator = "imaml_ext's exact-fit" if exact_fit_allocator() else "PyTorch's"
    return (f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, {allocator} CPU allocator")


def table(rows: List[dict], args) -> str:
    head = ("| work | model | T | variant | median s / meta-batch | peer / imaml_ext: median (min–max) "
            "| peak RSS MB | peak malloc'd MB | float64 rel. diff |")
    lines = [head, "|---|---|---:|---|---:|---|---:|---:|---|"]
    for r in rows:
        ratio = ((f"1 ({r['batching']})" if "batching" in r else "1") if r["variant"] == "imaml_ext" else
                 f"{r['ratio']:.2f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})" if "ratio" in r else "-")
        mem, heap = (f"{r[k]:.0f}" if isinstance(r.get(k), float) else r.get(k, "-")
                     for k in ("memory_mb", "heap_mb"))
        secs = f"{r['seconds']:.3f}" if "seconds" in r else r.get("error", "-")
        lines.append(f"| {r['work']} | {r['model']} | {r['tasks']} | {r['variant']} | {secs} | {ratio} | {mem} "
                     f"| {heap} | {r.get('check', '-')} |")
    return "\n".join(lines)


def compare(args) -> List[dict]:
    import torch
    rows: List[dict] = []
    for model_name in args.models:
        for work in args.works:
            settings = dict(SETTINGS[work], steps=args.steps.get(work, SETTINGS[work]["steps"]))
            tasks = args.tasks_of[work]
            problem = build_problem(model_name, tasks, args)
            if problem is None:
                print(f"[compare_peers] {model_name}: imaml_ext.models has no Conv4 here; skipped", flush=True)
                continue
            vs = []
            for v in variants(work, settings["steps"], args.task_chunk, args.budget_mb, args.batching):
                if args.variants and v.name not in args.variants:
                    continue
                why = v.peer and pl.peer_status(v.peer)
                if why:
                    rows.append(dict(work=work, model=model_name, tasks=tasks, variant=v.name, error="skipped"))
                    print(f"[compare_peers] {v.name}: {why}", flush=True)
                else:
                    vs.append(v)
            print(f"[compare_peers] {work} / {model_name}, T={tasks}, {settings}", flush=True)
            checks = {} if args.no_check else check(work, model_name, vs, settings, args)
            print(f"[compare_peers]   float64 check on {args.check_tasks} tasks: {checks}", flush=True)
            model, batch = problem
            times, faults, info = time_work(vs, model, batch, settings, args) if args.rounds else ({}, {}, {})
            if "batching" in info:
                print(f"[compare_peers]   imaml_ext batching: {info['batching']}", flush=True)
            mem = memory(work, model_name, vs, args) if args.memory else {}
            if args.profile:
                print(profile(vs, model, batch, settings, args), flush=True)
            base = times.get("imaml_ext")
            for v in vs:
                row = dict(work=work, model=model_name, tasks=tasks, variant=v.name, check=checks.get(v.name, "-"))
                if v.name == "imaml_ext" and "batching" in info:
                    row["batching"] = info["batching"]["batching"]
                if v.name in times:
                    row["seconds"] = statistics.median(times[v.name])
                    row["times_s"] = times[v.name]
                    row["minor_faults"] = faults[v.name]
                    if base and v.name != "imaml_ext":
                        ratios = [p / b for p, b in zip(times[v.name], base)]
                        row.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
                row.update(mem.get(v.name, {}))
                rows.append(row)
                print(f"[compare_peers]   {v.name:>18}: {row.get('seconds', float('nan')):.3f} s"
                      + (f"  ratio {row['ratio']:.2f}" if "ratio" in row else "")
                      + (f"  page faults per round {row['minor_faults']}" if "minor_faults" in row else "")
                      + (f"  RSS {row['memory_mb']} MB" if "memory_mb" in row else "")
                      + (f"  malloc'd {row['heap_mb']:.1f} MB" if "heap_mb" in row else ""), flush=True)
            del problem, model, batch
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return rows


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--works", nargs="+", default=list(WORKS), choices=WORKS)
    ap.add_argument("--models", nargs="+", default=["omniglot"], choices=MODELS)
    ap.add_argument("--tasks", type=int, default=32, help="T, tasks per meta-batch")
    ap.add_argument("--checkpointed-tasks", type=int, default=None,
                    help="T for the checkpointed work (default --tasks)")
    ap.add_argument("--checkpointed-steps", type=int, default=SETTINGS["checkpointed"]["steps"])
    ap.add_argument("--variants", nargs="+", default=None,
                    help="only these variants (names as in the table, e.g. imaml_ext higher)")
    ap.add_argument("--budget-mb", type=float, default=0.0,
                    help="also time checkpointed MAML with memory_budget of this many MB (0: not)")
    ap.add_argument("--task-chunk", type=int, default=0, help="imaml_ext iMAML's task_chunk (0: none)")
    ap.add_argument("--batching", default="vmap", choices=BATCHING_MODES,
                    help="how imaml_ext runs the tasks (imaml_ext.batching; 'auto' measures and picks, "
                         "the table says what it picked)")
    ap.add_argument("--pytorch-allocator", action="store_true",
                    help="keep PyTorch's CPU allocator instead of imaml_ext's exact-fit one (A/B of "
                         "imaml_ext.cpu_malloc.exact_fit_allocator; the malloc settings stay)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up (0: no timing)")
    ap.add_argument("--memory", action="store_true", help="peak memory, a fresh process per variant")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler table per variant; on the CPU also copies by caller and oneDNN's primitives")
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--check-tasks", type=int, default=4, help="tasks of the float64 gradient check")
    ap.add_argument("--check-tol", type=float, default=1e-10)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--data", default=os.environ.get("IMAML_EXT_DATA", "/work/shared/data"),
                    help="data root holding omniglot/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--point", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = argv
    args.steps = {"checkpointed": args.checkpointed_steps}
    args.tasks_of = {w: args.tasks for w in WORKS}
    args.tasks_of["checkpointed"] = args.checkpointed_tasks or args.tasks
    return args


def choose_allocator(args) -> None:
    """The CPU memory settings of imaml_ext.cpu_malloc now, not at the first TaskLoss,
    with PyTorch's allocator put back under ``--pytorch-allocator``."""
    from imaml_ext import cpu_malloc
    if args.device == "cpu" and cpu_malloc.reuse_freed_memory() and args.pytorch_allocator:
        cpu_malloc.exact_fit_allocator(False)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    choose_allocator(args)
    if args.point:
        print("RESULT " + json.dumps(run_point(args)), flush=True)
        return 0
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    versions = ", ".join(f"{p} {pl.peer_version(p)}" for p in pl.PEERS)
    print(f"[compare_peers] {machine(args)}; {versions}; load {os.getloadavg()[0]:.1f}", flush=True)
    rows = compare(args)
    print(f"\n`python benchmarks/compare_peers.py {' '.join(argv)}`\n\n{machine(args)}; {versions}; "
          f"load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds after a warm-up\n")
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(args), versions=versions, argv=argv, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
