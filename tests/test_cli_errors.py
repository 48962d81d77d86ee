"""The command line meets damaged files and unusable output paths with one clear message
(exit code 2, no traceback), checks output paths before any work, and never loses a finished result."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from test_cli import TINY, _restore_threads, exit_code  # noqa: F401 (autouse fixture)

import imaml_ext.data.paths as data_paths


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step sinusoid run folder."""
    from imaml_ext.training.cli import main
    folder = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--meta-steps", "2", "--log-every", "1", "--out", str(folder)]) == 0
    return folder


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and "weights_only" not in err and "file an issue" not in err


@pytest.mark.parametrize("content, message", [
    (np.random.RandomState(0).bytes(3000), "not a checkpoint: not a torch.save archive"),
    (b"", "is empty"),
    ("truncated", "is damaged or truncated"),
    ("foreign", "not an imaml_ext training checkpoint: it holds objects other than tensors"),
    ("unknown key", "configuration this version of imaml_ext cannot use: unknown configuration keys ['colour']"),
])
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_bad_checkpoints_get_one_message(tmp_path, run, capsys, content, message, command):
    bad = tmp_path / "checkpoint.pt"
    if content == "truncated":
        data = (run / "checkpoint.pt").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif content == "foreign":
        torch.save({"model": torch.nn.Linear(2, 2)}, bad)          # a whole module: not weights only
    elif content == "unknown key":
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        state["config"]["colour"] = "red"
        torch.save(state, bad)
    else:
        bad.write_bytes(content)
    argv = ["eval", str(bad), "--no-progress"] if command == "eval" else ["train", "--resume", str(bad), "--no-progress"]
    code, _, err = exit_code(argv, capsys)
    assert code == 2 and str(bad) in err and message in err, err
    _no_traceback(err)


@pytest.mark.parametrize("where", ["file", "under a file", "not writable"])
def test_train_out_is_checked_before_any_work(tmp_path, capsys, monkeypatch, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = {"file": blocker, "under a file": blocker / "run", "not writable": tmp_path / "locked" / "run"}[where]
    if where == "not writable":
        locked = tmp_path / "locked"
        locked.mkdir()
        real_access = os.access
        monkeypatch.setattr(data_paths.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))

    def no_work(*args, **kwargs):
        raise AssertionError("training started before the output folder was checked")
    monkeypatch.setattr("imaml_ext.training.train.train", no_work)
    code, _, err = exit_code(["train", *TINY, "--meta-steps", "2", "--out", str(out)], capsys)
    expected = {"file": "is a file, not a folder", "under a file": "which is a file, not a folder",
                "not writable": "no permission to create files in"}[where]
    assert code == 2 and "--out" in err and expected in err, err
    _no_traceback(err)


def test_demo_out_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = exit_code(["demo", "--meta-steps", "1", "--out", str(blocker)], capsys)
    assert code == 2 and "is a file, not a folder" in err


def test_eval_out_folder_gets_the_default_name(tmp_path, run, capsys):
    code, out, _ = exit_code(["eval", str(run), "--tasks", "4", "--batch", "4", "--inner-steps", "1",
                              "--no-progress", "--out", str(tmp_path)], capsys)
    written = tmp_path / "eval-test-k1.json"
    assert code == 0 and f"written: {written}" in out
    assert json.loads(written.read_text())["tasks"] == 4


def test_eval_out_under_a_file_fails_before_evaluating(tmp_path, run, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")

    def no_work(*args, **kwargs):
        raise AssertionError("evaluated before checking --out")
    monkeypatch.setattr("imaml_ext.training.evaluate.evaluate", no_work)
    code, _, err = exit_code(["eval", str(run), "--no-progress", "--out", str(blocker / "r.json")], capsys)
    assert code == 2 and "which is a file, not a folder" in err


def test_eval_result_survives_a_failed_write(tmp_path, run, capsys, monkeypatch):
    def disk_full(path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data_paths, "atomic_file", disk_full)
    target = tmp_path / "r.json"
    code, _, err = exit_code(["eval", str(run), "--tasks", "4", "--batch", "4", "--inner-steps", "1",
                              "--no-progress", "--out", str(target)], capsys)
    assert code == 2 and f"could not write {target}" in err and "No space left" in err
    saved = Path(err.split("the result is saved in ")[1].strip())
    try:
        report = json.loads(saved.read_text())
    finally:
        saved.unlink()
    assert report["tasks"] == 4 and report["loss"]["n"] == 4 and not target.exists()


def test_plot_prints_the_file_it_writes(tmp_path, run, capsys):
    pytest.importorskip("matplotlib", reason="plot needs matplotlib, in the 'train' extra")
    stem = tmp_path / "figure"
    code, out, _ = exit_code(["plot", str(run), "-o", str(stem)], capsys)
    assert code == 0 and f"written: {stem}.png" in out and Path(f"{stem}.png").is_file()
    folder = tmp_path / "figs"
    folder.mkdir()
    code, out, _ = exit_code(["plot", str(run), "-o", str(folder)], capsys)
    assert code == 0 and f"written: {folder / 'curves.png'}" in out
    assert (folder / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_of_a_binary_file_is_explained(tmp_path, run, capsys):
    code, _, err = exit_code(["plot", str(run / "checkpoint.pt"), "-o", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "is not a metrics file: it is not text" in err
    _no_traceback(err)
    assert "codec" not in err


def test_damaged_omniglot_cache_is_one_message(tmp_path, capsys):
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "omniglot28.npz").write_bytes(np.random.RandomState(1).bytes(4000))
    code, _, err = exit_code(["train", "--data", str(tmp_path), "--meta-steps", "1", "--threads", "1",
                              "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "omniglot28.npz is damaged" in err and "Delete it" in err
    _no_traceback(err)
    assert "allow_pickle" not in err


# ----------------------------------------------------------------------------- OpenMP default

@pytest.mark.skipif(os.name != "posix", reason="the relaunch uses exec (POSIX)")
@pytest.mark.parametrize("preset, threads, relaunched", [
    (None, "2", True), ("ACTIVE", "2", False), (None, "1", False),
])
def test_train_and_eval_run_with_a_passive_openmp_wait_policy(tmp_path, capsys, monkeypatch, preset, threads,
                                                             relaunched):
    """Without a user choice, `imaml-ext train/eval` re-executes itself with OMP_WAIT_POLICY=PASSIVE
    (idle OpenMP threads sleep instead of spinning: no cliff on a busy machine)."""
    import sys

    from imaml_ext.training.cli import main
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.delenv(name, raising=False)
    if preset:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    argv = ["imaml-ext", "eval", str(tmp_path / "none"), "--threads", threads]
    monkeypatch.setattr(sys, "argv", argv)
    calls = []

    def execve(path, args, env):
        calls.append((args, env))
        raise SystemExit(0)
    monkeypatch.setattr(os, "execve", execve)
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    if relaunched:
        (args, env), = calls
        assert args[1:] == ["-m", "imaml_ext", *argv[1:]] and env["OMP_WAIT_POLICY"] == "PASSIVE"
    else:
        assert calls == [] and code == 2 and "checkpoint not found" in capsys.readouterr().err
