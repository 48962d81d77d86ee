"""Meta-training: one meta-step per method, and the resumable training loop.

:class:`MetaStep` performs one meta-iteration: adapt the model to a
meta-batch of T tasks, put the meta-gradient of the mean query loss on the
model's parameters, step the outer optimizer.  :func:`train` runs it for
``cfg.meta_steps`` steps with a progress bar, JSONL metrics, atomic
checkpoints (:mod:`imaml_ext.training.checkpoint`) every so many steps and
every so many minutes, optional validation, and SIGINT / SIGTERM handling
that checkpoints after the step in progress and returns.

Safety: the run folder is locked for the whole run
(:class:`~imaml_ext.training.runfolder.RunLock`); a checkpoint stores the
run options, which a resumed run reuses; a meta-gradient with NaN or
infinite entries is never stepped into the model, and the run stops with an
error naming the step and the tasks (:mod:`imaml_ext.training.gradcheck`).

Exact resumption: the parameters, the optimizer state, the task sampler's
generator and the global torch / NumPy / Python generators are all restored,
so N steps in one go and N/2 + N/2 resumed give bit-identical parameters
(on the same device, with the same number of threads).

The metrics file's records are described in :mod:`imaml_ext.training.metrics`.

:func:`train` is made of named pieces: :func:`resume_config` (which
configuration a run or a resumed run has), :class:`RunState` (model,
optimizer, sampler, step and time; built, restored from and saved to a
checkpoint), :class:`Checkpointer`, :class:`Validator`,
:class:`~imaml_ext.training.gradcheck.MetaGradientWatch`,
:class:`~imaml_ext.training.metrics.MetricsLogger` and :class:`InterruptGuard`.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import diagnostics
from ..distributed import world
from ..unrolled import reptile_grad
from .checkpoint import (CHECKPOINT_NAME, FORMAT, capture_rng, checkpoint_config, load_checkpoint, restore_rng,
                         save_checkpoint)
from .evaluate import evaluate
from ..data.paths import atomic_file, data_root
from ..finite import NonFiniteLossError
from .experiment import (RunOptions, TrainConfig, build_model, build_outer_optimizer, check_device,
                         is_classification, loss_function, make_sampler)
from .gradcheck import MetaGradientWatch, NonFiniteStepError, step_if_finite
from .methods import get_method
from .metrics import METRICS_NAME, MetricsLogger
from .parallel import GradientSync, SilentMetricsLogger, is_main
from .runfolder import RunError, RunLock

__all__ = ["MetaStep", "RunOptions", "TrainResult", "InterruptGuard", "train", "METRICS_NAME", "RunState",
           "Checkpointer", "Validator", "resume_config"]


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

    The outer step is taken only if the meta-gradient is finite
    (:meth:`step_if_finite`); after a call, :attr:`finite` holds that
    condition and :attr:`task_losses` the per-task query losses ``[T]``
    (of this process's slice, with ``sync``), both on the device.

    With ``sync`` (several processes, :class:`~imaml_ext.training.parallel.GradientSync`)
    this process forms the gradient of its slice of the batch and the
    processes sum theirs before the step; loss and accuracy are the whole batch's.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 sync: Optional[GradientSync] = None, batching: str = "vmap"):
        self.cfg, self.model, self.optimizer, self.sync = cfg, model, optimizer, sync
        self.batching = batching
        self.info: Dict[str, Any] = {}
        self.method = get_method(cfg.method)
        self.method.check_batching(batching)
        self.loss_fn = loss_function(cfg)
        self.classification = is_classification(cfg)
        self.finite: Optional[torch.Tensor] = None
        self.task_losses: Optional[torch.Tensor] = None

    def adapt(self, sx: torch.Tensor, sy: torch.Tensor):
        return self.method.adapt(self.cfg, self.model, sx, sy, self.loss_fn, self.batching)

    def query_loss(self, out: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
        """Mean loss over all T·m queries: out [T, m, ...], qy [T, m, ...] -> scalar."""
        return self.loss_fn(out.flatten(0, 1), qy.flatten(0, 1))

    def per_task_losses(self, out: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
        """Each task's mean query loss, detached: out [T, m, ...], qy [T, m, ...] -> [T]."""
        with torch.no_grad():
            losses = self.loss_fn(out.detach().flatten(0, 1), qy.flatten(0, 1), reduction="none")
            return losses.reshape(out.shape[0], -1).mean(1)

    def step_if_finite(self) -> torch.Tensor:
        """The outer optimizer's step, taken only if the meta-gradient is finite (0-dim bool on the device)."""
        return step_if_finite(self.optimizer)

    def gradient(self, batch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Put the meta-gradient of ``batch``'s mean query loss on the parameters' ``.grad``;
        return the loss and accuracy (None for regression), detached."""
        sx, sy, qx, qy = batch
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
        self.info = adapted.info  # the last step's solver diagnostics, for the log
        self.task_losses = self.per_task_losses(out, qy)
        acc = (out.detach().argmax(-1) == qy).float().mean() if self.classification else None
        return loss.detach(), acc

    def __call__(self, batch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.sync is None:
            loss, acc = self.gradient(batch)
        else:
            loss, acc = self.sync(self.gradient, batch, self.model)
        self.finite = self.step_if_finite()  # after the sum over processes: the same on every rank
        return loss, acc

    def stop_requested(self, guard: "InterruptGuard") -> bool:
        """Whether to stop after this step: a signal reached this process (with ``sync``:
        any process, as of the last step's all-reduce, so that all stop together)."""
        return self.sync.stop if self.sync is not None else guard.requested is not None


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


def resume_config(cfg: Optional[TrainConfig], resume: Optional[Path], meta_steps: Optional[int]
                  ) -> Tuple[TrainConfig, Optional[Dict[str, Any]]]:
    """The configuration of the run and, when resuming, the checkpoint to continue from."""
    state = None
    if resume is not None:
        if cfg is not None:
            raise ValueError("a resumed run keeps its saved configuration: pass cfg=None with resume")
        state = load_checkpoint(resume)
        cfg = checkpoint_config(state, resume)
        done = int(state["step"])
        if meta_steps is not None and meta_steps < done:
            raise RunError(f"{resume} has done {done} meta-steps; a total of meta_steps={meta_steps} "
                           f"(--meta-steps) would go back: give the new total, at least {done}")
    if cfg is None:
        raise ValueError("give a configuration, or a checkpoint to resume")
    if meta_steps is not None:
        cfg = cfg.replace(meta_steps=meta_steps)
    return cfg, state


class RunState:
    """What a checkpoint holds: the model, outer optimizer and training task sampler of ``cfg``,
    the meta-steps done and the training time so far."""

    def __init__(self, cfg: TrainConfig, device: torch.device, data_root: Optional[str],
                 options: Optional[Dict[str, Any]] = None):
        self.cfg, self.options = cfg, options or {}
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(device)
        self.optimizer = build_outer_optimizer(cfg, self.model)
        self.sampler = make_sampler(cfg, "train", cfg.seed, root=data_root, device=device)
        self.step, self.seconds = 0, 0.0

    def restore(self, state: Dict[str, Any]) -> None:
        """Continue from a checkpoint's contents (also the global random-number generators)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        restore_rng(state["rng"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])

    def payload(self) -> Dict[str, Any]:
        """The checkpoint's contents (format in :mod:`imaml_ext.training.checkpoint`)."""
        return {"format": FORMAT, "config": self.cfg.to_dict(), "run": self.options,
                "step": self.step, "seconds": self.seconds,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(), "rng": capture_rng()}


class Checkpointer:
    """Saves a :class:`RunState`: :meth:`due` every ``every`` steps (0: never on the way) and
    whenever ``minutes`` of wall time have passed since the last save (or the start);
    with ``write=False`` (ranks > 0 of several processes) it only keeps count."""

    def __init__(self, path: Path, every: int, minutes: float, write: bool = True):
        self.path, self.every, self.seconds, self.write = path, every, 60.0 * minutes, write
        self.saved: Optional[int] = None
        self._last = time.monotonic()

    def due(self, run: RunState) -> bool:
        return bool(self.every and run.step % self.every == 0) or time.monotonic() - self._last >= self.seconds

    def save(self, run: RunState) -> None:
        if self.write:
            save_checkpoint(self.path, run.payload())
        self.saved, self._last = run.step, time.monotonic()


class Validator:
    """Scores the model on the same ``tasks`` validation tasks (seed ``seed``) every ``every`` steps."""

    def __init__(self, cfg: TrainConfig, opts: RunOptions, device: torch.device):
        self.cfg, self.every, self.tasks = cfg, opts.val_every, opts.val_tasks
        self.sampler = make_sampler(cfg, "val", opts.eval_seed, root=opts.data_root, device=device)
        self.start = self.sampler.state_dict()

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, model: nn.Module) -> Dict[str, Any]:
        self.sampler.load_state_dict(self.start)
        return evaluate(self.cfg, model, self.sampler, self.tasks)


@contextmanager
def _torch_threads(threads: Optional[int]):
    """torch's CPU thread count set to ``threads`` (None: unchanged) inside the block."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(cfg: Optional[TrainConfig], opts: RunOptions, resume: Optional[Path] = None,
          meta_steps: Optional[int] = None) -> TrainResult:
    """Meta-train, writing ``checkpoint.pt``, ``metrics.jsonl`` and ``config.json`` in ``opts.out_dir``.

    The folder is locked for the whole run (a second training into it raises
    :class:`~imaml_ext.training.runfolder.RunFolderBusyError`); temporary
    files left by a killed run are removed.  The checkpoint also stores
    ``opts.stored()`` with the data root made absolute and the thread count
    in effect, for :meth:`RunOptions.build` on resume.

    Args:
        cfg: the configuration of a new run; None with ``resume``.
        opts: where and how to run.
        resume: a checkpoint (file or run folder) to continue; its
            configuration is used.
        meta_steps: with ``resume``, a new total number of meta-steps (not
            fewer than done: :class:`~imaml_ext.training.runfolder.RunError`).

    Returns:
        :class:`TrainResult`; ``interrupted`` if a signal stopped the run
        (after checkpointing the completed steps).

    Raises:
        NonFiniteStepError: a meta-gradient had NaN or infinite entries
            (that step was not applied), or a support loss became
            non-finite in the inner loop; nothing after it is saved.

    Inside a ``torch.distributed`` process group of several processes
    (:mod:`imaml_ext.training.parallel`) each adapts its slice of every
    meta-batch; only rank 0 writes files and shows the progress bar.
    """
    device = check_device(opts.device)
    out_dir = Path(opts.out_dir)
    main = is_main()
    # Rank 0 alone holds the run folder (the others only read the checkpoint).
    with (RunLock(out_dir) if main else nullcontext()) as lock, _torch_threads(opts.threads):
        if lock is not None:
            lock.remove_partials()
        cfg, state = resume_config(cfg, resume, meta_steps)
        stored = dict(opts.stored(), threads=torch.get_num_threads(),
                      data_root=str(data_root(opts.data_root).resolve()))
        return _train_locked(cfg, state, opts, device, stored, main)


def _train_locked(cfg: TrainConfig, state: Optional[Dict[str, Any]], opts: RunOptions, device: torch.device,
                  stored: Dict[str, Any], main: bool) -> TrainResult:
    """:func:`train`'s loop, in the locked run folder."""
    out_dir = Path(opts.out_dir)
    run = RunState(cfg, device, opts.data_root, stored)
    validator = Validator(cfg, opts, device) if opts.val_every else None
    logger = (MetricsLogger if main else SilentMetricsLogger)(out_dir / METRICS_NAME, cfg.method,
                                                                echo=not opts.progress)
    if state is not None:
        run.restore(state)
    logger.resume_at(run.step if state is not None else None)
    if main:
        with atomic_file(out_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    checkpointer = Checkpointer(out_dir / CHECKPOINT_NAME, opts.checkpoint_every, opts.checkpoint_minutes,
                                write=main)
    watch = MetaGradientWatch()

    guard = InterruptGuard()
    sync = GradientSync(cfg.meta_batch, lambda: guard.requested is not None) if world()[1] > 1 else None
    meta_step = MetaStep(cfg, run.model, run.optimizer, sync, opts.batching)
    if opts.batching == "compiled" and main:
        print("--batching compiled: the first meta-step compiles the inner steps' gradient "
              "(tens of seconds, once per input shape)", file=sys.stderr, flush=True)
    last: Dict[str, Any] = {}
    interrupted = False
    bar = tqdm(total=cfg.meta_steps, initial=run.step, desc=cfg.method, unit="step",
               disable=not opts.progress or not main, dynamic_ncols=True)
    with guard, logger, closing(bar):
        started = time.perf_counter() - run.seconds
        while run.step < cfg.meta_steps:
            try:
                logger.add(*meta_step(run.sampler.sample(cfg.meta_batch)))
            except NonFiniteLossError as exc:  # the library's: a support loss went NaN / inf
                _check_gradients(watch, checkpointer)  # an earlier refused step is reported first
                raise NonFiniteStepError(f"meta-step {run.step + 1}: {exc}. {_kept(checkpointer)}") from None
            run.step += 1
            watch.record(run.step, meta_step.finite, meta_step.task_losses)
            run.seconds = time.perf_counter() - started
            bar.update(1)
            interrupted = meta_step.stop_requested(guard)
            save = interrupted or run.step == cfg.meta_steps or checkpointer.due(run)
            if save or run.step % opts.log_every == 0:  # a checkpoint ends a metrics window
                _check_gradients(watch, checkpointer)
                last = logger.log_train(run.step, run.seconds, diagnostics.summary(meta_step.info))
                bar.set_postfix(loss=f"{last['loss']:.4f}",
                                **({"acc": f"{last['acc']:.3f}"} if last["acc"] is not None else {}))
            if validator is not None and validator.due(run.step):
                logger.log_val(run.step, run.seconds, validator(run.model))
            if save:
                checkpointer.save(run)
            if interrupted:
                break
    return TrainResult(step=run.step, interrupted=interrupted, checkpoint=checkpointer.path,
                       metrics=logger.path, seconds=run.seconds, last=last)


def _kept(checkpointer: Checkpointer) -> str:
    """What a run stopped by a non-finite step leaves, for the error message."""
    if checkpointer.saved is not None:
        return f"Training stopped; {checkpointer.path} holds meta-step {checkpointer.saved}."
    before = f" ({checkpointer.path} is from before)" if checkpointer.path.exists() else ""
    return f"Training stopped; nothing was saved by this run{before}."


def _check_gradients(watch: MetaGradientWatch, checkpointer: Checkpointer) -> None:
    """:meth:`MetaGradientWatch.check`, its error saying what the checkpoint holds."""
    try:
        watch.check()
    except NonFiniteStepError as exc:
        raise NonFiniteStepError(f"{exc}. {_kept(checkpointer)}") from None
