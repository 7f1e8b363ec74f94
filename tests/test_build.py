"""The build's choices (setup.py) and what a build without CUDA kernels does on a CUDA device.

setup.py is run with ``--version`` (nothing compiles) under different environments,
and its log lines say which sources it would compile.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import barrier_ops
from barrier_ops import backends
from barrier_ops import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "setup.py")


def _cuda_possible() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _setup_log(env_overrides, gpu_visible: bool = False) -> str:
    """stderr of `setup.py --version` under the given environment (None removes a variable)."""
    env = {k: v for k, v in os.environ.items() if k not in ("BARRIER_OPS_CUDA", "TORCH_CUDA_ARCH_LIST")}
    env.update({k: v for k, v in env_overrides.items() if v is not None})
    code = textwrap.dedent(f"""
        import runpy, sys, torch
        torch.cuda.is_available = lambda: {gpu_visible!r}
        sys.argv = [{SETUP!r}, "--version"]
        runpy.run_path({SETUP!r}, run_name="__main__")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return "\n".join(line for line in out.stderr.splitlines() if line.startswith("barrier_ops build:"))


@pytest.mark.skipif(not os.path.isfile(SETUP), reason="needs the source checkout")
class TestCudaChoice:
    def test_default_without_gpu_builds_cpu_ops_only(self):
        log = _setup_log({})
        assert "CPU ops only" in log and "CUDA kernels (" not in log, log

    def test_zero_forces_cpu_even_with_gpu_and_arch_list(self):
        log = _setup_log({"BARRIER_OPS_CUDA": "0", "TORCH_CUDA_ARCH_LIST": "9.0"}, gpu_visible=True)
        assert "BARRIER_OPS_CUDA=0: CPU ops only" in log, log

    @pytest.mark.skipif(not _cuda_possible(), reason="needs a CUDA toolkit and a CUDA build of torch")
    def test_visible_gpu_builds_cuda(self):
        log = _setup_log({}, gpu_visible=True)
        assert "a GPU is visible: CPU ops and CUDA kernels" in log, log

    @pytest.mark.skipif(not _cuda_possible(), reason="needs a CUDA toolkit and a CUDA build of torch")
    def test_arch_list_builds_cuda_without_gpu(self):
        log = _setup_log({"TORCH_CUDA_ARCH_LIST": "9.0"})
        assert "TORCH_CUDA_ARCH_LIST='9.0' is set: CPU ops and CUDA kernels" in log, log
        assert "TORCH_CUDA_ARCH_LIST='9.0'" in log.splitlines()[-1], log  # the arch list is kept

    @pytest.mark.skipif(not _cuda_possible(), reason="needs a CUDA toolkit and a CUDA build of torch")
    def test_one_builds_cuda_without_gpu(self):
        log = _setup_log({"BARRIER_OPS_CUDA": "1"})
        assert "BARRIER_OPS_CUDA=1: CPU ops and CUDA kernels" in log, log
        assert "8.0;9.0+PTX" in log, log  # the default architectures

    def test_bad_value_is_an_error(self):
        env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
        env["BARRIER_OPS_CUDA"] = "maybe"
        out = subprocess.run([sys.executable, SETUP, "--version"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode != 0 and "BARRIER_OPS_CUDA must be auto, 1 or 0, got 'maybe'" in out.stderr

    def test_object_files_outlive_an_editable_install(self, tmp_path):
        # pip's editable install hands build_ext a temporary build_temp; BuildExt keeps the checkout's.
        code = textwrap.dedent(f"""
            import runpy, sys
            from setuptools import Distribution
            sys.argv = [{SETUP!r}, "--version"]
            g = runpy.run_path({SETUP!r}, run_name="__main__")
            cmd = g["BuildExt"](Distribution({{"ext_modules": []}}))
            cmd.initialize_options()
            cmd.build_temp = {str(tmp_path)!r}
            cmd.finalize_options()
            print(cmd.build_temp)
            print(g["BUILD_TEMP"])
        """)
        env = {k: v for k, v in os.environ.items() if k != "BARRIER_OPS_CUDA"}
        env["BARRIER_OPS_CUDA"] = "0"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        got, expected = out.stdout.split()[-2:]
        assert got == expected and expected.startswith(os.path.join(ROOT, "build", "temp.")), out.stdout

    def test_no_cublas_link(self):
        # No source calls cuBLAS; linking it only added a dependency.
        with open(SETUP, encoding="utf-8") as f:
            assert "cublas" not in f.read()


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 17, 8, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v


def test_this_build_has_cpu_kernels():
    assert backends.fused_available(torch.device("cpu"))
    assert not backends.fused_available(torch.device("meta"))


def test_build_without_kernels_for_the_device(monkeypatch):
    """What a CPU-only build does on a CUDA device, simulated on CPU: fused says how to rebuild, auto runs sdpa."""
    monkeypatch.setitem(backends.FUSED_BUILT, "cpu", False)
    monkeypatch.setitem(backends.FUSED_BUILT, "cuda", False)
    for device in ("cpu", "cuda"):
        assert backends.resolve_backend("auto", torch.device(device)) == "sdpa"
        with pytest.raises(RuntimeError, match="Rebuild with BARRIER_OPS_CUDA=1"):
            backends.resolve_backend("fused", torch.device(device))
    q, k, v = _inputs()
    with pytest.raises(RuntimeError, match="BARRIER_OPS_CUDA=1"):
        barrier_ops.token_margins(q, k, v, backend="fused")
    got = barrier_ops.token_margins(q, k, v)  # auto: sdpa
    torch.testing.assert_close(got, ref.token_margins_reference(q, k, v), rtol=1e-10, atol=1e-10)
    assert barrier_ops.margin_barrier_loss(q, k, v).isfinite()
