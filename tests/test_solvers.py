"""Batched conjugate gradient against dense solves."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import imaml_ext as im
from imaml_ext.solvers import CG, CGResult, CGState, Neumann, ShiftedOperator


def random_spd(T, P, cond=50.0, dtype=torch.float64):
    q, _ = torch.linalg.qr(torch.randn(T, P, P, dtype=dtype))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), P, dtype=dtype)
    return q @ torch.diag_embed(eig.expand(T, P)) @ q.transpose(1, 2)


def batched_matvec(M):
    return lambda v: torch.einsum("tij,tj->ti", M, v)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_cg_matches_dense_solve(dtype, rtol):
    T, P = 6, 12
    M = random_spd(T, P).to(dtype)
    rhs = torch.randn(T, P, dtype=dtype)
    res = im.cg(batched_matvec(M), rhs, max_iter=4 * P, tol=1e-12 if dtype == torch.float64 else 1e-6)
    ref = torch.linalg.solve(M.double(), rhs.double())
    err = (res.x.double() - ref).norm() / ref.norm()
    assert err < rtol
    assert (res.state == CGState.CONVERGED).all()
    # float32 rounding costs CG its finite termination (15-17 iterations here for
    # P = 12); twice P still fails a solver that stalls until max_iter = 4P.
    bound = P + 2 if dtype == torch.float64 else 2 * P
    assert (res.iterations <= bound).all()


def test_cg_shift_scale_operator():
    T, P = 4, 9
    M = random_spd(T, P)
    rhs = torch.randn(T, P, dtype=torch.float64)
    a, b = 1.3, 0.25
    res = im.cg(batched_matvec(M), rhs, shift=a, scale=b, max_iter=3 * P, tol=1e-13)
    A = a * torch.eye(P, dtype=torch.float64) + b * M
    torch.testing.assert_close(res.x, torch.linalg.solve(A, rhs), rtol=1e-10, atol=1e-12)


def test_cg_warm_start():
    T, P = 3, 8
    M = random_spd(T, P)
    rhs = torch.randn(T, P, dtype=torch.float64)
    x0 = torch.randn(T, P, dtype=torch.float64)
    res = im.cg(batched_matvec(M), rhs, x0=x0, max_iter=3 * P, tol=1e-13)
    torch.testing.assert_close(res.x, torch.linalg.solve(M, rhs), rtol=1e-10, atol=1e-12)


def test_indefinite_task_stops_without_nan_and_others_continue():
    T, P = 3, 10
    M = random_spd(T, P)
    M[1] = -M[1]                       # negative definite: pᵀAp < 0 at once
    rhs = torch.randn(T, P, dtype=torch.float64)
    res = im.cg(batched_matvec(M), rhs, max_iter=3 * P, tol=1e-12)
    assert torch.isfinite(res.x).all()
    assert res.state[1] == CGState.NONPOSITIVE_CURVATURE
    assert res.iterations[1] == 0
    assert torch.equal(res.x[1], torch.zeros(P, dtype=torch.float64))  # last iterate kept: x0
    for t in (0, 2):
        assert res.state[t] == CGState.CONVERGED
        torch.testing.assert_close(res.x[t], torch.linalg.solve(M[t], rhs[t]), rtol=1e-9, atol=1e-11)
    assert "stopped" in res.summary()


def test_tasks_stop_independently():
    """A well-conditioned task converges in few steps and is then frozen, while a
    harder one keeps iterating."""
    T, P = 2, 30
    M = torch.stack([torch.eye(P, dtype=torch.float64) * 2.0, random_spd(1, P, cond=1e4)[0]])
    rhs = torch.randn(T, P, dtype=torch.float64)
    res = im.cg(batched_matvec(M), rhs, max_iter=P, tol=1e-10)
    assert res.iterations[0] == 1 and res.state[0] == CGState.CONVERGED
    assert res.iterations[1] > 5
    torch.testing.assert_close(res.x[0], rhs[0] / 2.0)


def test_max_iter_reached_is_reported():
    M = random_spd(2, 20, cond=1e3)
    res = im.cg(batched_matvec(M), torch.randn(2, 20, dtype=torch.float64), max_iter=2)
    assert (res.state == CGState.RUNNING).all() and (res.iterations == 2).all()


class CountingMatvec:
    """batched_matvec(M) that counts its calls."""

    def __init__(self, M):
        self.apply, self.calls = batched_matvec(M), 0

    def __call__(self, v):
        self.calls += 1
        return self.apply(v)


def test_cg_with_tol_stops_once_every_task_has_stopped():
    """max_iter far beyond convergence: with tol > 0 the loop ends within
    CG_HOST_CHECK_EVERY iterations of the last task stopping, with the same
    result as a loop that ran on."""
    from imaml_ext.solvers import CG_HOST_CHECK_EVERY
    T, P = 4, 12
    M = random_spd(T, P)
    rhs = torch.randn(T, P, dtype=torch.float64)
    matvec = CountingMatvec(M)
    res = im.cg(matvec, rhs, max_iter=10**5, tol=1e-10)
    assert (res.state == CGState.CONVERGED).all()
    last = int(res.iterations.max())
    assert last <= P + 2
    assert matvec.calls <= last + CG_HOST_CHECK_EVERY
    full = im.cg(batched_matvec(M), rhs, max_iter=last + 3 * CG_HOST_CHECK_EVERY, tol=1e-10)
    assert torch.equal(res.x, full.x) and torch.equal(res.iterations, full.iterations)
    assert torch.equal(res.residual_sq, full.residual_sq)
    # Stopped on curvature counts as stopped too.
    matvec = CountingMatvec(-M)
    res = im.cg(matvec, rhs, max_iter=10**5, tol=1e-10)
    assert (res.state == CGState.NONPOSITIVE_CURVATURE).all()
    assert matvec.calls <= CG_HOST_CHECK_EVERY


def test_cg_without_tol_runs_every_iteration_without_asking_the_host():
    """tol = 0 keeps the fixed-length loop (no sync), even when all tasks are done."""
    matvec = CountingMatvec(random_spd(2, 5))
    res = im.cg(matvec, torch.zeros(2, 5, dtype=torch.float64), max_iter=40)
    assert (res.state == CGState.CONVERGED).all() and matvec.calls == 40


def test_zero_rhs_converges_at_start():
    M = random_spd(2, 5)
    res = im.cg(batched_matvec(M), torch.zeros(2, 5, dtype=torch.float64), max_iter=5)
    assert (res.state == CGState.CONVERGED).all() and (res.iterations == 0).all()
    assert torch.equal(res.x, torch.zeros(2, 5, dtype=torch.float64))


def test_cg_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[T, P\]"):
        im.cg(lambda v: v, torch.randn(5))
    with pytest.raises(TypeError, match="floating"):
        im.cg(lambda v: v, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_iter"):
        im.cg(lambda v: v, torch.randn(2, 3), max_iter=-1)


def contraction(T, P, radius, dtype=torch.float64):
    """Symmetric A_t = I + M_t with the spectrum of M_t in [-radius, radius]."""
    q, _ = torch.linalg.qr(torch.randn(T, P, P, dtype=dtype))
    eig = torch.linspace(-radius, radius, P, dtype=dtype)
    return torch.eye(P, dtype=dtype) + q @ torch.diag_embed(eig.expand(T, P)) @ q.transpose(1, 2)


def test_neumann_converges_to_the_dense_solve():
    """α = 1: x_K = Σ_{k≤K} (I − A)^k rhs, error ≤ ρ^(K+1)/(1 − ρ)·‖rhs‖ for ρ = ‖I − A‖ = 0.5."""
    T, P = 4, 10
    A = contraction(T, P, radius=0.5)
    rhs = torch.randn(T, P, dtype=torch.float64)
    exact = torch.linalg.solve(A, rhs)
    errors = []
    for steps in (0, 5, 10, 20, 60):
        x = Neumann(steps=steps, alpha=1.0)(batched_matvec(A), rhs)
        err = ((x - exact).norm(dim=1) / rhs.norm(dim=1)).max().item()
        assert err <= 0.5 ** (steps + 1) / 0.5 + 1e-13  # the bound, plus rounding
        errors.append(err)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12
    torch.testing.assert_close(x, exact, rtol=1e-12, atol=1e-12)


def test_neumann_step_size_and_shifted_operator():
    """A = a·I + b·M, applied as a ShiftedOperator (fused) or as a plain matvec: the same
    series; α = 1/(a + b·‖M‖) makes it converge where α = 1 would not."""
    T, P = 3, 8
    M = random_spd(T, P, cond=4.0)                  # spectrum in [1, 4]
    a, b = 1.0, 0.5                                 # A's spectrum in [1.5, 3]
    rhs = torch.randn(T, P, dtype=torch.float64)
    op = ShiftedOperator(batched_matvec(M), shift=a, scale=b)
    exact = torch.linalg.solve(a * torch.eye(P, dtype=torch.float64) + b * M, rhs)
    solver = Neumann(steps=80, alpha=1 / 3.0)
    fused, plain = solver(op, rhs), solver(lambda v: op(v), rhs)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(fused, exact, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(Neumann(steps=80, alpha=1.0)(op, rhs), exact)  # ‖I − A‖ = 2


def test_cg_object_equals_cg_function():
    T, P = 3, 9
    M = random_spd(T, P)
    rhs = torch.randn(T, P, dtype=torch.float64)
    res = CG(max_iter=7, tol=1e-3)(ShiftedOperator(batched_matvec(M), 1.0, 0.5), rhs)
    ref = im.cg(batched_matvec(M), rhs, shift=1.0, scale=0.5, max_iter=7, tol=1e-3)
    assert isinstance(res, CGResult)
    assert torch.equal(res.x, ref.x) and torch.equal(res.iterations, ref.iterations)


def test_neumann_keeps_non_finite_values_in_their_task():
    A = contraction(3, 5, radius=0.3)
    rhs = torch.randn(3, 5, dtype=torch.float64)
    rhs[1, 2] = float("nan")
    x = Neumann(steps=5, alpha=1.0)(batched_matvec(A), rhs)
    assert torch.isnan(x[1]).any() and torch.isfinite(x[[0, 2]]).all()


@pytest.mark.parametrize("make,match", [
    (lambda: Neumann(steps=-1), "Neumann.steps must be a non-negative integer"),
    (lambda: Neumann(steps=2.5), "Neumann.steps must be a non-negative integer"),
    (lambda: Neumann(alpha=0.0), "Neumann.alpha must be a positive"),
    (lambda: Neumann(alpha=float("inf")), "Neumann.alpha must be a positive"),
    (lambda: CG(max_iter=0), "CG.max_iter must be a positive integer"),
    (lambda: CG(tol=-1.0), "CG.tol must be a non-negative"),
])
def test_solver_objects_reject_bad_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_solver_objects_are_frozen():
    with pytest.raises(Exception):
        Neumann().steps = 3


# Runs in a fresh process, so that no imaml_ext op has run (and no kernel is
# loaded) before torch.compile traces the first call.
_COMPILE_PROBE = textwrap.dedent("""
    import json, sys, torch
    import imaml_ext as im
    device = sys.argv[1]
    M = torch.diag_embed(torch.tensor([[1.0, 2.0, 4.0, 8.0]] * 3, device=device))
    def solve(rhs, tol):
        return im.cg(lambda v: torch.einsum("tij,tj->ti", M, v), rhs, max_iter=6, tol=tol).x
    compiled = torch.compile(solve, fullgraph=True, backend="aot_eager")
    rhs = torch.arange(12.0, device=device).reshape(3, 4) + 1
    exact = rhs / torch.tensor([1.0, 2.0, 4.0, 8.0], device=device)
    errors = [(compiled(rhs, tol) - exact).abs().max().item() for tol in (None, 1e-6)]
    print(json.dumps(errors))
""")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_torch_compile_fullgraph_over_cg_from_a_cold_start(device):
    """torch.compile(fullgraph=True) over cg with a fixed matvec, as the first
    use of the ops in the process: no graph break, and the solve is exact (a
    diagonal 4x4 system: CG converges in 4 steps)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_PROBE, device], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(errors) < 1e-5, errors
