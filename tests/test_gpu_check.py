"""The GPU check kit keeps working: its CPU smoke run writes a report with parity
rows for both backends, speed rows against the SDPA yardstick and the
end-to-end overhead rows (benchmarks/gpu_check.sh --cpu-smoke); and the full
command, simulated on CPU, survives a failed pre-flight, a failed build, hung
and failing CUDA tests and a hung harness, ending within its total with a
report that names what failed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", SCRIPT, "--cpu-smoke", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"gpu_check.sh --cpu-smoke failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(out / "report.json") as f:
        report = json.load(f)
    md = (out / "report.md").read_text()
    return report, md


def test_report_files_and_environment(smoke_report):
    report, md = smoke_report
    assert report["smoke"] is True
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["torch"]
    assert "recommended auto backend on cpu:" in md
    assert report["recommendation"]["recommended"]
    assert not report["errors"], report["errors"]


def test_parity_rows_for_both_backends_pass(smoke_report):
    report, _ = smoke_report
    rows = report["parity"]
    for backend in ("fused", "sdpa"):
        mine = [r for r in rows if r["backend"] == backend]
        assert mine, f"no parity rows for {backend}"
        failed = [(r["case"], r["dtype"], r.get("error"), r.get("margin_rel_err"), r.get("grad_rel_err"))
                  for r in mine if not r["passed"]]
        assert not failed, f"{backend}: {failed}"
        # Against the reference and, for the longest case, against the other backend.
        assert {r["compared_to"] for r in mine} == {"reference", "sdpa" if backend == "fused" else "fused"}
        assert {r["dtype"] for r in mine} == {"fp32", "bf16"}
        assert {r["coupling"] for r in mine} == {"none", "scalar", "matrix"}
        assert {r["mask"] for r in mine} == {"none", "right", "left"}
        for r in mine:
            assert r["margin_rel_err"] <= r["tol_margin"] * r["tol_factor"]
            assert set(r["grad_rel_err"]) >= {"dq", "dk", "dv"}
    assert report["recommendation"]["parity_passed"] == {"fused": True, "sdpa": True}


def test_speed_rows_with_the_yardstick_ratio(smoke_report):
    report, md = smoke_report
    ok = [r for r in report["speed"] if r["status"] == "ok"]
    impls = {r["impl"] for r in ok}
    assert {"fused", "sdpa", "attention", "eager_reference"} <= impls
    for r in ok:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["fwd_bwd_ratio_to_yardstick"] > 0
        if r["impl"] == "attention":
            assert r["fwd_bwd_ratio_to_yardstick"] == pytest.approx(1.0)
    assert all(r["sdpa_kernel"] for r in ok if r["impl"] in ("sdpa", "attention"))
    assert "fwd+bwd x yardstick" in md


def test_end_to_end_overhead_rows(smoke_report):
    report, md = smoke_report
    rows = report["e2e"]
    assert rows[0]["variant"] == "none" and rows[0]["status"] == "ok"
    attached = rows[1:]
    assert attached and all(r["status"] == "ok" for r in attached), attached
    for r in attached:
        assert isinstance(r["overhead_pct"], float)
        assert r["step_ms"] > 0
    assert "overhead %" in md


def test_value_split_rows_record_kernels_probes_and_agreement(smoke_report):
    # Every variant at every case: its layout, one kernel per SDPA call, which
    # kernels take every call alone, timings, and kappa equal to the whole one's.
    report, md = smoke_report
    rows = report["value_split"]
    cases = {r["case"] for r in rows}
    assert len(cases) == 3 and any("rows=" in c for c in cases) and any("key-pad" in c for c in cases)
    for case in cases:
        assert {r["split"] for r in rows if r["case"] == case} == {"whole", "equal", "narrow"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["calls"] and len(r["kernels"].split(" + ")) == len(r["calls"])
        parts = r["layout"][1] if isinstance(r["layout"][1], list) else [r["layout"][1]]
        assert len(parts) == len(r["calls"]) and [c["v"] for c in r["calls"]] == parts
        assert all(c["mask"] == ("rows=" in r["case"]) for c in r["calls"])
        # On CPU the flash kernel takes every layout (a math fallback would be a bug).
        assert r["kernels"].replace(" + ", "") == "FLASH_ATTENTION" * len(r["calls"]), r["kernels"]
        assert r["probe"]["FLASH_ATTENTION"] == "ok"
        assert r["probe"]["EFFICIENT_ATTENTION"].startswith("unavailable")
        assert r["agrees"] and r["kappa_rel_diff_vs_whole"] <= 5e-4
        assert set(r["grad_rel_diff_vs_whole"]) == {"dq", "dk", "dv"}
        assert max(r["grad_rel_diff_vs_whole"].values()) <= 2e-3
        assert r["fwd_bwd_ms"] > 0
    equal = [r for r in rows if r["split"] == "equal" and "key-pad" not in r["case"]]
    assert all(len(r["calls"]) == 3 for r in equal)  # d = 16: V' 38 wide in parts of 16
    rec = report["value_split_recommendation"]
    assert rec["recommended"] in ("whole", "equal", "narrow") and rec["current_auto"] == "whole"
    assert f"recommended SDPA_VALUE_SPLIT on cpu: {rec['recommended']}" in md


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def _split_row(case, split, ms, agrees=True, status="ok"):
    return {"case": case, "split": split, "status": status, "fwd_bwd_ms": ms, "agrees": agrees,
            "kernels": "K", "forced_fwd_bwd_ms": {}}


def test_the_split_recommendation_picks_the_fastest_agreeing_variant():
    gc = _gpu_check_module()
    cpu = torch.device("cpu")
    rows = [_split_row("a", "whole", 10.0), _split_row("a", "equal", 6.0), _split_row("a", "narrow", 8.0),
            _split_row("b", "whole", 20.0), _split_row("b", "equal", 16.0), _split_row("b", "narrow", 12.0)]
    rec = gc.recommend_split(rows, cpu)
    assert rec["recommended"] == "narrow" and rec["totals_fwd_bwd_ms"]["narrow"] == 20.0
    assert rec["speedup_vs_whole"] == pytest.approx(1.5)
    assert rec["per_case"] == {"a": "equal", "b": "narrow"}
    # Within the margin of whole: one SDPA call stays.
    close = [_split_row("a", "whole", 10.0), _split_row("a", "equal", 9.8), _split_row("a", "narrow", 9.9)]
    assert gc.recommend_split(close, cpu)["recommended"] == "whole"
    # A variant whose kappa disagrees, or that failed, takes no case into the totals.
    bad = [_split_row("a", "whole", 10.0), _split_row("a", "equal", 1.0, agrees=False),
           _split_row("a", "narrow", 9.0)]
    rec = gc.recommend_split(bad, cpu)
    assert rec["recommended"].startswith("n/a") and rec["per_case"] == {"a": "narrow"}
    assert gc.recommend_split([], cpu)["recommended"].startswith("n/a")


# ---------------------------------------------------------------------------
# The GPU run's failure modes, simulated on CPU (GPU_CHECK_SIMULATE=1): whatever
# fails, the command ends within its total and report.md / report.json say what.
# ---------------------------------------------------------------------------

HANGING_TESTS = '''
import time

import pytest

pytestmark = pytest.mark.cuda


def test_passes():
    pass


def test_fails():
    assert 1 == 2, "planted failure"


def test_hangs():
    time.sleep(600)
'''

# Slack over the total: timeout's kill grace (-k 5) and a loaded CI machine.
TOTAL_SLACK_S = 15


def _simulate(out, total_s, **env_overrides):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SIMULATE="1",
               GPU_CHECK_TOTAL_S=str(total_s), GPU_CHECK_HARNESS_MIN_S="5", GPU_CHECK_RESERVE_S="8",
               **env_overrides)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=total_s + 60)
    elapsed = time.monotonic() - t0
    log = f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert (out / "report.json").exists() and (out / "report.md").exists(), log
    with open(out / "report.json") as f:
        report = json.load(f)
    return proc, elapsed, report, (out / "report.md").read_text(), log


@pytest.fixture
def needs_bash():
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")


def test_failed_build_and_hung_harness_still_write_the_report(tmp_path, needs_bash):
    """The build fails (GPU_CHECK_FAKE_BUILD_FAILURE) and the harness hangs after its
    first row (GPU_CHECK_FAKE_HARNESS_HANG_S): the tests are skipped, the harness is
    ended at its hard limit, and the report names both, within the total."""
    total = 30
    proc, elapsed, report, md, log = _simulate(
        tmp_path, total, GPU_CHECK_FAKE_BUILD_FAILURE="1", GPU_CHECK_FAKE_HARNESS_HANG_S="600")
    assert elapsed <= total + TOTAL_SLACK_S, f"took {elapsed:.0f} s of {total} s\n{log}"
    assert proc.returncode != 0
    kit = report["kit"]
    assert kit["phases"]["build_status"].startswith("FAILED"), kit["phases"]
    assert kit["phases"]["tests_status"] == "not run (build failed)"
    assert report["finished"] is False
    assert report["kit_stopped"] and "harness stopped before its end" in report["kit_stopped"]
    assert md.splitlines()[2].startswith("**GPU check stopped early"), md[:500]
    assert "simulated build failure" in md
    # The rows finished before the hang are kept: the yardstick ran first.
    assert [r["impl"] for r in report["speed"]] == ["attention"]
    assert "simulating a hang" in (tmp_path / "harness.log").read_text()


def test_hung_and_failing_cuda_tests_are_named_and_the_harness_still_runs(tmp_path, needs_bash):
    """A test that never returns and one that fails: with pytest-timeout the hung test
    fails at the per-test timeout; without it the phase limit ends pytest and the report
    names the test that was running. Either way the harness runs after it and the whole
    command ends within the total."""
    tests = tmp_path / "fake" / "test_fake_cuda.py"
    tests.parent.mkdir()
    tests.write_text(HANGING_TESTS)
    total = 40
    proc, elapsed, report, md, log = _simulate(
        tmp_path / "out", total, GPU_CHECK_SKIP_BUILD="1", GPU_CHECK_TESTS=str(tests),
        GPU_CHECK_TESTS_S="14", GPU_CHECK_TEST_TIMEOUT_S="3", GPU_CHECK_XDIST="0")
    assert elapsed <= total + TOTAL_SLACK_S, f"took {elapsed:.0f} s of {total} s\n{log}"
    assert proc.returncode != 0
    kit = report["kit"]
    tests_info = kit["tests"]
    named = " ".join(tests_info.get("failures", [])) + tests_info.get("running_when_stopped", "")
    assert "test_fails" in named and "test_hangs" in named, tests_info
    assert "test_hangs" in md and "test_fails" in md
    assert kit["phases"]["harness_status"].startswith(("rc", "killed")), kit["phases"]
    assert report["speed"] and report["speed"][0]["impl"] == "attention"


def test_preflight_failure_is_one_line_in_the_report(tmp_path, needs_bash):
    """No GPU visible (the real check, without GPU_CHECK_SIMULATE): nothing is built or
    run, exit status 2, and the report's first lines say why in one line."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_TOTAL_S="60")
    env.pop("GPU_CHECK_SIMULATE", None)
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    md = (tmp_path / "report.md").read_text()
    first = md.splitlines()[2]
    assert first.startswith("**GPU check stopped early: pre-flight failed: FAIL gpu:"), md[:600]
    assert "torch.cuda.is_available() is False" in first
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kit"]["phases"]["build_status"] == "not run (pre-flight failed)"
    assert not (tmp_path / "build.log").exists() and not (tmp_path / "tests.log").exists()
