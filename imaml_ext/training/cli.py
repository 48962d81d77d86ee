"""Command line: ``imaml-ext {train,eval,plot,demo,info}`` (also ``python -m imaml_ext``).

Exit codes: 0 success; 2 bad arguments, missing data, an unreadable
checkpoint or a missing optional dependency (one message, no traceback);
130 training stopped by Ctrl-C / SIGTERM after checkpointing.

``train`` and ``eval`` also run under ``torchrun`` (one process per CPU
share or GPU, data parallel over tasks: :mod:`imaml_ext.training.parallel`);
rank 0 prints and writes the files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional

from .flags import NONNEGATIVE_INT, POSITIVE_INT, add_flags

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


def _rank_device(device: str) -> str:
    """This process's device under torchrun (:func:`~.parallel.rank_device`), errors as usage errors."""
    from .parallel import rank_device
    try:
        return rank_device(device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _setup_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


# ----------------------------------------------------------------------------- train

def _train(args) -> int:
    from .checkpoint import CHECKPOINT_NAME, find_checkpoint, load_checkpoint
    from ..distributed import task_shard
    from .experiment import TrainConfig, make_config, make_sampler
    from .parallel import process_group
    from .train import RunOptions, train

    parser: argparse.ArgumentParser = args.parser
    if args.list_presets:
        from .presets import describe_presets
        print(describe_presets())
        return 0
    _setup_threads(args)
    device = _rank_device(_check_device(args.device or _default_device()))
    given = [f for f in _config_flags() if getattr(args, f) is not None]
    if args.resume is not None:
        if given or args.preset:
            flags = ", ".join("--" + f.replace("_", "-") for f in given) or "--preset"
            parser.error(f"--resume continues a run with its saved configuration; {flags} cannot be "
                         f"changed (drop it, or start a new run with another --out)")
        checkpoint = find_checkpoint(args.resume)
        cfg = TrainConfig.from_dict(load_checkpoint(checkpoint)["config"])
        out_dir = Path(args.out) if args.out else checkpoint.parent
    else:
        try:
            cfg = make_config(args.dataset, args.preset, meta_steps=args.meta_steps,
                              **{f: getattr(args, f) for f in given if f != "dataset"})
        except ValueError as exc:
            parser.error(str(exc))
        out_dir = Path(args.out) if args.out else Path("out") / "train" / cfg.name
        if (out_dir / CHECKPOINT_NAME).exists():
            parser.error(f"{out_dir} already holds a run ({CHECKPOINT_NAME}); continue it with "
                         f"--resume {out_dir}, or choose another --out")
    if args.val_every and cfg.dataset == "omniglot" and cfg.val_classes == 0:
        parser.error("--val-every on Omniglot needs --val-classes > 0 (training characters held out)")
    try:
        make_sampler(cfg, "train", cfg.seed, root=args.data)  # data present and large enough
    except ValueError as exc:
        parser.error(str(exc))

    opts = RunOptions(out_dir=out_dir, device=device, data_root=args.data, log_every=args.log_every,
                      checkpoint_every=args.checkpoint_every, val_every=args.val_every,
                      val_tasks=args.val_tasks, progress=not args.no_progress)
    with process_group(device) as ranks:
        try:
            task_shard(cfg.meta_batch)
        except ValueError as exc:
            raise UsageError(f"--meta-batch: {exc}") from None
        verb = f"resuming {args.resume}" if args.resume is not None else "training"
        processes = f" on {ranks.size} processes" if ranks.size > 1 else ""
        if ranks.is_main:
            print(f"{verb}: {cfg.name}{processes} -> {out_dir}", flush=True)
        result = train(None if args.resume is not None else cfg, opts, resume=args.resume,
                       meta_steps=args.meta_steps if args.resume is not None else None)
    if not ranks.is_main:
        return EXIT_INTERRUPTED if result.interrupted else 0
    if result.interrupted:
        print(f"\nInterrupted after step {result.step}; checkpoint saved to {result.checkpoint}.\n"
              f"Resume with: imaml-ext train --resume {result.checkpoint.parent}", file=sys.stderr)
        return EXIT_INTERRUPTED
    last = result.last
    acc = f", query acc {last['acc']:.4f}" if last.get("acc") is not None else ""
    print(f"done: {result.step} steps in {result.seconds:.0f} s; last query loss {last.get('loss', float('nan')):.4f}"
          f"{acc}; checkpoint {result.checkpoint}, metrics {result.metrics}")
    return 0


# ----------------------------------------------------------------------------- eval

def _eval(args) -> int:
    import torch

    from .checkpoint import find_checkpoint, load_checkpoint
    from .evaluate import evaluate
    from .experiment import TrainConfig, build_model, make_sampler
    from .parallel import process_group

    _setup_threads(args)
    device = _rank_device(_check_device(args.device or _default_device()))
    file = find_checkpoint(args.checkpoint)
    state = load_checkpoint(file)
    cfg = TrainConfig.from_dict(state["config"])
    try:
        sampler = make_sampler(cfg, args.subset, args.seed, root=args.data, queries=args.queries, device=device)
    except ValueError as exc:
        args.parser.error(str(exc))
    model = build_model(cfg).to(device)
    model.load_state_dict(state["model"])
    with process_group(device) as ranks:
        scores = evaluate(cfg, model, sampler, args.tasks, args.batch, args.inner_steps,
                          progress=not args.no_progress)
    if not ranks.is_main:
        return 0
    report = {"checkpoint": str(file), "step": state["step"], "config": cfg.to_dict(), "subset": args.subset,
              "queries": args.queries or cfg.queries, "seed": args.seed, **scores}
    steps = scores["inner_steps"]
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
    out = Path(args.out) if args.out else file.parent / f"eval-{args.subset}-k{steps}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {out} ({scores['seconds']:.0f} s)")
    return 0


# ----------------------------------------------------------------------------- plot, demo, info

def _plot(args) -> int:
    from .metrics import metrics_file
    from .plotting import plot_curves

    paths = [metrics_file(p) for p in args.metrics]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"metrics file not found: {', '.join(missing)}")
    out = Path(args.output) if args.output else paths[0].parent / "curves.png"
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
    cfg = DemoConfig(meta_steps=args.meta_steps, seed=args.seed, eval_tasks=args.eval_tasks)
    run_demo(cfg, out_dir=Path(args.out), progress=not args.no_progress, device=device)
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
                   help="CPU threads for torch (train/eval default: torch's choice; demo default: 1, "
                        "the MLP gains nothing from more). On a busy machine 1 is often much faster")
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
                    "dataset's defaults. Writes OUT/checkpoint.pt (every --checkpoint-every steps, "
                    "atomically), OUT/metrics.jsonl and OUT/config.json. Ctrl-C saves a checkpoint "
                    "and exits (code 130); --resume OUT continues exactly.",
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
    add_flags({"run": run}, RunOptions, with_defaults=True)
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
    p.add_argument("--out", metavar="JSON", help="result file (default <run>/eval-<subset>-k<steps>.json)")
    _add_common(p)
    p.set_defaults(run=_eval, parser=p)

    p = sub.add_parser("plot", help="learning curves from metrics.jsonl files to a PNG")
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files or run folders (several are overlaid)")
    p.add_argument("-o", "--output", metavar="PNG", help="default: curves.png beside the first file")
    p.add_argument("--labels", nargs="+", help="one legend label per file (default: run folder names)")
    p.set_defaults(run=_plot, parser=p)

    p = sub.add_parser("demo", help="sinusoid regression: iMAML vs MAML vs FOMAML vs transfer (no data, CPU minutes)")
    p.add_argument("--meta-steps", type=POSITIVE_INT.parse, default=1000, help="meta-steps per method (default 1000)")
    p.add_argument("--eval-tasks", type=POSITIVE_INT.parse, default=200, help="held-out tasks (default 200)")
    p.add_argument("--seed", type=NONNEGATIVE_INT.parse, default=0)
    p.add_argument("--out", metavar="DIR", default="out/demo", help="folder for runs, results and figures")
    _add_common(p, data=False, device_default="cpu; the MLP gains little from a GPU")
    p.set_defaults(run=_demo, parser=p, threads=1)

    p = sub.add_parser("info", help="versions, compiled backend and devices")
    p.set_defaults(run=_info, parser=p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from ..data import DatasetNotFoundError
    from .plotting import MissingDependencyError
    try:
        return args.run(args)
    except (UsageError, DatasetNotFoundError, CheckpointError, MissingDependencyError) as exc:
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
