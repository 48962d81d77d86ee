"""The fused batch-norm → ReLU → max-pool layer (imaml_ext.fused_layers).

Checked against PyTorch's three layers (an independent implementation) in
float64, against finite differences (gradcheck), the compiled CPU kernel
against the reference kernel, the operator's registration (opcheck), the
module rewrite (:func:`fuse`), and whole meta-gradients with and without
fusion for every MAML mode and iMAML, vmap and loop batching.
"""

import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import imaml_ext as im
from imaml_ext import _build, fused_layers as fl, models

NO_EXT = os.environ.get("IMAML_EXT_NO_EXT", "") not in ("", "0")
compiled = pytest.mark.skipif(NO_EXT, reason="IMAML_EXT_NO_EXT=1: no compiled kernels to test")
LONGDOUBLE_WIDER = np.finfo(np.longdouble).eps < np.finfo(np.float64).eps

# (N, C, H, W, k): pooled evenly, with leftover rows/columns, k = 1 and 3, one example
CASES = [(4, 3, 8, 8, 2), (5, 6, 7, 9, 2), (3, 2, 3, 3, 2), (2, 4, 7, 7, 3), (1, 2, 4, 6, 2),
         (3, 5, 8, 7, 1)]


def _inputs(n, c, h, w, dtype=torch.float64, affine=True):
    x = torch.randn(n, c, h, w, dtype=dtype, requires_grad=True)
    if not affine:
        return x, None, None
    weight = torch.randn(c, dtype=dtype).requires_grad_()
    bias = torch.randn(c, dtype=dtype).requires_grad_()
    return x, weight, bias


def _layers(x, weight, bias, k, eps=1e-5):
    """The three PyTorch layers, written out here."""
    y = F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, eps))
    return y if k == 1 else F.max_pool2d(y, k, k)


@compiled
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_output_and_gradients_equal_the_three_pytorch_layers_in_float64(case, affine):
    *shape, k = case
    x, w, b = _inputs(*shape, affine=affine)
    out = fl.bn_relu_pool(x, w, b, 1e-5, k)
    expected = _layers(x, w, b, k)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    wrt = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(out, wrt, grad)
    want = torch.autograd.grad(expected, wrt, grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)


@compiled
def test_float32_agrees_with_the_three_layers_to_float32_rounding():
    x, w, b = _inputs(6, 8, 14, 14, torch.float32)
    out = fl.bn_relu_pool(x, w, b, 1e-5, 2)
    expected = _layers(x, w, b, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, (x, w, b), grad), torch.autograd.grad(expected, (x, w, b), grad)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@compiled
def test_gradients_pass_finite_differences():
    x, w, b = _inputs(3, 2, 5, 4)
    assert torch.autograd.gradcheck(lambda *a: fl.bn_relu_pool(*a, 1e-3, 2), (x, w, b))


def _second_derivatives(layer, x, w, b, k, grad, v):
    """The derivatives of ⟨v, (dx, dw, db)⟩, (dx, dw, db) = the create_graph gradient of
    ⟨grad, layer(x, w, b)⟩, with respect to x, w and grad (bias: none, see below)."""
    wrt = [t for t in (x, w, b) if t is not None]
    first = torch.autograd.grad(layer(x, w, b, k), wrt, grad, create_graph=True)
    return torch.autograd.grad(first, [t for t in (x, w, grad) if t is not None], v[:len(first)])


@compiled
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_second_derivatives_equal_those_of_the_three_layers(case, affine):
    """create_graph=True: the gradient of the gradient (full MAML, reverse HVPs), through
    the double-backward operator, with respect to x, the weight and the incoming gradient."""
    *shape, k = case
    x, w, b = _inputs(*shape, affine=affine)
    out = fl.bn_relu_pool(x, w, b, 1e-5, k)
    grad = torch.randn_like(out).requires_grad_()
    v = [torch.randn_like(t) for t in (x, w, b) if t is not None]
    got = _second_derivatives(lambda *a: fl.bn_relu_pool(*a[:3], 1e-5, a[3]), x, w, b, k, grad, v)
    want = _second_derivatives(_layers, x, w, b, k, grad, v)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@compiled
def test_second_derivatives_of_a_loss_run_the_double_backward_operator(monkeypatch):
    """The incoming gradient depends on x, weight and bias (a squared loss)."""
    x, w, b = _inputs(4, 3, 6, 6)
    calls = []
    op = fl._double_backward_op
    monkeypatch.setattr(fl, "_double_backward_op", lambda *a: calls.append(1) or op(*a))
    first = torch.autograd.grad(fl.bn_relu_pool(x, w, b, 1e-5, 2).square().sum(), (x, w, b), create_graph=True)
    second = torch.autograd.grad(sum(f.square().sum() for f in first), (x, w, b))
    assert calls == [1]
    want = torch.autograd.grad(_layers(x, w, b, 2).square().sum(), (x, w, b), create_graph=True)
    want = torch.autograd.grad(sum(f.square().sum() for f in want), (x, w, b))
    for g, e in zip(second, want):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@compiled
def test_second_derivatives_pass_finite_differences():
    x, w, b = _inputs(3, 2, 5, 4)
    assert torch.autograd.gradgradcheck(lambda *a: fl.bn_relu_pool(*a, 1e-3, 2), (x, w, b))


@compiled
def test_forward_mode_tangents_through_the_backward_and_its_backward():
    """A dual grad_outputs (first derivative, with and without create_graph) and a dual
    vector in a Hessian-vector product: the tangent is the product with the tangent."""
    import torch.autograd.forward_ad as fwAD
    x, w, b = _inputs(2, 3, 6, 6)
    out = fl.bn_relu_pool(x, w, b, 1e-5, 2)
    v, t = torch.randn_like(out), torch.randn_like(out)
    for create_graph in (False, True):
        with fwAD.dual_level():
            got = torch.autograd.grad(out, (x, w, b), fwAD.make_dual(v, t), create_graph=create_graph,
                                      retain_graph=True)
            got = [fwAD.unpack_dual(g).tangent for g in got]
        for g, e in zip(got, torch.autograd.grad(_layers(x, w, b, 2), (x, w, b), t), strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    first = torch.autograd.grad(out.square().sum(), (x, w), create_graph=True)
    vs, ts = [torch.randn_like(f) for f in first], [torch.randn_like(f) for f in first]
    with fwAD.dual_level():
        hv = torch.autograd.grad(first, (x, w), [fwAD.make_dual(a, c) for a, c in zip(vs, ts)], retain_graph=True)
        hv = [fwAD.unpack_dual(h).tangent for h in hv]
    want = torch.autograd.grad(torch.autograd.grad(_layers(x, w, b, 2).square().sum(), (x, w), create_graph=True),
                               (x, w), ts)
    for g, e in zip(hv, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@compiled
def test_third_derivatives_equal_those_of_the_three_layers():
    """A backward of the second derivative with create_graph=True: against the layers
    with batch-norm written out here (PyTorch's batch-norm stops at second derivatives)."""
    x, w, b = _inputs(3, 2, 6, 6)

    def written_out(x, w, b, k):
        mean = x.mean((0, 2, 3), keepdim=True)
        var = (x - mean).square().mean((0, 2, 3), keepdim=True)
        y = (x - mean) / (var + 1e-5).sqrt() * w.view(-1, 1, 1) + b.view(-1, 1, 1)
        return F.max_pool2d(y.clamp(min=0), k, k)

    def third(layer):
        first = torch.autograd.grad(layer(x, w, b, 2).square().sum(), (x, w), create_graph=True)
        second = torch.autograd.grad(sum(f.square().sum() for f in first), (x, w), create_graph=True)
        return torch.autograd.grad(sum(s.square().sum() for s in second), (x, w))

    for g, e in zip(third(lambda *a: fl.bn_relu_pool(*a[:3], 1e-5, a[3])), third(written_out), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


@compiled
@pytest.mark.parametrize("case", CASES + [(5, 7, 2, 3, 1), (2, 9, 14, 14, 1)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_compiled_kernels_equal_the_reference_kernels(case, layout):
    """Also channels-last x: without pooling the kernel's row path, whose outputs are
    channels-last as well (the reference's too); with pooling the plane path."""
    *shape, k = case
    x, w, b = (t.detach() for t in _inputs(*shape))
    x = x.contiguous(memory_format=layout)
    rows = layout is torch.channels_last and k == 1
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{fl.NAMESPACE}::bn_relu_pool", "CPU")
    _build.backend()
    got = torch.ops.imaml_ext_layers.bn_relu_pool(x, w, b, 1e-5, k)
    want = fl.reference_forward(x, w, b, 1e-5, k)
    plane = torch.ops.imaml_ext_layers.bn_relu_pool(x.contiguous(), w, b, 1e-5, k)  # the plane path

    def same(got, want, rtol, atol):
        for g, e in zip(got, want, strict=True):
            torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
            assert g.stride() == e.stride()

    same(got, want, 1e-12, 1e-14)
    assert got[0].is_contiguous(memory_format=layout if rows else torch.contiguous_format)
    torch.testing.assert_close(got[0], plane[0], rtol=1e-12, atol=1e-14)
    grad = torch.randn_like(got[0])
    got_b = torch.ops.imaml_ext_layers.bn_relu_pool_backward(grad, x, w, *got[1:], k)
    same(got_b, fl.reference_backward(grad, x, w, *want[1:], k), 1e-11, 1e-12)
    for g, e in zip(got_b, torch.ops.imaml_ext_layers.bn_relu_pool_backward(grad.contiguous(), x.contiguous(), w,
                                                                             *plane[1:], k)):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)
    u, u_w, u_b = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    for cotangents in [(u, u_w, u_b), (u, None, None), (None, u_w, None), (None, None, u_b), (None, None, None)]:
        got_d = torch.ops.imaml_ext_layers.bn_relu_pool_double_backward(*cotangents, grad, x, w, *got[1:], k)
        same(got_d, fl.reference_double_backward(*cotangents, grad, x, w, *want[1:], k), 1e-10, 1e-12)
        plain = (None if cotangents[0] is None else u.contiguous(), *cotangents[1:])
        for g, e in zip(got_d, torch.ops.imaml_ext_layers.bn_relu_pool_double_backward(
                *plain, grad.contiguous(), x.contiguous(), w, *plane[1:], k)):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_reference_kernels_equal_the_three_layers():
    x, w, b = _inputs(3, 4, 6, 7)
    out, mean, invstd, index, xmax = fl.reference_forward(x.detach(), w.detach(), b.detach(), 1e-5, 2)
    torch.testing.assert_close(out, _layers(x, w, b, 2).detach(), rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = fl.reference_backward(grad, x.detach(), w.detach(), mean, invstd, index, xmax, 2)
    want = torch.autograd.grad(_layers(x, w, b, 2), (x, w, b), grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)
    grad.requires_grad_()
    first = torch.autograd.grad(_layers(x, w, b, 2), (x, w, b), grad, create_graph=True)
    u = [torch.randn_like(t) for t in first]
    want = torch.autograd.grad(first, (grad, x, w), u)
    got = fl.reference_double_backward(*u, grad.detach(), x.detach(), w.detach(), mean, invstd, index, xmax, 2)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@compiled
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kernel, layout", [(2, torch.contiguous_format), (1, torch.contiguous_format),
                                            (1, torch.channels_last)])  # plane and row kernels
def test_nan_and_inf_propagate_as_through_the_three_layers(value, kernel, layout):
    x, w, b = (t.detach() for t in _inputs(2, 3, 8, 8))
    x[0, 1, 2, 3] = value
    x = x.contiguous(memory_format=layout)
    out = fl.bn_relu_pool(x, w, b, 1e-5, kernel)
    expected = _layers(x, w, b, kernel)
    assert torch.equal(out.isnan(), expected.isnan())
    assert out[:, 1].isnan().all()  # the channel's statistics are NaN
    torch.testing.assert_close(out[:, [0, 2]], expected[:, [0, 2]], rtol=1e-12, atol=1e-12)


@compiled
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_results_do_not_depend_on_the_number_of_threads(layout):
    x, w, b = (t.detach() for t in _inputs(7, 40, 14, 14, torch.float32))
    x = x.contiguous(memory_format=layout)
    grad, u = torch.randn_like(x), torch.randn_like(x)
    ops = torch.ops.imaml_ext_layers
    _build.backend()

    def run():
        out, *saved = ops.bn_relu_pool(x, w, b, 1e-5, 1)
        return (out, *saved[:2], *ops.bn_relu_pool_backward(grad, x, w, *saved, 1),
                *ops.bn_relu_pool_double_backward(u, w, b, grad, x, w, *saved, 1))

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(before)
    for a, c in zip(one, two, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("args, message", [
    ((torch.randn(2, 3, 4), None, None, 1e-5, 2), "must be \\[N, C, H, W\\]"),
    ((torch.randn(2, 3, 4, 4), None, None, 1e-5, 16), "kernel must be in 1..15"),
    ((torch.randn(2, 3, 4, 4), None, None, 1e-5, 5), "does not fit in 4x4"),
    ((torch.randn(2, 3, 4, 4), torch.randn(2), None, 1e-5, 2), "must be \\[C\\] = \\[3\\]"),
    ((torch.randn(1, 3, 1, 1), None, None, 1e-5, 1), "more than 1 value per channel"),
    ((torch.randn(2, 3, 4, 4).half(), None, None, 1e-5, 2), "float32 or float64"),
])
@pytest.mark.parametrize("path", ["operator", "reference"])
def test_bad_arguments_raise_value_errors_that_name_the_problem(args, message, path):
    _build.backend()
    fn = torch.ops.imaml_ext_layers.bn_relu_pool if path == "operator" else fl.reference_forward
    with pytest.raises(ValueError, match=message):
        fn(*args)


@compiled
def test_bad_arguments_of_the_backward_operators_raise_value_errors():
    x, w, b = (t.detach() for t in _inputs(3, 4, 6, 6))
    _build.backend()
    out, mean, invstd, index, xmax = torch.ops.imaml_ext_layers.bn_relu_pool(x, w, b, 1e-5, 2)
    grad = torch.randn_like(out)
    ops = torch.ops.imaml_ext_layers
    with pytest.raises(ValueError, match="bn_relu_pool_backward: the gradient, index, mean and invstd"):
        ops.bn_relu_pool_backward(grad, x, w, mean.float(), invstd, index, xmax, 2)
    with pytest.raises(ValueError, match="bn_relu_pool_double_backward: the gradient"):
        ops.bn_relu_pool_double_backward(None, None, None, grad[:2], x, w, mean, invstd, index, xmax, 2)
    with pytest.raises(ValueError, match="grad_grad_weight and grad_grad_bias must be \\[C\\]"):
        ops.bn_relu_pool_double_backward(None, w[:, None], None, grad, x, w, mean, invstd, index, xmax, 2)
    with pytest.raises(ValueError, match="grad_grad_x must be x-shaped"):
        ops.bn_relu_pool_double_backward(x[:2], None, None, grad, x, w, mean, invstd, index, xmax, 2)


@compiled
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel", [2, 1])  # channels-last without pooling: the row path
def test_opcheck(layout, kernel):
    x, w, b = _inputs(3, 4, 6, 6)
    x = x.detach().to(memory_format=layout).requires_grad_()
    _build.backend()
    torch.library.opcheck(torch.ops.imaml_ext_layers.bn_relu_pool.default, (x, w, b, 1e-5, kernel))
    out, *saved = torch.ops.imaml_ext_layers.bn_relu_pool(x.detach(), w.detach(), b.detach(), 1e-5, kernel)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.imaml_ext_layers.bn_relu_pool_backward.default,
                          (grad, x.detach(), w.detach(), *saved, kernel))
    cotangents = (torch.randn_like(x.detach()), torch.randn_like(w.detach()), None)
    torch.library.opcheck(torch.ops.imaml_ext_layers.bn_relu_pool_double_backward.default,
                          (*cotangents, grad, x.detach(), w.detach(), *saved, kernel))


@pytest.mark.parametrize("net, kernel", [(models.Conv4, 2), (models.OmniglotConvNet, 1)])
def test_fuse_keeps_parameter_names_and_objects_and_leaves_the_model_alone(net, kernel):
    model = net(ways=5)
    before = repr(model)
    fused = fl.fuse(model)
    assert [m.kernel for m in fused.modules() if isinstance(m, fl.BnReluPool)] == [kernel] * 4
    assert dict(fused.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert all(p is q for p, q in zip(fused.parameters(), model.parameters()))
    assert repr(model) == before and not any(isinstance(m, fl.BnReluPool) for m in model.modules())


@pytest.mark.parametrize("block", [
    [nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)],  # running statistics
    [nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU6(), nn.MaxPool2d(2)],
    [nn.BatchNorm2d(3, track_running_stats=False), nn.AvgPool2d(2), nn.ReLU()],
])
def test_fuse_leaves_other_blocks_as_they_are(block):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), *block)
    assert fl.fuse(model) is model


@pytest.mark.parametrize("tail", [
    [],  # batch-norm and ReLU at the end (the stride-2 net's blocks)
    [nn.MaxPool2d(2, padding=1)], [nn.MaxPool2d(3, stride=2)], [nn.MaxPool2d(2, ceil_mode=True)],
    [nn.Conv2d(3, 3, 1)],
])
def test_batch_norm_and_relu_without_a_fusable_pool_run_fused_without_pooling(tail):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                          *tail).double()
    fused = fl.fuse(model)
    assert [type(m) for m in fused] == [nn.Conv2d, fl.BnReluPool, nn.Identity] + [type(m) for m in tail]
    assert fused[1].kernel == 1 and all(f is m for f, m in zip(fused[3:], tail))
    x = torch.randn(4, 1, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


@compiled
def test_channels_last_planes_below_the_limit_run_the_operator(monkeypatch):
    calls = []
    op = fl._op
    monkeypatch.setattr(fl, "_op", lambda *a: calls.append(a[0].shape) or op(*a))
    x, w, b = _inputs(3, 5, 2, 3)
    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out = fl.bn_relu_pool(x, w, b, 1e-5, 1)
    expected = _layers(x, w, b, 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert calls == [(3, 5, 2, 3)] and out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, (x, w, b), grad), torch.autograd.grad(expected, (x, w, b), grad)):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)


@compiled
def test_without_pooling_planes_below_the_limit_run_the_layers(monkeypatch):
    calls = []
    op = fl._op
    monkeypatch.setattr(fl, "_op", lambda *a: calls.append(a[0].shape) or op(*a))
    for side in (6, 7):  # 36 < MIN_UNPOOLED_PLANE = 49 <= 49
        x, w, b = _inputs(3, 2, side, side)
        torch.testing.assert_close(fl.bn_relu_pool(x, w, b, 1e-5, 1), _layers(x, w, b, 1), rtol=1e-12, atol=1e-12)
    assert side * side == fl.MIN_UNPOOLED_PLANE and calls == [(3, 2, 7, 7)]
    x, w, b = _inputs(3, 2, 6, 6)
    fl.bn_relu_pool(x, w, b, 1e-5, 2)  # pooled: any size
    assert calls[-1] == (3, 2, 6, 6)


def test_a_hook_on_the_pool_keeps_the_pool_and_fuses_batch_norm_and_relu():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                          nn.MaxPool2d(2))
    fired = []
    model[3].register_forward_hook(lambda *a: fired.append("pool"))
    fused = fl.fuse(model)
    assert fused[1].kernel == 1 and fused[3] is model[3]
    fused(torch.randn(2, 1, 8, 8))
    assert fired == ["pool"]


def test_fused_model_computes_what_the_model_computes():
    model = models.Conv4(ways=5).double()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(fl.fuse(model)(x), model(x), rtol=1e-12, atol=1e-12)


def test_unfused_and_the_environment_switch_turn_fusion_off(monkeypatch):
    assert fl.fusion_enabled()
    with fl.unfused():
        assert not fl.fusion_enabled()
    assert fl.fusion_enabled()
    monkeypatch.setenv(fl.DISABLE_ENV, "1")
    assert not fl.fusion_enabled()
    calls = []
    monkeypatch.setattr(fl, "_op", lambda *a: calls.append(a))
    x, w, b = _inputs(2, 3, 4, 4)
    torch.testing.assert_close(fl.bn_relu_pool(x, w, b, 1e-5, 2), _layers(x, w, b, 2))
    assert not calls


@compiled
def test_one_task_with_one_input_channel_runs_channels_last_too(monkeypatch):
    """T = 1 and a 1-channel image: the first folded convolution's input is both layouts."""
    model = models.OmniglotConvNet(ways=5).double()
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(1, 5, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 5, (1, 5), generator=g),
             torch.randn(1, 6, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 5, (1, 6), generator=g))
    layouts = []
    op = fl._op
    monkeypatch.setattr(fl, "_op", lambda *a: layouts.append(fl._layout(a[0], a[4])) or op(*a))
    fused = _meta_gradient(model, batch, "imaml", "vmap")
    assert layouts and set(layouts) == {torch.channels_last}
    monkeypatch.setenv(fl.DISABLE_ENV, "1")
    torch.testing.assert_close(fused, _meta_gradient(model, batch, "imaml", "vmap"), rtol=1e-11, atol=1e-13)


class _ViewingNet(nn.Module):
    """A stride-2 net whose forward flattens with .view, as many users write it, and
    draws dropout masks before that."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.Dropout(0.3),
            nn.Conv2d(4, 4, 3, 2, 1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
        self.fc = nn.Linear(4 * 7 * 7, 5)

    def forward(self, x):
        h = self.features(x)
        return self.fc(h.view(h.size(0), -1))


@compiled
def test_a_forward_that_views_an_activation_runs_contiguous_with_a_warning(monkeypatch):
    model = _ViewingNet().double()
    assert fl.runs_channels_last(fl.fuse(model))
    T = 3
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(T, 5, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 5, (T, 5), generator=g),
             torch.randn(T, 6, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 5, (T, 6), generator=g))

    def meta_gradient():
        torch.manual_seed(1)  # the same dropout masks both ways: the failed attempt's draws are undone
        model.zero_grad()
        xs, ys, xq, yq = batch
        im.imaml(model, xs, ys, F.cross_entropy, inner_steps=2, cg_steps=2, batching="vmap").loss(xq, yq).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    with pytest.warns(RuntimeWarning, match=r"calls \.view on an activation.*\.reshape or \.flatten"):
        got = meta_gradient()
    # the model is remembered: the next meta-batch runs contiguous from the start
    layouts = []
    op = fl._op
    monkeypatch.setattr(fl, "_op", lambda *a: layouts.append(fl._layout(a[0], a[4])) or op(*a))
    torch.testing.assert_close(meta_gradient(), got, rtol=1e-12, atol=1e-14)
    assert layouts and set(layouts) == {torch.contiguous_format}
    monkeypatch.setattr(im.functional, "runs_channels_last", lambda runner: False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*calls .view on an activation")
        want = meta_gradient()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_models_whose_every_batch_norm_is_fused_without_pooling_run_channels_last():
    assert fl.runs_channels_last(fl.fuse(models.OmniglotConvNet(ways=5)))
    assert not fl.runs_channels_last(fl.fuse(models.Conv4(ways=5)))  # pooled: the plane kernel
    assert not fl.runs_channels_last(models.OmniglotConvNet(ways=5))  # PyTorch's batch-norm
    unfusable = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                              nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.Tanh())
    assert not fl.runs_channels_last(fl.fuse(unfusable))  # one batch-norm is left as it is
    assert not fl.runs_channels_last(fl.fuse(nn.Sequential(nn.Linear(3, 3), nn.ReLU())))


def test_a_switch_restores_the_value_it_found_however_the_block_ends():
    from imaml_ext import batching
    assert not batching.CHANNELS_LAST.get()
    with batching.CHANNELS_LAST.set(True):
        with pytest.raises(KeyError):
            with batching.CHANNELS_LAST.set(False):
                assert not batching.CHANNELS_LAST.get()
                raise KeyError
        assert batching.CHANNELS_LAST.get()
    assert not batching.CHANNELS_LAST.get()


def test_a_switch_set_in_one_context_and_left_in_another_does_not_raise():
    import contextvars
    from imaml_ext import batching
    block = batching.CHANNELS_LAST.set(True)
    contextvars.copy_context().run(block.__enter__)
    block.__exit__(None, None, None)  # here, not in the context it was entered in
    assert not batching.CHANNELS_LAST.get()


@compiled
def test_task_loss_runs_the_fused_layer_on_the_cpu():
    task_loss = im.functional.TaskLoss(models.Conv4(ways=5), F.cross_entropy)
    assert any(isinstance(m, fl.BnReluPool) for m in task_loss.runner.modules())


def _meta_gradient(model, batch, kind, batching):
    xs, ys, xq, yq = batch
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "imaml":
            adapted = im.imaml(model, xs, ys, F.cross_entropy, inner_steps=3, cg_steps=3, batching=batching)
        else:
            adapted = im.maml(model, xs, ys, F.cross_entropy, inner_steps=2, inner_lr=0.1, mode=kind,
                              batching=batching)
        adapted.loss(xq, yq).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@compiled
@pytest.mark.parametrize("kind", ["first_order", "full", "checkpointed", "imaml"])
@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("net", [models.Conv4, models.OmniglotConvNet])  # k = 2 and k = 1
def test_meta_gradients_with_fusion_equal_those_without(kind, batching, net, monkeypatch):
    model = net(ways=5).double()
    T = 3
    batch = (torch.randn(T, 5, 1, 28, 28, dtype=torch.float64), torch.randint(0, 5, (T, 5)),
             torch.randn(T, 6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 5, (T, 6)))
    calls, second = [], []
    op, double_backward = fl._op, fl._double_backward_op
    monkeypatch.setattr(fl, "_op", lambda *a: calls.append(fl._layout(a[0], a[4])) or op(*a))
    monkeypatch.setattr(fl, "_double_backward_op", lambda *a: second.append(1) or double_backward(*a))
    fused = _meta_gradient(model, batch, kind, batching)
    assert calls, "the fused layer did not run"
    # the stride-2 net's folded layers run channels-last (batching.CHANNELS_LAST), all of them
    rows = net is models.OmniglotConvNet and batching == "vmap"
    assert set(calls) == {torch.channels_last if rows else torch.contiguous_format}
    # second derivatives: full MAML's inner loop, the adjoint's steps, iMAML's Hessian products
    assert bool(second) == (kind != "first_order")
    monkeypatch.setenv(fl.DISABLE_ENV, "1")
    plain = _meta_gradient(model, batch, kind, batching)
    torch.testing.assert_close(fused, plain, rtol=1e-11, atol=1e-13)


@compiled
@pytest.mark.skipif(not LONGDOUBLE_WIDER, reason="numpy's longdouble is float64 here: no wider reference")
@pytest.mark.parametrize("mean, spread", [(5.0, 1e-3), (5.0, 1.0), (1e6, 1e-3)])
def test_statistics_are_at_least_as_accurate_as_pytorchs_batch_norm(mean, spread):
    """Against an extended-precision reference: a channel whose mean is far from zero
    compared with its spread, half of it constant (as a convolution's output over blank
    image borders)."""
    x = mean + spread * torch.randn(6, 3, 16, 16, dtype=torch.float64)
    x[:, :, :8] = mean
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    xl = x.numpy().astype(np.longdouble)
    mu = xl.mean(axis=(0, 2, 3))[None, :, None, None]
    var = ((xl - mu) ** 2).mean(axis=(0, 2, 3))[None, :, None, None]
    y = (xl - mu) / np.sqrt(var + np.longdouble(1e-5)) * w.numpy()[None, :, None, None] + b.numpy()[None, :, None, None]
    exact = F.max_pool2d(torch.relu(torch.from_numpy(y.astype(np.float64))), 2)
    scale = exact.abs().max()
    fused_error = ((fl.bn_relu_pool(x, w, b, 1e-5, 2) - exact).abs().max() / scale).item()
    pytorch_error = ((_layers(x, w, b, 2) - exact).abs().max() / scale).item()
    # (x - mean) loses the digits of |mean|/spread: the bound scales with it
    assert fused_error < 1e-13 * max(1.0, mean / spread)
    assert fused_error <= max(pytorch_error, 1e-15)


@compiled
def test_transforms_on_weight_alone_and_forward_mode_ad_run_the_three_layers():
    """x plain, weight/bias wrapped by torch.func (jvp, grad), or a forward-mode
    tangent on x: the operator has no rules for those, so the three layers run."""
    from torch.autograd import forward_ad
    from torch.func import grad, jvp
    x, w, b = (t.detach() for t in _inputs(3, 2, 4, 4))
    v = torch.randn_like(w)
    got = jvp(lambda w_: fl.bn_relu_pool(x, w_, b, 1e-5, 2), (w,), (v,))[1]
    want = jvp(lambda w_: _layers(x, w_, b, 2), (w,), (v,))[1]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.abs().sum() > 0
    torch.testing.assert_close(grad(lambda w_: fl.bn_relu_pool(x, w_, b, 1e-5, 2).sum())(w),
                               grad(lambda w_: _layers(x, w_, b, 2).sum())(w), rtol=1e-12, atol=1e-12)
    tangent = torch.randn_like(x)
    with forward_ad.dual_level():
        got = forward_ad.unpack_dual(fl.bn_relu_pool(forward_ad.make_dual(x, tangent), w, b, 1e-5, 2)).tangent
        want = forward_ad.unpack_dual(_layers(forward_ad.make_dual(x, tangent), w, b, 2)).tangent
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@compiled
def test_gauss_newton_products_with_the_block_on_the_raw_input():
    """A model whose first block sees the (never wrapped) input: the Gauss–Newton
    product's jvp wraps only the parameters."""
    model = nn.Sequential(nn.BatchNorm2d(1, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(16, 5)).double()
    xs, ys = torch.randn(2, 5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (2, 5))
    xq, yq = torch.randn(2, 6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (2, 6))

    def meta_gradient():
        model.zero_grad()
        adapted = im.imaml(model, xs, ys, F.cross_entropy, inner_steps=2, cg_steps=3,
                           curvature="gauss_newton", batching="loop")
        adapted.loss(xq, yq).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    fused = meta_gradient()
    with fl.unfused():
        torch.testing.assert_close(fused, meta_gradient(), rtol=1e-11, atol=1e-13)


@compiled
def test_other_dtypes_and_degenerate_sizes_run_the_three_layers():
    x, w, b = (t.detach() for t in _inputs(3, 2, 4, 4))
    torch.testing.assert_close(fl.bn_relu_pool(x.bfloat16(), w.bfloat16(), b.bfloat16(), 1e-5, 2),
                               _layers(x.bfloat16(), w.bfloat16(), b.bfloat16(), 2))
    empty = torch.randn(0, 2, 4, 4, dtype=torch.float64)
    assert fl.bn_relu_pool(empty, w, b, 1e-5, 2).shape == _layers(empty, w, b, 2).shape == (0, 2, 2, 2)


def test_eps_must_be_positive_as_in_pytorch():
    _build.backend()
    with pytest.raises(ValueError, match="eps must be positive"):
        torch.ops.imaml_ext_layers.bn_relu_pool(torch.randn(2, 3, 4, 4), None, None, 0.0, 2)


def test_statistics_outputs_are_not_differentiable():
    _build.backend()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out, mean, invstd, index, xmax = torch.ops.imaml_ext_layers.bn_relu_pool(x, None, None, 1e-5, 2)
    assert out.requires_grad and not (mean.requires_grad or invstd.requires_grad or xmax.requires_grad)


def test_fuse_leaves_blocks_with_hooks_and_shares_no_tables():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False),
                                        nn.ReLU(), nn.MaxPool2d(2)))
    fused = fl.fuse(model)
    fired = []
    fused.register_forward_hook(lambda *a: fired.append("fused"))
    model(torch.randn(2, 1, 8, 8))
    assert not fired and not model._forward_hooks
    model[0][1].register_forward_hook(lambda *a: fired.append("norm"))
    assert fl.fuse(model) is model


def test_fused_copies_follow_the_models_training_flag():
    model = models.Conv4(ways=5)
    task_loss = im.functional.TaskLoss(model, F.cross_entropy)
    if task_loss.runner is model:
        pytest.skip("nothing fused here (no compiled CPU kernels)")
    model.eval()
    task_loss.per_task_outputs(task_loss.theta().detach(), torch.randn(4, 1, 28, 28))
    copies = [m for m in task_loss.runner.modules() if not isinstance(m, (fl.BnReluPool, nn.Identity))]
    assert not any(m.training for m in copies)


def test_info_says_whether_the_fused_layer_runs(monkeypatch):
    line = next(row for row in _build.describe().splitlines() if "fused batch-norm" in row)
    assert ("on for CPU models" in line) == (not NO_EXT)
    monkeypatch.setenv(fl.DISABLE_ENV, "1")
    assert "off" in fl.status()


@compiled
def test_second_derivatives_of_a_layer_applied_twice_equal_those_of_the_three_layers():
    """One batch-norm applied to its own (pooled) output: the input of the second call
    depends on the weight, which a create_graph backward must not count twice."""
    x, w, b = _inputs(4, 3, 8, 8)

    def twice(layer):
        return layer(layer(x, w, b, 2), w, b, 2)

    got = torch.autograd.grad((twice(lambda *a: fl.bn_relu_pool(*a[:3], 1e-5, a[3])) ** 2).sum(),
                              (x, w, b), create_graph=True)
    want = torch.autograd.grad((twice(_layers) ** 2).sum(), (x, w, b), create_graph=True)
    v = [torch.randn_like(t) for t in got]
    for g, e in zip(torch.autograd.grad(got, (x, w, b), v), torch.autograd.grad(want, (x, w, b), v)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
