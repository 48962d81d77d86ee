"""Named training settings: the iMAML paper's Omniglot experiments.

From the paper (Rajeswaran et al. 2019, its Omniglot experiments): λ = 2, 5 CG
steps, 16 inner GD steps for 5-way and 25 for 20-way.  Our choices, not the
paper's: inner learning rate 0.05, Adam with learning rate 1e-3, meta-batch
32 (5-way) / 16 (20-way), 15 (5-way) / 5 (20-way) query examples per class,
rotations by 0/90/180/270 as extra training classes, 20,000 meta-steps, and
for iMAML-HF 5 Newton steps of 5 CG iterations each.  The inner learning
rate is halved from 0.1 because a 5-way 1-shot run with 0.1 (meta-batch 8)
diverged after about 250 meta-steps: as the meta-learned network sharpened,
the inner gradient descent overshot (support loss 2.1 → 4.5 in three steps).  The test characters
are the project's fixed split (:func:`imaml_ext.data.omniglot_split`).

One preset per iMAML method of :data:`~imaml_ext.training.methods.METHODS`
(its inner solver, GD or HF), way (5, 20) and shot (1, 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

from .methods import METHODS, Method

__all__ = ["Preset", "PRESETS", "get_preset", "preset_names", "describe_presets"]


@dataclass(frozen=True)
class Preset:
    """A named partial :class:`~imaml_ext.training.experiment.TrainConfig` and where its values come from."""

    name: str
    values: Dict[str, Any]
    note: str


def _omniglot(ways: int, shots: int, method: Method) -> Preset:
    five = ways == 5
    solver = method.options["inner_solver"]
    values = dict(dataset="omniglot", method=method.name, ways=ways, shots=shots,
                  queries=15 if five else 5, lam=2.0, cg_steps=5, inner_lr=0.05,
                  meta_batch=32 if five else 16, outer_opt="adam", outer_lr=1e-3,
                  meta_steps=20000, rotations=(0, 90, 180, 270))
    if solver == "gd":
        values["inner_steps"] = 16 if five else 25
        note = (f"paper: λ=2, 5 CG steps, {values['inner_steps']} inner GD steps; ours: inner lr 0.05, "
                f"Adam 1e-3, meta-batch {values['meta_batch']}, {values['queries']} queries/class, 20k steps")
    else:
        values.update(inner_steps=5, inner_cg_steps=5)
        note = (f"paper: λ=2, 5 CG steps; ours: 5 Newton steps × 5 CG, Adam 1e-3, "
                f"meta-batch {values['meta_batch']}, {values['queries']} queries/class, 20k steps")
    return Preset(f"omniglot-{ways}w{shots}s-{method.name}", values, note)


PRESETS: Dict[str, Preset] = {
    p.name: p for p in (_omniglot(ways, shots, method)
                        for method in METHODS.values() if method.implicit
                        for ways in (5, 20) for shots in (1, 5))}


def preset_names() -> List[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}") from None


def describe_presets() -> str:
    """One line per preset: name and the origin of its values."""
    width = max(map(len, PRESETS))
    return "\n".join(f"{name:<{width}}  {PRESETS[name].note}" for name in preset_names())
