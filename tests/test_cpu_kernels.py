"""Properties of the CPU kernels' build and execution, beyond their values.

The value and gradient checks against the reference are in test_ops.py; these
cover how the kernels run: on several threads without races, with OpenMP
actually compiled in, and on the ATen GEMM fallback used where torch exports
no BLAS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import barrier_ops
from barrier_ops import _C

from _cases import Case, make_inputs, op_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _margins_and_grads(case, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, coupling, mask = make_inputs(case, seed=3)
        margins = barrier_ops.token_margins(q, k, v, **op_kwargs(case, coupling, mask))
        weights = torch.linspace(-1.0, 2.0, margins.numel()).view_as(margins)
        leaves = [t for t in (q, k, v, coupling) if t is not None]
        grads = torch.autograd.grad((margins * weights).sum(), leaves)
        return [margins, *grads]
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(
    "case",
    [
        Case(B=2, H=4, Hkv=2, T=300, d=16, coupling="matrix", masked=True),
        Case(B=3, H=2, Hkv=1, T=150, d=8, causal=False, coupling="scalar"),
    ],
    ids=str,
)
def test_results_do_not_depend_on_the_thread_count(case):
    # Every parallel task owns its outputs (a query block in the forward, a
    # (b, h) in the backward), so the thread count must not change a single
    # bit; a race or a shared scratch buffer would.
    serial = _margins_and_grads(case, threads=1)
    for threads in (2, 4):
        parallel = _margins_and_grads(case, threads=threads)
        for s, p in zip(serial, parallel):
            assert torch.equal(s, p), f"{threads} threads differ from 1 thread"


def test_extension_is_built_with_openmp():
    # at::parallel_for is inlined from ATen's headers; built without -fopenmp
    # its parallel region compiles away and the kernels silently run on one
    # thread. An OpenMP build references libgomp's GOMP_parallel.
    if not torch.backends.openmp.is_available():
        pytest.skip("this torch does not use OpenMP for intra-op parallelism")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    symbols = subprocess.run(
        [nm, "-D", "--undefined-only", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    assert "GOMP_parallel" in symbols, "barrier_ops._C was built without -fopenmp"


def _aten_gemm_calls_in_forward():
    q, k, v, _, _ = make_inputs(Case(B=1, H=2, Hkv=2, T=200, d=8), requires_grad=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        barrier_ops.token_margins(q, k, v)
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm_"))


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.mkl.is_available()),
                    reason="the direct BLAS path is expected where torch links MKL (Linux x86-64)")
def test_block_gemms_bypass_the_dispatcher():
    # One dispatcher round trip per 64 x 128 block GEMM cost ~15% of a
    # fwd+bwd at T = 1024; the kernels call the BLAS directly instead.
    assert _aten_gemm_calls_in_forward() == 0


@pytest.mark.skipif(os.environ.get("BARRIER_OPS_CPU_GEMM") != "aten",
                    reason="runs inside test_aten_gemm_fallback_matches_reference's subprocess")
def test_requested_aten_fallback_is_taken():
    assert _aten_gemm_calls_in_forward() > 0, "BARRIER_OPS_CPU_GEMM=aten did not take the ATen path"


def test_aten_gemm_fallback_matches_reference():
    # The fused kernels call the BLAS that torch exports; where there is none
    # they use ATen's addmm. BARRIER_OPS_CPU_GEMM=aten forces that path; it is
    # read once per process, so the grid's value and gradient tests run again
    # in a subprocess with it set.
    env = dict(os.environ, BARRIER_OPS_CPU_GEMM="aten")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_ops.py::test_margins_and_gradients_match_reference",
         "tests/test_ops.py::test_barrier_loss_matches_reference",
         "tests/test_cpu_kernels.py::test_requested_aten_fallback_is_taken"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
