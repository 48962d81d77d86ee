#!/usr/bin/env bash
# GPU check of imaml_ext on a machine with a preinstalled torch and no internet.
#
#   benchmarks/gpu_suite.sh OUTDIR
#
# Steps (each logged to OUTDIR/<step>.log; a failing step is recorded and the
# next one still runs; the exit code is non-zero if any step failed):
#   env        nvidia-smi, Python/torch/nvcc versions
#   build      pip install --no-build-isolation --no-deps -e . (CPU and CUDA
#              extensions, IMAML_EXT_REQUIRE_CUDA=1), falling back to
#              setup.py build_ext --inplace (or only that with
#              IMAML_EXT_SUITE_BUILD=inplace, which leaves the Python
#              environment untouched)
#   backend    imaml_ext must report compiled CUDA ops
#   tests-ops  pytest tests/test_ops.py tests/test_build.py (CUDA tests included)
#   tests-rest pytest on the rest of tests/
#   bench-*    benchmarks/bench_ops.py, bench_imaml.py, bench_imaml_ops_ab.py,
#              bench_hvp.py and
#              bench_memory.py (ResNet-18, K = 10, 50, 100), all --device cuda
#   sanitizer-memcheck, sanitizer-racecheck
#              compute-sanitizer on the CUDA op tests at storage offsets
# All tests run with IMAML_EXT_REQUIRE_COMPILED=1, so a fallback to the
# PyTorch reference ops fails. OUTDIR/summary.md gets the step table and the
# bench_ops table, printed last. Each step runs under its own time limit
# (the second argument of `step` below).
#
# Environment: PYTHON (default /opt/torch/.venv/bin/python, else python3),
# TORCH_CUDA_ARCH_LIST (default 9.0), CUDA_HOME, MAX_JOBS, and
# IMAML_EXT_SUITE_STEPS="env build ..." to run only the named steps.
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in /opt/torch/.venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
    done
fi
if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export IMAML_EXT_REQUIRE_COMPILED=1 IMAML_EXT_REQUIRE_CUDA=1
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

STEPS="$OUT/steps.txt"
: > "$STEPS"
FAILED=0

# step NAME TIMEOUT_S COMMAND...: runs COMMAND under timeout, logging to OUTDIR/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${IMAML_EXT_SUITE_STEPS:-}" ]; then
        case " $IMAML_EXT_SUITE_STEPS " in *" $name "*) ;; *) return 0 ;; esac
    fi
    local log="$OUT/$name.log" start rc status
    start=$(date +%s)
    echo "== $name: $*" | tee "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124) status="TIMEOUT (${limit}s)"; FAILED=1 ;;
        *) status="FAILED (rc=$rc)"; FAILED=1 ;;
    esac
    printf '| %-24s | %-16s | %5ss | %s |\n' "$name" "$status" "$(( $(date +%s) - start ))" \
        "$name.log" | tee -a "$STEPS"
    return $rc
}

step env 60 bash -c "nvidia-smi; echo; $PY -c 'import sys, torch; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", \
torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() \
else \"no GPU\")'; nvcc --version || \${CUDA_HOME:-/usr/local/cuda}/bin/nvcc --version; nproc"

if [ "${IMAML_EXT_SUITE_BUILD:-pip}" = inplace ]; then
    step build-inplace 360 "$PY" setup.py build_ext --inplace
else
    step build 360 "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
        || step build-inplace 360 "$PY" setup.py build_ext --inplace
fi

step backend 120 "$PY" -c "from imaml_ext import _build; print(_build.describe()); \
assert _build.backend().cuda, 'no compiled CUDA ops'"

step tests-ops 300 "$PY" -m pytest tests/test_ops.py tests/test_build.py -x -q -rs
step tests-rest 300 "$PY" -m pytest tests -x -q -rs \
    --ignore=tests/test_ops.py --ignore=tests/test_build.py

step bench-ops 180 "$PY" benchmarks/bench_ops.py --device cuda --json "$OUT/bench_ops.json"
# The end-to-end benchmarks, sized to fit the suite's budget: the iMAML
# meta-batch with and without the compiled ops (and the per-task loop), the
# HVP modes, and MAML memory on torch_maml's ResNet-18 setting up to K = 100
# (full MAML points that would not fit in memory are skipped by the script).
step bench_imaml 240 "$PY" benchmarks/bench_imaml.py --device cuda --repeats 7 \
    --json "$OUT/bench_imaml.json"
step bench_imaml_ops_ab 180 "$PY" benchmarks/bench_imaml_ops_ab.py --device cuda --pairs 15
step bench_hvp 120 "$PY" benchmarks/bench_hvp.py --device cuda
step bench_memory 300 "$PY" benchmarks/bench_memory.py --device cuda --preset resnet18 \
    --steps 10 50 100 --methods full checkpointed imaml --json "$OUT/bench_memory.json" \
    --plot "$OUT/bench_memory.png"

# Last, so that a slow sanitizer cannot crowd out the benchmarks:
# compute-sanitizer on the CUDA op tests at every storage-offset layout (both
# launch paths, packed and element-wise access): out-of-bounds or misaligned
# accesses (memcheck) and shared-memory races (racecheck) fail the step.
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
    2>/dev/null || true)
if [ -n "$SANITIZER" ]; then
    for tool in memcheck racecheck; do
        step "sanitizer-$tool" 180 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
            "$PY" -m pytest tests/test_ops.py -x -q -k "cuda and storage_offset"
    done
fi

{
    echo "# imaml_ext GPU suite ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    echo "| step | status | time | log |"
    echo "|---|---|---|---|"
    cat "$STEPS"
    echo
    echo '```'
    sed -n '/^cpu: /,$p' "$OUT/bench-ops.log" 2>/dev/null
    echo '```'
} > "$OUT/summary.md"
echo
cat "$OUT/summary.md"
exit $FAILED
