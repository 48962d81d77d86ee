"""Meta-training: one meta-step per method, and the resumable training loop.

:class:`MetaStep` performs one meta-iteration: adapt the model to a
meta-batch of T tasks, put the meta-gradient of the mean query loss on the
model's parameters, step the outer optimizer.  :func:`train` runs it for
``cfg.meta_steps`` steps with a progress bar, JSONL metrics, atomic
checkpoints (:mod:`imaml_ext.training.checkpoint`), optional validation, and SIGINT /
SIGTERM handling that checkpoints after the step in progress and returns.

Exact resumption: the parameters, the optimizer state, the task sampler's
generator and the global torch / NumPy / Python generators are all restored,
so N steps in one go and N/2 + N/2 resumed give bit-identical parameters
(on the same device, with the same number of threads).

Metrics file (``metrics.jsonl``), one JSON object per line:
``{"split": "train", "step", "loss", "acc", "seconds", "method"}`` — loss
and accuracy averaged over the steps since the previous line, ``acc`` null
for regression, ``seconds`` the training wall time so far — and, with
validation, ``{"split": "val", "step", "loss", "acc", "acc_ci95",
"seconds", "method"}``.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..unrolled import reptile_grad

from .checkpoint import CHECKPOINT_NAME, FORMAT, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .evaluate import evaluate
from .experiment import (TrainConfig, build_model, build_outer_optimizer, is_classification, loss_function,
                         make_sampler)
from .methods import get_method

__all__ = ["MetaStep", "RunOptions", "TrainResult", "InterruptGuard", "train", "METRICS_NAME"]

METRICS_NAME = "metrics.jsonl"


class MetaStep:
    """One meta-iteration of ``cfg.method`` on ``model`` with ``optimizer``.

    Calling it with a batch ``(sx, sy, qx, qy)`` (``[T, n, ...]`` support,
    ``[T, m, ...]`` query) returns the detached mean query loss and, for
    classification, the mean query accuracy (else None), both 0-dim tensors
    left on the device.

    The loss is the query loss of the adapted parameters averaged over all
    T·m query examples (equal to the mean over tasks).  Reptile adapts on
    the support set without a graph and uses θ − mean_t φ_t as the
    gradient (:func:`imaml_ext.unrolled.reptile_grad`); its reported loss is
    the query loss of the adapted parameters.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.method = get_method(cfg.method)
        self.loss_fn = loss_function(cfg)
        self.classification = is_classification(cfg)

    def adapt(self, sx: torch.Tensor, sy: torch.Tensor):
        return self.method.adapt(self.cfg, self.model, sx, sy, self.loss_fn)

    def query_loss(self, out: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
        """Mean loss over all T·m queries: out [T, m, ...], qy [T, m, ...] -> scalar."""
        return self.loss_fn(out.flatten(0, 1), qy.flatten(0, 1))

    def __call__(self, batch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        sx, sy, qx, qy = batch
        self.optimizer.zero_grad(set_to_none=True)
        if self.method.reptile:
            with torch.no_grad():
                adapted = self.adapt(sx, sy)
                out = adapted(qx)
                loss = self.query_loss(out, qy)
            reptile_grad(self.model, adapted, write=True)
        else:
            adapted = self.adapt(sx, sy)
            out = adapted(qx)
            loss = self.query_loss(out, qy)
            loss.backward()
        self.optimizer.step()
        acc = (out.detach().argmax(-1) == qy).float().mean() if self.classification else None
        return loss.detach(), acc


@dataclass
class RunOptions:
    """Where and how a run happens (not part of the checkpointed configuration).

    ``log_every``: steps per metrics line; ``checkpoint_every``: steps per
    checkpoint (0: only at the end or on interruption); ``val_every``: steps
    per validation (0: none) on ``val_tasks`` tasks, the same tasks each
    time; ``eval_seed``: seed of those tasks.
    """

    out_dir: Path
    device: str = "cpu"
    data_root: Optional[str] = None
    log_every: int = 10
    checkpoint_every: int = 500
    val_every: int = 0
    val_tasks: int = 100
    eval_seed: int = 0
    progress: bool = True


@dataclass
class TrainResult:
    """How a run ended: steps done, whether interrupted, where its files are, last logged metrics."""

    step: int
    interrupted: bool
    checkpoint: Path
    metrics: Path
    seconds: float
    last: Dict[str, Any]


class InterruptGuard:
    """Turns SIGINT / SIGTERM into a request to stop after the current step.

    Inside ``with guard:`` the first signal sets :attr:`requested` to the
    signal number and prints a notice to stderr; a second SIGINT raises
    KeyboardInterrupt at once.  The
    previous handlers are restored on exit.  Outside the main thread the
    guard installs nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def handle(self, signum: int, frame=None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the current step to save a checkpoint "
              f"(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``path`` up to ``step`` (those after a checkpoint are replayed on resume)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def train(cfg: Optional[TrainConfig], opts: RunOptions, resume: Optional[Path] = None,
          meta_steps: Optional[int] = None) -> TrainResult:
    """Meta-train, writing ``checkpoint.pt``, ``metrics.jsonl`` and ``config.json`` in ``opts.out_dir``.

    Args:
        cfg: the configuration of a new run; None with ``resume``.
        opts: where and how to run.
        resume: a checkpoint (file or run folder) to continue; its
            configuration is used.
        meta_steps: with ``resume``, a new total number of meta-steps.

    Returns:
        :class:`TrainResult`; ``interrupted`` if a signal stopped the run
        (after checkpointing the completed steps).
    """
    device = _device(opts.device)
    state = None
    if resume is not None:
        if cfg is not None:
            raise ValueError("a resumed run keeps its saved configuration: pass cfg=None with resume")
        state = load_checkpoint(resume)
        cfg = TrainConfig.from_dict(state["config"])
    if cfg is None:
        raise ValueError("give a configuration, or a checkpoint to resume")
    if meta_steps is not None:
        cfg = cfg.replace(meta_steps=meta_steps)
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    optimizer = build_outer_optimizer(cfg, model)
    sampler = make_sampler(cfg, "train", cfg.seed, root=opts.data_root, device=device)
    val_sampler = val_start = None
    if opts.val_every:
        val_sampler = make_sampler(cfg, "val", opts.eval_seed, root=opts.data_root, device=device)
        val_start = val_sampler.state_dict()
    step, seconds = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        restore_rng(state["rng"])
        step, seconds = int(state["step"]), float(state["seconds"])
        _truncate_metrics(metrics_path, step)
    elif metrics_path.exists():
        metrics_path.unlink()
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    saved = -1

    def checkpoint() -> None:
        nonlocal saved
        saved = step
        save_checkpoint(ckpt_path, {
            "format": FORMAT, "config": cfg.to_dict(), "step": step, "seconds": seconds,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(), "rng": capture_rng()})

    meta_step = MetaStep(cfg, model, optimizer)
    window_loss, window_acc, window_n = 0.0, 0.0, 0
    last: Dict[str, Any] = {}
    interrupted = False
    bar = tqdm(total=cfg.meta_steps, initial=step, desc=cfg.method, unit="step",
               disable=not opts.progress, dynamic_ncols=True)
    with InterruptGuard() as guard, open(metrics_path, "a") as log:
        def write(record: Dict[str, Any]) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()
            if not opts.progress:
                print(json.dumps(record), flush=True)

        started = time.perf_counter() - seconds
        while step < cfg.meta_steps:
            loss, acc = meta_step(sampler.sample(cfg.meta_batch))
            window_loss = loss + window_loss
            window_acc = (acc if acc is not None else 0.0) + window_acc
            window_n += 1
            step += 1
            seconds = time.perf_counter() - started
            bar.update(1)
            if step % opts.log_every == 0 or step == cfg.meta_steps:
                last = {"split": "train", "step": step, "loss": float(window_loss) / window_n,
                        "acc": float(window_acc) / window_n if acc is not None else None,
                        "seconds": round(seconds, 3), "method": cfg.method}
                write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}",
                                **({"acc": f"{last['acc']:.3f}"} if acc is not None else {}))
                window_loss, window_acc, window_n = 0.0, 0.0, 0
            if opts.val_every and step % opts.val_every == 0:
                val_sampler.load_state_dict(val_start)
                scores = evaluate(cfg, model, val_sampler, opts.val_tasks)
                key = "acc" if "acc" in scores else "loss"
                write({"split": "val", "step": step, "loss": scores["loss"]["mean"],
                       "acc": scores["acc"]["mean"] if "acc" in scores else None,
                       f"{key}_ci95": scores[key]["ci95"], "seconds": round(seconds, 3),
                       "method": cfg.method})
            if guard.requested is not None:
                interrupted = True
                break
            if opts.checkpoint_every and step % opts.checkpoint_every == 0:
                checkpoint()
        if saved != step:
            checkpoint()
    bar.close()
    return TrainResult(step=step, interrupted=interrupted, checkpoint=ckpt_path, metrics=metrics_path,
                       seconds=seconds, last=last)
