"""What a meta-learning run is: its configuration, and the model, tasks and loss it implies.

:class:`TrainConfig` holds everything that determines the trained
parameters (dataset, task shape, method and its hyper-parameters, outer
optimizer, seed); where and how a run happens (device, data folder, output
folder, logging) is :class:`RunOptions`.  Their fields are declared with
:func:`~imaml_ext.training.flags.option`: one declaration gives the field's
check and its command-line flag.  :func:`make_config` layers, from weakest to strongest:
the dataset's defaults (:data:`DATASET_DEFAULTS`), a named preset
(:mod:`imaml_ext.training.presets`), explicit values.

Task streams are seeded per purpose with :func:`stream_seed`, so the
training tasks of seed s, the validation tasks and the test tasks are
independent streams, and the test tasks are the same for every training seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data import MiniImageNet, Omniglot, SinusoidTasks, TaskSampler, derive_seed
from ..data.omniglot import load_omniglot_arrays
from ..batching import BATCHING_MODES
from ..data.paths import SUBSETS, check_subset
from ..hvp import CURVATURES
from ..models import MiniImagenetConvNet, OmniglotConvNet, SinusoidMLP
from .flags import NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, Choice, Rotations, check_fields, option
from .methods import implicit_method_names, method_names
from .presets import get_preset

__all__ = [
    "DATASETS", "METHODS", "IMAML_METHODS", "OUTER_OPTIMIZERS", "DATASET_DEFAULTS",
    "TrainConfig", "make_config", "build_model", "build_outer_optimizer", "make_sampler",
    "loss_function", "is_classification", "stream_seed", "check_device", "RunOptions",
]

DATASETS = ("omniglot", "miniimagenet", "sinusoid")
METHODS = method_names()
IMAML_METHODS = implicit_method_names()
OUTER_OPTIMIZERS = ("adam", "sgd")
_PURPOSES = {purpose: index for index, purpose in enumerate(SUBSETS)}  # train 0, val 1, test 2
_TASK, _OPT = "task and method", "optimisation"
_DATASET = Choice(DATASETS)

# Defaults per dataset.  Omniglot: λ = 2, 5 CG steps and 16 inner steps are
# the iMAML paper's; inner lr, outer lr, meta-batch and queries are our
# choices (see imaml_ext.training.presets).
# MiniImageNet: not tuned here.  Sinusoid: tuned on this project's demo.
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "omniglot": dict(ways=5, shots=1, queries=15, lam=2.0, inner_steps=16, inner_lr=0.05,
                     cg_steps=5, meta_batch=32, outer_lr=1e-3, hidden=64,
                     rotations=(0, 90, 180, 270)),
    "miniimagenet": dict(ways=5, shots=1, queries=15, lam=0.5, inner_steps=10, inner_lr=0.01,
                         cg_steps=5, meta_batch=4, outer_lr=1e-3, hidden=32, rotations=(0,)),
    "sinusoid": dict(ways=1, shots=10, queries=10, lam=1.0, inner_steps=10, inner_lr=0.01,
                     cg_steps=5, meta_batch=25, outer_lr=1e-3, hidden=40, rotations=(0,)),
}


@dataclass
class TrainConfig:
    """The hyper-parameters of one meta-training run.

    ``ways`` is ignored for sinusoid regression; ``rotations`` (degrees, each
    rotation of a training character a class of its own) and
    ``val_classes`` (training characters held out for validation) apply to
    Omniglot.  ``lam``, ``cg_steps`` and ``curvature`` (the matrix of the
    backward solve and of iMAML-HF's Newton steps, :func:`imaml_ext.imaml`)
    apply to iMAML, ``inner_cg_steps`` to iMAML-HF; ``inner_lr`` is the GD / SGD step of every method except
    iMAML-HF.  ``hidden`` is the conv filters (Omniglot, MiniImageNet) or
    the MLP width (sinusoid).
    """

    dataset: str = option("omniglot", _DATASET, "default: omniglot (or the preset's)", _TASK)
    method: str = option("imaml-gd", Choice(METHODS), "default: imaml-gd", _TASK)
    ways: int = option(5, POSITIVE_INT, "N, classes per task", _TASK)
    shots: int = option(1, POSITIVE_INT, "K, support examples per class (sinusoid: per task)", _TASK)
    queries: int = option(15, POSITIVE_INT, "query examples per class (sinusoid: per task)", _TASK)
    lam: float = option(2.0, POSITIVE_FLOAT, "iMAML's λ (proximal strength)", _TASK)
    inner_steps: int = option(16, NONNEGATIVE_INT, "inner GD / SGD / Newton steps", _TASK)
    inner_lr: float = option(0.05, POSITIVE_FLOAT, "inner GD / SGD step size", _TASK)
    cg_steps: int = option(5, POSITIVE_INT, "CG iterations of iMAML's meta-gradient", _TASK)
    inner_cg_steps: int = option(5, POSITIVE_INT, "CG iterations per Newton step (imaml-hf)", _TASK)
    curvature: str = option(CURVATURES[0], Choice(CURVATURES),
                            "iMAML's curvature: hessian (default) or gauss_newton (positive "
                            "semi-definite, for losses convex in the outputs)", _TASK)
    meta_batch: int = option(32, POSITIVE_INT, "tasks per meta-step (T)", _OPT)
    meta_steps: int = option(10000, POSITIVE_INT, "total meta-steps (with --resume: a new total)", _OPT)
    outer_opt: str = option("adam", Choice(OUTER_OPTIMIZERS), "outer optimizer (default adam)", _OPT)
    outer_lr: float = option(1e-3, POSITIVE_FLOAT, "outer learning rate", _OPT)
    hidden: int = option(64, POSITIVE_INT, "conv filters (images) or MLP width (sinusoid)", _TASK)
    rotations: Tuple[int, ...] = option((0, 90, 180, 270), Rotations(),
                                        "Omniglot training rotations, e.g. 0,90,180,270", _TASK)
    val_classes: int = option(0, NONNEGATIVE_INT, "Omniglot training characters held out for validation", _TASK)
    seed: int = option(0, NONNEGATIVE_INT, "seed of the initialisation and training tasks (default 0)", _OPT)

    def __post_init__(self):
        self.rotations = tuple(int(r) for r in self.rotations)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (the rules of :mod:`.flags`,
        which the command line applies to its flags too)."""
        check_fields(self)

    def to_dict(self) -> Dict[str, Any]:
        """JSON- and checkpoint-friendly dict (``rotations`` as a list)."""
        out = dataclasses.asdict(self)
        out["rotations"] = list(self.rotations)
        return out

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def name(self) -> str:
        """A short run name, e.g. ``omniglot-5w1s-imaml-gd-seed0``."""
        shape = f"{self.shots}shot" if self.dataset == "sinusoid" else f"{self.ways}w{self.shots}s"
        return f"{self.dataset}-{shape}-{self.method}-seed{self.seed}"


_RUN = "run"


@dataclass
class RunOptions:
    """Where and how a run happens (not part of the checkpointed configuration).

    ``log_every``: steps per metrics line; ``checkpoint_every``: steps per
    checkpoint (0: only at the end or on interruption);
    ``checkpoint_minutes``: also a checkpoint whenever this much training
    time has passed since the last one, so a crash loses at most that;
    ``val_every``: steps per validation (0: none) on ``val_tasks`` tasks,
    the same tasks each time; ``eval_seed``: seed of those tasks;
    ``threads``: torch CPU threads (None: as set); ``batching``: how the
    training meta-steps run the tasks (:mod:`imaml_ext.batching`).

    A checkpoint stores :meth:`stored` (all but ``out_dir`` and
    ``progress``); a resumed run reuses them unless told otherwise
    (:meth:`build`).
    """

    out_dir: Path
    device: str = "cpu"
    data_root: Optional[str] = None
    log_every: int = option(10, POSITIVE_INT, "steps per metrics line (default 10)", _RUN)
    checkpoint_every: int = option(500, NONNEGATIVE_INT, "steps per checkpoint; 0: only at the end (default 500)",
                                   _RUN)
    checkpoint_minutes: float = option(5.0, POSITIVE_FLOAT, "also checkpoint after this many minutes of training "
                                       "since the last checkpoint (default 5)", _RUN)
    batching: str = option("vmap", Choice(BATCHING_MODES),
                           "how the tasks run in training: vmap (default), loop, compiled (vmap with the "
                           "inner steps compiled by torch.compile; not with maml), auto", _RUN)
    val_every: int = option(0, NONNEGATIVE_INT, "steps per validation; 0: none", _RUN)
    val_tasks: int = option(100, POSITIVE_INT, "tasks per validation (default 100)", _RUN)
    eval_seed: int = option(0, NONNEGATIVE_INT)
    threads: Optional[int] = None
    progress: bool = True

    def __post_init__(self):
        check_fields(self)

    def stored(self) -> Dict[str, Any]:
        """The options a checkpoint keeps for a resumed run (all but ``out_dir`` and ``progress``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_STORED}

    @classmethod
    def build(cls, out_dir: Path, stored: Dict[str, Any], progress: bool = True,
              **given: Any) -> "RunOptions":
        """Options of a run: the defaults, then the ``stored`` ones of a resumed run (known names only),
        then those ``given`` (None entries ignored)."""
        names = {f.name for f in dataclasses.fields(cls)} - _NOT_STORED
        values = {k: v for k, v in stored.items() if k in names}
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(out_dir=out_dir, progress=progress, **values)


_NOT_STORED = {"out_dir", "progress"}


def make_config(dataset: Optional[str] = None, preset: Optional[str] = None,
                **explicit: Any) -> TrainConfig:
    """A :class:`TrainConfig` from the dataset's defaults, then ``preset``,
    then the ``explicit`` values (entries that are None are ignored).

    The dataset is ``dataset``, else the preset's, else Omniglot; a preset
    for another dataset than an explicit ``dataset`` is an error.
    """
    preset_values: Dict[str, Any] = dict(get_preset(preset).values) if preset else {}
    if dataset is not None and preset_values.get("dataset", dataset) != dataset:
        raise ValueError(f"preset {preset!r} is for dataset {preset_values['dataset']!r}, "
                         f"not {dataset!r}")
    dataset = dataset or preset_values.get("dataset", "omniglot")
    _DATASET.check("dataset", dataset)
    values: Dict[str, Any] = dict(DATASET_DEFAULTS[dataset], dataset=dataset)
    values.update(preset_values)
    values.update({k: v for k, v in explicit.items() if v is not None})
    return TrainConfig.from_dict(values)


def is_classification(cfg: TrainConfig) -> bool:
    return cfg.dataset != "sinusoid"


def loss_function(cfg: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One task's loss: cross-entropy (logits [n, N], labels [n]) or MSE ([n, 1], [n, 1])."""
    return F.cross_entropy if is_classification(cfg) else F.mse_loss


def build_model(cfg: TrainConfig) -> nn.Module:
    """The dataset's network, initialised from the global torch RNG."""
    if cfg.dataset == "omniglot":
        return OmniglotConvNet(ways=cfg.ways, in_channels=1, hidden=cfg.hidden)
    if cfg.dataset == "miniimagenet":
        return MiniImagenetConvNet(ways=cfg.ways, hidden=cfg.hidden)
    return SinusoidMLP(hidden=cfg.hidden)


def build_outer_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.outer_opt == "adam":
        return torch.optim.Adam(params, lr=cfg.outer_lr)
    return torch.optim.SGD(params, lr=cfg.outer_lr)


def stream_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for the task stream of ``purpose`` (train / val / test) under ``seed``."""
    return derive_seed(seed, _PURPOSES[purpose])


def check_device(name: str, what: str = "device") -> torch.device:
    """``torch.device(name)``, or a ValueError if it is not a device or is a CUDA one without CUDA."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {name}: CUDA is not available on this machine")
    return device


def make_sampler(cfg: TrainConfig, subset: str, seed: int, *, root=None, queries: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu") -> Union[TaskSampler, SinusoidTasks]:
    """The task sampler of ``subset`` (train / val / test) drawing from ``stream_seed(seed, subset)``.

    Omniglot's training characters come with ``cfg.rotations``; validation
    and test characters are used unrotated.  ``queries`` overrides
    ``cfg.queries``.  Raises :class:`~imaml_ext.data.DatasetNotFoundError`
    when the data is missing.
    """
    check_subset(subset)
    queries = cfg.queries if queries is None else queries
    generator_seed = stream_seed(seed, subset)
    if cfg.dataset == "sinusoid":
        return SinusoidTasks(shots=cfg.shots, queries=queries, seed=generator_seed, device=device)
    if cfg.dataset == "omniglot":
        if subset == "val" and cfg.val_classes == 0:
            raise ValueError("Omniglot validation needs held-out training characters: set val_classes > 0 "
                             "(--val-classes)")
        arrays = load_omniglot_arrays(root)
        images = Omniglot.from_arrays(arrays, subset, val_classes=cfg.val_classes,
                                      rotations=cfg.rotations if subset == "train" else (0,)).images
    else:
        images = MiniImageNet(root, subset).images
    return TaskSampler(images, cfg.ways, cfg.shots, queries, seed=generator_seed, device=device)
