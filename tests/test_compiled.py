"""``batching="compiled"``: the graph-free inner gradients compiled by torch.compile
(imaml_ext.compiled) give the meta-gradients of ``batching="vmap"`` to rounding
(float64), run compiled at every inner step, compile once per model and shape,
and fail with an error that names the way out."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import imaml_ext as im
from imaml_ext import functional

from few_shot import image_tasks, tiny_convnet

TASKS, WAYS, SHOTS = 3, 3, 2
STEPS = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return tiny_convnet(WAYS)  # one model for the module: compiled once, reused by every test


@pytest.fixture
def batch():
    return image_tasks(TASKS, WAYS, SHOTS, SHOTS)


class CountingCompiled:
    """``functional.compiled_grad`` wrapped so that its calls are counted."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = functional.compiled_grad

        def make(*args):
            fn = real(*args)

            def counted(*a):
                self.calls += 1
                return fn(*a)
            return counted
        monkeypatch.setattr(functional, "compiled_grad", make)


def meta_gradient(model, batch, method, batching, **kwargs):
    model.zero_grad(set_to_none=True)
    adapted = method(model, batch[0], batch[1], F.cross_entropy, batching=batching, **kwargs)
    adapted.loss(batch[2], batch[3]).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), adapted.info


CASES = {
    "imaml-gd": (im.imaml, dict(inner_steps=STEPS, cg_steps=3, lam=4.0), STEPS),
    "imaml-nesterov": (im.imaml, dict(inner_steps=STEPS, cg_steps=3, lam=4.0, inner_solver="nesterov"), STEPS),
    "first-order": (im.maml, dict(inner_steps=STEPS, mode="first_order"), STEPS),
    # the first pass and the replays between snapshots take compiled gradients
    "checkpointed": (im.maml, dict(inner_steps=STEPS, mode="checkpointed", checkpoint_every=3), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_meta_gradient_equals_vmap(model, batch, case, monkeypatch):
    method, kwargs, steps = CASES[case]
    want, _ = meta_gradient(model, batch, method, "vmap", **kwargs)
    counter = CountingCompiled(monkeypatch)
    got, info = meta_gradient(model, batch, method, "compiled", **kwargs)
    assert info["batching"]["batching"] == "compiled"
    assert counter.calls == steps if steps is not None else counter.calls >= STEPS
    assert want.abs().max() > 0
    assert float((got - want).norm() / want.norm()) <= 1e-12


def test_compiled_once_per_model_and_shape(model, batch):
    from torch._dynamo.utils import counters
    meta_gradient(model, batch, im.maml, "compiled", inner_steps=2, mode="first_order")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    meta_gradient(model, batch, im.maml, "compiled", inner_steps=2, mode="first_order")
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_code_does_not_keep_the_model_alive(batch):
    net = tiny_convnet(WAYS)
    meta_gradient(net, batch, im.maml, "compiled", inner_steps=1, mode="first_order")
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


def test_full_maml_refuses_compiled(model, batch):
    with pytest.raises(ValueError, match="mode='full'.*batching='vmap'"):
        im.maml(model, batch[0], batch[1], F.cross_entropy, mode="full", batching="compiled")


class Untraceable(nn.Module):
    """A forward that runs under vmap but that torch.compile cannot trace whole."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, WAYS).double()

    def forward(self, x):
        torch._dynamo.graph_break()  # a no-op without compiling
        return self.linear(x.flatten(1))


def test_untraceable_model_raises_compile_error(batch):
    with pytest.raises(im.CompileError, match="batching='vmap'") as caught:
        im.imaml(Untraceable(), batch[0], batch[1], F.cross_entropy, inner_steps=1, batching="compiled")
    assert caught.value.__cause__ is not None



def test_compiled_dropout_draws_per_task_masks_at_every_shape():
    """vmap's randomness="different" holds compiled: identical tasks get different
    masks, also at a second support size (a graph of its own, not a symbolic one)."""
    from imaml_ext.functional import TaskLoss
    net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    task_loss = TaskLoss(net, F.cross_entropy)
    phi = task_loss.theta().detach().expand(4, -1).contiguous()
    for n in (6, 5):
        x = torch.randn(1, n, 4, dtype=torch.float64).expand(4, -1, -1).contiguous()
        y = torch.zeros(4, n, dtype=torch.long)
        task_loss.select_batching("compiled", x, y)
        _, losses = task_loss.grad(phi, x, y)
        assert len(set(losses.tolist())) == 4


def test_past_the_recompile_limit_the_eager_gradient_runs():
    """torch.compile's recompile limit is per process: past it, the same numbers uncompiled, with a warning."""
    from torch._dynamo import config
    from imaml_ext.functional import TaskLoss
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    task_loss = TaskLoss(net, F.cross_entropy)
    phi = task_loss.theta().detach().expand(2, -1).contiguous()
    with config.patch(recompile_limit=1), pytest.warns(RuntimeWarning, match="recompile_limit"):
        for n in (4, 5, 6):
            x, y = torch.randn(2, n, 3, dtype=torch.float64), torch.randint(0, 2, (2, n))
            task_loss.select_batching("compiled", x, y)
            g, losses = task_loss.grad(phi, x, y)
            want_g, want_losses = task_loss._grad(phi, x, y)
            assert float((g - want_g).norm() / want_g.norm()) <= 1e-12
            torch.testing.assert_close(losses, want_losses, rtol=1e-12, atol=0)


def test_an_error_of_the_loss_is_raised_as_without_compiling(batch):
    """A non-scalar loss is the user's error, not a compilation failure: the eager message."""
    from imaml_ext.functional import TaskLoss
    task_loss = TaskLoss(tiny_convnet(WAYS), lambda out, y: F.cross_entropy(out, y, reduction="none"))
    phi = task_loss.theta().detach().expand(TASKS, -1).contiguous()
    task_loss.select_batching("compiled", batch[0], batch[1])
    with pytest.raises(ValueError, match="one scalar per task"):
        task_loss.grad(phi, batch[0], batch[1])


def test_selecting_another_batching_drops_the_compiled_gradient(batch, monkeypatch):
    from imaml_ext.functional import TaskLoss
    counter = CountingCompiled(monkeypatch)
    task_loss = TaskLoss(tiny_convnet(WAYS), F.cross_entropy)
    phi = task_loss.theta().detach().expand(TASKS, -1).contiguous()
    task_loss.select_batching("compiled", batch[0], batch[1])
    task_loss.select_batching("loop", batch[0], batch[1])
    task_loss.grad(phi, batch[0], batch[1])
    assert counter.calls == 0 and task_loss.batching == "loop"
