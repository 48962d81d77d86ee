"""What a meta-learning run is: its configuration, and the model, tasks and loss it implies.

:class:`TrainConfig` holds everything that determines the trained
parameters (dataset, task shape, method and its hyper-parameters, outer
optimizer, seed); where a run happens (device, data folder, output folder)
is not part of it.  :func:`make_config` layers, from weakest to strongest:
the dataset's defaults (:data:`DATASET_DEFAULTS`), a named preset
(:mod:`imaml_ext.training.presets`), explicit values.

Task streams are seeded per purpose with :func:`stream_seed`, so the
training tasks of seed s, the validation tasks and the test tasks are
independent streams, and the test tasks are the same for every training seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import MiniImageNet, Omniglot, SinusoidTasks, TaskSampler
from ..data.omniglot import load_omniglot_arrays
from ..models import MiniImagenetConvNet, OmniglotConvNet, SinusoidMLP
from .methods import implicit_method_names, method_names
from .presets import get_preset

__all__ = [
    "DATASETS", "METHODS", "IMAML_METHODS", "OUTER_OPTIMIZERS", "DATASET_DEFAULTS",
    "TrainConfig", "make_config", "build_model", "build_outer_optimizer", "make_sampler",
    "loss_function", "is_classification", "stream_seed",
]

DATASETS = ("omniglot", "miniimagenet", "sinusoid")
METHODS = method_names()
IMAML_METHODS = implicit_method_names()
OUTER_OPTIMIZERS = ("adam", "sgd")
SUBSETS = ("train", "val", "test")
_PURPOSES = {"train": 0, "val": 1, "test": 2}

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
    Omniglot.  ``lam`` and ``cg_steps`` apply to iMAML, ``inner_cg_steps``
    to iMAML-HF; ``inner_lr`` is the GD / SGD step of every method except
    iMAML-HF.  ``hidden`` is the conv filters (Omniglot, MiniImageNet) or
    the MLP width (sinusoid).
    """

    dataset: str = "omniglot"
    method: str = "imaml-gd"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    lam: float = 2.0
    inner_steps: int = 16
    inner_lr: float = 0.05
    cg_steps: int = 5
    inner_cg_steps: int = 5
    meta_batch: int = 32
    meta_steps: int = 10000
    outer_opt: str = "adam"
    outer_lr: float = 1e-3
    hidden: int = 64
    rotations: Tuple[int, ...] = field(default=(0, 90, 180, 270))
    val_classes: int = 0
    seed: int = 0

    def __post_init__(self):
        self.rotations = tuple(int(r) for r in self.rotations)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.outer_opt not in OUTER_OPTIMIZERS:
            raise ValueError(f"outer_opt must be one of {OUTER_OPTIMIZERS}, got {self.outer_opt!r}")
        for name in ("ways", "shots", "cg_steps", "inner_cg_steps", "meta_batch", "meta_steps", "hidden"):
            _check_int(name, getattr(self, name), 1)
        for name in ("queries", "inner_steps", "val_classes", "seed"):
            _check_int(name, getattr(self, name), 0)
        if self.queries < 1:
            raise ValueError("queries must be ≥ 1: the query set gives the meta-training loss")
        for name in ("lam", "inner_lr", "outer_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not self.rotations or any(r % 90 or not 0 <= r < 360 for r in self.rotations) \
                or len(set(self.rotations)) != len(self.rotations):
            raise ValueError(f"rotations must be distinct angles from (0, 90, 180, 270), got {self.rotations}")

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


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


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
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
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
    state = np.random.SeedSequence([int(seed), _PURPOSES[purpose]]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def make_sampler(cfg: TrainConfig, subset: str, seed: int, *, root=None, queries: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu") -> Union[TaskSampler, SinusoidTasks]:
    """The task sampler of ``subset`` (train / val / test) drawing from ``stream_seed(seed, subset)``.

    Omniglot's training characters come with ``cfg.rotations``; validation
    and test characters are used unrotated.  ``queries`` overrides
    ``cfg.queries``.  Raises :class:`~imaml_ext.data.DatasetNotFoundError`
    when the data is missing.
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
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
