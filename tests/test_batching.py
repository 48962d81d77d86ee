"""batching="vmap" | "loop" | "auto": per-task randomness, modules vmap cannot batch,
and meta-gradients equal to a naive per-task computation in float64."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import imaml_ext as im
from imaml_ext import batching, fused_layers
from imaml_ext.models import Conv4, OmniglotConvNet

INNER_LR, LAM, STEPS, CG_STEPS = 0.3, 2.0, 3, 4


class LSTMClassifier(nn.Module):
    """Sequences [B, L, 3] -> logits [B, 2] from the LSTM's last state."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class SignBranch(nn.Module):
    """Python control flow on a tensor's value: vmap cannot batch it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def tasks(T, n, m, shape, classes):
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(T, n, *shape, generator=g, dtype=torch.float64)
    xq = torch.randn(T, m, *shape, generator=g, dtype=torch.float64)
    ys = torch.arange(classes).repeat(T, n // classes)
    yq = torch.arange(classes).repeat(T, m // classes)
    return xs, ys, xq, yq


MODELS = {
    "conv4-maxpool": (lambda: Conv4(ways=2, in_channels=1, image_size=16, hidden=4), (1, 16, 16)),
    "omniglot-stride2": (lambda: OmniglotConvNet(ways=2, hidden=4), (1, 28, 28)),
    "lstm": (LSTMClassifier, (4, 3)),
}


def make(name):
    torch.manual_seed(0)
    build, shape = MODELS[name]
    return build().double(), tasks(3, 4, 6, shape, 2)


# --- naive per-task computations: one task at a time, plain autograd -----------------

def naive_unrolled(model, batches, first_order):
    names = [n for n, _ in model.named_parameters()]
    theta = [p for _, p in model.named_parameters()]
    xs, ys, xq, yq = batches
    total = torch.zeros_like(torch.cat([p.flatten() for p in theta]))
    for t in range(xs.shape[0]):
        w = theta if not first_order else [p.detach().requires_grad_(True) for p in theta]
        for _ in range(STEPS):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, w)), (xs[t],)), ys[t])
            grads = torch.autograd.grad(loss, w, create_graph=not first_order)
            w = [p - INNER_LR * g for p, g in zip(w, grads)]
            if first_order:
                w = [p.detach().requires_grad_(True) for p in w]
        q = F.cross_entropy(functional_call(model, dict(zip(names, w)), (xq[t],)), yq[t])
        total += torch.cat([g.flatten() for g in torch.autograd.grad(q, theta if not first_order else w)])
    return total


def naive_imaml(model, batches):
    """GD on the regularised support loss, then CG on (I + H/λ) x = ∇L_query, per task."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().flatten() for _, p in model.named_parameters()])
    xs, ys, xq, yq = batches

    def loss(flat, x, y):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    total = torch.zeros_like(theta)
    for t in range(xs.shape[0]):
        phi = theta.clone()
        for _ in range(STEPS):
            p = phi.requires_grad_(True)
            (g,) = torch.autograd.grad(loss(p, xs[t], ys[t]), p)
            phi = (phi - INNER_LR * (g + LAM * (phi - theta))).detach()
        p = phi.clone().requires_grad_(True)
        (gs,) = torch.autograd.grad(loss(p, xs[t], ys[t]), p, create_graph=True)
        (b,) = torch.autograd.grad(loss(p, xq[t], yq[t]), p, retain_graph=True)

        def A(v):
            (hv,) = torch.autograd.grad(gs, p, v, retain_graph=True)
            return v + hv / LAM

        x, r = torch.zeros_like(b), b.clone()
        d, rs = r.clone(), r @ r
        for _ in range(CG_STEPS):
            Ad = A(d)
            curvature = d @ Ad
            if curvature <= 0:
                break
            alpha = rs / curvature
            x, r = x + alpha * d, r - alpha * Ad
            rs_new = r @ r
            d, rs = r + (rs_new / rs) * d, rs_new
        total += x
    return total


def ours(model, batches, method, mode):
    xs, ys, xq, yq = batches
    model.zero_grad(set_to_none=True)
    if method == "imaml":
        adapted = im.imaml(model, xs, ys, lam=LAM, inner_steps=STEPS, inner_lr=INNER_LR,
                           cg_steps=CG_STEPS, batching=mode)
    else:
        adapted = im.maml(model, xs, ys, inner_steps=STEPS, inner_lr=INNER_LR, mode=method, batching=mode)
    # Sum over tasks of each task's mean query loss, as the naive computations take it.
    (F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten()) * xs.shape[0]).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), adapted


CASES = [(m, b) for m in ("conv4-maxpool", "omniglot-stride2") for b in ("vmap", "loop")] + [("lstm", "loop")]


@pytest.mark.parametrize("name, mode", CASES)
@pytest.mark.parametrize("method", ["full", "first_order", "imaml"])
def test_meta_gradient_equals_naive_per_task(name, mode, method):
    model, batches = make(name)
    got, adapted = ours(model, batches, method, mode)
    assert adapted.info["batching"]["batching"] == mode
    if method == "imaml":
        expected = naive_imaml(model, batches)
    else:
        expected = naive_unrolled(model, batches, first_order=method == "first_order")
    assert (got - expected).norm() / expected.norm() < 1e-10


# --- randomness: dropout draws its own mask for every task --------------------------

@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_dropout_masks_differ_across_tasks(mode):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 2)).double()
    T = 4
    x = torch.randn(1, 6, 3, dtype=torch.float64).expand(T, 6, 3)  # the same task T times
    y = torch.zeros(T, 6, dtype=torch.long)
    adapted = im.maml(model, x, y, inner_steps=0, batching=mode)
    with torch.no_grad():
        out = adapted(x)
        hidden = model[0](x[0])
        no_dropout = model[2](hidden)
    for t in range(1, T):
        assert not torch.equal(out[0], out[t]), f"task {t} drew task 0's dropout mask"
    # Each output is the dropout network: some units dropped, the rest scaled by 1/(1-p).
    assert not torch.allclose(out[0], no_dropout)

    # Every task's inner loop and the implicit backward run with dropout on.
    adapted = im.imaml(model, x, y, inner_steps=2, cg_steps=2, batching=mode)
    F.cross_entropy(adapted(x).flatten(0, 1), y.flatten()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- modules vmap cannot batch: a clear error, and the loop --------------------------

@pytest.mark.parametrize("make_model, x", [
    (LSTMClassifier, torch.randn(2, 4, 5, 3)),
    (SignBranch, torch.randn(2, 4, 3)),
])
def test_vmap_failure_says_what_and_to_use_loop(make_model, x):
    model = make_model()
    y = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(im.BatchingError, match=r"cannot be batched over tasks with torch\.func\.vmap.*"
                                               r"pass batching='loop'") as caught:
        im.maml(model, x, y, inner_steps=1)
    assert caught.value.__cause__ is not None  # PyTorch's own message is kept as the cause
    adapted = im.maml(model, x, y, inner_steps=1, batching="loop")
    assert adapted(x).shape == (2, 4, 2)


def test_errors_that_are_not_vmap_failures_pass_through():
    model = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="size|shape") as caught:  # a shape error from PyTorch
        im.maml(model, torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.long), inner_steps=1)
    assert not isinstance(caught.value, im.BatchingError)


@pytest.mark.parametrize("value", ["vectorize", None, 1, "VMAP"])
def test_bad_batching_value(value):
    x, y = torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long)
    for fn in (im.maml, im.imaml):
        with pytest.raises(ValueError, match=re.escape(f"batching must be one of {batching.BATCHING_MODES}")):
            fn(nn.Linear(3, 2), x, y, batching=value)


def test_auto_falls_back_to_loop_and_reports_why():
    model = LSTMClassifier()
    x, y = torch.randn(2, 4, 5, 3), torch.zeros(2, 4, dtype=torch.long)
    batching._DECISIONS.clear()
    adapted = im.imaml(model, x, y, inner_steps=1, batching="auto")
    decision = adapted.info["batching"]
    assert decision["batching"] == "loop" and decision["requested"] == "auto"
    assert "vmap cannot batch the model" in decision["reason"] and not decision["cached"]
    again = im.maml(model, x, y, inner_steps=1, batching="auto").info["batching"]
    assert again["batching"] == "loop" and again["cached"]


def test_auto_times_both_and_picks_the_faster(monkeypatch):
    seconds = {"vmap": 2.0, "loop": 1.0}
    monkeypatch.setattr(batching, "_seconds_per_gradient", lambda f, mode, *a: seconds[mode])
    batching._DECISIONS.clear()
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long)
    decision = im.maml(model, x, y, inner_steps=1, batching="auto").info["batching"]
    assert decision["batching"] == "loop" and decision["seconds"] == seconds
    seconds.update(vmap=0.5)
    batching._DECISIONS.clear()
    assert im.maml(model, x, y, inner_steps=1, batching="auto").info["batching"]["batching"] == "vmap"


# --- the folded layers: batch-norm, max-pooling and convolution as one call on [n, T·C, ...] --

def test_folded_layers_run_under_vmap_and_equal_the_generic_rules(monkeypatch):
    """Under vmap, batch-norm, max-pool and convolution run folded (counted); outputs,
    gradients and second derivatives equal those of vmap's own batching rules (folding
    switched off).  The fused batch-norm → ReLU → max-pool layer is off here: it
    would run these layers itself (tests/test_fused_layers.py)."""
    monkeypatch.setenv(fused_layers.DISABLE_ENV, "1")
    model, (xs, ys, _, _) = make("conv4-maxpool")
    used = []
    for cls in (batching._TaskBatchNorm, batching._TaskMaxPool2d, batching._TaskConv2d):
        monkeypatch.setattr(cls, "folded", staticmethod(
            lambda T, dims, *a, _orig=cls.folded, _name=cls.__name__: used.append(_name) or _orig(T, dims, *a)))

    def derivatives():
        tl = im.maml(model, xs, ys, inner_steps=0).task_loss
        phi = tl.theta().detach().unsqueeze(0).repeat(xs.shape[0], 1).requires_grad_(True)
        losses = tl.losses(phi, xs, ys)
        (g,) = torch.autograd.grad(losses.sum(), phi, create_graph=True)
        (hg,) = torch.autograd.grad((g * g).sum(), phi)
        return losses.detach(), g.detach(), hg

    folded = derivatives()
    assert used.count("_TaskBatchNorm") == 4 and used.count("_TaskMaxPool2d") == 4
    assert used.count("_TaskConv2d") == 4
    monkeypatch.setattr(batching, "_FOLDED", {})
    generic = derivatives()
    assert used.count("_TaskBatchNorm") == 4  # not used with the table empty
    for a, b in zip(folded, generic):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_convolution_equals_one_convolution_per_task(bias, channels_last):
    """Per-task weights with stride, padding, dilation and groups: the folded grouped
    convolution under vmap gives each task's own F.conv2d output and first and
    second derivatives, also on channels-last activations (batching.CHANNELS_LAST)."""
    g = torch.Generator().manual_seed(3)
    T, n = 3, 2
    x = torch.randn(T, n, 4, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(T, 6, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(T, 6, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    options = dict(stride=2, padding=1, dilation=2, groups=2)
    args = (x, w) + ((b,) if bias else ())

    def conv(x_t, w_t, b_t=None):
        return F.conv2d(x_t, w_t, b_t, **options)

    physical = []

    def conv_seen(*a):
        out = conv(*a)
        physical.append(torch._C._functorch.get_unwrapped(out))
        return out

    with batching.CHANNELS_LAST.set(channels_last):
        folded = batching.over_tasks(conv_seen, "vmap")(*args)
    folded_layout = physical[0].view(n, T * 6, *physical[0].shape[-2:])  # [n, T, C, H, W] as folded
    assert folded_layout.is_contiguous(memory_format=torch.channels_last) == channels_last
    looped = torch.stack([conv(*(a[t] for a in args)) for t in range(T)])
    torch.testing.assert_close(folded, looped, rtol=1e-12, atol=1e-12)
    v = torch.randn(looped.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((folded ** 2 * v).sum(), args, create_graph=True)
    want = torch.autograd.grad((looped ** 2 * v).sum(), args, create_graph=True)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    u = [torch.randn(a.shape, generator=g, dtype=torch.float64) for a in args]
    for a, c in zip(torch.autograd.grad(got, args, u), torch.autograd.grad(want, args, u)):
        torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-12)


def test_auto_inside_a_torch_func_transform_is_vmap():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    xs, ys, xq, yq = tasks(2, 4, 4, (3,), 2)
    seen = {}

    class Meta(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self):
            adapted = im.imaml(self.net, xs, ys, inner_steps=2, cg_steps=2, batching="auto")
            seen.update(adapted.info["batching"])
            return F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten())

    meta = Meta()
    params = {n: p.detach().clone() for n, p in meta.named_parameters()}
    grads = torch.func.grad(lambda p: functional_call(meta, p, ()))(params)
    assert seen["batching"] == "vmap" and "torch.func transform" in seen["reason"]
    meta().backward()
    for n, p in meta.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conf", [((1, 1), (1, 1), (1, 1), 3), ((2, 2), (1, 1), (1, 1), 3), ((1, 1), (0, 0), (2, 2), 1)])
def test_grouped_convolution_derivatives_up_to_third_order_equal_pytorchs(bias, conf):
    """The folded convolution's own first and second derivatives (three native grouped
    convolutions, no loop over groups) and its fallback for a third equal F.conv2d's."""
    g = torch.Generator().manual_seed(5)
    groups = conf[3]
    x = torch.randn(2, 2 * groups, 7, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4 * groups, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4 * groups, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    wrt = [t for t in (x, w, b) if t is not None]

    def derivatives(conv):
        out = conv(x, w, b)
        first = torch.autograd.grad((out ** 3).sum(), wrt, create_graph=True)
        second = torch.autograd.grad(sum((f ** 2).sum() for f in first), wrt, create_graph=True)
        third = torch.autograd.grad(sum((s ** 2).sum() for s in second), wrt)
        return (out, *first, *second, *third)

    ours = derivatives(lambda x, w, b: batching._GroupedConv2d.apply(x, w, b, conf))
    pytorch = derivatives(lambda x, w, b: F.conv2d(x, w, b, *conf))
    for a, e in zip(ours, pytorch):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)


def test_grouped_convolution_leaves_out_gradients_nobody_needs():
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)  # an input image: no gradient wanted
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = batching._GroupedConv2d.apply(x, w, None, ((1, 1), (1, 1), (1, 1), 3))
    (gw,) = torch.autograd.grad((out ** 2).sum(), [w], create_graph=True)
    (hw,) = torch.autograd.grad((gw ** 2).sum(), [w])
    (ref,) = torch.autograd.grad((torch.autograd.grad((F.conv2d(x, w, None, 1, 1, 1, 3) ** 2).sum(), [w],
                                                      create_graph=True)[0] ** 2).sum(), [w])
    torch.testing.assert_close(hw, ref)
