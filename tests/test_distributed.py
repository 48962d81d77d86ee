"""Data-parallel meta-training over tasks (torch.distributed, gloo on the CPU).

Jobs of 2 processes are started with torchrun (``python -m torch.distributed.run
--standalone``: a free local port each time) in a subprocess; each rank runs
tests/distributed_worker.py or ``-m imaml_ext``.  Their results are compared
with the same computation in this one process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import imaml_ext as im
from imaml_ext.distributed import TaskShard, split_tasks, task_shard, world
from imaml_ext.training.checkpoint import load_checkpoint
from imaml_ext.training.cli import main
from imaml_ext.training.experiment import METHODS, TrainConfig, build_model
from imaml_ext.training.parallel import cuda_device_for

from distributed_worker import one_meta_step
from test_train import DATA_ROOT, needs_omniglot

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
JOB_TIMEOUT = 600  # seconds: a hung job fails the test instead of the whole CI run


def torchrun(args, nproc=2, timeout=JOB_TIMEOUT):
    """Run ``torchrun --standalone --nproc-per-node nproc ARGS`` to its end; the CompletedProcess.

    On a timeout torchrun gets SIGTERM (it stops its workers) and then SIGKILL.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(WORKER.parent)]), OMP_NUM_THREADS="1")
    if DATA_ROOT is not None:
        env["IMAML_EXT_DATA"] = str(DATA_ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"torchrun {args} did not finish in {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


# ----------------------------------------------------------------------------- task shards (one process)

def test_split_tasks_covers_the_batch_once_in_order_with_weights_summing_to_one():
    for total, size in [(5, 2), (4, 2), (32, 3), (7, 7), (3, 4)]:
        shards = [split_tasks(total, r, size) for r in range(size)]
        assert [s.start for s in shards] == [0] + [s.stop for s in shards[:-1]]
        assert shards[-1].stop == total
        assert max(s.size for s in shards) - min(s.size for s in shards) <= 1
        assert sum(s.weight for s in shards) == pytest.approx(1.0, abs=1e-15)
    assert split_tasks(5, 0, 2) == TaskShard(0, 3, 5) and split_tasks(5, 1, 2) == TaskShard(3, 5, 5)


def test_one_process_is_the_whole_batch_and_world_size_without_a_group_is_an_error(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world() == (0, 1) and task_shard(5) == TaskShard(0, 5, 5)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 but torch.distributed is not initialised"):
        task_shard(5)
    model = nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="not initialised"):
        im.distributed.all_reduce_meta_grad(model)


def test_all_reduce_meta_grad_in_one_process_applies_the_weight_and_returns_the_metrics(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)
    model(torch.randn(4, 3)).sum().backward()
    model[0].bias.grad = None  # a missing gradient counts as zeros
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    loss, = im.distributed.all_reduce_meta_grad(model, 0.25, torch.tensor(2.0))
    assert float(loss) == 0.5
    for b, p in zip(before, model.parameters()):
        if p.requires_grad:
            expected = torch.zeros_like(p) if b is None else 0.25 * b
            assert torch.equal(p.grad, expected)
    assert model[1].bias.grad is None


def test_a_gloo_sum_returns_after_the_worker_thread_let_go_of_the_buffer():
    """gloo's worker drops its references to a collective's tensors just after the
    result is ready; a release still pending when the interpreter shuts down aborts
    the process.  all_reduce_sum returns only after the release: over 2000 sums in a
    1-rank group none comes back with the buffer still held (plain ``dist.all_reduce``
    came back held 11–18 times in 2000 here) and every sum is right."""
    dist = torch.distributed
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        held_after = 0
        for i in range(2000):
            buffer = torch.full((1000,), float(i))
            before = buffer._use_count()
            assert im.distributed.all_reduce_sum(buffer) is buffer
            held_after += buffer._use_count() > before
            assert torch.equal(buffer, torch.full((1000,), float(i)))
        assert held_after == 0
    finally:
        dist.destroy_process_group()


def test_too_few_tasks_for_the_processes_and_more_ranks_than_gpus_are_clear_errors(monkeypatch):
    monkeypatch.setattr(im.distributed, "world", lambda group=None: (1, 4))
    with pytest.raises(ValueError, match="a meta-batch of 3 tasks cannot be split over 4 processes"):
        task_shard(3)
    assert cuda_device_for(1, 2, 2) == "cuda:1"
    with pytest.raises(ValueError, match="2 processes on this node but only 1 CUDA device"):
        cuda_device_for(0, 2, 1)


# ----------------------------------------------------------------------------- 2 processes vs 1

def test_two_processes_give_the_one_process_meta_gradient_in_float64(tmp_path):
    """T = 5 tasks split 3 + 2: the weighted sum is the mean over the 5 tasks, for every method."""
    ok(torchrun([WORKER, "grad", tmp_path / "grads.pt"]))
    two = torch.load(tmp_path / "grads.pt", weights_only=True)
    for method in METHODS:
        grads, loss, acc = one_meta_step(method)
        assert two[method]["all_reduce"] == 1, method  # one collective per meta-step
        flat_one = torch.cat([g.flatten() for g in grads])
        flat_two = torch.cat([g.flatten() for g in two[method]["grads"]])
        assert flat_one.norm() > 0
        assert float((flat_two - flat_one).norm() / flat_one.norm()) <= 1e-12, method
        assert float(abs(two[method]["loss"] - loss)) <= 1e-12 * float(abs(loss)), method
        assert float(abs(two[method]["acc"] - acc)) <= 1e-6, method  # a float32 mean of 0/1 values


# Sinusoid regression: a smooth problem.  (On Omniglot's binary images, max-pooling and ReLU
# meet exact ties that a rounding difference flips, so two float32 runs of 20 steps can part
# by more than 1e-5 however they are split; the float64 meta-gradients above agree there.)
TRAIN = ["--dataset", "sinusoid", "--shots", "5", "--queries", "5", "--hidden", "16", "--inner-steps", "3",
         "--cg-steps", "3", "--meta-batch", "5", "--meta-steps", "20", "--outer-lr", "0.01", "--log-every", "2",
         "--checkpoint-every", "5", "--no-progress", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """20 meta-steps of 2 processes, uninterrupted."""
    out = tmp_path_factory.mktemp("dist") / "two"
    ok(torchrun(["-m", "imaml_ext", "train", *TRAIN, "--out", out]))
    return out


def _params(run):
    return load_checkpoint(run)["model"]


def _train_lines(run):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(tmp_path, two_process_run):
    before = torch.get_num_threads()
    try:
        assert main(["train", *TRAIN, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(before)
    one, two = _params(tmp_path / "one"), _params(two_process_run)
    cfg = TrainConfig.from_dict(load_checkpoint(two_process_run)["config"])
    torch.manual_seed(cfg.seed)
    start = build_model(cfg).state_dict()  # the initialisation of both runs
    flat = {name: torch.cat([p[k].flatten() for k in sorted(p)]) for name, p in
            (("one", one), ("two", two), ("start", start))}
    moved = float((flat["one"] - flat["start"]).norm() / flat["start"].norm())
    assert moved > 0.01  # training changed the parameters by more than the tolerance below
    for name in one:
        assert float((two[name] - one[name]).norm() / one[name].norm()) <= 1e-5, name
    assert sorted(p.name for p in two_process_run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "run.lock"]
    lines_one, lines_two = _train_lines(tmp_path / "one"), _train_lines(two_process_run)
    # Rank 0 alone wrote, once per line: every 2 steps, and at the checkpoints (every 5) that end a window.
    assert [r["step"] for r in lines_two] == sorted(set(range(2, 21, 2)) | {5, 15})
    assert [r["step"] for r in lines_one] == [r["step"] for r in lines_two]
    for a, b in zip(lines_one, lines_two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_sigkill_then_resume_on_two_processes_equals_the_uninterrupted_run(tmp_path, two_process_run):
    out = tmp_path / "killed"
    killed = torchrun([WORKER, "die", 13, "--", "train", *TRAIN, "--out", out])
    assert killed.returncode != 0
    assert load_checkpoint(out)["step"] == 10
    ok(torchrun(["-m", "imaml_ext", "train", "--resume", out, "--log-every", "2", "--checkpoint-every", "5",
                 "--no-progress", "--threads", "1", "--device", "cpu"]))
    whole, resumed = load_checkpoint(two_process_run), load_checkpoint(out)
    assert resumed["step"] == 20
    for name in whole["model"]:
        assert torch.equal(whole["model"][name], resumed["model"][name]), name
    assert torch.equal(whole["sampler"]["generator"], resumed["sampler"]["generator"])
    assert _train_lines(out) == _train_lines(two_process_run)


@needs_omniglot
def test_eval_on_two_processes_equals_one(tmp_path, monkeypatch):
    """11 test tasks in batches of 4: slices of 2 + 2 and, in the last batch, 2 + 1."""
    monkeypatch.setenv("IMAML_EXT_DATA", str(DATA_ROOT))
    run = tmp_path / "omniglot"
    flags = ["--no-progress", "--threads", "1", "--device", "cpu"]
    before = torch.get_num_threads()
    try:
        assert main(["train", "--dataset", "omniglot", "--ways", "3", "--hidden", "8", "--inner-steps", "2",
                     "--meta-batch", "2", "--meta-steps", "3", "--out", str(run), *flags]) == 0
        flags += ["--tasks", "11", "--batch", "4"]
        assert main(["eval", str(run), *flags, "--out", str(tmp_path / "one.json")]) == 0
    finally:
        torch.set_num_threads(before)
    ok(torchrun(["-m", "imaml_ext", "eval", run, *flags, "--out", tmp_path / "two.json"]))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert len(two["per_task"]["acc"]) == 11 and len(set(two["per_task"]["acc"])) > 1
    assert two["per_task"]["acc"] == one["per_task"]["acc"]
    assert two["per_task"]["loss"] == pytest.approx(one["per_task"]["loss"], rel=1e-6)
    assert two["acc"] == one["acc"]


# ----------------------------------------------------------------------------- failures

def test_a_rank_that_raises_ends_the_job_quickly_naming_the_rank(tmp_path):
    stamp = tmp_path / "raised_at"
    result = torchrun([WORKER, "raise", 3, stamp, "--", "train", *TRAIN, "--out", tmp_path / "run"], timeout=300)
    ended = time.time()
    assert result.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: deliberate failure in a meta-step" in result.stderr
    assert ended - float(stamp.read_text()) < 30  # torchrun stops rank 0, blocked in the all-reduce


def test_a_meta_batch_smaller_than_the_processes_is_a_usage_error(tmp_path):
    args = list(TRAIN)
    args[args.index("--meta-batch") + 1] = "1"
    result = torchrun(["-m", "imaml_ext", "train", *args, "--out", tmp_path / "run"], timeout=300)
    assert result.returncode != 0
    assert "--meta-batch: a meta-batch of 1 tasks cannot be split over 2 processes" in result.stderr
