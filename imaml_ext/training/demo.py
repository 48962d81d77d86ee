"""The built-in example: meta-learning sinusoid regression, no data needed.

Meta-trains the 1-40-40-1 MLP on 10-shot sinusoid tasks with iMAML-GD,
iMAML-HF, MAML and first-order MAML (each with
:func:`imaml_ext.training.train.train`, from the same initialisation), and
pre-trains a "transfer learning" baseline: the same network fitted to the
pooled points of all training tasks, with no meta-learning.  On held-out
tasks it reports the query MSE after 0 and 1 adaptation steps and after the
adaptation each method was meta-trained with (its own number of steps) —
each method adapts as it was trained
(:func:`imaml_ext.training.evaluate.adapt`: iMAML its regularised inner solve
from θ with its λ, steps and lr or Newton steps; MAML its K SGD steps at its
inner lr; the baseline and the untrained network fine-tune with the MAML
setting's SGD) — with, for iMAML, the measured stationarity residual of that
inner solve; prints a table, and draws the fits on a few tasks.

Settings: MAML and first-order MAML 10 inner steps of lr 0.01; iMAML λ =
``imaml_lam``, iMAML-GD ``imaml_inner_steps`` steps of lr
``imaml_inner_lr``, iMAML-HF ``hf_inner_steps`` Newton steps of
``hf_cg_steps`` CG steps; 5 CG steps in the backward solve; Adam 1e-3,
meta-batch 25.  It runs on the CPU unless given another ``device``, the
methods meta-training in ``workers`` processes at once (``imaml-ext demo``:
2); benchmarks/RESULTS.md has its measurements.
"""
from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..functional import TaskLoss
from .evaluate import adapt, adaptation_text, inner_residual, summarize, task_scores
from .experiment import TrainConfig, build_model, check_device, make_config, make_sampler
from .metrics import METRICS_NAME, read_metrics
from .plotting import MissingDependencyError, plot_curves, plot_fits
from .train import RunOptions, train

__all__ = ["DemoConfig", "run_demo", "DEMO_METHODS"]

DEMO_METHODS = ("imaml-gd", "imaml-hf", "maml", "fomaml")
LABELS = {"imaml-gd": "iMAML-GD", "imaml-hf": "iMAML-HF", "maml": "MAML", "fomaml": "first-order MAML",
          "transfer": "transfer (pretrain + fine-tune)", "untrained": "untrained init"}
STEPS = (0, 1, None)  # None: the method's own number of steps, as meta-trained


@dataclass
class DemoConfig:
    """The demo's settings; ``meta_steps`` apply to each method and to the baseline's pre-training."""

    meta_steps: int = 1000
    meta_batch: int = 25
    shots: int = 10
    lam: float = 1.0
    inner_steps: int = 10
    inner_lr: float = 0.01
    imaml_lam: float = 1.0
    imaml_inner_steps: int = 10
    imaml_inner_lr: float = 0.01
    hf_inner_steps: int = 3
    hf_cg_steps: int = 5
    cg_steps: int = 5
    outer_lr: float = 1e-3
    eval_tasks: int = 200
    eval_queries: int = 100
    plot_tasks: int = 4
    seed: int = 0
    methods: Sequence[str] = DEMO_METHODS

    def train_config(self, method: str) -> TrainConfig:
        """The run of ``method``: iMAML's inner settings for the iMAML methods, else MAML's."""
        inner = dict(lam=self.lam, inner_steps=self.inner_steps, inner_lr=self.inner_lr)
        if method == "imaml-gd":
            inner = dict(lam=self.imaml_lam, inner_steps=self.imaml_inner_steps, inner_lr=self.imaml_inner_lr)
        elif method == "imaml-hf":
            inner = dict(lam=self.imaml_lam, inner_steps=self.hf_inner_steps, inner_cg_steps=self.hf_cg_steps)
        return make_config("sinusoid", method=method, shots=self.shots, queries=self.shots, **inner,
                           cg_steps=self.cg_steps, meta_batch=self.meta_batch, meta_steps=self.meta_steps,
                           outer_lr=self.outer_lr, seed=self.seed)


def pretrain_transfer(cfg: TrainConfig, progress: bool, device: torch.device = torch.device("cpu")
                      ) -> torch.nn.Module:
    """The no-meta-learning baseline: one network fitted by Adam to the pooled
    support and query points of ``meta_batch`` fresh training tasks per step."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    sampler = make_sampler(cfg, "train", cfg.seed, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.outer_lr)
    for _ in tqdm(range(cfg.meta_steps), desc="transfer", unit="step", disable=not progress):
        sx, sy, qx, qy = sampler.sample(cfg.meta_batch)
        x, y = torch.cat([sx, qx], 1).flatten(0, 1), torch.cat([sy, qy], 1).flatten(0, 1)
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    return model


_LOG_EVERY = 50  # meta-steps per metrics line of each method's run


def _train_method(cfg: TrainConfig, out: Path, device: str, progress: bool, threads: int) -> Tuple[Path, float]:
    """Meta-train one method into ``out`` (in this process or a worker); its
    checkpoint and training seconds.  KeyboardInterrupt if it was interrupted."""
    torch.set_num_threads(threads)
    result = train(cfg, RunOptions(out_dir=out, device=device, log_every=_LOG_EVERY, checkpoint_every=0,
                                   progress=progress))
    if result.interrupted:
        raise KeyboardInterrupt
    return result.checkpoint, result.seconds


def _steps_logged(metrics: Path) -> int:
    """The last meta-step in a run's metrics file, 0 before its first complete line."""
    try:
        train_lines = read_metrics(metrics).get("train", [])
    except (OSError, ValueError):  # not written yet, or being written
        return 0
    return train_lines[-1]["step"] if train_lines else 0


def _train_all(cfg: DemoConfig, out_dir: Path, device: str, progress: bool,
               workers: int) -> Dict[str, Tuple[Path, float]]:
    """Each method's checkpoint and training seconds.  With ``workers`` > 1 the
    methods train in that many processes at once (each with this process's torch
    threads, spawned, seeded alike: the same results as one after the other),
    with one progress bar over all their meta-steps, advanced at each metrics line."""
    threads = torch.get_num_threads()
    processes = min(workers, len(cfg.methods))
    if processes <= 1:
        return {m: _train_method(cfg.train_config(m), out_dir / m, device, progress, threads)
                for m in cfg.methods}
    done: Dict[str, Tuple[Path, float]] = {}
    with ProcessPoolExecutor(processes, multiprocessing.get_context("spawn")) as pool, \
            tqdm(total=cfg.meta_steps * len(cfg.methods), desc=f"meta-training ({processes} processes)",
                 unit="step", disable=not progress) as bar:
        futures = {pool.submit(_train_method, cfg.train_config(m), out_dir / m, device, False, threads): m
                   for m in cfg.methods}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in finished:
                done[futures[future]] = future.result()
            bar.n = max(bar.n, sum(cfg.meta_steps if m in done else _steps_logged(out_dir / m / METRICS_NAME)
                                   for m in cfg.methods))
            bar.refresh()
    return {m: done[m] for m in cfg.methods}


def run_demo(cfg: DemoConfig = DemoConfig(), out_dir: Optional[Path] = Path("out/demo"),
             progress: bool = True, device: str = "cpu", workers: int = 1) -> Dict[str, Dict[int, float]]:
    """Train, evaluate, print the table, write ``demo_results.json`` and the
    figures in ``out_dir``; returns {method: {k: mean query MSE}}.  Everything
    runs on ``device``; the methods train in ``workers`` processes at once
    (:func:`_train_all`).

    Each method's run folder (``out_dir/<method>``) holds its checkpoint and
    metrics, so ``imaml-ext eval`` and ``imaml-ext plot`` work on them.
    """
    out_dir = Path(out_dir)
    device = check_device(device)
    start = time.perf_counter()
    base = cfg.train_config("maml")  # the baselines fine-tune with MAML's SGD setting
    torch.manual_seed(cfg.seed)
    models = {"untrained": build_model(base).to(device)}
    configs = {"untrained": base}
    train_seconds: Dict[str, float] = {}
    for method, (checkpoint, seconds) in _train_all(cfg, out_dir, str(device), progress, workers).items():
        mcfg = cfg.train_config(method)
        model = build_model(mcfg).to(device)
        model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
        models[method], configs[method], train_seconds[method] = model, mcfg, seconds
    t0 = time.perf_counter()
    models["transfer"] = pretrain_transfer(base, progress, device)
    configs["transfer"] = base
    train_seconds["transfer"] = time.perf_counter() - t0

    sampler = make_sampler(base, "test", cfg.seed, queries=cfg.eval_queries, device=device)
    amplitude, phase = sampler.sample_tasks(cfg.eval_tasks)
    sx, sy, qx, qy = sampler.sample_points(amplitude, phase)
    table: Dict[str, Dict[str, float]] = {}
    ci: Dict[str, Dict[str, float]] = {}
    adapted: Dict[str, torch.Tensor] = {}
    residual: Dict[str, float] = {}
    how: Dict[str, str] = {}
    for name, model in models.items():
        method = name if name in cfg.methods else "sgd"
        mcfg = configs[name]
        table[name], ci[name] = {}, {}
        for k in STEPS:
            steps = mcfg.inner_steps if k is None else k
            phi = adapt(mcfg, model, sx, sy, steps, method=method)
            score = summarize(task_scores(mcfg, model, phi, qx, qy)["loss"])
            table[name][_column(k)], ci[name][_column(k)] = score.mean, score.ci95
        adapted[name] = phi
        how[name] = adaptation_text(mcfg, mcfg.inner_steps, method=method)
        if method.startswith("imaml"):
            residual[name] = float(inner_residual(mcfg, model, phi, sx, sy).median())
    total = time.perf_counter() - start

    print(f"\nSinusoid regression, {cfg.shots}-shot, {cfg.eval_tasks} held-out tasks: query MSE "
          f"(± 95% CI) after 0 and 1 adaptation steps and after each method's own adaptation (K steps, "
          f"as meta-trained)")
    print(f"{'initialisation':<32}" + "".join(f"{_column(k):>16}" for k in STEPS) + f"{'residual':>10}"
          + f"{'training':>11}")
    for name in models:
        cells = "".join(f"{f'{table[name][_column(k)]:.3f} ± {ci[name][_column(k)]:.3f}':>16}" for k in STEPS)
        res = f"{residual[name]:>10.3f}" if name in residual else f"{'-':>10}"
        trained = f"{train_seconds[name]:>9.0f} s" if name in train_seconds else f"{'-':>11}"
        print(f"{LABELS.get(name, name):<32}{cells}{res}{trained}")
    print("Each adapts as it was meta-trained (K = its own steps):")
    for name in models:
        print(f"  {LABELS.get(name, name)}: {how[name]}")
    print("residual: median over tasks of the iMAML inner problem's ‖∇L̂(φ) + λ(φ − θ)‖ / ‖∇L̂(θ)‖ "
          "after the adaptation (0: solved)")
    print(f"{cfg.meta_steps} meta-steps per method, meta-batch {cfg.meta_batch}, {max(workers, 1)} training "
          f"process(es); total {total:.0f} s")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo_results.json").write_text(json.dumps(
        {"config": {**asdict(cfg), "methods": list(cfg.methods)}, "query_mse": table, "ci95": ci,
         "inner_residual": residual, "adaptation": how,
         "train_seconds": train_seconds, "total_seconds": total, "workers": workers}, indent=2) + "\n")
    try:
        _draw(cfg, models, configs, adapted, amplitude, phase, sx, sy, out_dir)
    except MissingDependencyError as exc:
        print(f"no figures: {exc}")
    return table


def _column(k: Optional[int]) -> str:
    return "K (as trained)" if k is None else f"k={k}"


def _draw(cfg: DemoConfig, models, configs, adapted, amplitude, phase, sx, sy, out_dir: Path) -> None:
    """The fits after the last number of steps on the first ``plot_tasks`` tasks, and the learning curves."""
    n = min(cfg.plot_tasks, sx.shape[0])
    grid = torch.linspace(-5.0, 5.0, 200)
    truth = amplitude[:n, None] * torch.sin(grid[None, :].double() - phase[:n, None])
    fits = {}
    for name in models:
        if name == "untrained":
            continue
        task_loss = TaskLoss(models[name], F.mse_loss)
        with torch.no_grad():
            x = grid.to(sx.device).expand(n, -1)[..., None]
            fits[LABELS[name]] = task_loss.outputs(adapted[name][:n], x)[..., 0].cpu()
    fits_png = plot_fits(grid, truth.float(), sx[:n, :, 0].cpu(), sy[:n, :, 0].cpu(), fits,
                         out_dir / "demo_fits.png", title=f"held-out tasks, {cfg.shots} support points, "
                                                           "after each method's own adaptation")
    curves_png = plot_curves([out_dir / m / METRICS_NAME for m in cfg.methods], out_dir / "demo_curves.png",
                             labels=[LABELS[m] for m in cfg.methods])
    print(f"figures: {fits_png} (fits), {curves_png} (meta-training curves)")
