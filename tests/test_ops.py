"""The fused ops: compiled kernels (CPU, and CUDA when available) against the
PyTorch reference, an independent CG solve, input validation (the same errors
from the compiled and the reference kernels), autograd of the reductions,
opcheck on both paths, and a check that the compiled backend is really the one
under test.

Environment: IMAML_EXT_NO_EXT=1 skips the compiled-kernel tests (the reference
ops are still tested); IMAML_EXT_REQUIRE_COMPILED=1 (CI) makes a missing CPU
build, or a missing CUDA build on a machine with a GPU, a failure.
"""

import contextlib
import os

import pytest
import torch

from imaml_ext import _build, ops
from imaml_ext.ops import reference as ref

NO_EXT = os.environ.get("IMAML_EXT_NO_EXT", "") not in ("", "0")
REQUIRE_COMPILED = os.environ.get("IMAML_EXT_REQUIRE_COMPILED", "") not in ("", "0")

# (T, P): P = 1, 7, 33 are below or straddle the vector width; 4099 and 40000
# span several CPU chunks and several CUDA slices per row.
SHAPES = [(1, 1), (3, 7), (64, 33), (5, 1000), (2, 4099), (4, 40000)]
DTYPES = [torch.float32, torch.float64]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def _compiled_available(device: str) -> bool:
    b = _build.backend()
    return b.cpu if device == "cpu" else b.cuda


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """A device whose compiled kernels are loaded (else the test is skipped)."""
    dev = request.param
    if NO_EXT:
        pytest.skip("IMAML_EXT_NO_EXT=1: compiled ops disabled")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not _compiled_available(dev):
        # test_compiled_backend_is_loaded reports this as a failure.
        pytest.skip(f"compiled {dev} ops not loaded: {_build.backend().reason}")
    return dev


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def any_device(request):
    """A device, whichever backend serves it."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


def _compiled(name):
    return getattr(torch.ops.imaml_ext, name).default


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a floating tensor (so NaN compares equal to itself)."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _clone_all(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _randn(gen, shape, dtype, device):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------
# Backend


def test_compiled_backend_is_loaded():
    """Fails (rather than silently testing the fallback) when the build is missing."""
    if NO_EXT:
        pytest.skip("IMAML_EXT_NO_EXT=1: compiled ops disabled on purpose")
    b = _build.backend()
    assert b.cpu, f"compiled CPU ops not loaded: {b}"
    assert b.name.startswith("compiled-")
    if REQUIRE_COMPILED and torch.cuda.is_available():
        assert b.cuda, f"compiled CUDA ops not loaded on a machine with a GPU: {b}"


def test_backend_reports_itself():
    b = _build.backend()
    assert b.name in ("compiled-cuda+cpu", "compiled-cpu", "pytorch")
    assert b.name in str(b) and b.reason in str(b)
    assert b.source in ("aot", "jit", None)
    text = _build.describe()
    assert b.name in text and torch.__version__ in text


# ---------------------------------------------------------------------------
# cg_step_

# Scenario of task t (t % 6): 0 an ordinary step, 1 already converged,
# 2 already stopped, 3 p'Ap < 0, 4 p'Ap not finite, 5 a convergence threshold
# halfway between the old and the new r'r (so that testing the old one shows).
_EXPECTED_STATE = {0: 0, 1: 1, 3: 2, 4: 3}


def _rs_after_step(r, p, Hp, rs, a, b):
    """r'r after one CG step of one task, in float64."""
    r, p, Hp, rs = (v.double() for v in (r, p, Hp, rs))
    Ap = a * p + b * Hp
    r_new = r - rs / torch.dot(p, Ap) * Ap
    return torch.dot(r_new, r_new).item()


def _cg_inputs(T, P, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, r, p, noise = (_randn(gen, (T, P), dtype, device) for _ in range(4))
    a, b = 1.0, 0.5
    # Ap = 1.25 p + 0.05 noise: p'Ap > 0.
    Hp = 0.5 * p + 0.1 * noise
    rs = (r * r).sum(1)
    state = torch.zeros(T, dtype=torch.int32, device=device)
    threshold_sq = 1e-8 * rs
    for t in range(T):
        scenario = t % 6
        if scenario == 1:
            state[t] = 1
        elif scenario == 2:
            state[t] = 2 if (t // 6) % 2 == 0 else 3
        elif scenario == 3:
            Hp[t] = -4.0 * p[t]  # Ap = -p
        elif scenario == 4:
            p[t, 0] = float("inf") if (t // 6) % 2 == 0 else float("nan")
        elif scenario == 5:
            threshold_sq[t] = 0.5 * (rs[t].item() + _rs_after_step(r[t], p[t], Hp[t], rs[t], a, b))
    return [x, r, p, Hp, rs, state, threshold_sq, a, b]


def _assert_cg_outcome(args, out):
    """State codes per scenario, and tasks not stepped left bitwise untouched."""
    before, after = args[5], out[5]
    for t in range(before.shape[0]):
        scenario = t % 6
        want = _EXPECTED_STATE.get(scenario, before[t].item())
        if scenario == 5:
            x, r, p, Hp, rs, _, threshold_sq, a, b = args
            want = int(_rs_after_step(r[t], p[t], Hp[t], rs[t], a, b) <= threshold_sq[t].item())
        assert after[t].item() == want, (t, scenario)
    stepped = (before == 0) & (after != 2) & (after != 3)
    for i, name in [(0, "x"), (1, "r"), (2, "p"), (4, "rs")]:
        assert torch.equal(_bits(out[i][~stepped]), _bits(args[i][~stepped])), name
    assert torch.equal(out[3], args[3]) and torch.equal(out[6], args[6]), "inputs modified"
    return stepped


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,P", SHAPES)
def test_cg_step_matches_reference(device, T, P, dtype):
    _check_cg_step_against_reference(_cg_inputs(T, P, dtype, device), dtype)


def _check_cg_step_against_reference(args, dtype):
    """The compiled cg_step_ and the reference on copies of args agree."""
    got, want = _clone_all(args), _clone_all(args)
    _compiled("cg_step_")(*got)
    ref.cg_step_(*want)
    assert torch.equal(got[5], want[5]), "state"
    for i, name in [(0, "x"), (1, "r"), (2, "p"), (4, "rs")]:
        torch.testing.assert_close(got[i], want[i], equal_nan=True, **TOL[dtype], msg=name)
    _assert_cg_outcome(args, got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,P", [(1, 1), (12, 33), (3, 4099)])
def test_cg_step_reference_semantics(any_device, T, P, dtype):
    """The reference against a plain per-task transcription of the contract."""
    args = _cg_inputs(T, P, dtype, any_device)
    out = _clone_all(args)
    ref.cg_step_(*out)
    stepped = _assert_cg_outcome(args, out)
    x, r, p, Hp, rs, _, _, a, b = [v.double() if isinstance(v, torch.Tensor) else v
                                   for v in args]
    for t in torch.nonzero(stepped).flatten().tolist():
        Ap = a * p[t] + b * Hp[t]
        alpha = rs[t] / torch.dot(p[t], Ap)
        r_new = r[t] - alpha * Ap
        rs_new = torch.dot(r_new, r_new)
        for i, want in [(0, x[t] + alpha * p[t]), (1, r_new),
                        (2, r_new + rs_new / rs[t] * p[t]), (4, rs_new)]:
            torch.testing.assert_close(out[i][t].double(), want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cg_step_reference_matches_on_device(device, dtype):
    """The reference itself on the device agrees with the compiled op (and, for
    CUDA, both agree with the float64 reference on the CPU)."""
    args = _cg_inputs(6, 5000, dtype, device, seed=1)
    got, want, cpu64 = _clone_all(args), _clone_all(args), _clone_all(args)
    ops.cg_step_(*got)
    ref.cg_step_(*want)
    cpu64 = [a.to("cpu", torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point()
             else a.cpu() if isinstance(a, torch.Tensor) else a for a in cpu64]
    ref.cg_step_(*cpu64)
    for i in range(5):
        torch.testing.assert_close(got[i], want[i], equal_nan=True, **TOL[dtype])
        torch.testing.assert_close(got[i].cpu().double(), cpu64[i], equal_nan=True,
                                   **TOL[torch.float32])
    assert torch.equal(got[5].cpu(), cpu64[5])


def _spd_problem(T, P, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(T, P, P, generator=gen, dtype=torch.float64))
    eig = torch.rand(T, P, generator=gen, dtype=torch.float64) * 10 + 0.1
    H = (q * eig.unsqueeze(1)) @ q.transpose(1, 2)
    rhs = torch.randn(T, P, generator=gen, dtype=torch.float64)
    return H.to(device), rhs.to(device)


def _run_cg(step, H, rhs, a, b, iters):
    T, P = rhs.shape
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = rhs.clone()
    rs = (r * r).sum(1)
    state = torch.zeros(T, dtype=torch.int32, device=rhs.device)
    threshold_sq = 1e-24 * rs
    for _ in range(iters):
        Hp = torch.bmm(H, p.unsqueeze(2)).squeeze(2)
        step(x, r, p, Hp, rs, state, threshold_sq, a, b)
    return x, state


def _check_spd_solve(step, device):
    T, P, a, b = 4, 40, 1.0, 0.5
    H, rhs = _spd_problem(T, P, device)
    x, state = _run_cg(step, H, rhs, a, b, iters=3 * P)
    A = a * torch.eye(P, dtype=H.dtype, device=device) + b * H
    want = torch.linalg.solve(A, rhs)
    assert (state == 1).all(), state
    torch.testing.assert_close(x, want, rtol=1e-9, atol=1e-9)


def test_cg_step_solves_spd_systems(device):
    _check_spd_solve(_compiled("cg_step_"), device)


def test_cg_step_reference_solves_spd_systems(any_device):
    _check_spd_solve(ref.cg_step_, any_device)


@pytest.mark.parametrize("op", ["prox_sgd_step_", "adjoint_sgd_step_", "batched_dot",
                                "batched_sq_norm", "cg_step_"])
def test_public_ops_match_reference(any_device, op):
    """ops.* (compiled or fallback, whichever the backend gives) equal the reference."""
    kwargs = _valid_args(op, device=any_device, T=4, P=3000, dtype=torch.float64)
    got = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    want = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out_got = getattr(ops, op)(**got)
    out_want = getattr(ref, op)(**want)
    if out_want is not None:
        torch.testing.assert_close(out_got, out_want, **TOL[torch.float64])
    for k in kwargs:
        if isinstance(kwargs[k], torch.Tensor):
            torch.testing.assert_close(got[k], want[k], **TOL[torch.float64], msg=k)


def test_cg_step_stops_on_indefinite_system(device):
    """A = I - 2I is negative definite: the first step stops with state 2, x untouched."""
    T, P = 3, 10
    H = -2.0 * torch.eye(P, dtype=torch.float64, device=device).expand(T, P, P)
    rhs = torch.randn(T, P, dtype=torch.float64, device=device)
    x, state = _run_cg(_compiled("cg_step_"), H, rhs, 1.0, 1.0, iters=3)
    assert (state == 2).all()
    assert (x == 0).all()


def test_cg_step_is_deterministic_across_thread_counts():
    if NO_EXT or not _build.backend().cpu:
        pytest.skip("compiled CPU ops not loaded")
    args = _cg_inputs(8, 50000, torch.float32, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = _clone_all(args)
            _compiled("cg_step_")(*out)
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for i in range(6):
            assert torch.equal(results[0][i], other[i])


def test_cuda_ops_are_deterministic_and_do_not_sync(device):
    if device != "cuda":
        pytest.skip("CUDA only")
    args = _cg_inputs(8, 50000, torch.float32, device)
    a, b = _clone_all(args), _clone_all(args)
    theta = args[2][0].clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.cg_step_(*a)
        ops.cg_step_(*b)
        ref.cg_step_(*_clone_all(args))
        ops.prox_sgd_step_(args[0], args[1], theta, 0.1, 2.0, 1.0)
        ops.adjoint_sgd_step_(args[0], args[1], args[3], args[4], 0.1)
        ops.batched_dot(args[0], args[1])
        ops.batched_sq_norm(args[0])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for i in range(6):
        assert torch.equal(_bits(a[i]) if i < 5 else a[i], _bits(b[i]) if i < 5 else b[i])


# ---------------------------------------------------------------------------
# prox_sgd_step_, adjoint_sgd_step_, batched_dot, batched_sq_norm


@pytest.mark.parametrize("max_norm", [0.0, 3.0, 1e9])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,P", SHAPES)
def test_prox_sgd_step_matches_reference(device, T, P, dtype, max_norm):
    gen = torch.Generator().manual_seed(2)
    phi, g = (_randn(gen, (T, P), dtype, device) for _ in range(2))
    g[::2] *= 100.0  # rows that get clipped
    theta = _randn(gen, (P,), dtype, device)
    got, want = phi.clone(), phi.clone()
    _compiled("prox_sgd_step_")(got, g, theta, 0.1, 2.0, max_norm)
    ref.prox_sgd_step_(want, g, theta, 0.1, 2.0, max_norm)
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_prox_sgd_step_clips_to_max_norm(device):
    T, P, lr = 3, 5000, 0.5
    g = torch.randn(T, P, dtype=torch.float64, device=device) * 10
    phi = torch.zeros(T, P, dtype=torch.float64, device=device)
    theta = torch.zeros(P, dtype=torch.float64, device=device)
    _compiled("prox_sgd_step_")(phi, g, theta, lr, 0.0, 1.0)
    torch.testing.assert_close(phi.norm(dim=1), torch.full((T,), lr, dtype=torch.float64,
                                                         device=device), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,P", SHAPES)
def test_adjoint_sgd_step_matches_reference(device, T, P, dtype):
    gen = torch.Generator().manual_seed(3)
    adj, Ha, g = (_randn(gen, (T, P), dtype, device) for _ in range(3))
    lr_grad = _randn(gen, (T,), dtype, device)
    got, want = [adj.clone(), lr_grad.clone()], [adj.clone(), lr_grad.clone()]
    _compiled("adjoint_sgd_step_")(got[0], Ha, g, got[1], 0.3)
    ref.adjoint_sgd_step_(want[0], Ha, g, want[1], 0.3)
    torch.testing.assert_close(got[0], want[0], **TOL[dtype])
    torch.testing.assert_close(got[1], want[1], **TOL[dtype])
    # lr_grad uses adj before the update.
    torch.testing.assert_close(got[1], lr_grad - (g * adj).sum(1), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,P", SHAPES + [(3, 0), (0, 5)])
def test_batched_reductions_match_reference(device, T, P, dtype):
    gen = torch.Generator().manual_seed(4)
    x, y = (_randn(gen, (T, P), dtype, device) for _ in range(2))
    dot = _compiled("batched_dot")(x, y)
    sq = _compiled("batched_sq_norm")(x)
    assert dot.shape == (T,) and dot.dtype == dtype and dot.device == x.device
    torch.testing.assert_close(dot, ref.batched_dot(x, y), **TOL[dtype])
    torch.testing.assert_close(sq, ref.batched_sq_norm(x), **TOL[dtype])
    torch.testing.assert_close(ops.batched_dot(x, y), dot, **TOL[dtype])


@pytest.mark.parametrize("T,P", [(0, 5), (3, 0)])
def test_cg_step_empty(device, T, P):
    args = _cg_inputs(T, P, torch.float64, device)
    got, want = _clone_all(args), _clone_all(args)
    _compiled("cg_step_")(*got)
    ref.cg_step_(*want)
    assert torch.equal(got[5], want[5])


# ---------------------------------------------------------------------------
# Input validation (the Python wrappers, and the compiled ops directly)


def _valid_args(op, device="cpu", T=3, P=5, dtype=torch.float32):
    def f(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    if op == "cg_step_":
        return dict(x=f(T, P), r=f(T, P), p=f(T, P), Hp=f(T, P), rs=f(T).abs(),
                    state=torch.zeros(T, dtype=torch.int32, device=device),
                    threshold_sq=torch.zeros(T, dtype=dtype, device=device), a=1.0, b=0.5)
    if op == "prox_sgd_step_":
        return dict(phi=f(T, P), g=f(T, P), theta=f(P), lr=0.1, lam=2.0, max_norm=1.0)
    if op == "adjoint_sgd_step_":
        return dict(adj=f(T, P), Ha=f(T, P), g=f(T, P), lr_grad=f(T), lr=0.1)
    if op == "batched_dot":
        return dict(x=f(T, P), y=f(T, P))
    return dict(x=f(T, P))


def _call(op, impl, kwargs):
    if impl == "wrapper":
        return getattr(ops, op)(**kwargs)
    return _compiled(op)(*kwargs.values())


def _noncontiguous(t):
    return torch.stack([t, t], dim=-1)[..., 0]


_OPS = ["cg_step_", "prox_sgd_step_", "adjoint_sgd_step_", "batched_dot", "batched_sq_norm"]
_FIRST = {"cg_step_": "x", "prox_sgd_step_": "phi", "adjoint_sgd_step_": "adj",
          "batched_dot": "x", "batched_sq_norm": "x"}
_SECOND = {"cg_step_": "Hp", "prox_sgd_step_": "g", "adjoint_sgd_step_": "g", "batched_dot": "y"}
_PER_TASK = {"cg_step_": "rs", "adjoint_sgd_step_": "lr_grad"}

# (case, ops it applies to, argument picker, transform, expected message)
_BAD = [
    ("noncontiguous-first", _OPS, _FIRST, _noncontiguous, "contiguous"),
    ("noncontiguous-second", list(_SECOND), _SECOND, _noncontiguous, "contiguous"),
    ("noncontiguous-per-task", list(_PER_TASK), _PER_TASK, _noncontiguous, "contiguous"),
    ("int-dtype", _OPS, _FIRST, lambda t: t.to(torch.int32), "unsupported dtype"),
    ("half-dtype", _OPS, _FIRST, lambda t: t.half(), "unsupported dtype"),
    ("mixed-float", list(_SECOND), _SECOND, lambda t: t.double(), "dtype"),
    ("mixed-float-per-task", list(_PER_TASK), _PER_TASK, lambda t: t.double(), "dtype"),
    ("wrong-shape", list(_SECOND), _SECOND, lambda t: torch.zeros(t.shape[0], t.shape[1] + 1),
     "shape"),
    ("wrong-T", list(_PER_TASK), _PER_TASK, lambda t: torch.zeros(t.shape[0] + 1), "shape"),
    ("1-d", _OPS, _FIRST, lambda t: t.flatten(), "2-D"),
    ("state-int64", ["cg_step_"], {"cg_step_": "state"}, lambda t: t.long(), "int32"),
    ("state-shape", ["cg_step_"], {"cg_step_": "state"}, lambda t: t[:-1], "shape"),
    ("theta-shape", ["prox_sgd_step_"], {"prox_sgd_step_": "theta"},
     lambda t: torch.zeros(t.shape[0] + 1), "shape"),
    ("threshold-dtype", ["cg_step_"], {"cg_step_": "threshold_sq"}, lambda t: t.double(), "dtype"),
]


@pytest.mark.parametrize("impl", ["wrapper", "compiled"])
@pytest.mark.parametrize("case", _BAD, ids=[c[0] for c in _BAD])
def test_invalid_inputs_are_rejected(case, impl):
    _, applies_to, picker, transform, match = case
    if impl == "compiled" and (NO_EXT or not _build.backend().cpu):
        pytest.skip("compiled CPU ops not loaded")
    for op in applies_to:
        kwargs = _valid_args(op)
        kwargs[picker[op]] = transform(kwargs[picker[op]])
        with pytest.raises((ValueError, RuntimeError), match=match):
            _call(op, impl, kwargs)


@pytest.mark.parametrize("op", list(_SECOND))
def test_mixed_devices_are_rejected(op):
    kwargs = _valid_args(op)
    kwargs[_SECOND[op]] = kwargs[_SECOND[op]].to("meta")
    with pytest.raises(ValueError, match="device"):
        _call(op, "wrapper", kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["wrapper", "compiled"])
@pytest.mark.parametrize("op", [op for op in _OPS if op in _SECOND])
def test_cpu_cuda_mix_is_rejected(op, impl):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl == "compiled" and not _build.backend().cuda:
        pytest.skip("compiled CUDA ops not loaded")
    kwargs = _valid_args(op, device="cuda")
    kwargs[_SECOND[op]] = kwargs[_SECOND[op]].cpu()
    with pytest.raises((ValueError, RuntimeError), match="device|cpu"):
        _call(op, impl, kwargs)


def test_aliased_outputs_are_rejected():
    if NO_EXT or not _build.backend().cpu:
        pytest.skip("compiled CPU ops not loaded")
    kwargs = _valid_args("cg_step_")
    kwargs["r"] = kwargs["x"]
    with pytest.raises(RuntimeError, match="share memory"):
        _call("cg_step_", "compiled", kwargs)


def _same(t):
    return t


def _same_range(t):
    return t.view(t.shape)


def _shifted_by_one(t):
    """A tensor of t's shape starting one element into t's storage."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    return buf[1:].view(t.shape), buf[:-1].view(t.shape)


# (case, op, written argument, other argument, how the other shares memory)
# after csrc/checks.h's `distinct` pairs; "disjoint" shares a storage but no
# element, and both paths accept it.
_ALIASED = [
    *[(f"{b}-is-{a}", "cg_step_", a, b, _same)
      for a, b in [("x", "r"), ("x", "p"), ("r", "p"), ("x", "Hp"), ("r", "Hp"), ("p", "Hp")]],
    ("r-views-x", "cg_step_", "x", "r", _same_range),
    ("g-is-phi", "prox_sgd_step_", "phi", "g", _same),
    ("theta-in-phi", "prox_sgd_step_", "phi", "theta", lambda phi: phi[1]),
    ("Ha-is-adj", "adjoint_sgd_step_", "adj", "Ha", _same),
    ("g-is-adj", "adjoint_sgd_step_", "adj", "g", _same),
    # The per-task vectors (T = 3, P = 5 in _valid_args).
    ("state-views-rs", "cg_step_", "rs", "state", lambda rs: rs.view(torch.int32)),
    ("threshold-is-rs", "cg_step_", "rs", "threshold_sq", _same),
    ("rs-in-x", "cg_step_", "x", "rs", lambda x: x.view(-1)[4:7]),
    ("rs-in-Hp", "cg_step_", "Hp", "rs", lambda Hp: Hp.view(-1)[:3]),
    ("state-in-r", "cg_step_", "r", "state", lambda r: r.view(-1)[:3].view(torch.int32)),
    ("threshold-in-p", "cg_step_", "p", "threshold_sq", lambda p: p[2, 2:]),
    ("lr_grad-in-adj", "adjoint_sgd_step_", "adj", "lr_grad", lambda adj: adj[1, :3]),
    ("lr_grad-in-g", "adjoint_sgd_step_", "g", "lr_grad", lambda g: g.view(-1)[-3:]),
]


def _bad_inputs():
    """Every rejected input of test_invalid_inputs_are_rejected and every
    aliasing case, as (case id, op, kwargs)."""
    for name, applies_to, picker, transform, _ in _BAD:
        for op in applies_to:
            kwargs = _valid_args(op)
            kwargs[picker[op]] = transform(kwargs[picker[op]])
            yield f"{name}-{op}", op, kwargs
    for name, op, written, other, share in _ALIASED:
        kwargs = _valid_args(op)
        kwargs[other] = share(kwargs[written])
        yield name, op, kwargs
    for op in ["cg_step_", "adjoint_sgd_step_"]:
        kwargs = _valid_args(op)
        first, second = _FIRST[op], _SECOND[op]
        kwargs[first], kwargs[second] = _shifted_by_one(kwargs[first])
        yield f"overlap-by-all-but-one-{op}", op, kwargs
        kwargs = _valid_args(op)
        kwargs[first], kwargs[second] = torch.randn(2, *kwargs[first].shape).unbind(0)
        yield f"disjoint-{op}", op, kwargs
    kwargs = _valid_args("cg_step_")
    kwargs["rs"], kwargs["threshold_sq"] = torch.randn(2, 3).unbind(0)
    yield "disjoint-per-task-cg_step_", "cg_step_", kwargs
    kwargs = _valid_args("batched_dot")
    kwargs["y"] = _valid_args("batched_dot")["x"].to("meta")
    yield "meta-device", "batched_dot", kwargs


def _error(op, kwargs):
    """(type, message) of the error calling the op raises, or None."""
    try:
        _compiled(op)(*kwargs.values())
    except Exception as e:  # noqa: BLE001 - the error is what is compared
        return type(e), str(e)
    return None


_BAD_INPUTS = list(_bad_inputs())


@pytest.mark.parametrize("case", _BAD_INPUTS, ids=[c[0] for c in _BAD_INPUTS])
def test_compiled_and_reference_kernels_reject_alike(case):
    """Each bad input gives the same exception type and message on both paths;
    the inputs sharing a storage without overlapping pass on both."""
    name, op, kwargs = case
    with ops.use_reference():
        want = _error(op, kwargs)
    if name.startswith("disjoint"):
        assert want is None, want
    else:
        assert want is not None and want[0] in (ValueError, RuntimeError), want
        assert (want[0] is RuntimeError) == ("share memory" in want[1]), want
    if NO_EXT or not _build.backend().cpu:
        pytest.skip("compiled CPU ops not loaded: the reference kernels alone were checked")
    assert _error(op, kwargs) == want


def test_use_reference_swaps_the_kernels_and_back(device):
    """Inside use_reference() the reference kernels run (they differ from the
    compiled ones in the last bits of a long float32 reduction), after it the
    compiled ones again."""
    x = torch.randn(2, 100_003, device=device)
    compiled = ops.batched_sq_norm(x)
    with ops.use_reference():
        inside = ops.batched_sq_norm(x)
    assert torch.equal(inside, ref.batched_sq_norm(x))
    assert torch.equal(ops.batched_sq_norm(x), compiled)


# ---------------------------------------------------------------------------
# Storage offsets: the CUDA kernels use 16-byte packs only where every row they
# touch is aligned alike (csrc/cuda/packs.h); buffers that start a few elements
# into their storage, alike or each differently, must give the same results up
# to rounding.


def _at_offset(t, offset):
    """A contiguous copy of t whose data starts `offset` elements into its storage."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    return buf[offset:].view(t.shape).copy_(t)


# Element offset of argument i. "first": only the first argument is shifted, so
# that in cg_step_ the x/r update (x in the cut) goes element by element and the
# p update (x not in it) in packs, and threads hand r over between the two.
_OFFSETS = {"aligned": lambda i: 0, "shifted": lambda i: 1, "mixed": lambda i: i % 3,
            "first": lambda i: int(i == 0)}


@pytest.mark.parametrize("layout", list(_OFFSETS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,P", [(5, 37), (4, 40000)])
@pytest.mark.parametrize("op", _OPS)
def test_ops_match_reference_at_any_storage_offset(device, op, T, P, dtype, layout):
    if op == "cg_step_":
        args = _cg_inputs(T, P, dtype, device)
    else:
        args = list(_valid_args(op, device, T, P, dtype).values())
        if op == "prox_sgd_step_":
            args[1][::2] *= 100.0  # rows that get clipped
    got = [_at_offset(a, _OFFSETS[layout](i)) if isinstance(a, torch.Tensor) else a
           for i, a in enumerate(args)]
    offsets = [a.storage_offset() for a in got if isinstance(a, torch.Tensor)]
    assert offsets == [_OFFSETS[layout](i) for i, a in enumerate(args)
                       if isinstance(a, torch.Tensor)]
    want = _clone_all(args)
    out_got = _compiled(op)(*got)
    out_want = getattr(ref, op)(*want)
    if out_want is not None:
        torch.testing.assert_close(out_got, out_want, **TOL[dtype])
    for g, w in zip(got, want):
        if isinstance(g, torch.Tensor):
            torch.testing.assert_close(g, w, equal_nan=True, **TOL[dtype])


# ---------------------------------------------------------------------------
# opcheck (schema, fake kernels, functionalization under AOT dispatch)


@pytest.mark.parametrize("op", _OPS)
@pytest.mark.parametrize("T,P", [(3, 37), (2, 5000)])
def test_opcheck(device, op, T, P):
    kwargs = _valid_args(op, device=device, T=T, P=P)
    torch.library.opcheck(_compiled(op), tuple(kwargs.values()))


_DIFFERENTIABLE = ["batched_dot", "batched_sq_norm"]


def _kernels(path):
    """A context in which the op runs its compiled or its reference kernels."""
    return ops.use_reference() if path == "reference" else contextlib.nullcontext()


@pytest.mark.parametrize("path", ["compiled", "reference"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("op", _OPS)
def test_opcheck_on_both_paths(any_device, op, requires_grad, path):
    """opcheck (schema, fake kernel, autograd registration, AOT dispatch) of
    whichever kernels serve the device, and of the reference kernels; the
    differentiable ops also with inputs that require grad."""
    if requires_grad and op not in _DIFFERENTIABLE:
        pytest.skip("the op writes its inputs in place: not differentiable")
    kwargs = _valid_args(op, device=any_device, T=3, P=37, dtype=torch.float64)
    args = tuple(a.requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in kwargs.values())
    with _kernels(path):
        torch.library.opcheck(_compiled(op), args)


@pytest.mark.parametrize("path", ["compiled", "reference"])
def test_reductions_are_differentiable(any_device, path):
    """gradcheck in float64, and the gradients against the formulas
    d<x, y>/dx = g*y, d<x, y>/dy = g*x, d||x||^2/dx = 2*g*x."""
    gen = torch.Generator().manual_seed(5)
    x, y, g = (_randn(gen, shape, torch.float64, any_device) for shape in [(3, 7), (3, 7), (3,)])
    x.requires_grad_(True)
    y.requires_grad_(True)
    with _kernels(path):
        assert torch.autograd.gradcheck(ops.batched_dot, (x, y))
        assert torch.autograd.gradcheck(ops.batched_sq_norm, (x,))
        assert torch.autograd.gradgradcheck(ops.batched_sq_norm, (x,))
        gx, gy = torch.autograd.grad(ops.batched_dot(x, y), (x, y), g)
        (gxx,) = torch.autograd.grad(ops.batched_sq_norm(x), (x,), g)
    torch.testing.assert_close(gx, g[:, None] * y, rtol=0, atol=0)
    torch.testing.assert_close(gy, g[:, None] * x, rtol=0, atol=0)
    torch.testing.assert_close(gxx, 2 * g[:, None] * x, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Reductions accumulate in float64 on every path


def test_float32_reductions_accumulate_in_float64(any_device):
    """Rows of 2^21 float32 terms of 1 + 5*2^-23: a float32 partial sum drops
    the 5*2^-23 of every term once it passes 4 (2^21 instead of 2^21 + 1.25);
    every path (compiled where loaded, reference always) returns the float64
    sum rounded once."""
    P = 1 << 21
    term = 1.0 + 5.0 * 2.0 ** -23
    want = torch.full((2,), P * term, dtype=torch.float64).float()
    x = torch.full((2, P), term, dtype=torch.float32, device=any_device)
    ones = torch.ones_like(x)
    for path in (contextlib.nullcontext, ops.use_reference):
        with path():
            assert torch.equal(ops.batched_dot(x, ones).cpu(), want)
            assert torch.equal(ops.batched_sq_norm(ones).cpu(), torch.full((2,), float(P)))
            lr_grad = torch.zeros(2, device=any_device)
            ops.adjoint_sgd_step_(x.clone(), torch.zeros_like(x), ones, lr_grad, 0.1)
            assert torch.equal(-lr_grad.cpu(), want)


# ---------------------------------------------------------------------------
# Large CUDA cases (run by benchmarks/gpu_suite.sh)


@pytest.mark.cuda
def test_cuda_ops_index_past_2_to_the_31_elements(device):
    """T*P > 2^31: row 2 starts past int32 range; each row holds its own value,
    so a wrapped index reads another row's."""
    if device != "cuda":
        pytest.skip("a CUDA-only case")
    T, P = 3, (1 << 30) + 5
    if torch.cuda.get_device_properties(0).total_memory < 3 * T * P * 4 + (8 << 30):
        pytest.skip("needs ~40 GiB of GPU memory")
    rows = torch.arange(1, T + 1, dtype=torch.float32, device="cuda").unsqueeze(1)
    x = rows.expand(T, P).contiguous()
    y = torch.ones(T, P, device="cuda")
    want = (torch.arange(1, T + 1, dtype=torch.float64) * P).float()
    assert torch.equal(ops.batched_dot(x, y).cpu(), want)
    lr_grad = torch.zeros(T, device="cuda")
    ops.adjoint_sgd_step_(x, y, y, lr_grad, 0.5)  # x -= 0.5 * 1 in every row
    assert torch.equal(-lr_grad.cpu(), want)
    assert torch.equal(x[:, -1].cpu(), rows.squeeze(1).cpu() - 0.5)
    assert torch.equal(x[:, 0].cpu(), rows.squeeze(1).cpu() - 0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_single_block_per_row_at_large_p(device, dtype):
    """Many tasks with long rows: more rows than the GPU holds blocks at once,
    so every op runs one block per row (P well past a block's registers)."""
    if device != "cuda":
        pytest.skip("a CUDA-only case")
    T, P = 2048, 32768 + 7
    args = _cg_inputs(T, P, dtype, device, seed=3)
    _check_cg_step_against_reference(args, dtype)
    x, y = args[0], args[2]
    torch.testing.assert_close(ops.batched_dot(x, y), ref.batched_dot(x, y), **TOL[dtype])
