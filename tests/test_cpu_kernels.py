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
import textwrap

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


def test_aten_gemm_fallback_matches_reference():
    # The fused kernels call the BLAS that torch exports; where there is none
    # they use ATen's addmm. BARRIER_OPS_CPU_GEMM=aten forces that path (read
    # once per process, hence the subprocess).
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, "tests")
        import barrier_ops
        from barrier_ops import reference
        from _cases import Case, GRAD_TOL, VALUE_TOL, assert_close, make_inputs, op_kwargs, upcast
        for case in [Case(B=2, H=4, Hkv=2, T=140, d=8, coupling="matrix", masked=True),
                     Case(B=1, H=2, Hkv=2, T=70, d=5, causal=False, coupling="scalar")]:
            for dtype in (torch.float32, torch.float64):
                q, k, v, A, mask = make_inputs(case, dtype=dtype)
                kw = op_kwargs(case, A, mask)
                loss = barrier_ops.margin_barrier_loss(q, k, v, **kw)
                leaves = [t for t in (q, k, v, A) if t is not None]
                grads = torch.autograd.grad(loss, leaves)
                ref_leaves = [upcast(t, torch.float64) for t in leaves]
                rq, rk, rv = ref_leaves[:3]
                rkw = op_kwargs(case, ref_leaves[3] if A is not None else None, mask)
                ref = reference.margin_barrier_loss_reference(rq, rk, rv, **rkw)
                ref_grads = torch.autograd.grad(ref, ref_leaves)
                assert_close(loss, ref, VALUE_TOL[dtype], "loss")
                for g, rg in zip(grads, ref_grads):
                    assert_close(g, rg, GRAD_TOL[dtype], "grad")
        from test_cpu_kernels import _aten_gemm_calls_in_forward
        assert _aten_gemm_calls_in_forward() > 0, "the ATen fallback was not taken"
        print("fallback ok")
        """
    )
    env = dict(os.environ, BARRIER_OPS_CPU_GEMM="aten")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fallback ok" in result.stdout
