"""Batched Hessian-vector products against dense Hessians and finite differences."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

import imaml_ext as im
from imaml_ext.functional import TaskLoss


def tanh_mlp():
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def task_data(T=3, n=7):
    return torch.randn(T, n, 3, dtype=torch.float64), torch.randint(0, 2, (T, n))


def dense_hessian(task_loss, phi_t, x_t, y_t):
    return torch.autograd.functional.hessian(lambda p: task_loss.per_task(p, x_t, y_t), phi_t)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_hvp_equals_dense_hessian(mode):
    model = tanh_mlp()
    tl = TaskLoss(model, nn.functional.cross_entropy)
    x, y = task_data()
    phi = tl.theta().detach().expand(3, -1) + 0.3 * torch.randn(3, tl.layout.numel, dtype=torch.float64)
    v = torch.randn_like(phi)
    hv = im.hvp(tl.per_task, phi, x, y, v, mode=mode)
    for t in range(3):
        H = dense_hessian(tl, phi[t], x[t], y[t])
        torch.testing.assert_close(hv[t], H @ v[t], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_hvp_equals_finite_differences(mode):
    model = tanh_mlp()
    tl = TaskLoss(model, nn.functional.cross_entropy)
    x, y = task_data(T=2)
    phi = tl.theta().detach().expand(2, -1).clone()
    v = torch.randn_like(phi)
    eps = 1e-5
    g_plus, _ = tl.grad(phi + eps * v, x, y)
    g_minus, _ = tl.grad(phi - eps * v, x, y)
    fd = (g_plus - g_minus) / (2 * eps)
    hv = im.hvp(tl.per_task, phi, x, y, v, mode=mode)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)


def test_reverse_hvp_reuses_graph_for_many_vectors():
    model = tanh_mlp()
    tl = TaskLoss(model, nn.functional.cross_entropy)
    x, y = task_data(T=2)
    phi = tl.theta().detach().expand(2, -1).clone()
    matvec = im.make_hvp(tl.per_task, phi, x, y, mode="reverse")
    for _ in range(3):  # the cached graph survives repeated products
        v = torch.randn_like(phi)
        torch.testing.assert_close(matvec(v), im.hvp(tl.per_task, phi, x, y, v, mode="forward"))


def test_hvp_of_affine_loss_is_zero():
    model = nn.Linear(3, 1, bias=False).double()
    tl = TaskLoss(model, lambda out, tgt: (out.squeeze(-1) * tgt).sum())
    x, y = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    phi = torch.randn(2, 3, dtype=torch.float64)
    for mode in ("reverse", "forward"):
        assert torch.equal(im.hvp(tl.per_task, phi, x, y, torch.randn_like(phi), mode=mode), torch.zeros_like(phi))


def test_hvp_rejects_unknown_mode():
    tl = TaskLoss(tanh_mlp(), nn.functional.cross_entropy)
    x, y = task_data(T=1)
    with pytest.raises(ValueError, match="unknown HVP mode"):
        im.make_hvp(tl.per_task, tl.theta().detach()[None], x, y, mode="sideways")


def test_default_mode_reads_its_device(monkeypatch):
    import importlib
    hvp_module = importlib.import_module("imaml_ext.hvp")
    assert hvp_module.default_mode(torch.device("cpu")) == "reverse"
    assert hvp_module.default_mode("cuda:1") == "reverse"
    assert hvp_module.default_mode("meta") == "reverse"  # a type not in the table
    monkeypatch.setitem(hvp_module.DEFAULT_MODES, "cpu", "forward")
    monkeypatch.setitem(hvp_module.DEFAULT_MODES, "cuda", "forward")
    assert hvp_module.default_mode("cpu") == "forward"
    assert hvp_module.default_mode("meta") == "reverse"
    # "auto" in make_hvp follows the table for the device of phi.
    monkeypatch.setattr(hvp_module, "_forward", lambda *args: "forward-over-reverse")
    tl = TaskLoss(tanh_mlp(), nn.functional.cross_entropy)
    x, y = task_data(T=2)
    assert im.make_hvp(tl.per_task, tl.theta().detach()[None], x, y, mode="auto") == "forward-over-reverse"
