"""The parts of the GPU check that must work when torch or the extension does not.

Called by benchmarks/gpu_check.sh as ``gpu_check_kit.py --preflight`` and
``gpu_check_kit.py --finalize`` (standard library only at import):

* :func:`preflight` (~5 s): Python.h, torch (a CUDA build, its version against
  the minimum), nvcc, ninja, setuptools, the pytest plugins, transformers, and
  a visible GPU. One line per item, ``OK``/``WARN``/``FAIL name: detail``; exit
  status 1 if any item FAILs. Also writes OUTDIR/preflight.json.
* :func:`finalize`: merges what every phase left (OUTDIR/phases.env written by
  the shell, preflight.json, build.log, tests.log, and the harness's
  report.json / report.md if it got that far) into the final report.json and
  report.md. Standard library only, so a failed pre-flight, a failed build, a
  hung test or a killed harness still ends in a report that says so in its
  first lines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from typing import Dict, List, Optional, Tuple

# The oldest torch the extension is checked against: the GPU image's torch 2.11
# (its headers compile csrc/ as C++17; tests/test_build_guard.py keeps csrc/
# within them).
MIN_TORCH = (2, 11)


# ---------------------------------------------------------------------------
# Pre-flight
# ---------------------------------------------------------------------------


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:2])


def _nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def preflight_items(simulate: bool) -> List[Tuple[str, str, str]]:
    """[(status, name, detail)] with status OK / WARN / FAIL."""
    items: List[Tuple[str, str, str]] = []

    def add(status, name, detail):
        items.append((status, name, detail))

    include = sysconfig.get_paths().get("include") or ""
    if os.path.exists(os.path.join(include, "Python.h")):
        add("OK", "python-headers", os.path.join(include, "Python.h"))
    else:
        add("FAIL", "python-headers", f"no Python.h in {include!r}: the extension cannot be built")

    t0 = time.monotonic()
    try:
        import torch
    except Exception as exc:  # no torch: nothing else can run
        add("FAIL", "torch", f"import torch failed: {type(exc).__name__}: {exc}")
        return items
    version = torch.__version__
    detail = f"{version} (CUDA {torch.version.cuda}), import {time.monotonic() - t0:.1f} s"
    if torch.version.cuda is None:
        add("WARN" if simulate else "FAIL", "torch",
            f"{detail}: a CPU-only torch cannot build or run the CUDA kernels")
    elif _version_tuple(version) < MIN_TORCH:
        add("WARN", "torch", f"{detail}: older than the checked minimum "
                             f"{'.'.join(map(str, MIN_TORCH))}")
    else:
        add("OK", "torch", detail)

    nvcc = _nvcc()
    if nvcc is None:
        add("FAIL", "nvcc", "not found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH)")
    else:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=10).stdout
            release = re.search(r"release ([\d.]+)", out)
            rel = release.group(1) if release else "?"
            status = "OK"
            note = ""
            if torch.version.cuda and release and rel.split(".")[0] != torch.version.cuda.split(".")[0]:
                status, note = "WARN", f" (torch was built with CUDA {torch.version.cuda})"
            add(status, "nvcc", f"{nvcc}, release {rel}{note}")
        except Exception as exc:
            add("FAIL", "nvcc", f"{nvcc} --version failed: {exc}")

    if shutil.which("ninja") or importlib.util.find_spec("ninja") is not None:
        add("OK", "ninja", shutil.which("ninja") or "python package")
    else:
        add("WARN", "ninja", "absent: the build falls back to one compile at a time (several minutes)")
    for module, what in (("setuptools", "the build"), ("wheel", "the editable install")):
        if importlib.util.find_spec(module) is None:
            add("FAIL", module, f"absent: {what} cannot run")
    for module, status, what in (("pytest", "FAIL", "the CUDA tests cannot run"),
                                 ("pytest_timeout", "WARN", "no per-test timeout, only the phase limit"),
                                 ("xdist", "WARN", "the CUDA tests run serially"),
                                 ("transformers", "WARN", "no end-to-end GPT-2 rows")):
        if importlib.util.find_spec(module) is None:
            add(status, module, f"absent: {what}")
        else:
            add("OK", module, "importable")

    if simulate:
        add("OK", "gpu", "not checked (GPU_CHECK_SIMULATE=1: CPU simulation of the kit)")
        return items
    try:
        if not torch.cuda.is_available():
            add("FAIL", "gpu", "torch.cuda.is_available() is False: no GPU visible "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
            return items
        major, minor = torch.cuda.get_device_capability(0)
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        status = "OK" if major >= 8 else "FAIL"
        add(status, "gpu", f"{name}, compute capability {major}.{minor}, {free / 2**30:.0f} of "
                           f"{total / 2**30:.0f} GiB free, {torch.cuda.device_count()} device(s)"
                           + ("" if major >= 8 else ": the fused kernels need 8.0"))
        items.append(("arch", f"{major}.{minor}", ""))
    except Exception as exc:
        add("FAIL", "gpu", f"CUDA initialisation failed: {type(exc).__name__}: {exc}")
    return items


def preflight(outdir: str) -> int:
    t0 = time.monotonic()
    items = preflight_items(os.environ.get("GPU_CHECK_SIMULATE", "0") == "1")
    for status, name, detail in items:
        print(f"arch {name}" if status == "arch" else f"{status} {name}: {detail}", flush=True)
    failed = [f"{n}: {d}" for s, n, d in items if s == "FAIL"]
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "preflight.json"), "w") as f:
        json.dump({"items": [{"status": s, "name": n, "detail": d} for s, n, d in items if s != "arch"],
                   "failed": failed, "seconds": round(time.monotonic() - t0, 2)}, f, indent=1)
    print(f"pre-flight: {len(failed)} failed, {time.monotonic() - t0:.1f} s", flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def parse_tests_log(path: Optional[str]) -> Dict:
    """Summary counts, failed/errored test ids, the slowest tests and, after a kill,
    the test that was running (from pytest -v's start-of-test lines)."""
    out: Dict = {"log": path}
    text = _read(path) if path else ""
    if not text:
        return out
    lines = text.splitlines()
    summary = [line for line in lines if re.search(r"\d+ (passed|failed|errors?|skipped)", line)
               and not line.startswith(("PASSED", "FAILED", "ERROR"))]
    if summary:
        last = summary[-1]
        out["summary"] = last.strip("= ").strip()
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", last):
            out[what.rstrip("s") if what.startswith("error") else what] = int(n)
    # -rfE short summary: "FAILED tests/x.py::test[..] - AssertionError: ..."
    out["failures"] = [line.strip() for line in lines if re.match(r"^(FAILED|ERROR) \S+::", line)][:40]
    if not out["failures"]:  # killed before the short summary: pytest -v's outcome lines
        out["failures"] = [f"{m.group(2)} {m.group(1)}" for m in
                           (re.match(r"^(\S+\.py::\S+) (FAILED|ERROR)\b", line) for line in lines) if m][:40]
    timeouts = [line.strip() for line in lines if line.startswith(("E ", "+++")) and "Timeout" in line]
    if timeouts:
        out["timeouts"] = timeouts[:10]
    slow = []
    in_durations = False
    for line in lines:
        if "slowest" in line and "durations" in line:
            in_durations = True
            continue
        if in_durations:
            m = re.match(r"^\s*([\d.]+)s (call|setup|teardown)\s+(\S+)", line)
            if m:
                slow.append(f"{m.group(1)} s {m.group(2)} {m.group(3)}")
            elif line.strip() and not line.startswith("("):
                in_durations = False
    out["slowest"] = slow[:15]
    # pytest -v prints "path::test[...] " when a test starts and its outcome on the same
    # line when it ends: a last line with a test id and no outcome is the test that hung.
    started = [line for line in lines if re.match(r"^\S+\.py::\S+", line)]
    if started and not summary:
        last = started[-1]
        if not re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", last):
            out["running_when_stopped"] = last.split()[0]
    return out


def _load_env(path: str) -> Dict[str, str]:
    env: Dict[str, str] = {}
    for line in _read(path).splitlines():
        if "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            parts = shlex.split(value)
            env[key] = parts[0] if parts else ""
        except ValueError:
            env[key] = value
    return env


# ---------------------------------------------------------------------------
# Final report
# ---------------------------------------------------------------------------


def kit_summary(outdir: str) -> Dict:
    phases = _load_env(os.path.join(outdir, "phases.env"))
    try:
        with open(os.path.join(outdir, "preflight.json")) as f:
            pre = json.load(f)
    except (OSError, ValueError):
        pre = {"items": [], "failed": []}
    tests = parse_tests_log(os.path.join(outdir, "tests.log")) if os.path.exists(
        os.path.join(outdir, "tests.log")) and phases.get("tests_rc") is not None else {}
    build_log = _read(os.path.join(outdir, "build.log"))
    errors = [line.strip() for line in build_log.splitlines() if re.search(r"\berror\b", line, re.I)]
    return {"phases": phases, "preflight": pre, "tests": tests,
            "build_errors": errors[:10], "build_log_tail": build_log.splitlines()[-20:]}


def _stop_reason(kit: Dict, harness: Optional[Dict]) -> Optional[str]:
    ph = kit["phases"]
    pre = kit["preflight"]
    if ph.get("preflight_failure") and ph.get("harness_status", "").startswith("not run"):
        return f"pre-flight failed: {ph['preflight_failure']}"
    if harness is None:
        return f"the harness wrote no report (harness: {ph.get('harness_status', 'not run')})"
    if not harness.get("finished"):
        return f"the harness stopped before its end (harness: {ph.get('harness_status', '?')}); rows so far below"
    if pre.get("failed"):
        return "pre-flight: " + "; ".join(pre["failed"])
    return None


def kit_markdown(kit: Dict) -> List[str]:
    ph, tests = kit["phases"], kit["tests"]
    total, elapsed = ph.get("total_s", "?"), ph.get("elapsed_s", "?")
    L = ["## Kit phases", "",
         f"- total: {elapsed} s of {total} s" + (" (CPU simulation: GPU_CHECK_SIMULATE=1)"
                                                  if ph.get("simulate") == "1" else "")]
    pre = kit["preflight"]
    if pre.get("failed"):
        L.append("- pre-flight: **FAILED**: " + "; ".join(pre["failed"]))
    else:
        warn = [f"{i['name']}: {i['detail']}" for i in pre.get("items", []) if i["status"] == "WARN"]
        L.append("- pre-flight: ok" + (f" (warnings: {'; '.join(warn)})" if warn else ""))
    build = ph.get("build_status", "?")
    L.append(f"- build: {build}" + (f", {ph['build_s']} s" if ph.get("build_s") else "")
             + " (log build.log)")
    if kit["build_errors"] and not build.startswith(("ok", "skipped")):
        L.append("  - first error lines: " + " / ".join(f"`{e[:160]}`" for e in kit["build_errors"][:3]))
    tstat = ph.get("tests_status", "?")
    line = f"- CUDA tests: {tstat}"
    if tests.get("summary"):
        line += f": {tests['summary']}"
    if ph.get("tests_s"):
        line += f", {ph['tests_s']} s of a {ph.get('tests_limit_s', '?')} s limit"
    if ph.get("tests_per_test_timeout"):
        line += f"; per-test timeout: {ph['tests_per_test_timeout']}"
    L.append(line + " (log tests.log)")
    if tests.get("running_when_stopped"):
        L.append(f"  - **running when stopped (hung?)**: `{tests['running_when_stopped']}`")
    for f in tests.get("failures", [])[:20]:
        L.append(f"  - `{f[:240]}`")
    for t in tests.get("timeouts", [])[:5]:
        L.append(f"  - timeout: `{t[:200]}`")
    if tests.get("slowest"):
        L.append("  - slowest: " + "; ".join(tests["slowest"][:8]))
    L.append(f"- harness: {ph.get('harness_status', '?')} (log harness.log)")
    return L


def finalize(outdir: str) -> int:
    kit = kit_summary(outdir)
    json_path, md_path = os.path.join(outdir, "report.json"), os.path.join(outdir, "report.md")
    harness = None
    try:
        with open(json_path) as f:
            harness = json.load(f)
    except (OSError, ValueError):
        harness = None
    report = harness if harness is not None else {"parity": [], "speed": [], "e2e": [], "errors": []}
    report["kit"] = kit
    reason = _stop_reason(kit, harness)
    report["kit_stopped"] = reason
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, json_path)

    head = []
    if reason:
        head = [f"**GPU check stopped early: {reason}**", ""]
    body = _read(md_path) if harness is not None else ""
    if body:
        lines = body.splitlines()
        title, rest = lines[:1], lines[1:]
    else:
        title, rest = ["# barrier_ops GPU check"], ["", "No harness report: see the phases above and harness.log."]
    md = title + [""] + head + kit_markdown(kit) + rest
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"finalized {md_path} and {json_path}" + (f": {reason}" if reason else ""))
    return 0


def main(argv: List[str]) -> int:
    outdir = "runs/gpu_check"
    if "--outdir" in argv:
        outdir = argv[argv.index("--outdir") + 1]
    if "--preflight" in argv:
        return preflight(outdir)
    if "--finalize" in argv:
        return finalize(outdir)
    raise SystemExit("gpu_check_kit: --preflight or --finalize")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
