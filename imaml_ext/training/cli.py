"""Command line: ``imaml-ext {train,eval,plot,demo,info}`` (also ``python -m imaml_ext``).

Exit codes: 0 success; 1 training stopped on a non-finite meta-gradient;
2 bad arguments, missing or damaged data, an unreadable checkpoint, a run
folder in use by another training, an output path that cannot be written or
a missing optional dependency (one message, no traceback; a finished
evaluation whose file could not be written is saved elsewhere and the
message says where); 130 training stopped by Ctrl-C / SIGTERM after
checkpointing.

``train`` and ``eval`` also run under ``torchrun`` (one process per CPU
share or GPU, data parallel over tasks: :mod:`imaml_ext.training.parallel`);
rank 0 prints and writes the files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from .flags import NONNEGATIVE_INT, POSITIVE_INT, add_flags

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_TRAIN_EXTRA = ("tqdm", "PIL", "matplotlib")  # modules of the 'train' extra (pyproject.toml)


class UsageError(Exception):
    """A problem to report in one message, with exit code 2."""


def _config_flags() -> List[str]:
    """The TrainConfig fields set by flags of their own (``--meta-steps`` excepted: with
    ``--resume`` it is a new total, not a change of configuration)."""
    from .experiment import TrainConfig
    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("group") and f.name != "meta_steps"]


def _run_flags() -> List[str]:
    """The RunOptions fields set by flags of their own (``--log-every``, ``--checkpoint-every``, ...)."""
    from .experiment import RunOptions
    return [f.name for f in dataclasses.fields(RunOptions) if f.metadata.get("group")]


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(name: str) -> str:
    from .experiment import check_device
    try:
        check_device(name, what="--device")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return name


def _check_output(path: Path, what: str, folder: bool = False) -> Path:
    """``path`` if it can be written (:func:`~imaml_ext.data.paths.check_output_path`), else a UsageError."""
    from ..data.paths import check_output_path
    try:
        return check_output_path(path, what, folder=folder)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _rank_device(device: str) -> str:
    """This process's device under torchrun (:func:`~.parallel.rank_device`), errors as usage errors."""
    from .parallel import rank_device
    try:
        return rank_device(device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _save_result(out: Path, text: str, command: str) -> int:
    """Write a finished result to ``out``; if that fails, to a new file in the temporary
    folder (else to stdout), saying where, and return exit code 2.  Never loses ``text``."""
    import tempfile

    from ..data.paths import atomic_file
    try:
        with atomic_file(out) as tmp:
            tmp.write_text(text)
        return 0
    except OSError as exc:
        problem = f"could not write {out} ({exc})"
    try:
        fd, name = tempfile.mkstemp(prefix=f"imaml-ext-{command}-", suffix=out.suffix)
        with open(fd, "w") as f:
            f.write(text)
        where = name
    except OSError:
        print(text, end="")
        where = "standard output above"
    print(f"imaml-ext {command}: error: {problem}; the result is saved in {where}", file=sys.stderr)
    return EXIT_USAGE


# OpenMP settings a user may have chosen; without any, the command line runs with a passive wait policy.
_OPENMP_WAIT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def _relaunch_with_passive_openmp(args) -> None:
    """Run this command again in a fresh interpreter with ``OMP_WAIT_POLICY=PASSIVE``,
    unless the user set an OpenMP wait setting or it runs one torch thread.

    By default OpenMP's idle threads spin between parallel regions; on a busy
    machine (more runnable threads than cores) the spinning threads take the
    cores from the working ones and training fell off a cliff (15× slower measured,
    benchmarks/RESULTS.md).  Passive threads sleep instead.  OpenMP reads the
    variable once, when torch loads it, hence the fresh interpreter (POSIX only)."""
    if os.name != "posix" or any(name in os.environ for name in _OPENMP_WAIT):
        return
    import torch
    if (getattr(args, "threads", None) or torch.get_num_threads()) <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    os.execve(sys.executable, [sys.executable, "-m", "imaml_ext", *sys.argv[1:]], env)


def _setup_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


# ----------------------------------------------------------------------------- train

def _check_step_memory(cfg, sampler, device: str) -> None:
    """Refuse a setting whose meta-step would not fit in the device's available memory
    (:mod:`~imaml_ext.training.memory`), warn above half of it."""
    import torch

    from .experiment import build_model
    from .memory import available_bytes, estimate_step_bytes, format_bytes

    have = available_bytes(torch.device(device))
    if have is None:
        return
    support_x, _, query_x, _ = sampler.sample(1)
    need = estimate_step_bytes(cfg.method, cfg.inner_steps, build_model(cfg), cfg.meta_batch,
                               support_x[0], query_x[0])
    what = (f"one meta-step needs about {format_bytes(need)} (estimated from the shapes: {cfg.method}, "
            f"{cfg.meta_batch} tasks of {support_x.shape[1]} support and {query_x.shape[1]} query examples)")
    if need > have:
        raise UsageError(f"{what}, but {device} has {format_bytes(have)} available; lower --meta-batch, "
                         f"--ways, --shots or --queries (or pass --no-memory-check to try anyway)")
    if need > have / 2:
        print(f"warning: {what}; {format_bytes(have)} available on {device}", file=sys.stderr, flush=True)


def _train(args) -> int:
    from .checkpoint import CHECKPOINT_NAME, checkpoint_config, find_checkpoint, load_checkpoint
    from .experiment import make_config, make_sampler
    from ..distributed import task_shard
    from .parallel import process_group
    from .methods import get_method
    from .train import RunOptions, train
    from .runfolder import RunError, check_not_busy

    parser: argparse.ArgumentParser = args.parser
    if args.list_presets:
        from .presets import describe_presets
        print(describe_presets())
        return 0
    given = [f for f in _config_flags() if getattr(args, f) is not None]
    stored = {}  # the run options of a resumed run
    if args.resume is not None:
        if given or args.preset:
            flags = ", ".join("--" + f.replace("_", "-") for f in given) or "--preset"
            parser.error(f"--resume continues a run with its saved configuration; {flags} cannot be "
                         f"changed (drop it, or start a new run with another --out)")
        checkpoint = find_checkpoint(args.resume)
        state = load_checkpoint(checkpoint)
        cfg, stored = checkpoint_config(state, checkpoint), state.get("run", {})
        out_dir = Path(args.out) if args.out else checkpoint.parent
    else:
        try:
            cfg = make_config(args.dataset, args.preset, meta_steps=args.meta_steps,
                              **{f: getattr(args, f) for f in given if f != "dataset"})
        except ValueError as exc:
            parser.error(str(exc))
        out_dir = Path(args.out) if args.out else Path("out") / "train" / cfg.name
        try:
            check_not_busy(out_dir)  # a live run says so, rather than "already holds a run"
        except RunError as exc:
            raise UsageError(str(exc)) from None
        if (out_dir / CHECKPOINT_NAME).exists():
            parser.error(f"{out_dir} already holds a run ({CHECKPOINT_NAME}); continue it with "
                         f"--resume {out_dir}, or choose another --out")
    # Run options: given on the command line, else as the resumed run had them, else the defaults.
    args.threads = args.threads or stored.get("threads")
    args.data = args.data or stored.get("data_root")
    _setup_threads(args)
    device = _rank_device(_check_device(args.device or stored.get("device") or _default_device()))
    _check_output(out_dir, "--out", folder=True)
    if args.val_every and cfg.dataset == "omniglot" and cfg.val_classes == 0:
        parser.error("--val-every on Omniglot needs --val-classes > 0 (training characters held out)")
    try:
        sampler = make_sampler(cfg, "train", cfg.seed, root=args.data)  # data present and large enough
    except ValueError as exc:
        parser.error(str(exc))
    if not args.no_memory_check:
        _check_step_memory(cfg, sampler, device)

    opts = RunOptions.build(out_dir, stored, progress=not args.no_progress, device=device, data_root=args.data,
                            threads=args.threads, **{f: getattr(args, f) for f in _run_flags()})
    try:
        get_method(cfg.method).check_batching(opts.batching)
    except ValueError as exc:
        parser.error(str(exc))
    with process_group(device) as ranks:
        try:
            task_shard(cfg.meta_batch)
        except ValueError as exc:
            raise UsageError(f"--meta-batch: {exc}") from None
        verb = f"resuming {args.resume}" if args.resume is not None else "training"
        processes = f" on {ranks.size} processes" if ranks.size > 1 else ""
        if ranks.is_main:
            print(f"{verb}: {cfg.name}{processes} -> {out_dir}", flush=True)
        try:
            result = train(None if args.resume is not None else cfg, opts, resume=args.resume,
                           meta_steps=args.meta_steps if args.resume is not None else None)
        except RunError as exc:
            from .gradcheck import NonFiniteStepError
            print(f"imaml-ext train: error: {exc}", file=sys.stderr)
            return EXIT_FAILED if isinstance(exc, NonFiniteStepError) else EXIT_USAGE
    if not ranks.is_main:
        return EXIT_INTERRUPTED if result.interrupted else 0
    if result.interrupted:
        print(f"\nInterrupted after step {result.step}; checkpoint saved to {result.checkpoint}.\n"
              f"Resume with: imaml-ext train --resume {result.checkpoint.parent}\n"
              f"(the run's options are reused, --threads included: a flag given with --resume "
              f"overrides; on a busy machine --threads 1 can be much faster)", file=sys.stderr)
        return EXIT_INTERRUPTED
    last = result.last
    if not last:
        print(f"nothing to do: {out_dir} has done its {result.step} meta-steps; give a larger total "
              f"with --meta-steps to continue")
        return 0
    acc = f", query acc {last['acc']:.4f}" if last.get("acc") is not None else ""
    print(f"done: {result.step} steps in {result.seconds:.0f} s; last query loss {last.get('loss', float('nan')):.4f}"
          f"{acc}; checkpoint {result.checkpoint}, metrics {result.metrics}")
    return 0


# ----------------------------------------------------------------------------- eval

def _eval(args) -> int:
    import torch

    from .checkpoint import checkpoint_config, find_checkpoint, load_checkpoint
    from .evaluate import evaluate
    from .experiment import build_model, make_sampler
    from .parallel import process_group

    _setup_threads(args)
    device = _rank_device(_check_device(args.device or _default_device()))
    file = find_checkpoint(args.checkpoint)
    state = load_checkpoint(file)
    cfg = checkpoint_config(state, file)
    steps = cfg.inner_steps if args.inner_steps is None else args.inner_steps
    default_name = f"eval-{args.subset}-k{steps}.json"
    out = Path(args.out) if args.out else file.parent / default_name
    out = _check_output(out / default_name if out.is_dir() else out, "--out")
    try:
        sampler = make_sampler(cfg, args.subset, args.seed, root=args.data, queries=args.queries, device=device)
    except ValueError as exc:
        args.parser.error(str(exc))
    model = build_model(cfg).to(device)
    model.load_state_dict(state["model"])
    with process_group(device) as ranks:
        scores = evaluate(cfg, model, sampler, args.tasks, args.batch, steps, progress=not args.no_progress)
    if not ranks.is_main:
        return 0
    report = {"checkpoint": str(file), "step": state["step"], "config": cfg.to_dict(), "subset": args.subset,
              "queries": args.queries or cfg.queries, "seed": args.seed, **scores}
    shape = f"{cfg.shots}-shot" if cfg.dataset == "sinusoid" else f"{cfg.ways}-way {cfg.shots}-shot"
    what = (f"{cfg.dataset} {shape}, {cfg.method} after {state['step']} meta-steps, {steps} adaptation steps, "
            f"{args.tasks} {args.subset} tasks")
    if "acc" in scores:
        acc = scores["acc"]
        print(f"{what}: accuracy {100 * acc['mean']:.2f} ± {100 * acc['ci95']:.2f} % "
              f"(mean ± 1.96·std/√n), query loss {scores['loss']['mean']:.4f}")
    else:
        loss = scores["loss"]
        print(f"{what}: query MSE {loss['mean']:.4f} ± {loss['ci95']:.4f} (mean ± 1.96·std/√n)")
    print(f"adapted as meta-trained: {scores['adaptation']}" + (
        f"; inner residual ‖∇F(φ)‖/‖∇F(θ)‖ median {scores['inner_residual']:.3g}" if "inner_residual" in scores else ""))
    code = _save_result(out, json.dumps(report, indent=2) + "\n", "eval")
    if code == 0:
        print(f"written: {out} ({scores['seconds']:.0f} s)")
    return code


# ----------------------------------------------------------------------------- plot, demo, info

def _plot(args) -> int:
    from .metrics import metrics_file
    from .plotting import plot_curves, png_path

    paths = [metrics_file(p) for p in args.metrics]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"metrics file not found: {', '.join(missing)}")
    out = Path(args.output) if args.output else paths[0].parent / "curves.png"
    out = _check_output(out / "curves.png" if out.is_dir() else png_path(out), "-o")
    try:
        written = plot_curves(paths, out, labels=args.labels)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"written: {written}")
    return 0


def _demo(args) -> int:
    from .demo import DemoConfig, run_demo
    _setup_threads(args)
    device = _check_device(args.device or "cpu")
    _check_output(Path(args.out), "--out", folder=True)
    cfg = DemoConfig(meta_steps=args.meta_steps, seed=args.seed, eval_tasks=args.eval_tasks)
    run_demo(cfg, out_dir=Path(args.out), progress=not args.no_progress, device=device, workers=args.workers)
    return 0


def _info(args) -> int:
    from .._build import describe
    print(describe())
    return 0


# ----------------------------------------------------------------------------- parser

def _add_common(p: argparse.ArgumentParser, data: bool = True,
                device_default: str = "cuda if available, else cpu") -> None:
    p.add_argument("--device", help=f"torch device (default: {device_default})")
    if data:
        p.add_argument("--data", metavar="DIR",
                       help="data root holding omniglot/ or miniimagenet/ (default: $IMAML_EXT_DATA, "
                            "else ~/.cache/imaml_ext)")
    p.add_argument("--threads", type=POSITIVE_INT.parse,
                   help="CPU threads for torch (train/eval default: torch's choice, with OpenMP's idle "
                        "threads sleeping instead of spinning unless OMP_WAIT_POLICY is set; demo "
                        "default: 1, the MLP gains nothing from more). On a busy machine 1 is often faster")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (train: print metrics lines)")


def _train_parser(sub) -> None:
    from .experiment import DATASET_DEFAULTS, DATASETS, RunOptions, TrainConfig
    from .presets import describe_presets

    defaults = "; ".join(
        f"{d}: " + ", ".join(f"{k}={v if not isinstance(v, tuple) else ','.join(map(str, v))}"
                             for k, v in DATASET_DEFAULTS[d].items())
        for d in DATASETS)
    p = sub.add_parser(
        "train", help="meta-train a model, with checkpoints and metrics",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Meta-train with iMAML (GD or HF inner solver), MAML (full, first-order, "
                    "checkpointed) or Reptile. Values not given come from --preset, else from the "
                    "dataset's defaults. Writes OUT/checkpoint.pt (atomically, every --checkpoint-every "
                    "steps and every --checkpoint-minutes), OUT/metrics.jsonl and OUT/config.json; OUT "
                    "is locked while the training runs. Ctrl-C saves a checkpoint and exits (code 130); "
                    "--resume OUT continues exactly, with the run options it was started with unless "
                    "given again.",
        epilog=f"dataset defaults (our choices unless a preset says otherwise):\n  {defaults}\n\n"
               f"presets:\n" + "\n".join("  " + line for line in describe_presets().splitlines()))
    task = p.add_argument_group("task and method")
    task.add_argument("--preset", help="named setting (see below and --list-presets)")
    task.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    # Flags of the configuration's fields: not given -> None (the preset's or the dataset's value).
    add_flags({"task and method": task, "optimisation": p.add_argument_group("optimisation")}, TrainConfig)
    run = p.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="run folder (default out/train/<dataset>-<N>w<K>s-<method>-seed<S>)")
    run.add_argument("--resume", metavar="CKPT", help="continue the run in this folder or checkpoint file")
    run.add_argument("--no-memory-check", action="store_true",
                     help="start even if the estimated memory of a meta-step exceeds what is available")
    add_flags({"run": run}, RunOptions)  # not given: as the resumed run had it, else the default
    _add_common(p)
    p.set_defaults(run=_train, parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imaml-ext", description="Fast batched meta-gradients (iMAML, MAML).")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)

    p = sub.add_parser("eval", help="few-shot test accuracy of a checkpoint",
                       description="Adapt a trained checkpoint to new tasks as it was trained (iMAML: the "
                                   "regularised inner solve from θ; MAML variants and Reptile: SGD steps "
                                   "with the inner lr) and report mean ± 1.96·std/√n over the tasks.")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--tasks", type=POSITIVE_INT.parse, default=600, help="tasks to evaluate (default 600)")
    p.add_argument("--batch", type=POSITIVE_INT.parse, default=50, help="tasks adapted at once (default 50)")
    p.add_argument("--inner-steps", type=NONNEGATIVE_INT.parse, help="adaptation steps (default: as trained)")
    p.add_argument("--queries", type=POSITIVE_INT.parse, help="query examples per class (default: as trained)")
    p.add_argument("--subset", choices=("test", "val"), default="test", help="default test")
    p.add_argument("--seed", type=NONNEGATIVE_INT.parse, default=0, help="seed of the evaluation tasks (default 0)")
    p.add_argument("--out", metavar="JSON", help="result file, or a folder for the default name "
                                                 "(default <run>/eval-<subset>-k<steps>.json)")
    _add_common(p)
    p.set_defaults(run=_eval, parser=p)

    p = sub.add_parser("plot", help="learning curves from metrics.jsonl files to a PNG")
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files or run folders (several are overlaid)")
    p.add_argument("-o", "--output", metavar="PNG", help="image file (.png added if it has no suffix), or a "
                                                         "folder for curves.png (default: curves.png beside the "
                                                         "first file)")
    p.add_argument("--labels", nargs="+", help="one legend label per file (default: run folder names)")
    p.set_defaults(run=_plot, parser=p)

    p = sub.add_parser("demo", help="sinusoid regression: iMAML vs MAML vs FOMAML vs transfer (no data, CPU minutes)")
    p.add_argument("--meta-steps", type=POSITIVE_INT.parse, default=1000, help="meta-steps per method (default 1000)")
    p.add_argument("--eval-tasks", type=POSITIVE_INT.parse, default=200, help="held-out tasks (default 200)")
    p.add_argument("--seed", type=NONNEGATIVE_INT.parse, default=0)
    p.add_argument("--out", metavar="DIR", default="out/demo", help="folder for runs, results and figures")
    p.add_argument("--workers", type=POSITIVE_INT.parse, default=min(2, os.cpu_count() or 1),
                   help="methods meta-trained at once, one process each (default: 2, or 1 on one core)")
    _add_common(p, data=False, device_default="cpu; the MLP gains little from a GPU")
    p.set_defaults(run=_demo, parser=p, threads=1)

    p = sub.add_parser("info", help="versions, compiled backend and devices")
    p.set_defaults(run=_info, parser=p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default: this process's arguments, and then a
    busy machine's OpenMP setting is chosen as :func:`_relaunch_with_passive_openmp` says)."""
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ("train", "eval"):
        _relaunch_with_passive_openmp(args)
    from .checkpoint import CheckpointError
    from ..data import DamagedFileError, DatasetNotFoundError
    from .plotting import MissingDependencyError
    try:
        return args.run(args)
    except (UsageError, DatasetNotFoundError, DamagedFileError, CheckpointError, MissingDependencyError) as exc:
        print(f"imaml-ext {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        if exc.name not in _TRAIN_EXTRA:
            raise
        print(f"imaml-ext {args.command}: error: needs {exc.name}, part of the 'train' extra: "
              f"pip install 'imaml_ext[train]'", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\nimaml-ext {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
