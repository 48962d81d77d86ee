"""Argument rules of the library entry points (imaml_ext.validation): numbers of any
real type, one inner_lr rule, empty batches, class labels against the model's width."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import imaml_ext as im
from imaml_ext.training.flags import NONNEGATIVE_INT, POSITIVE_FLOAT
from imaml_ext.validation import check_positive, check_steps, output_shape, real_number
from imaml_ext.functional import TaskLoss

WAYS = 3


def _tasks(tasks=2, n=6, ways=WAYS, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, n, 4, generator=g, dtype=dtype)
    y = torch.randint(0, ways, (tasks, n), generator=g)
    return x, y


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, WAYS)).to(dtype)


@pytest.mark.parametrize("spelling", [np.float32, np.float64, lambda v: torch.tensor(v),
                                      lambda v: torch.tensor(v, dtype=torch.float32)])
def test_imaml_takes_numpy_and_tensor_scalars_as_numbers(spelling):
    x, y = _tasks()
    steps_spelling = np.int64 if spelling in (np.float32, np.float64) else (lambda v: torch.tensor(v))
    other = im.imaml(_model(), x, y, lam=spelling(2.0), inner_lr=spelling(0.25),
                     inner_steps=steps_spelling(4), cg_steps=steps_spelling(3),
                     cg_tol=spelling(1e-3), max_grad_norm=spelling(10.0))
    reference = im.imaml(_model(), x, y, lam=2.0, inner_lr=0.25, inner_steps=4, cg_steps=3,
                         cg_tol=float(np.float32(1e-3)), max_grad_norm=10.0)
    torch.testing.assert_close(other.flat, reference.flat, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spelling", [np.float32, lambda v: torch.tensor(v)])
def test_maml_takes_numpy_and_tensor_scalars_as_numbers(spelling):
    x, y = _tasks()
    steps = np.int64(3) if spelling is np.float32 else torch.tensor(3)
    ref = im.maml(_model(), x, y, inner_lr=float(spelling(0.25)), inner_steps=3, mode="checkpointed",
                  checkpoint_every=2, inner_solver="momentum", momentum=0.5)
    got = im.maml(_model(), x, y, inner_lr=spelling(0.25), inner_steps=steps, mode="checkpointed",
                  checkpoint_every=np.int64(2), inner_solver="momentum", momentum=spelling(0.5))
    torch.testing.assert_close(got.flat, ref.flat, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("value", [True, np.bool_(True), "2.0", torch.tensor([2.0]), torch.tensor(True),
                                   torch.tensor(2.0, requires_grad=True), None])
def test_non_numbers_are_rejected_with_the_argument_name(value):
    x, y = _tasks()
    with pytest.raises(ValueError, match="lam"):
        im.imaml(_model(), x, y, lam=value)


def test_steps_must_be_integers_of_any_integer_type():
    assert check_steps("k", np.int32(5)) == 5 and type(check_steps("k", np.int32(5))) is int
    assert check_steps("k", torch.tensor(5)) == 5
    for bad in (5.0, np.float64(5.0), torch.tensor(5.0), True, -1):
        with pytest.raises(ValueError, match="k must be a non-negative integer"):
            check_steps("k", bad)
    assert type(check_positive("a", np.float32(0.5))) is float
    assert real_number("a", np.int64(3)) == 3.0


@pytest.mark.parametrize("entry", ["imaml", "maml"])
def test_inner_lr_zero_has_one_rule(entry):
    """Both methods refuse inner_lr=0 and point to inner_steps=0, which both accept (φ = θ)."""
    x, y = _tasks()
    fn = getattr(im, entry)
    with pytest.raises(ValueError, match="inner_lr must be a positive.*inner_steps=0"):
        fn(_model(), x, y, inner_lr=0)
    with pytest.raises(ValueError, match="inner_lr must be a positive"):
        fn(_model(), x, y, inner_lr=np.float32(-0.1))
    model = _model()
    adapted = fn(model, x, y, inner_lr=0.1, inner_steps=0)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(adapted.flat.detach(), theta.expand(x.shape[0], -1))


@pytest.mark.parametrize("entry", ["imaml", "maml"])
def test_empty_meta_batch_and_empty_support_set_are_errors(entry):
    x, y = _tasks()
    fn = getattr(im, entry)
    with pytest.raises(ValueError, match="meta-batch is empty"):
        fn(_model(), x[:0], y[:0])
    with pytest.raises(ValueError, match="empty support set") as info:
        fn(_model(), x[:, :0], y[:, :0])
    assert "inner_lr" not in str(info.value)


@pytest.mark.parametrize("entry", ["imaml", "maml"])
@pytest.mark.parametrize("label", [7, WAYS, -1])
def test_labels_outside_the_models_classes_are_explained(entry, label):
    x, y = _tasks()
    y[1, 2] = label
    with pytest.raises(ValueError, match=f"label {label}, but the model outputs {WAYS} classes"):
        getattr(im, entry)(_model(), x, y)


def test_labels_are_checked_against_a_conv_net_and_per_step_support():
    from imaml_ext.models import OmniglotConvNet
    torch.manual_seed(0)
    net = OmniglotConvNet(ways=5, hidden=4).double()
    x = torch.rand(2, 5, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(5).repeat(2, 1)
    im.maml(net, x, y, inner_steps=1, inner_lr=0.1)  # in range: accepted
    y[0, 4] = 5
    with pytest.raises(ValueError, match="label 5, but the model outputs 5 classes"):
        im.maml(net, x, y, inner_steps=1, inner_lr=0.1)
    xs, ys = _tasks(n=4)
    ys = ys.reshape(2, 2, 2)
    ys[0, 1, 1] = 9
    with pytest.raises(ValueError, match="label 9"):
        im.maml(_model(), xs.reshape(2, 2, 2, 4), ys, inner_steps=2, per_step_support=True)


def test_models_that_cannot_run_on_one_example_are_not_refused():
    """Batch norm over a batch of one cannot run in training mode: no label check, the call still works."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, WAYS)).double()
    x, y = _tasks()
    assert output_shape(TaskLoss(net, F.cross_entropy), x[0]) is None
    im.imaml(net, x, y, inner_steps=2)
    assert output_shape(TaskLoss(_model(), F.cross_entropy), x[0]) == (1, WAYS)


def test_the_probe_leaves_the_random_state_alone():
    """A model with dropout: the label check's probe draws no numbers from the global generator."""
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, WAYS)).double()
    x, _ = _tasks()
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    assert output_shape(TaskLoss(net, F.cross_entropy), x[0]) == (1, WAYS)
    assert torch.equal(torch.rand(3), expected)


def test_regression_targets_are_not_labels():
    x, _ = _tasks()
    torch.manual_seed(0)
    y = torch.randn(2, 6, 1, dtype=torch.float64) * 100
    model = nn.Linear(4, 1).double()
    im.imaml(model, x, y, F.mse_loss, inner_lr=1e-3, inner_steps=2)


def test_config_flags_take_numpy_numbers():
    assert POSITIVE_FLOAT.valid(np.float32(2.0)) and POSITIVE_FLOAT.valid(np.int64(2))
    assert NONNEGATIVE_INT.valid(np.int64(5)) and not NONNEGATIVE_INT.valid(np.float32(5.0))
    assert not POSITIVE_FLOAT.valid(np.float32("nan")) and not POSITIVE_FLOAT.valid(True)
