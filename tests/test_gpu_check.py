"""The GPU check kit (issue #12) keeps working: its CPU smoke run writes a report
with parity rows for both backends, speed rows against the SDPA yardstick and
the end-to-end overhead rows (benchmarks/gpu_check.sh --cpu-smoke)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

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
