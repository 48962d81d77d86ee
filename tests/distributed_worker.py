"""The program each rank runs in tests/test_distributed.py (started by torchrun).

    distributed_worker.py grad OUT            one float64 meta-step per method; rank 0 saves
                                              the meta-gradients, losses and all-reduce counts
    distributed_worker.py die STEP -- ARGS    imaml-ext ARGS; rank 0 SIGKILLs itself at step STEP
    distributed_worker.py raise STEP FILE -- ARGS
                                              imaml-ext ARGS; rank 1 raises at step STEP after
                                              writing the time to FILE
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from imaml_ext.training.cli import main
from imaml_ext.training.experiment import METHODS, build_model, make_config
from imaml_ext.training.train import MetaStep

GRAD_TASKS = 5  # T = 5 over 2 processes: slices of 3 and 2 tasks, the weighted split


def grad_config(method: str):
    return make_config("omniglot", method=method, ways=3, shots=1, queries=2, hidden=4, inner_steps=2,
                       cg_steps=3, inner_cg_steps=2, meta_batch=GRAD_TASKS)


def grad_batch():
    """A float64 meta-batch of GRAD_TASKS 3-way tasks on random 28×28 images, the same in every process."""
    g = torch.Generator().manual_seed(7)
    sx = torch.rand(GRAD_TASKS, 3, 1, 28, 28, generator=g, dtype=torch.float64)
    qx = torch.rand(GRAD_TASKS, 6, 1, 28, 28, generator=g, dtype=torch.float64)
    sy = torch.arange(3).repeat(GRAD_TASKS, 1)
    qy = torch.arange(3).repeat_interleave(2).repeat(GRAD_TASKS, 1)
    return sx, sy, qx, qy


def grad_model(method: str):
    torch.manual_seed(0)
    return build_model(grad_config(method)).double()


def one_meta_step(method: str, sync=None):
    """The meta-gradients [P_i] and the loss of one meta-step of ``method`` on :func:`grad_batch`."""
    model = grad_model(method)
    step = MetaStep(grad_config(method), model, torch.optim.SGD(model.parameters(), lr=0.0), sync)
    loss, acc = step(grad_batch())
    return [p.grad.clone() for p in model.parameters()], loss, acc


def _grad(out: str) -> None:
    from imaml_ext.training.parallel import GradientSync, process_group
    calls = {"all_reduce": 0}
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls["all_reduce"] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    with process_group("cpu") as ranks:
        results = {}
        for method in METHODS:
            before = calls["all_reduce"]
            grads, loss, acc = one_meta_step(method, GradientSync(GRAD_TASKS))
            results[method] = {"grads": grads, "loss": loss, "acc": acc,
                               "all_reduce": calls["all_reduce"] - before}
        if ranks.is_main:
            torch.save(results, out)


def _patch_step(hook) -> None:
    """Call ``hook(step_number)`` before every meta-step of training."""
    original = MetaStep.__call__
    count = {"n": 0}

    def patched(self, batch):
        count["n"] += 1
        hook(count["n"])
        return original(self, batch)

    MetaStep.__call__ = patched


def _cli_args(argv):
    return argv[argv.index("--") + 1:]


def run(argv) -> int:
    mode = argv[0]
    if mode == "grad":
        _grad(argv[1])
        return 0
    rank = int(os.environ.get("RANK", "0"))
    if mode == "die":
        at = int(argv[1])
        if rank == 0:
            _patch_step(lambda n: os.kill(os.getpid(), signal.SIGKILL) if n == at else None)
    elif mode == "raise":
        at, stamp = int(argv[1]), argv[2]

        def fail(n):
            if n == at:
                with open(stamp, "w") as f:
                    f.write(repr(time.time()))
                raise RuntimeError("deliberate failure in a meta-step")

        if rank == 1:
            _patch_step(fail)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return main(_cli_args(argv))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
