"""The memory estimate of a meta-step and the training command's check against available memory."""
from __future__ import annotations

import pytest
import torch

from test_cli import TINY, _restore_threads, exit_code  # noqa: F401 (autouse fixture)

from imaml_ext.models import OmniglotConvNet
from imaml_ext.training import memory


def _shapes(ways, shots=1, queries=15):
    return torch.zeros(ways * shots, 1, 28, 28), torch.zeros(ways * queries, 1, 28, 28)


def test_activation_count_of_a_linear_stack():
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    # input 3 + Linear 5 + ReLU 5 + Linear 2 floats
    assert memory.activation_bytes_per_example(model, torch.zeros(1, 3)) == 4 * (3 + 5 + 5 + 2)


def test_estimate_follows_tasks_ways_and_kept_graphs():
    net = OmniglotConvNet(ways=5, hidden=64)
    sx, qx = _shapes(5)
    one = memory.estimate_step_bytes("imaml-gd", 16, net, 1, sx, qx)
    assert memory.estimate_step_bytes("imaml-gd", 16, net, 32, sx, qx) == 32 * one
    assert memory.estimate_step_bytes("imaml-gd", 100, net, 32, sx, qx) == 32 * one  # iMAML: K-free
    full = memory.estimate_step_bytes("maml", 16, net, 32, sx, qx)
    checkpointed = memory.estimate_step_bytes("checkpointed-maml", 16, net, 32, sx, qx)
    first_order = memory.estimate_step_bytes("fomaml", 16, net, 32, sx, qx)
    assert full > checkpointed > first_order
    wide = OmniglotConvNet(ways=2000, hidden=64)
    huge = memory.estimate_step_bytes("imaml-gd", 16, wide, 32, *_shapes(2000))
    assert huge > 100 * 2**30 > 32 * one   # the `--ways 2000` setting: hundreds of GiB


def test_train_refuses_a_step_that_cannot_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**16)
    run = tmp_path / "run"
    code, _, err = exit_code(["train", *TINY, "--meta-steps", "2", "--out", str(run)], capsys)
    assert code == 2 and "one meta-step needs about" in err and "64.0 KiB available" in err
    assert "--no-memory-check" in err and not (run / "checkpoint.pt").exists()
    code, out, _ = exit_code(["train", *TINY, "--meta-steps", "2", "--out", str(run), "--no-memory-check"], capsys)
    assert code == 0 and "done: 2 steps" in out


@pytest.mark.parametrize("available, warned", [(1500, True), (3000, False)])
def test_train_warns_above_half_of_the_available_memory(tmp_path, capsys, monkeypatch, available, warned):
    monkeypatch.setattr(memory, "estimate_step_bytes", lambda *args: 1000)
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    code, _, err = exit_code(["train", *TINY, "--meta-steps", "1", "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and ("warning: one meta-step needs about 1000 B" in err) == warned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA free memory")
def test_cuda_available_memory_is_the_free_memory():
    free, total = torch.cuda.mem_get_info()
    assert 0 < memory.available_bytes(torch.device("cuda")) <= total
