"""Training runs under real use: one training per run folder, resume that remembers how the run
was started, checkpoints by wall time, no going back, a damaged metrics tail, a non-finite
meta-gradient, and SIGKILLs at random moments (the quick version of benchmarks/soak.py's fault run)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imaml_ext.training.checkpoint import load_checkpoint
from imaml_ext.training.experiment import METHODS, build_model, build_outer_optimizer, make_sampler
from imaml_ext.training.gradcheck import NonFiniteStepError
from imaml_ext.training.metrics import read_metrics
from imaml_ext.training.runfolder import LOCK_NAME, RunError, RunFolderBusyError, RunLock
from imaml_ext.training.train import Checkpointer, MetaStep, train

from test_cli import REPO, TINY, exit_code
from test_train import DATA_ROOT, one_thread, opts, tiny  # noqa: F401 (one_thread: a fixture)


def interrupt_after(monkeypatch, steps):
    """Make training receive SIGINT during its ``steps``-th meta-step of this process."""
    calls = {"n": 0}
    original = MetaStep.__call__

    def step_then_signal(self, batch):
        result = original(self, batch)
        calls["n"] += 1
        if calls["n"] == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(MetaStep, "__call__", step_then_signal)


def cli_process(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "imaml_ext", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metric_lines(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the run folder's lock

def test_second_training_into_a_live_run_fails_naming_the_pid_and_a_dead_ones_lock_does_not_block(tmp_path):
    run = tmp_path / "run"
    first = cli_process(*TINY, "--meta-steps", "1000000", "--log-every", "1", "--checkpoint-every", "1",
                        "--out", str(run))
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").is_file():  # the first one is training
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        for argv in ([*TINY, "--meta-steps", "5", "--out", str(run)],  # a new run into its folder
                     ["--resume", str(run), "--meta-steps", "2000000"]):  # or continuing it
            second = cli_process(*argv)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            assert f"{run} is in use by another training (PID {first.pid}" in err and "Traceback" not in err
        first.send_signal(signal.SIGKILL)  # dies holding the lock
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert (run / LOCK_NAME).read_text().strip() == str(first.pid)  # its lock file stays behind
    step = load_checkpoint(run)["step"]
    third = cli_process("--resume", str(run), "--meta-steps", str(step + 2))
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert f"done: {step + 2} steps" in out and load_checkpoint(run)["step"] == step + 2


def test_lock_is_exclusive_within_a_process_too_and_released_on_exit(tmp_path, one_thread):
    with RunLock(tmp_path) as lock:
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(RunFolderBusyError, match=f"PID {os.getpid()}"):
            train(tiny(meta_steps=1), opts(tmp_path))
        (tmp_path / ".checkpoint.pt.abc123.part").write_bytes(b"half a checkpoint")
        assert [p.name for p in lock.remove_partials()] == [".checkpoint.pt.abc123.part"]
    assert train(tiny(meta_steps=1), opts(tmp_path)).step == 1  # released


# ----------------------------------------------------------------------------- resume remembers

@pytest.mark.skipif(DATA_ROOT is None, reason="shared Omniglot copy not found")
def test_resume_hint_works_as_printed_without_data_or_threads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IMAML_EXT_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default data root holds nothing
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    interrupt_after(monkeypatch, 2)
    code, _, err = exit_code(["train", "--dataset", "omniglot", "--ways", "2", "--shots", "1", "--queries", "1",
                              "--hidden", "4", "--meta-batch", "2", "--inner-steps", "1", "--cg-steps", "1",
                              "--rotations", "0", "--meta-steps", "4", "--data", str(DATA_ROOT),
                              "--threads", "1", "--checkpoint-every", "3", "--log-every", "1",
                              "--no-progress", "--out", str(run)], capsys)
    monkeypatch.undo()
    monkeypatch.delenv("IMAML_EXT_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert code == 130, err
    hint = err.split("Resume with: ", 1)[1].splitlines()[0].strip()
    torch.set_num_threads(2)  # a new shell: the thread count comes from the run, not from here
    code, out, err = exit_code(shlex.split(hint)[1:], capsys)
    assert code == 0, err
    assert "done: 4 steps" in out
    state = load_checkpoint(run)
    assert state["run"]["data_root"] == str(DATA_ROOT.resolve())
    assert state["run"]["threads"] == 1 and state["run"]["checkpoint_every"] == 3
    assert state["run"]["log_every"] == 1
    assert [r["step"] for r in metric_lines(run)] == [1, 2, 3, 4]


def test_resume_reuses_the_stored_options_unless_given(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = exit_code(["train", *TINY, "--meta-steps", "3", "--log-every", "3", "--checkpoint-every", "7",
                              "--checkpoint-minutes", "9", "--out", str(run)], capsys)
    assert code == 0, err
    code, _, err = exit_code(["train", "--resume", str(run), "--meta-steps", "5", "--log-every", "1",
                              "--no-progress"], capsys)
    assert code == 0, err
    stored = load_checkpoint(run)["run"]
    assert (stored["checkpoint_every"], stored["checkpoint_minutes"], stored["log_every"]) == (7, 9.0, 1)
    assert stored["threads"] == 1 and stored["device"] == "cpu"
    assert [r["step"] for r in metric_lines(run)] == [3, 4, 5]  # every step after the resume


def test_wall_time_checkpoints(tmp_path, monkeypatch, one_thread):
    saved = []
    original = Checkpointer.save

    def record(self, run):
        saved.append(run.step)
        original(self, run)

    monkeypatch.setattr(Checkpointer, "save", record)
    train(tiny(meta_steps=4), opts(tmp_path / "often", log_every=100, checkpoint_minutes=1e-9))
    assert saved == [1, 2, 3, 4]
    assert [(r["step"], r["window"]) for r in metric_lines(tmp_path / "often")] == [(1, 1), (2, 1), (3, 1), (4, 1)]
    saved.clear()
    train(tiny(meta_steps=4), opts(tmp_path / "rarely", log_every=100))  # 5 minutes: only at the end
    assert saved == [4]


def test_resume_cannot_go_back(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    train(tiny(meta_steps=4), opts(run))
    config = (run / "config.json").read_text()
    with pytest.raises(RunError, match="has done 4 meta-steps; a total of meta_steps=2"):
        train(None, opts(run), resume=run, meta_steps=2)
    code, out, err = exit_code(["train", "--resume", str(run), "--meta-steps", "2", "--no-progress"], capsys)
    assert code == 2 and "has done 4 meta-steps" in err and "at least 4" in err and "done:" not in out
    assert (run / "config.json").read_text() == config and load_checkpoint(run)["step"] == 4
    code, out, _ = exit_code(["train", "--resume", str(run), "--no-progress"], capsys)
    assert code == 0 and "nothing to do" in out and "nan" not in out


# ----------------------------------------------------------------------------- the metrics file

def test_damaged_last_metrics_line_is_moved_aside_on_resume(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    train(tiny(meta_steps=4), opts(run))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 5, "win')  # killed mid-write
    result = train(None, opts(run), resume=run, meta_steps=6)
    assert result.step == 6
    assert [(r["step"], r["window"]) for r in metric_lines(run)] == [(2, 2), (4, 2), (6, 2)]
    aside = list(run.glob("metrics.jsonl.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"split": "train", "step": 5, "win\n'
    assert f"moved to {aside[0]}" in capsys.readouterr().err


def test_windows_say_how_many_steps_a_line_covers_across_a_resume(tmp_path, monkeypatch, one_thread):
    interrupt_after(monkeypatch, 3)
    assert train(tiny(meta_steps=8), opts(tmp_path, log_every=2)).step == 3
    monkeypatch.undo()
    train(None, opts(tmp_path, log_every=2), resume=tmp_path)
    lines = read_metrics(tmp_path / "metrics.jsonl")["train"]
    assert [(r["step"], r["window"]) for r in lines] == [(2, 2), (3, 1), (4, 1), (6, 2), (8, 2)]


def test_read_metrics_gives_older_files_their_windows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"split": split, "step": step, "loss": 1.0}) + "\n"
                            for split, step in [("train", 10), ("val", 10), ("train", 20), ("train", 25)]))
    assert [r["window"] for r in read_metrics(path)["train"]] == [10, 10, 5]
    with open(path, "a") as f:
        f.write('{"split": "train", "step": 3')  # a line being written
    assert [r["step"] for r in read_metrics(path)["train"]] == [10, 20, 25]


# ----------------------------------------------------------------------------- non-finite meta-gradient

def _with_nan_query(batch, task):
    sx, sy, qx, qy = batch
    qx = qx.clone()
    qx[task] = float("nan")
    return sx, sy, qx, qy


@pytest.mark.parametrize("method", [m for m in METHODS if m != "reptile"])  # Reptile's step ignores queries
def test_a_nan_task_is_not_stepped_into_the_model(method, one_thread):
    cfg = tiny(method)
    model = build_model(cfg)
    step = MetaStep(cfg, model, build_outer_optimizer(cfg, model))
    sampler = make_sampler(cfg, "train", 0)
    step(sampler.sample(4))  # the optimizer has state (Adam's moments)
    before = [p.detach().clone() for p in model.parameters()]
    loss, _ = step(_with_nan_query(sampler.sample(4), task=2))
    assert torch.isnan(loss)  # the library reports the NaN task as it is
    assert not bool(step.finite)
    assert torch.isnan(step.task_losses[2]) and torch.isfinite(step.task_losses[[0, 1, 3]]).all()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.isfinite(v).all() for s in step.optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))
    loss, _ = step(sampler.sample(4))
    assert torch.isfinite(loss) and bool(step.finite)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_training_stops_naming_the_step_and_task_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                    one_thread):
    calls = {"n": 0}
    original = MetaStep.__call__

    def nan_in_step_three(self, batch):
        calls["n"] += 1
        return original(self, _with_nan_query(batch, task=1) if calls["n"] == 3 else batch)

    monkeypatch.setattr(MetaStep, "__call__", nan_in_step_three)
    with pytest.raises(NonFiniteStepError, match=r"meta-step 3: .*task\(s\) \[1\] .*holds meta-step 2"):
        train(tiny(meta_steps=8), opts(tmp_path, log_every=4, checkpoint_every=2))
    state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert [r["step"] for r in metric_lines(tmp_path)] == [2]  # the window holding step 3 is not logged


@pytest.mark.parametrize("method", ["maml", "imaml-gd"])
def test_a_diverging_inner_loop_stops_training_naming_the_meta_step(tmp_path, method, one_thread):
    with pytest.raises(NonFiniteStepError, match=r"meta-step 1: .*support loss became non-finite"):
        train(tiny(method, inner_lr=1e30, meta_steps=4), opts(tmp_path))


def test_cli_reports_a_non_finite_meta_gradient_without_a_traceback(tmp_path, monkeypatch, capsys):
    original = MetaStep.__call__
    monkeypatch.setattr(MetaStep, "__call__", lambda self, batch: original(self, _with_nan_query(batch, 0)))
    code, _, err = exit_code(["train", *TINY, "--meta-steps", "3", "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "meta-step 1: the meta-gradient has NaN" in err and "task(s) [0]" in err


# ----------------------------------------------------------------------------- SIGKILL at random moments

@pytest.mark.slow
def test_fault_run_with_kills_at_random_moments(tmp_path):
    """benchmarks/soak.py's fault run, 2 kills: bit-identical final state, complete metrics, no debris."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--kills", "2", "--meta-steps",
                             "10", "--seed", "1", "--out", str(tmp_path), "--json", str(tmp_path / "fault.json")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "fault.json").read_text())
    assert report["problems"] == [] and report["attempts"] == 3
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]
