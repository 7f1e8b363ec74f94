#!/usr/bin/env bash
# GPU check: pre-flight, build for the local GPU, the CUDA tests, then the
# parity / speed / end-to-end harness (benchmarks/gpu_check.py), which writes
# OUTDIR/report.md and OUTDIR/report.json with a recommended auto backend.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]              # CUDA machine: <= 450 s by default, build included
#   GPU_CHECK_SKIP_BUILD=1 bash benchmarks/gpu_check.sh OUTDIR   # rerun on the same machine
#   bash benchmarks/gpu_check.sh --cpu-smoke [OUTDIR]  # the harness alone, tiny sizes, CPU (CI)
#
# OUTDIR defaults to runs/gpu_check (runs/ is git-ignored). Logs: OUTDIR/preflight.log,
# build.log, tests.log, harness.log. Every phase has a hard time limit, and the
# report is written whatever happens (a failed pre-flight, build, test or harness
# row, a hang): docs/cuda.md, "A GPU run in 15 minutes", has the phase budget.
#
# Phase budget (seconds, defaults; each phase also gets no more than what is
# left of the total minus what the later phases need at least):
#   GPU_CHECK_TOTAL_S          450  wall clock of the whole command
#   GPU_CHECK_PREFLIGHT_S       30  Python.h, nvcc, ninja, pytest plugins, GPU visible (~5 s)
#   GPU_CHECK_BUILD_S          180  pip install -e . for this GPU's arch only
#   GPU_CHECK_TESTS_S          150  pytest -m cuda on tests/test_cuda.py and test_query_rows_kernels.py (the whole session)
#   GPU_CHECK_TEST_TIMEOUT_S    90  one test (pytest-timeout; without it, only the phase limit)
#   GPU_CHECK_HARNESS_MIN_S     60  what the tests leave the harness at least
#   GPU_CHECK_RESERVE_S         10  kept for writing the final report
# Other switches:
#   GPU_CHECK_SKIP_BUILD=1     use the extension as built (a rerun on the same machine)
#   GPU_CHECK_XDIST=N          pytest-xdist workers for the tests (default 4; 0: serial)
# Test hooks (tests/test_gpu_check.py simulates failures with them, without a GPU):
#   GPU_CHECK_SIMULATE=1       no GPU needed: skip the GPU pre-flight, harness on CPU at smoke sizes
#   GPU_CHECK_FAKE_BUILD_FAILURE=1   the build step fails at once instead of building
#   GPU_CHECK_TESTS="paths"    test files instead of the two above
#   GPU_CHECK_FAKE_HARNESS_HANG_S=N  the harness hangs N s after its first row (gpu_check.py)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then
    SMOKE=1
    shift
fi
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
START=$(date +%s)

if [ "$SMOKE" = 1 ]; then
    # No build, no CUDA tests: the harness on CPU at tiny sizes (CI keeps the kit working).
    "$PY" benchmarks/gpu_check.py --smoke --device cpu --outdir "$OUT" \
        --budget-s "${GPU_CHECK_BUDGET_S:-45}" 2>&1 | tee "$OUT/harness.log"
    exit "${PIPESTATUS[0]}"
fi

TOTAL=${GPU_CHECK_TOTAL_S:-450}
PREFLIGHT_S=${GPU_CHECK_PREFLIGHT_S:-30}
BUILD_S=${GPU_CHECK_BUILD_S:-180}
TESTS_S=${GPU_CHECK_TESTS_S:-150}
TEST_TIMEOUT_S=${GPU_CHECK_TEST_TIMEOUT_S:-90}
HARNESS_MIN_S=${GPU_CHECK_HARNESS_MIN_S:-60}
RESERVE_S=${GPU_CHECK_RESERVE_S:-10}
SIMULATE=${GPU_CHECK_SIMULATE:-0}
TESTS=${GPU_CHECK_TESTS:-tests/test_cuda.py tests/test_query_rows_kernels.py}
XDIST=${GPU_CHECK_XDIST:-4}

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check.sh $(elapsed)s] $*"; }
# min(cap, what is left of the total after keeping `later` seconds for the phases after
# this one), and never below 1 (`timeout 0` would mean no limit at all)
phase_limit() {
    local cap=$1 later=$2 left
    left=$(( TOTAL - $(elapsed) - later ))
    [ "$left" -lt "$cap" ] && cap=$left
    [ "$cap" -lt 1 ] && cap=1
    echo "$cap"
}
# The phases' outcomes, read by the final report writer (gpu_check_kit.py --finalize).
PHASES="$OUT/phases.env"
: >"$PHASES"
record() { printf '%s=%q\n' "$1" "$2" >>"$PHASES"; }
# A timed phase's outcome: rc, limit, and whether `timeout` killed it (124/137).
record_outcome() {  # PHASE RC LIMIT_S
    record "$1_rc" "$2"
    record "$1_limit_s" "$3"
    if [ "$2" = 124 ] || [ "$2" = 137 ]; then
        record "$1_status" "killed at the ${3}s phase limit"
    else
        record "$1_status" "rc $2"
    fi
}
record total_s "$TOTAL"
record simulate "$SIMULATE"

finalize() {
    record elapsed_s "$(elapsed)"
    # Standard library only: this must work when torch or the extension does not import.
    "$PY" benchmarks/gpu_check_kit.py --finalize --outdir "$OUT" 2>&1 | tail -n 3
    say "done: $OUT/report.md"
    grep -m1 -E "^\*\*(recommended auto backend|GPU check stopped)" "$OUT/report.md" || true
}

# 0. Pre-flight (~5 s): one line per requirement; a failure is one line in the report.
PF_LIMIT=$(phase_limit "$PREFLIGHT_S" $(( RESERVE_S )))
say "pre-flight (limit ${PF_LIMIT}s, log $OUT/preflight.log)"
GPU_CHECK_SIMULATE=$SIMULATE timeout -k 5 "$PF_LIMIT" "$PY" benchmarks/gpu_check_kit.py --preflight \
    --outdir "$OUT" >"$OUT/preflight.log" 2>&1
PF_RC=$?
cat "$OUT/preflight.log"
record preflight_rc "$PF_RC"
if [ "$PF_RC" -ne 0 ]; then
    line=$(grep -m1 '^FAIL' "$OUT/preflight.log" || true)
    [ -z "$line" ] && line="pre-flight did not finish (rc $PF_RC$([ "$PF_RC" = 124 ] && echo ", timed out after ${PF_LIMIT}s"))"
    record preflight_failure "$line"
    say "pre-flight FAILED: $line"
fi
# A failed build requirement (Python.h, nvcc, ninja) stops the build, not the run:
# an extension built earlier may still be there. No GPU at all stops everything.
BUILD_BLOCKER=$(grep -m1 -E '^FAIL (python-headers|nvcc|setuptools|wheel)' "$OUT/preflight.log" || true)
if grep -q -E '^FAIL (gpu|torch)' "$OUT/preflight.log" || ! grep -q '^pre-flight:' "$OUT/preflight.log"; then
    record build_status "not run (pre-flight failed)"
    record tests_status "not run (pre-flight failed)"
    record harness_status "not run (pre-flight failed)"
    finalize
    exit 2
fi

# 1. Build for this GPU only.
BUILD_STATUS=skipped
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    BUILD_STATUS="skipped (GPU_CHECK_SKIP_BUILD=1: the extension as built)"
elif [ -n "$BUILD_BLOCKER" ]; then
    BUILD_STATUS="not run: $BUILD_BLOCKER"
elif [ "$(phase_limit "$BUILD_S" $(( HARNESS_MIN_S + RESERVE_S )))" -lt 10 ]; then
    BUILD_STATUS="not run: no time left in GPU_CHECK_TOTAL_S=$TOTAL"
else
    B_LIMIT=$(phase_limit "$BUILD_S" $(( HARNESS_MIN_S + RESERVE_S )))
    ARCH=$(grep -m1 '^arch ' "$OUT/preflight.log" | cut -d' ' -f2)
    ARCH=${ARCH:-9.0}
    JOBS=$(nproc)
    say "building for sm ${ARCH} with MAX_JOBS=${JOBS}, limit ${B_LIMIT}s (log $OUT/build.log)"
    B0=$(date +%s)
    if [ "${GPU_CHECK_FAKE_BUILD_FAILURE:-0}" = 1 ]; then
        echo "simulated build failure (GPU_CHECK_FAKE_BUILD_FAILURE=1): error: command 'nvcc' failed" >"$OUT/build.log"
        BUILD_RC=1
    else
        BARRIER_OPS_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS" timeout -k 10 "$B_LIMIT" \
            "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1
        BUILD_RC=$?
    fi
    record build_s $(( $(date +%s) - B0 ))
    if [ "$BUILD_RC" = 0 ]; then
        BUILD_STATUS=ok
    elif [ "$BUILD_RC" = 124 ] || [ "$BUILD_RC" = 137 ]; then
        BUILD_STATUS="FAILED: timed out after ${B_LIMIT}s"
    else
        BUILD_STATUS="FAILED (rc $BUILD_RC): $(grep -m1 -iE 'error' "$OUT/build.log" | cut -c1-200)"
    fi
fi
record build_status "$BUILD_STATUS"
say "build: $BUILD_STATUS"

# 2. The CUDA tests. After a failed build they would test a stale extension or
# none: skipped, and the harness gets their time.
case "$BUILD_STATUS" in
    ok|skipped*) RUN_TESTS=1 ;;
    *) RUN_TESTS=0 ;;
esac
if [ "$RUN_TESTS" = 1 ]; then
    T_LIMIT=$(phase_limit "$TESTS_S" $(( HARNESS_MIN_S + RESERVE_S )))
    ARGS=(-m cuda -k "not cpu_covered" -rfE --durations=15 -p no:cacheprovider)
    if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
        # signal method: a test stuck in Python (or between kernel launches) fails and the
        # session goes on; a kernel that never returns is caught by the phase limit.
        ARGS+=(--timeout="$TEST_TIMEOUT_S" -q)
        if [ "$XDIST" -gt 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
            ARGS+=(-n "$XDIST")
        fi
        PER_TEST="pytest-timeout ${TEST_TIMEOUT_S}s"
    else
        # No per-test timeout: -v names each test as it starts (the last unfinished line
        # of tests.log is a hung test) and faulthandler dumps its stack.
        ARGS+=(-v -o "faulthandler_timeout=$TEST_TIMEOUT_S")
        PER_TEST="none (pytest-timeout absent; phase limit only)"
    fi
    record tests_per_test_timeout "$PER_TEST"
    say "CUDA tests (${TESTS}; limit ${T_LIMIT}s, per test: ${PER_TEST}; log $OUT/tests.log)"
    T0=$(date +%s)
    # shellcheck disable=SC2086  # TESTS is a list of paths
    COLUMNS=240 timeout -k 5 "$T_LIMIT" "$PY" -m pytest "${ARGS[@]}" $TESTS >"$OUT/tests.log" 2>&1
    TESTS_RC=$?
    record tests_s $(( $(date +%s) - T0 ))
    record_outcome tests "$TESTS_RC" "$T_LIMIT"
    say "tests rc=$TESTS_RC: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -1)"
else
    record tests_status "not run (build failed)"
    say "tests skipped: the build failed"
fi

# 3. The harness: a hard limit of what is left (never past the total), and a budget
# inside it after which it starts no new row.
H_LIMIT=$(phase_limit 100000 "$RESERVE_S")
if [ "$H_LIMIT" -lt 5 ]; then
    record harness_status "not run (no time left)"
else
    GRACE=$(( H_LIMIT / 4 ))
    [ "$GRACE" -gt 30 ] && GRACE=30
    H_BUDGET=$(( H_LIMIT - GRACE ))
    H_ARGS=(--outdir "$OUT" --budget-s "$H_BUDGET" --hard-limit-s "$(( H_LIMIT - 2 ))")
    if [ "$SIMULATE" = 1 ]; then
        H_ARGS+=(--smoke --device cpu)
    fi
    say "harness: budget ${H_BUDGET}s, hard limit ${H_LIMIT}s (log $OUT/harness.log)"
    timeout -k 5 "$H_LIMIT" "$PY" benchmarks/gpu_check.py "${H_ARGS[@]}" 2>&1 | tee "$OUT/harness.log"
    H_RC=${PIPESTATUS[0]}
    record_outcome harness "$H_RC" "$H_LIMIT"
fi

finalize
# 0 only when every phase that ran succeeded.
[ "$BUILD_STATUS" = ok ] || [ "${BUILD_STATUS#skipped}" != "$BUILD_STATUS" ] || exit 1
[ "${TESTS_RC:-0}" = 0 ] || exit 1
exit "${H_RC:-1}"
