"""MAML (full / first-order / checkpointed) and Reptile against independent computations."""
import math
import warnings
from dataclasses import astuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import imaml_ext.unrolled as un
from imaml_ext.finite import NonFiniteLossError

T, N, M, CLASSES = 3, 6, 5, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one thread is as fast, and immune to OpenMP
    oversubscription when the machine is busy (2 threads ran 25x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
OPT_KW = {
    "sgd": dict(inner_lr=0.3),
    "momentum": dict(inner_lr=0.1, momentum=0.9),
    "rmsprop": dict(inner_lr=0.01, beta=0.9, eps=1e-8),
}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 5 * 5, CLASSES)).double()


def data(shape, steps=None):
    """Support [T, N, *shape] (or [T, steps, N, *shape]) and query [T, M, *shape] batches."""
    g = torch.Generator().manual_seed(1)
    lead = (T, N) if steps is None else (T, steps, N)
    xs = torch.randn(*lead, *shape, generator=g, dtype=torch.float64)
    ys = torch.randint(0, CLASSES, lead, generator=g)
    xq = torch.randn(T, M, *shape, generator=g, dtype=torch.float64)
    yq = torch.randint(0, CLASSES, (T, M), generator=g)
    return xs, ys, xq, yq


def make_lr(kind, model, value):
    names = [n for n, _ in model.named_parameters()]
    if kind == "float":
        return value
    if kind == "scalar":
        return torch.tensor(value, dtype=torch.float64, requires_grad=True)
    rates = [torch.tensor(value * (1 + 0.25 * i), dtype=torch.float64, requires_grad=True)
             for i in range(len(names))]
    return dict(zip(names, rates)) if kind == "dict" else rates


def lr_tensors(lr):
    if isinstance(lr, dict):
        return list(lr.values())
    if isinstance(lr, list):
        return lr
    return [lr] if isinstance(lr, torch.Tensor) else []


def run(make_model, mode, optimizer="sgd", steps=5, lr_kind="scalar", batches=None, **kw):
    """Meta-gradient of the mean query cross-entropy: (θ-gradient [P], [learning-rate gradients])."""
    model = make_model()
    xs, ys, xq, yq = batches
    opt_kw = dict(OPT_KW[optimizer])
    lr = make_lr(lr_kind, model, opt_kw.pop("inner_lr"))
    adapted = un.maml(model, xs, ys, F.cross_entropy, inner_steps=steps, inner_lr=lr, mode=mode,
                      inner_solver=optimizer, **opt_kw, **kw)
    F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten()).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return grad, [r.grad for r in lr_tensors(lr)], adapted


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_same(got, ref, tol=1e-10):
    (g1, lr1), (g2, lr2) = got[:2], ref[:2]
    assert rel(g1, g2) <= tol
    assert len(lr1) == len(lr2)
    for a, b in zip(lr1, lr2):
        assert rel(a, b) <= tol


MLP_DATA = data((3,))
CONV_DATA = data((1, 5, 5))


# --- checkpointed == full ----------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "rmsprop"])
@pytest.mark.parametrize("steps,every", [(1, 1), (7, 1), (7, 3), (7, 7), (20, 1), (20, 6), (20, 20)])
def test_checkpointed_equals_full_mlp(optimizer, steps, every):
    full = run(mlp, "full", optimizer, steps, batches=MLP_DATA)
    ckpt = run(mlp, "checkpointed", optimizer, steps, batches=MLP_DATA, checkpoint_every=every)
    assert_same(ckpt, full)
    assert ckpt[1][0].abs() > 0  # the learning rate's gradient is exercised


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "rmsprop"])
@pytest.mark.parametrize("steps,every", [(7, 1), (7, 7), (20, 4)])
def test_checkpointed_equals_full_convnet_batchnorm(optimizer, steps, every):
    full = run(convnet, "full", optimizer, steps, batches=CONV_DATA)
    ckpt = run(convnet, "checkpointed", optimizer, steps, batches=CONV_DATA, checkpoint_every=every)
    assert_same(ckpt, full)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "rmsprop"])
@pytest.mark.parametrize("lr_kind", ["float", "dict", "list"])
def test_checkpointed_equals_full_learning_rates(optimizer, lr_kind):
    full = run(mlp, "full", optimizer, 7, lr_kind, batches=MLP_DATA)
    ckpt = run(mlp, "checkpointed", optimizer, 7, lr_kind, batches=MLP_DATA, checkpoint_every=3)
    assert_same(ckpt, full)
    assert all(g.abs() > 0 for g in ckpt[1])


def test_checkpointed_forward_hvp_equals_full():
    full = run(convnet, "full", "sgd", 7, batches=CONV_DATA)
    ckpt = run(convnet, "checkpointed", "sgd", 7, batches=CONV_DATA, checkpoint_every=2, hvp_mode="forward")
    assert_same(ckpt, full)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "rmsprop"])
def test_clipping_checkpointed_equals_full_and_clips(optimizer):
    # A bound below the typical norm of the flow, so that clipping is active.
    kw = dict(max_grad_grad_norm=0.05, batches=MLP_DATA)
    full = run(mlp, "full", optimizer, 7, **kw)
    ckpt = run(mlp, "checkpointed", optimizer, 7, checkpoint_every=3, **kw)
    assert_same(ckpt, full)
    unclipped = run(mlp, "full", optimizer, 7, batches=MLP_DATA)
    assert rel(full[0], unclipped[0]) > 1e-3


def test_per_step_support_checkpointed_equals_full():
    batches = data((3,), steps=7)
    full = run(mlp, "full", "momentum", 7, batches=batches, per_step_support=True)
    ckpt = run(mlp, "checkpointed", "momentum", 7, batches=batches, per_step_support=True, checkpoint_every=3)
    assert_same(ckpt, full)


def test_checkpointed_keeps_only_snapshots():
    # Saved for backward: the effective rate, the rate tensor and ceil(K/c) snapshots of (φ, v).
    _, _, adapted = run(mlp, "checkpointed", "momentum", 20, batches=MLP_DATA, checkpoint_every=6)
    # backward has run; the saved tensors were freed
    with pytest.raises(RuntimeError):
        adapted.flat.grad_fn.saved_tensors
    model = mlp()
    xs, ys, _, _ = MLP_DATA
    adapted = un.maml(model, xs, ys, inner_steps=20, inner_lr=0.1, mode="checkpointed",
                      inner_solver="momentum", checkpoint_every=6)
    saved = adapted.flat.grad_fn.saved_tensors
    assert len(saved) == 1 + 1 + math.ceil(20 / 6) * 2


def test_modes_share_the_inner_trajectory():
    xs, ys, _, _ = MLP_DATA
    outs = {}
    for mode in un.MODES:
        adapted = un.maml(mlp(), xs, ys, inner_steps=6, inner_lr=0.3, mode=mode, inner_solver="rmsprop")
        outs[mode] = adapted
    for mode in ("first_order", "checkpointed"):
        torch.testing.assert_close(outs[mode].flat, outs["full"].flat, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(outs[mode].info["inner_losses"], outs["full"].info["inner_losses"])
    assert outs["full"].info["inner_losses"].shape == (6, T)
    with torch.no_grad():
        assert un.maml(mlp(), xs, ys, inner_steps=6, mode="full").flat.grad_fn is None


# --- full == naive per-task autograd ---------------------------------------------

def naive_inner(model, xs_t, ys_t, steps, lr, optimizer, create_graph, per_step=False):
    """Task-by-task inner loop over the model's own named parameters, plain autograd."""
    names = [n for n, _ in model.named_parameters()]
    w = [p for _, p in model.named_parameters()]
    if isinstance(lr, dict):
        rates = [lr[n] for n in names]
    elif isinstance(lr, list):
        rates = lr
    else:
        rates = [lr] * len(w)
    hp = OPT_KW[optimizer]
    state = [torch.zeros_like(p) for p in w]
    for k in range(steps):
        x, y = (xs_t[k], ys_t[k]) if per_step else (xs_t, ys_t)
        loss = F.cross_entropy(functional_call(model, dict(zip(names, w)), (x,)), y)
        grads = torch.autograd.grad(loss, w, create_graph=create_graph)
        if optimizer == "sgd":
            w = [p - r * g for p, r, g in zip(w, rates, grads)]
        elif optimizer == "momentum":
            state = [hp["momentum"] * v + g for v, g in zip(state, grads)]
            w = [p - r * v for p, r, v in zip(w, rates, state)]
        else:
            state = [g * g if k == 0 else hp["beta"] * s + (1 - hp["beta"]) * g * g for s, g in zip(state, grads)]
            w = [p - r * g / torch.sqrt(s + hp["eps"]) for p, r, g, s in zip(w, rates, grads, state)]
        if not create_graph:
            w = [p.detach().requires_grad_(True) for p in w]
    return dict(zip(names, w))


def naive_maml(make_model, optimizer, steps, lr_kind, batches, per_step=False):
    model = make_model()
    xs, ys, xq, yq = batches
    lr = make_lr(lr_kind, model, OPT_KW[optimizer]["inner_lr"])
    total = 0.0
    for t in range(T):
        phi = naive_inner(model, xs[t], ys[t], steps, lr, optimizer, True, per_step)
        total = total + F.cross_entropy(functional_call(model, phi, (xq[t],)), yq[t], reduction="sum")
    (total / (T * M)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), [r.grad for r in lr_tensors(lr)]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "rmsprop"])
@pytest.mark.parametrize("lr_kind", ["scalar", "dict"])
def test_full_equals_naive_unrolled_mlp(optimizer, lr_kind):
    ours = run(mlp, "full", optimizer, 5, lr_kind, batches=MLP_DATA)
    assert_same(ours, naive_maml(mlp, optimizer, 5, lr_kind, MLP_DATA))


def test_full_equals_naive_unrolled_convnet():
    ours = run(convnet, "full", "sgd", 4, batches=CONV_DATA)
    assert_same(ours, naive_maml(convnet, "sgd", 4, "scalar", CONV_DATA))


def test_full_equals_naive_per_step_support():
    batches = data((3,), steps=4)
    ours = run(mlp, "full", "sgd", 4, batches=batches, per_step_support=True)
    assert_same(ours, naive_maml(mlp, "sgd", 4, "scalar", batches, per_step=True))


# --- first order --------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_first_order_equals_hand_fomaml(optimizer):
    grad, lr_grads, _ = run(mlp, "first_order", optimizer, 5, batches=MLP_DATA)
    assert lr_grads[0] == 0  # dφ_K/dα is dropped with dφ_K/dθ

    model = mlp()
    xs, ys, xq, yq = MLP_DATA
    expected = torch.zeros_like(grad)
    for t in range(T):
        phi = naive_inner(model, xs[t], ys[t], 5, OPT_KW[optimizer]["inner_lr"], optimizer, False)
        loss = F.cross_entropy(functional_call(model, phi, (xq[t],)), yq[t], reduction="sum") / (T * M)
        expected += torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(phi.values()))])
    assert rel(grad, expected) <= 1e-12


# --- Reptile --------------------------------------------------------------------------

def test_reptile_grad_matches_hand_computation():
    model = mlp()
    xs, ys, _, _ = MLP_DATA
    with torch.no_grad():
        adapted = un.maml(model, xs, ys, inner_steps=4, inner_lr=0.3, mode="first_order")
    phis = [naive_inner(model, xs[t], ys[t], 4, 0.3, "sgd", False) for t in range(T)]
    expected = {n: p.detach() - sum(phi[n].detach() for phi in phis) / T for n, p in model.named_parameters()}
    model[0].weight.grad = torch.ones_like(model[0].weight)
    grad = un.reptile_grad(model, adapted, write=True)
    flat = torch.cat([expected[n].flatten() for n, _ in model.named_parameters()])
    assert rel(grad, flat) <= 1e-12
    for n, p in model.named_parameters():
        extra = 1.0 if n == "0.weight" else 0.0  # accumulated like backward()
        torch.testing.assert_close(p.grad, expected[n] + extra, rtol=1e-12, atol=1e-12)
    assert un.reptile_grad(model, adapted.flat, write=False).shape == (flat.numel(),)


def test_reptile_grad_writes_nothing_unless_asked():
    model = mlp()
    xs, ys, _, _ = MLP_DATA
    with torch.no_grad():
        adapted = un.maml(model, xs, ys, inner_steps=2, inner_lr=0.3, mode="first_order")
    grad = un.reptile_grad(model, adapted)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(un.reptile_grad(model, adapted, write=True), grad)
    assert torch.equal(torch.cat([p.grad.flatten() for p in model.parameters()]), grad)


def test_reptile_grad_rejects_wrong_layout():
    with pytest.raises(ValueError, match="adapted parameters must be"):
        un.reptile_grad(mlp(), torch.zeros(2, 5, dtype=torch.float64))


# --- memory_budget: the recomputation schedule ---------------------------------------------

@pytest.mark.parametrize("budget", ["none fits", "least without graphs", "least with graphs", "ample"])
@pytest.mark.parametrize("lr_kind", ["float", "scalar"])
def test_memory_budget_checkpointed_equals_full(budget, lr_kind):
    """Each schedule a budget selects (none fits: a warning and the least memory; without
    kept graphs; kept graphs) is plan_checkpoints' for the measured graph, and gives full
    MAML's meta-gradient, the learning rate's included."""
    steps = 12
    full = run(convnet, "full", "sgd", steps, lr_kind=lr_kind, batches=CONV_DATA)
    graph = run(convnet, "checkpointed", "sgd", steps, batches=CONV_DATA,
                memory_budget=10**12)[2].info["checkpoint_schedule"].step_graph_bytes
    snapshot = T * sum(p.numel() for p in convnet().parameters()) * 8
    least = {True: min(math.ceil(steps / c) * snapshot + c * (snapshot + graph) for c in range(1, steps + 1)),
             False: min(math.ceil(steps / c) * snapshot + c * snapshot + graph for c in range(1, steps + 1))}
    assert least[False] < least[True]  # this problem has a budget for each
    value = {"none fits": least[False] - 1, "least without graphs": least[False],
             "least with graphs": least[True], "ample": 10**12}[budget]
    expected = un.plan_checkpoints(steps, snapshot, graph, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if budget != "none fits" else "ignore", RuntimeWarning)
        ckpt = run(convnet, "checkpointed", "sgd", steps, lr_kind=lr_kind, batches=CONV_DATA, memory_budget=value)
    assert ckpt[2].info["checkpoint_schedule"] == expected
    assert expected.keep_graphs == (budget in ("least with graphs", "ample"))
    assert_same(ckpt, full, tol=1e-12)
    if budget == "none fits":
        with pytest.warns(RuntimeWarning, match=f"no schedule fits memory_budget={value} bytes"):
            run(convnet, "checkpointed", "sgd", steps, batches=CONV_DATA, memory_budget=value)


def test_memory_budget_schedules_a_momentum_loop_without_kept_graphs():
    full = run(convnet, "full", "momentum", 9, batches=CONV_DATA)
    ckpt = run(convnet, "checkpointed", "momentum", 9, batches=CONV_DATA, memory_budget=10**9)
    assert not ckpt[2].info["checkpoint_schedule"].keep_graphs
    assert ckpt[2].info["checkpoint_schedule"].every == 1  # the fastest without graphs
    assert_same(ckpt, full, tol=1e-12)


def test_plan_checkpoints_by_hand():
    """K = 16, snapshots of 10 bytes, a step's graph of 100 bytes."""
    plan = un.plan_checkpoints
    # Everything fits: kept graphs (no extra passes), the smallest such: c = 1 costs
    # 16·10 + 1·110 = 270 (c = 2: 80 + 220 = 300).
    assert astuple(plan(16, 10, 100, 10**6))[:3] == (1, True, 270)
    # Snapshots large against the graph (10 bytes of graph, 100 of snapshot): c = 1
    # costs 1600 + 110; c = 4 with graphs 400 + 440 = 840 is the least with graphs.
    assert astuple(plan(16, 100, 10, 10**6))[:3] == (4, True, 840)
    # Budget 700 below every kept-graph schedule (least 840): without graphs
    # ⌈16/c⌉·100 + c·100 + 10 fits for c = 4 only (810 > 700: none), so nothing fits
    # and the least without graphs is returned: c = 4, 810.
    assert astuple(plan(16, 100, 10, 700))[:3] == (4, False, 810)
    # Budget 1000 without kept graphs allowed: c ∈ {3,...,6} fit (c=3: 600+300+10=910;
    # c=2: 800+200+10=1010 does not); the fastest is the smallest c, 3.
    assert astuple(plan(16, 100, 10, 1000, graphs_allowed=False))[:3] == (3, False, 910)


# --- errors -----------------------------------------------------------------------------

def call(**kw):
    xs, ys, _, _ = MLP_DATA
    args = dict(model=mlp(), support_x=xs, support_y=ys, inner_steps=5, inner_lr=0.3)
    args.update(kw)
    return un.maml(args.pop("model"), args.pop("support_x"), args.pop("support_y"), **args)


@pytest.mark.parametrize("every", [0, 6, 2.5])
def test_checkpoint_every_out_of_range(every):
    with pytest.raises(ValueError, match=r"checkpoint_every must be an integer in \[1, inner_steps=5\]"):
        call(mode="checkpointed", checkpoint_every=every)


@pytest.mark.parametrize("kw,match", [
    (dict(mode="implicit"), "mode must be one of"),
    (dict(optimizer="adam"), "optimizer must be one of"),
    (dict(mode="full", checkpoint_every=2), "checkpoint_every applies to mode='checkpointed' only"),
    (dict(mode="full", memory_budget=10**6), "memory_budget applies to mode='checkpointed' only"),
    (dict(mode="checkpointed", memory_budget=10**6, checkpoint_every=2), "not both"),
    (dict(mode="checkpointed", memory_budget=0), "memory_budget must be a positive integer"),
    (dict(optimizer="sgd", momentum=0.9), "optimizer 'sgd' takes no momentum"),
    (dict(optimizer="momentum", momentum=1.5), r"momentum must be a number in \[0, 1\]"),
    (dict(optimizer="rmsprop", eps=0.0), "eps must be a positive finite number"),
    (dict(mode="first_order", max_grad_grad_norm=1.0), "mode='first_order' has no such flow"),
    (dict(mode="full", max_grad_grad_norm=-1.0), "max_grad_grad_norm must be a positive"),
    (dict(inner_lr={"0.weight": 0.1}), r"missing \['0.bias', '2.weight', '2.bias'\]"),
    (dict(inner_lr=[0.1, 0.2]), "one rate per trainable parameter tensor"),
    (dict(inner_lr=torch.ones(2)), "must be a floating-point scalar"),
    (dict(inner_lr=-0.1), "inner_lr must be a positive finite number"),
    (dict(hvp_mode="sideways"), "hvp_mode must be one of"),
    (dict(inner_steps=-1), "inner_steps must be a non-negative integer"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        call(**kw)


def test_mismatched_shapes():
    xs, ys, _, _ = MLP_DATA
    with pytest.raises(ValueError, match="support_x has 3 tasks but support_y has 2"):
        call(support_y=ys[:2])
    with pytest.raises(ValueError, match="support_x has 6 examples per task but support_y has 4"):
        call(support_y=ys[:, :4])
    steps_x, steps_y, _, _ = data((3,), steps=4)
    with pytest.raises(ValueError, match=r"support_x must be \[T, K=5, n, \.\.\.\].*got shape \(3, 4, 6, 3\)"):
        call(support_x=steps_x, support_y=steps_y, per_step_support=True)
    with pytest.raises(ValueError, match=r"support_y must be \[T, K=4, n, \.\.\.\]"):
        call(support_x=steps_x, support_y=steps_y[:, :3], per_step_support=True, inner_steps=4)


def test_optimizer_is_the_deprecated_name_of_inner_solver():
    xs, ys, xq, yq = MLP_DATA

    def meta_grad(**kw):
        model = mlp()
        adapted = un.maml(model, xs, ys, inner_steps=4, inner_lr=0.1, mode="checkpointed", momentum=0.9, **kw)
        F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]), adapted.info

    with pytest.warns(DeprecationWarning, match="optimizer= is deprecated; use inner_solver="):
        old, info = meta_grad(optimizer="momentum")
    new, _ = meta_grad(inner_solver="momentum")
    assert torch.equal(old, new)
    assert info["inner_solver"] == info["optimizer"] == "momentum"
    with pytest.raises(ValueError, match="pass only inner_solver="):
        call(inner_solver="sgd", optimizer="sgd")
    with pytest.raises(ValueError, match="inner_solver must be one of"):
        call(inner_solver="adam")


@pytest.mark.parametrize("mode", un.MODES)
def test_non_finite_loss_names_task_and_step(mode):
    # loss = mean sqrt(w x): task 1's first step drives w negative, so its loss at step 1 is NaN.
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    x = torch.tensor([0.01, 9.0, 0.04], dtype=torch.float64).view(3, 1, 1)
    y = torch.zeros(3, 1, dtype=torch.float64)

    def sqrt_loss(out, target):
        return out.sqrt().mean()

    with pytest.raises(NonFiniteLossError, match=r"\(task 1 at step 1\)"):
        un.maml(model, x, y, sqrt_loss, inner_steps=3, inner_lr=1.0, mode=mode)
