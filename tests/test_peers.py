"""imaml_ext's meta-gradients equal those of the libraries people use today (float64, ≤ 1e-12).

The peers (``pip install ".[peers]"``: torchopt, higher, torch-maml) compute
each task's meta-gradient with their own machinery, one task at a time
(``benchmarks/peer_loops.py``, the code that ``benchmarks/compare_peers.py``
times); imaml_ext batches the tasks.  A missing peer skips its tests, naming
the package.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import peer_loops as pl  # noqa: E402
from few_shot import image_tasks, tiny_convnet  # noqa: E402

TOL = 1e-12
TASKS, WAYS, SHOTS, QUERIES = 3, 3, 2, 2


@pytest.fixture
def problem():
    return tiny_convnet(WAYS), image_tasks(TASKS, WAYS, SHOTS, QUERIES)


def assert_equal_grads(mine, peer):
    assert mine.abs().max() > 0, "a zero meta-gradient would make the comparison vacuous"
    assert pl.relative_difference(peer, mine) <= TOL


def test_full_maml_equals_higher(problem):
    pytest.importorskip("higher", reason="higher not installed (pip install '.[peers]')")
    model, batch = problem
    mine = pl.meta_gradient(pl.imaml_ext_maml, model, batch, steps=3, lr=0.4, mode="full")
    assert_equal_grads(mine, pl.meta_gradient(pl.higher_maml, model, batch, steps=3, lr=0.4))


def test_full_maml_equals_torchopt_metasgd(problem):
    pytest.importorskip("torchopt", reason="torchopt not installed (pip install '.[peers]')")
    model, batch = problem
    mine = pl.meta_gradient(pl.imaml_ext_maml, model, batch, steps=3, lr=0.4, mode="full")
    assert_equal_grads(mine, pl.meta_gradient(pl.torchopt_metasgd_maml, model, batch, steps=3, lr=0.4))
    # MetaSGD runs on the module itself: θ must be back in place afterwards.
    again = pl.meta_gradient(pl.imaml_ext_maml, model, batch, steps=3, lr=0.4, mode="full")
    assert torch.equal(again, mine)


def test_first_order_maml_equals_higher_without_higher_grads(problem):
    pytest.importorskip("higher", reason="higher not installed (pip install '.[peers]')")
    model, batch = problem
    mine = pl.meta_gradient(pl.imaml_ext_maml, model, batch, steps=3, lr=0.4, mode="first_order")
    peer = pl.meta_gradient(pl.higher_maml, model, batch, steps=3, lr=0.4, first_order=True)
    assert_equal_grads(mine, peer)
    full = pl.meta_gradient(pl.imaml_ext_maml, model, batch, steps=3, lr=0.4, mode="full")
    assert pl.relative_difference(mine, full) > 1e-3  # first order is a different gradient


@pytest.mark.parametrize("every", [1, 2, 3])
def test_checkpointed_maml_equals_torch_maml(problem, every):
    pytest.importorskip("torch_maml", reason="torch_maml not installed (pip install '.[peers]')")
    model, batch = problem
    mine = pl.meta_gradient(pl.imaml_ext_maml, model, batch, steps=6, lr=0.4, mode="checkpointed",
                            checkpoint_every=every)
    peer = pl.meta_gradient(pl.torch_maml_checkpointed, model, batch, steps=6, lr=0.4, checkpoint_steps=every)
    assert_equal_grads(mine, peer)


@pytest.mark.parametrize("form", ["example", "flat"])
@pytest.mark.parametrize("cg_steps", [1, 5])
def test_imaml_equals_torchopt_implicit_differentiation(problem, form, cg_steps):
    pytest.importorskip("torchopt", reason="torchopt not installed (pip install '.[peers]')")
    import torch.nn.functional as F
    import imaml_ext as im
    model, batch = problem
    kw = dict(steps=8, lr=0.1, lam=2.0, cg_steps=cg_steps)
    # TorchOpt's CG has no stop at non-positive curvature (imaml_ext's has): the
    # comparison needs every task's CG to run its cg_steps.
    adapted = im.imaml(model, batch[0], batch[1], F.cross_entropy, lam=2.0, inner_steps=8, inner_lr=0.1,
                       cg_steps=cg_steps)
    adapted.loss(batch[2], batch[3]).sum().backward()
    assert bool((adapted.info["cg"].state == im.ops.CGState.RUNNING).all()), adapted.info["cg"].summary()
    mine = pl.meta_gradient(pl.imaml_ext_imaml, model, batch, **kw)
    peer_fn = pl.torchopt_imaml_example if form == "example" else pl.torchopt_imaml_flat
    assert_equal_grads(mine, pl.meta_gradient(peer_fn, model, batch, **kw))


@pytest.mark.parametrize("cg_steps", [1, 3])
def test_imaml_equals_the_reference_loop(problem, cg_steps):
    """The per-task loop compare_peers.py times as ``reference-loop`` (no library):
    its CG stops at non-positive curvature as imaml_ext's does, so every task counts."""
    model, batch = problem
    kw = dict(steps=8, lr=0.1, lam=2.0, cg_steps=cg_steps)
    mine = pl.meta_gradient(pl.imaml_ext_imaml, model, batch, **kw)
    assert_equal_grads(mine, pl.meta_gradient(pl.reference_imaml_loop, model, batch, **kw))
