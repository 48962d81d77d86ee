#!/usr/bin/env bash
# GPU check of imaml_ext in one device call: a fresh machine with a
# preinstalled torch, nothing prebuilt, no internet, at most 9 minutes.
#
#   benchmarks/gpu_suite.sh [--dry-run] [OUTDIR]     (OUTDIR defaults to $OUT)
#
# Stages, in this order, each with a time budget in seconds (BUDGET below;
# they sum to at most 540, and no stage runs past the suite's deadline):
#   env          nvidia-smi, Python/torch/nvcc versions
#   build        setup.py build_ext --inplace for sm_90 (CPU and CUDA
#                extensions; IMAML_EXT_REQUIRE_CUDA=1); leaves the Python
#                environment untouched
#   tests-cuda   the CUDA op tests (pytest -m cuda tests/test_ops.py, the
#                large-index and one-block-per-row cases among them) and
#                torch.compile over cg on CUDA from a cold start
#   memcheck     compute-sanitizer memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1
#                (the caching allocator would hide out-of-bounds accesses
#                inside its segments), then racecheck, synccheck and
#   racecheck    initcheck, each on the CUDA op tests at every storage
#   synccheck    offset (both launch paths, packed and element-wise access)
#   initcheck
#   bench-ops    benchmarks/bench_ops.py --device cuda (bursts, GB/s vs copy_)
#   bench-imaml  benchmarks/bench_imaml.py --device cuda (per-task reference
#                loop, PyTorch ops, compiled ops, CUDA graph)
#   bench-hvp    benchmarks/bench_hvp.py --device cuda (the HVP modes)
#   bench-memory benchmarks/bench_memory.py --device cuda (MAML memory,
#                ResNet-18 preset, K = 10 and 50)
# The CPU-only tests and the CPU just-in-time build test stay off the GPU
# machine (CI runs them).
#
# Output: everything goes under OUTDIR as the stages run, in at most 8 files:
# summary.md (rewritten after every stage, so it exists whatever stage the
# device call kills), logs.tar.gz (every stage's log, repacked after every
# stage), bench_ops.json, bench_imaml.json, bench_memory.json,
# bench_memory.png. The exit code is non-zero if any stage failed.
#
# --dry-run (no GPU needed): runs what a CPU can of each stage (versions,
# compiler checks, the CUDA test selection, bench_ops on a tiny CPU case,
# the other benchmarks' argument parsing) and prints the plan with each
# stage's budget.
#
# Environment: PYTHON (default /opt/torch/.venv/bin/python, else python3),
# TORCH_CUDA_ARCH_LIST (default 9.0), CUDA_HOME, MAX_JOBS (default nproc),
# IMAML_EXT_SUITE_STAGES="build tests-cuda ..." to run only those stages
# (e.g. a second call for the stages a first one did not reach; build is
# needed by every later stage on a fresh machine), IMAML_EXT_SUITE_BUDGET_S
# (default 540) for the whole suite.
set -u -o pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUTDIR=${1:-${OUT:-}}
if [ -z "$OUTDIR" ]; then
    if [ "$DRY" = 1 ]; then OUTDIR=$(mktemp -d); else
        echo "usage: benchmarks/gpu_suite.sh [--dry-run] [OUTDIR]  (or set OUT)" >&2; exit 2; fi
fi
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)           # logs as they are written; packed into OUTDIR
SUITE_START=$(date +%s)
DEADLINE=$(( SUITE_START + ${IMAML_EXT_SUITE_BUDGET_S:-540} ))

# Stage order and budgets (seconds). Keep the sum <= 540.
STAGES="env build tests-cuda memcheck racecheck synccheck initcheck bench-ops bench-imaml \
bench-hvp bench-memory"
declare -A BUDGET=([env]=10 [build]=150 [tests-cuda]=60 [memcheck]=40 [racecheck]=25
    [synccheck]=20 [initcheck]=25 [bench-ops]=60 [bench-imaml]=60 [bench-hvp]=30
    [bench-memory]=50)

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in /opt/torch/.venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
    done
fi
if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export IMAML_EXT_REQUIRE_COMPILED=1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_INDEX=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

export PY NVCC SANITIZER OUTDIR
# The CUDA op tests the sanitizers run: every op at every storage offset.
export SANITIZED_TESTS='tests/test_ops.py -x -q -p no:cacheprovider -k "cuda and storage_offset"'

# do_stage NAME: the stage's command on the device.
do_stage() {
    case $1 in
        env) nvidia-smi; "$PY" -c 'import sys, torch; print(sys.version); print("torch", \
torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'; "$NVCC" --version
             nproc; free -g ;;
        build) IMAML_EXT_REQUIRE_CUDA=1 "$PY" setup.py build_ext --inplace ;;
        tests-cuda) "$PY" -m pytest -x -q -rs -p no:cacheprovider -m cuda tests/test_ops.py \
            tests/test_solvers.py ;;
        memcheck) eval PYTORCH_NO_CUDA_MEMORY_CACHING=1 '"$SANITIZER"' --tool memcheck \
            --error-exitcode 1 '"$PY"' -m pytest "$SANITIZED_TESTS" ;;
        racecheck|synccheck|initcheck) eval '"$SANITIZER"' --tool "$1" --error-exitcode 1 \
            '"$PY"' -m pytest "$SANITIZED_TESTS" ;;
        bench-ops) "$PY" benchmarks/bench_ops.py --device cuda --reps 10 \
            --json "$OUTDIR/bench_ops.json" ;;
        bench-imaml) "$PY" benchmarks/bench_imaml.py --device cuda --repeats 5 \
            --json "$OUTDIR/bench_imaml.json" ;;
        bench-hvp) "$PY" benchmarks/bench_hvp.py --device cuda --repeats 5 ;;
        bench-memory) "$PY" benchmarks/bench_memory.py --device cuda --preset resnet18 \
            --steps 10 50 --methods full checkpointed imaml --timeout 20 \
            --json "$OUTDIR/bench_memory.json" --plot "$OUTDIR/bench_memory.png" ;;
    esac
}

# do_dry NAME: what a CPU can do of the stage (--dry-run).
do_dry() {
    case $1 in
        env) "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, \
"cuda", torch.version.cuda)'; "$NVCC" --version 2>/dev/null | tail -2 || echo "no nvcc here" ;;
        build) test -f setup.py && if "$NVCC" --version >/dev/null 2>&1; then
                   echo "nvcc found: the device run builds with it"
               else echo "no nvcc here: the build runs on the device"; fi ;;
        tests-cuda) "$PY" -m pytest --collect-only -q -p no:cacheprovider -m cuda \
            tests/test_ops.py tests/test_solvers.py | tail -3 ;;
        memcheck|racecheck|synccheck|initcheck)
            eval '"$PY"' -m pytest --collect-only "$SANITIZED_TESTS" | tail -3 ;;
        bench-ops) "$PY" benchmarks/bench_ops.py --device cpu --layouts omniglot \
            --ops cg_step_,batched_dot --tasks 4 --reps 1 --warmup 0 --threads 1 ;;
        bench-imaml) "$PY" benchmarks/bench_imaml.py --help | head -3 ;;
        bench-hvp) "$PY" benchmarks/bench_hvp.py --help | head -3 ;;
        bench-memory) "$PY" benchmarks/bench_memory.py --help | head -3 ;;
    esac
}

# One line per stage, for the plan.
describe() {
    case $1 in
        env) echo "versions of the GPU, Python, torch, nvcc" ;;
        build) echo "setup.py build_ext --inplace, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" ;;
        tests-cuda) echo "pytest -m cuda tests/test_ops.py tests/test_solvers.py" ;;
        memcheck) echo "compute-sanitizer memcheck (no caching allocator) on the op tests" ;;
        racecheck|synccheck|initcheck) echo "compute-sanitizer $1 on the op tests" ;;
        bench-ops) echo "bench_ops.py --device cuda (bursts, GB/s vs copy_)" ;;
        bench-imaml) echo "bench_imaml.py --device cuda (reference loop .. CUDA graph)" ;;
        bench-hvp) echo "bench_hvp.py --device cuda (HVP modes)" ;;
        bench-memory) echo "bench_memory.py --device cuda --preset resnet18 --steps 10 50" ;;
    esac
}
FUNCS="$(declare -f do_stage do_dry)"

ROWS="$WORK/rows.md"
: > "$ROWS"
FAILED=0

# Writes OUTDIR/summary.md and OUTDIR/logs.tar.gz from what is there now.
pack() {
    {
        echo "# imaml_ext GPU suite$([ "$DRY" = 1 ] && echo ' (dry run)') ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
        echo
        echo "| stage | status | time | budget |"
        echo "|---|---|---|---|"
        cat "$ROWS"
        echo
        echo '```'
        sed -n '/^fused ops in bursts/,$p' "$WORK/bench-ops.log" 2>/dev/null
        grep '^|' "$WORK/bench-imaml.log" 2>/dev/null
        grep -E 'passed|failed|error' "$WORK/tests-cuda.log" 2>/dev/null | tail -3
        echo '```'
    } > "$OUTDIR/summary.md.tmp" && mv "$OUTDIR/summary.md.tmp" "$OUTDIR/summary.md"
    tar -czf "$OUTDIR/logs.tar.gz.tmp" -C "$WORK" . 2>/dev/null \
        && mv "$OUTDIR/logs.tar.gz.tmp" "$OUTDIR/logs.tar.gz"
}

selected() {
    [ -z "${IMAML_EXT_SUITE_STAGES:-}" ] && return 0
    case " $IMAML_EXT_SUITE_STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}

# run_stage NAME: runs the stage under min(its budget, time to the deadline).
run_stage() {
    local name=$1 budget=${BUDGET[$1]} log="$WORK/$1.log" start rc status limit
    local left=$(( DEADLINE - $(date +%s) - 5 ))
    limit=$(( budget < left ? budget : left ))
    local fn=do_stage
    # A dry run checks the plan on a CPU machine: not held to the device budgets.
    if [ "$DRY" = 1 ]; then fn=do_dry; limit=300; fi
    if [ "$limit" -le 0 ]; then
        printf '| %s | SKIPPED (suite deadline) | 0s | %ss |\n' "$name" "$budget" >> "$ROWS"
        FAILED=1; pack; return
    fi
    start=$(date +%s)
    echo "== $name (budget ${budget}s, limit ${limit}s): $(describe "$name")" | tee "$log"
    timeout -k 5 "$limit" bash -c "$FUNCS; $fn $name" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT (${limit}s)"; FAILED=1 ;;
        *) status="FAILED (rc=$rc)"; FAILED=1 ;;
    esac
    printf '| %s | %s | %ss | %ss |\n' "$name" "$status" "$(( $(date +%s) - start ))" "$budget" \
        | tee -a "$ROWS"
    tail -n +2 "$log" | tail -3
    pack
}

total=0
echo "plan ($([ "$DRY" = 1 ] && echo 'dry run: CPU parts only' || echo 'device run')):"
for name in $STAGES; do
    selected "$name" || continue
    printf '  %-13s %4ss  %s\n' "$name" "${BUDGET[$name]}" "$(describe "$name")"
    total=$(( total + BUDGET[$name] ))
done
echo "  total budget: ${total}s (suite limit ${IMAML_EXT_SUITE_BUDGET_S:-540}s)"
pack
for name in $STAGES; do
    selected "$name" && run_stage "$name"
done
echo
cat "$OUTDIR/summary.md"
echo "files in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
rm -rf "$WORK"
exit $FAILED
