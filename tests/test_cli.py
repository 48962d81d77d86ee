"""The ``imaml-ext`` command line: help, argument errors, missing data, train / eval /
plot / demo / info, resume rules, and Ctrl-C on a training process."""
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

from imaml_ext.training.checkpoint import load_checkpoint
from imaml_ext.training.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "sinusoid", "--meta-batch", "4", "--inner-steps", "2", "--shots", "5",
        "--queries", "5", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_cli(*args, cwd=None, env=None, timeout=120):
    """``python -m imaml_ext ARGS`` in a subprocess that imports this checkout."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "imaml_ext", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def exit_code(argv, capsys):
    """(exit code, stdout, stderr) of ``main(argv)``, whether it returns or exits."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- help and errors

@pytest.mark.parametrize("command, expected", [
    ("train", "--preset"), ("eval", "--inner-steps"), ("plot", "--labels"), ("demo", "--meta-steps"),
    ("info", "usage"),
])
def test_help_for_each_subcommand(command, expected, capsys):
    code, out, _ = exit_code([command, "--help"], capsys)
    assert code == 0 and expected in out


def test_train_help_lists_presets_and_their_origin(capsys):
    code, out, _ = exit_code(["train", "--help"], capsys)
    assert code == 0 and "omniglot-5w1s-imaml-gd" in out and "paper: λ=2" in out


def test_module_entry_point():
    result = run_cli("--help")
    assert result.returncode == 0 and "train" in result.stdout and "eval" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "anil"], "argument --method: invalid choice: 'anil'"),
    (["train", "--inner-steps", "-3"], "argument --inner-steps: must be a non-negative integer, got -3"),
    (["train", "--meta-steps", "0"], "argument --meta-steps: must be a positive integer, got 0"),
    (["train", "--lam", "nan"], "argument --lam: must be a positive number"),
    (["train", "--ways", "five"], "argument --ways: expected a positive integer, got 'five'"),
    (["train", "--rotations", "0,45"], "argument --rotations: angles must be distinct values"),
    (["train", "--preset", "omniglot-7w1s"], "unknown preset 'omniglot-7w1s'"),
    (["eval", "ckpt", "--tasks", "-1"], "argument --tasks: must be a positive integer"),
    (["train", "--dataset", "sinusoid", "--device", "tpu:0"], "is not a torch device"),
])
def test_bad_arguments_name_the_problem(argv, message, capsys):
    code, _, err = exit_code(argv, capsys)
    assert code == 2 and message in err


def test_missing_data_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IMAML_EXT_DATA", raising=False)
    code, _, err = exit_code(["train", "--dataset", "omniglot", "--data", str(tmp_path / "nowhere"),
                              "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert "Omniglot not found" in err and str(tmp_path / "nowhere" / "omniglot") in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_missing_data_in_a_subprocess_prints_no_traceback(tmp_path):
    result = run_cli("train", "--dataset", "miniimagenet", "--data", str(tmp_path), env={"IMAML_EXT_DATA": ""})
    assert result.returncode == 2
    assert "MiniImageNet (train) not found" in result.stderr and str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


def test_info_reports_the_backend_and_torch():
    import imaml_ext as im
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert im.backend().name in result.stdout and f"torch {torch.__version__}" in result.stdout


# ----------------------------------------------------------------------------- train, resume, eval

def test_train_eval_and_resume_rules(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = exit_code(["train", *TINY, "--meta-steps", "4", "--log-every", "2", "--out", str(run)], capsys)
    assert code == 0 and "done: 4 steps" in out
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert set(lines[0]) >= {"step", "loss", "acc", "seconds", "method"}

    code, _, err = exit_code(["train", *TINY, "--out", str(run)], capsys)
    assert code == 2 and "already holds a run" in err and f"--resume {run}" in err

    code, _, err = exit_code(["train", "--resume", str(run), "--lam", "3"], capsys)
    assert code == 2 and "--lam cannot be changed" in err

    code, out, _ = exit_code(["train", "--resume", str(run), "--meta-steps", "6", "--no-progress",
                              "--threads", "1"], capsys)
    assert code == 0 and "done: 6 steps" in out and load_checkpoint(run)["step"] == 6

    code, out, _ = exit_code(["eval", str(run), "--tasks", "12", "--batch", "5", "--inner-steps", "3",
                              "--no-progress", "--threads", "1"], capsys)
    assert code == 0 and "query MSE" in out and "12 test tasks" in out
    report = json.loads((run / "eval-test-k3.json").read_text())
    assert report["tasks"] == 12 and report["inner_steps"] == 3 and report["step"] == 6
    assert report["loss"]["n"] == 12 and report["loss"]["ci95"] > 0


def test_train_with_compiled_batching_says_it_compiles_and_resume_keeps_it(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = exit_code(["train", *TINY, "--method", "fomaml", "--meta-steps", "2", "--log-every", "2",
                                "--batching", "compiled", "--out", str(run)], capsys)
    assert code == 0 and "done: 2 steps" in out and "compiles the inner steps" in err
    code, out, err = exit_code(["train", "--resume", str(run), "--meta-steps", "3"], capsys)
    assert code == 0 and "done: 3 steps" in out and "compiles the inner steps" in err

    code, _, err = exit_code(["train", *TINY, "--method", "maml", "--batching", "compiled",
                              "--out", str(tmp_path / "full")], capsys)
    assert code != 0 and "--batching vmap" in err


def _shared_data_root():
    roots = [Path(os.environ["IMAML_EXT_DATA"])] if os.environ.get("IMAML_EXT_DATA") else []
    roots.append(REPO.parent / "shared" / "data")
    return next((r for r in roots if (r / "omniglot").is_dir()), None)


@pytest.mark.skipif(_shared_data_root() is None, reason="shared Omniglot copy not found "
                    "in $IMAML_EXT_DATA/omniglot or ../shared/data/omniglot")
def test_omniglot_train_then_eval_reports_accuracy(tmp_path, capsys):
    root = str(_shared_data_root())
    code, _, _ = exit_code(["train", "--dataset", "omniglot", "--ways", "3", "--hidden", "8",
                            "--inner-steps", "1", "--cg-steps", "1", "--meta-batch", "2", "--meta-steps", "2",
                            "--queries", "2", "--data", root, "--out", str(tmp_path), "--threads", "1",
                            "--no-progress"], capsys)
    assert code == 0
    code, out, _ = exit_code(["eval", str(tmp_path), "--tasks", "6", "--data", root, "--no-progress",
                              "--threads", "1", "--out", str(tmp_path / "e.json")], capsys)
    assert code == 0 and "omniglot 3-way 1-shot" in out and "accuracy" in out
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["acc"]["n"] == 6 and 0 <= report["acc"]["mean"] <= 1 and report["queries"] == 2

    code, _, err = exit_code(["eval", str(tmp_path), "--data", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "Omniglot not found" in err and str(tmp_path / "nothing") in err


def test_miniimagenet_train_and_eval_on_a_synthetic_pickle(tmp_path, capsys):
    """The MiniImageNet path end to end on a tiny file in the pickle layout (5 classes × 3 images)."""
    import pickle

    import numpy as np
    folder = tmp_path / "data" / "miniimagenet"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for subset in ("train", "test"):
        content = {"image_data": rng.integers(0, 256, (15, 84, 84, 3), dtype=np.uint8),
                   "class_dict": {f"n{c:08d}": list(range(3 * c, 3 * c + 3)) for c in range(5)}}
        with open(folder / f"mini-imagenet-cache-{subset}.pkl", "wb") as f:
            pickle.dump(content, f)
    common = ["--data", str(tmp_path / "data"), "--threads", "1", "--no-progress"]
    code, out, _ = exit_code(["train", "--dataset", "miniimagenet", "--hidden", "4", "--queries", "2",
                              "--inner-steps", "1", "--cg-steps", "1", "--meta-batch", "1", "--meta-steps", "2",
                              "--out", str(tmp_path / "run"), *common], capsys)
    assert code == 0 and "done: 2 steps" in out
    code, out, _ = exit_code(["eval", str(tmp_path / "run"), "--tasks", "3", *common], capsys)
    assert code == 0 and "miniimagenet 5-way 1-shot" in out and "accuracy" in out


def test_eval_of_a_missing_checkpoint(tmp_path, capsys):
    code, _, err = exit_code(["eval", str(tmp_path)], capsys)
    assert code == 2 and "checkpoint not found" in err and str(tmp_path) in err


# ----------------------------------------------------------------------------- plot, demo

def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plot needs matplotlib, in the 'train' extra: pip install 'imaml_ext[train]'")
    for name, method in (("a", "imaml-gd"), ("b", "fomaml")):
        assert exit_code(["train", *TINY, "--method", method, "--meta-steps", "4", "--log-every", "1",
                          "--out", str(tmp_path / name)], capsys)[0] == 0
    out = tmp_path / "curves.png"
    code, stdout, _ = exit_code(["plot", str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"),
                                 "-o", str(out), "--labels", "iMAML", "FOMAML"], capsys)
    assert code == 0 and str(out) in stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_errors(tmp_path, capsys):
    code, _, err = exit_code(["plot", str(tmp_path / "none.jsonl")], capsys)
    assert code == 2 and "metrics file not found" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    code, _, err = exit_code(["plot", str(bad)], capsys)
    assert code == 2 and "lacks 'step'" in err


def test_demo_prints_the_table_and_draws_the_fits(tmp_path, capsys):
    code, out, _ = exit_code(["demo", "--meta-steps", "20", "--eval-tasks", "20", "--no-progress",
                              "--out", str(tmp_path)], capsys)
    assert code == 0
    for row in ("untrained init", "iMAML-GD", "iMAML-HF", "MAML", "first-order MAML",
                "transfer (pretrain + fine-tune)"):
        assert row in out
    assert "k=0" in out and "K (as trained)" in out and "adapts as it was meta-trained" in out
    assert "Hessian-free Newton steps" in out and "SGD steps of lr 0.01" in out
    results = json.loads((tmp_path / "demo_results.json").read_text())
    assert set(results["query_mse"]) == {"untrained", "imaml-gd", "imaml-hf", "maml", "fomaml", "transfer"}
    assert set(results["inner_residual"]) == {"imaml-gd", "imaml-hf"}
    assert all(r >= 0 for r in results["inner_residual"].values())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no figures" in out
    else:
        assert (tmp_path / "demo_fits.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_in_two_processes_equals_one_after_the_other(tmp_path):
    """The methods meta-trained in 2 spawned processes give the table (and the
    checkpoints) of the methods trained one after the other in this process."""
    import torch
    from imaml_ext.training.demo import DemoConfig, run_demo
    cfg = DemoConfig(meta_steps=6, eval_tasks=10, methods=("imaml-gd", "fomaml", "maml"))
    tables = {w: run_demo(cfg, tmp_path / str(w), progress=False, workers=w) for w in (1, 2)}
    assert tables[1] == tables[2]
    for method in cfg.methods:
        one, two = (torch.load(tmp_path / str(w) / method / "checkpoint.pt", weights_only=True)["model"]
                    for w in (1, 2))
        assert all(torch.equal(one[k], two[k]) for k in one)
    assert json.loads((tmp_path / "2" / "demo_results.json").read_text())["workers"] == 2


# ----------------------------------------------------------------------------- Ctrl-C

def test_sigint_checkpoints_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "imaml_ext", "train", *TINY, "--meta-steps", "1000000",
                             "--log-every", "1", "--checkpoint-every", "0", "--out", str(run)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):  # training has started
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "checkpoint saved" in err and f"imaml-ext train --resume {run}" in err
    state = load_checkpoint(run)
    assert state["step"] >= 1
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == state["step"]
