"""The training application's memory estimate of a meta-step against the measured peak.

For each setting, in a fresh process: load the data and build the model, read
the peak resident set size (``ru_maxrss``), run two meta-steps of
:class:`~imaml_ext.training.train.MetaStep`, read it again; the growth is the
measured peak of a meta-step, printed next to
:func:`~imaml_ext.training.memory.estimate_step_bytes`.  CPU, Linux.

    python benchmarks/bench_memory_estimate.py --data ../shared/data
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = [
    {"method": "imaml-gd"},
    {"method": "maml"},
    {"method": "fomaml"},
    {"method": "imaml-gd", "ways": 20, "shots": 5, "meta_batch": 8},
]


def measure(data: str, setting: dict) -> dict:
    import resource

    import torch

    from imaml_ext.training.experiment import build_model, build_outer_optimizer, make_config, make_sampler
    from imaml_ext.training.memory import estimate_step_bytes
    from imaml_ext.training.train import MetaStep

    torch.set_num_threads(1)
    cfg = make_config("omniglot", **setting)
    sampler = make_sampler(cfg, "train", 0, root=data)
    model = build_model(cfg)
    step = MetaStep(cfg, model, build_outer_optimizer(cfg, model))
    sx, _, qx, _ = sampler.sample(1)
    estimate = estimate_step_bytes(cfg.method, cfg.inner_steps, model, cfg.meta_batch, sx[0], qx[0])
    batches = [sampler.sample(cfg.meta_batch) for _ in range(2)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for batch in batches:
        step(batch)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"setting": setting, "estimate_mib": estimate / 2**20, "measured_mib": (after - before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.data, json.loads(args.one))))
        return
    for setting in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--data", args.data, "--one", json.dumps(setting)],
                             check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{json.dumps(r['setting']):55s} estimate {r['estimate_mib']:8.0f} MiB  measured peak growth "
              f"{r['measured_mib']:8.0f} MiB  ratio {r['estimate_mib'] / max(r['measured_mib'], 1):.2f}", flush=True)


if __name__ == "__main__":
    main()
