"""Tests of imaml_ext.models: sizes, shapes, and running under torch.func."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, stack_module_state, vmap

from imaml_ext.models import Conv4, MiniImagenetConvNet, OmniglotConvNet, SinusoidMLP

CASES = [
    (lambda: OmniglotConvNet(ways=5), (6, 1, 28, 28), 5),
    (lambda: MiniImagenetConvNet(ways=5), (4, 3, 84, 84), 5),
    (lambda: Conv4(ways=5), (6, 1, 28, 28), 5),
    (lambda: Conv4(ways=3, in_channels=3, image_size=84, hidden=8), (4, 3, 84, 84), 3),
    (lambda: SinusoidMLP(), (10, 1), 1),
]


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    assert _count(OmniglotConvNet(ways=5)) == 113_221
    assert _count(OmniglotConvNet(ways=20)) == 113_221 - (256 * 5 + 5) + (256 * 20 + 20)
    assert _count(MiniImagenetConvNet(ways=5)) == 32_901
    conv = 3 * (64 * 64 * 9 + 64 + 2 * 64)  # blocks 2-4: conv weight, bias, batch-norm affine
    assert _count(Conv4(ways=5)) == (1 * 64 * 9 + 64 + 2 * 64) + conv + 64 * 1 * 1 * 5 + 5
    assert _count(Conv4(ways=5, in_channels=3, image_size=84)) == (3 * 64 * 9 + 64 + 2 * 64) + conv + 64 * 5 * 5 * 5 + 5
    assert _count(SinusoidMLP()) == 1 * 40 + 40 + 40 * 40 + 40 + 40 + 1


@pytest.mark.parametrize("make, shape, out", CASES)
def test_forward_shape_and_no_running_statistics(make, shape, out):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(shape)
    y = model(x)
    assert y.shape == (shape[0], out)
    assert list(model.buffers()) == []
    model.eval()
    torch.testing.assert_close(model(x), y, msg="batch statistics in eval mode too")


def test_wrong_input_shapes_are_explained():
    with pytest.raises(ValueError, match=r"OmniglotConvNet takes images \[B, 1, 28, 28\]"):
        OmniglotConvNet()(torch.zeros(2, 5, 1, 28, 28))
    with pytest.raises(ValueError, match="MiniImagenetConvNet"):
        MiniImagenetConvNet()(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"Conv4 takes images \[B, 3, 84, 84\]"):
        Conv4(in_channels=3, image_size=84)(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="image_size must be at least 16"):
        Conv4(image_size=8)
    with pytest.raises(ValueError, match="SinusoidMLP"):
        SinusoidMLP()(torch.zeros(4))


@pytest.mark.parametrize("make, shape, out", CASES)
def test_vmap_over_stacked_parameters_equals_separate_calls(make, shape, out):
    torch.manual_seed(0)
    models = [make() for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = make().to("meta")
    x = torch.randn(3, *shape)

    def run(p, b, xi):
        return functional_call(base, (p, b), (xi,))

    batched = vmap(run)(params, buffers, x)
    separate = torch.stack([m(x[i]) for i, m in enumerate(models)])
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)

    if out > 1:
        y = torch.randint(0, out, (3, shape[0]))
        loss = lambda p, b, xi, yi: F.cross_entropy(functional_call(base, (p, b), (xi,)), yi)
        grads = vmap(grad(loss))(params, buffers, x, y)
        for i, m in enumerate(models):
            F.cross_entropy(m(x[i]), y[i]).backward()
            for name, p in m.named_parameters():
                torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-5)
