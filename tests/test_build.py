"""Loading of the compiled ops (imaml_ext/_build.py), each case in a fresh
subprocess: the forced fallback, a failing just-in-time build (one warning,
or an error under IMAML_EXT_REQUIRE_COMPILED=1), and a real just-in-time
build of the CPU ops."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Runs in the subprocess: records warnings, the backend, and checks one CG step
# and batched_dot against values worked out by hand.
_PROBE = textwrap.dedent("""
    import json, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch
        from imaml_ext import _build, ops
        b = _build.backend()
        _build.backend()
        # A = I, rhs = [3, 4]: one step reaches x = rhs, r = 0 (state 1).
        x = torch.zeros(1, 2); r = torch.tensor([[3.0, 4.0]]); p = r.clone()
        rs = torch.tensor([25.0]); state = torch.zeros(1, dtype=torch.int32)
        ops.cg_step_(x, r, p, torch.zeros(1, 2), rs, state, torch.zeros(1), 1.0, 0.0)
        ok = (x.tolist() == [[3.0, 4.0]] and r.abs().max().item() == 0 and rs.item() == 0
              and state.item() == 1
              and ops.batched_dot(torch.ones(2, 3), torch.ones(2, 3)).tolist() == [3.0, 3.0])
    print(json.dumps(dict(name=b.name, cpu=b.cpu, cuda=b.cuda, source=b.source,
                          reason=b.reason, ok=ok,
                          warnings=[str(w.message) for w in caught
                                    if "imaml_ext" in str(w.message)])))
""")


def _probe(tmp_path, **env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAML_EXT_")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU library only: keeps the JIT case short
    env.update(env_overrides)
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 or "IMAML_EXT_REQUIRE_COMPILED" in env_overrides, proc.stderr
    if proc.returncode != 0:
        return proc
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_ext_forces_the_reference_ops(tmp_path):
    out = _probe(tmp_path, IMAML_EXT_NO_EXT="1")
    assert out["name"] == "pytorch" and not out["cpu"] and not out["cuda"]
    assert out["source"] is None
    assert "IMAML_EXT_NO_EXT" in out["reason"]
    assert out["warnings"] == []
    assert out["ok"]


def test_failed_build_falls_back_with_one_warning(tmp_path):
    out = _probe(tmp_path, IMAML_EXT_JIT="1", CXX=str(tmp_path / "no-such-compiler"),
                 IMAML_EXT_BUILD_DIR=str(tmp_path / "build"))
    assert out["name"] == "pytorch"
    assert "no C++ compiler" in out["reason"]
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "no C++ compiler" in out["warnings"][0] and "To fix" in out["warnings"][0]
    assert out["ok"]


def test_compile_error_is_reported(tmp_path):
    # A "compiler" that fails with an error message, as a broken toolchain would.
    cxx = tmp_path / "bad-cxx"
    cxx.write_text("#!/bin/sh\necho 'fatal error: broken toolchain' >&2\nexit 1\n")
    cxx.chmod(0o755)
    out = _probe(tmp_path, IMAML_EXT_JIT="1", CXX=str(cxx),
                 IMAML_EXT_BUILD_DIR=str(tmp_path / "build"))
    assert out["name"] == "pytorch"
    assert "just-in-time CPU build failed" in out["reason"], out["reason"]
    assert len(out["warnings"]) == 1
    assert out["ok"]


def test_require_compiled_turns_the_fallback_into_an_error(tmp_path):
    proc = _probe(tmp_path, IMAML_EXT_JIT="1", CXX=str(tmp_path / "no-such-compiler"),
                  IMAML_EXT_REQUIRE_COMPILED="1")
    assert proc.returncode != 0
    assert "IMAML_EXT_REQUIRE_COMPILED=1 forbids the fallback" in proc.stderr


@pytest.mark.skipif(os.environ.get("IMAML_EXT_NO_EXT", "") not in ("", "0"),
                    reason="IMAML_EXT_NO_EXT=1: compiled ops disabled")
def test_just_in_time_build_of_the_cpu_ops(tmp_path):
    """Compiles csrc/*.cpp (about 30 s on 2 cores) and runs the ops from it."""
    out = _probe(tmp_path, IMAML_EXT_JIT="1", IMAML_EXT_BUILD_DIR=str(tmp_path / "build"))
    assert out["name"] == "compiled-cpu" and out["cpu"] and out["source"] == "jit", out
    assert "compiled just in time" in out["reason"]
    assert out["warnings"] == []
    assert out["ok"]
