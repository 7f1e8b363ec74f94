#!/usr/bin/env bash
# GPU check (issue #12): build for the local GPU, run the CUDA tests, then the
# parity / speed / end-to-end harness (benchmarks/gpu_check.py), which writes
# OUTDIR/report.md and OUTDIR/report.json with a recommended auto backend.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]              # on a CUDA machine, < 9 min on one H100/H200
#   bash benchmarks/gpu_check.sh --cpu-smoke [OUTDIR]  # same harness, tiny sizes, CPU, no build/tests
#
# OUTDIR defaults to runs/gpu_check (runs/ is git-ignored). Logs: OUTDIR/build.log,
# OUTDIR/tests.log, OUTDIR/harness.log. Environment:
#   GPU_CHECK_TOTAL_S   wall-clock target of the whole command (default 540)
#   GPU_CHECK_BUDGET_S  the harness's own budget (default: what is left of the total)
#   GPU_CHECK_SKIP_BUILD=1  use the extension as built (no pip install)
# Failures of the build or of tests do not stop the rest: they are recorded in the report.
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

TOTAL=${GPU_CHECK_TOTAL_S:-540}
say() { echo "[gpu_check.sh $(( $(date +%s) - START ))s] $*"; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); use --cpu-smoke" >&2
    exit 2
fi

# 1. Build for this GPU only.
BUILD_STATUS=skipped
if [ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]; then
    ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    JOBS=$(nproc)
    say "building for sm ${ARCH} with MAX_JOBS=${JOBS} (log $OUT/build.log)"
    if BARRIER_OPS_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS" \
        "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
        BUILD_STATUS=ok
    else
        BUILD_STATUS="failed (rc $?)"
        say "build FAILED; see $OUT/build.log (the harness still runs and records what fails)"
    fi
    say "build: $BUILD_STATUS"
fi

# 2. The CUDA tests (a timeout keeps a hang from eating the harness's time).
TESTS_TIMEOUT=${GPU_CHECK_TESTS_TIMEOUT_S:-210}
say "CUDA tests (log $OUT/tests.log, timeout ${TESTS_TIMEOUT}s)"
timeout "$TESTS_TIMEOUT" "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider >"$OUT/tests.log" 2>&1
TESTS_RC=$?
say "tests rc=$TESTS_RC: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -1)"

# 3. The harness, with what is left of the total (at least 120 s).
ELAPSED=$(( $(date +%s) - START ))
LEFT=$(( TOTAL - ELAPSED - 30 ))
[ "$LEFT" -lt 120 ] && LEFT=120
BUDGET=${GPU_CHECK_BUDGET_S:-$LEFT}
say "harness, budget ${BUDGET}s (log $OUT/harness.log)"
"$PY" benchmarks/gpu_check.py --outdir "$OUT" --budget-s "$BUDGET" \
    --build-status "$BUILD_STATUS" --build-log "$OUT/build.log" \
    --tests-log "$OUT/tests.log" --tests-rc "$TESTS_RC" 2>&1 | tee "$OUT/harness.log"
RC=${PIPESTATUS[0]}
say "done (harness rc=$RC): $OUT/report.md"
grep -m1 "recommended auto backend" "$OUT/report.md" || true
exit "$RC"
