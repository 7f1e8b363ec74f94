"""The CUDA precision checks (tests/_precision_checks.py) have teeth, shown on CPU.

tests/test_cuda.py runs these checks on the GPU only. Here the same bodies run
on CPU, where the sdpa backend is the same Python code as on CUDA (centring,
the float16 dO rescale, the attention form) and the fused backend the same
ATen glue around the kernel: each passes as the code stands and fails on a
planted defect (a missing centring, a missing rescale, a detached or
transposed coupling gradient, a 4% gradient error under the old bf16
tolerance). The defects are planted by patching private helpers; if one is
renamed, the patch target below must follow it.
"""

from __future__ import annotations

import pytest
import torch

from barrier_ops import _sdpa
from _cases import GRID, Case
from _precision_checks import (
    check_against_reference,
    sdpa_fp16_without_loss_scale_check,
    sdpa_real_scale_check,
)

MATRIX_CASE = Case(H=2, Hkv=1, T=37, d=40, coupling="matrix", masked=True)  # test_cuda's CUDA_GRID
SQUARE_MATRIX_CASE = Case(H=2, Hkv=2, T=97, d=16, coupling="matrix", masked=True, causal="strict",
                          combine_heads=True)


def _fails(fn):
    with pytest.raises(AssertionError):
        fn()


# ---------------------------------------------------------------------------
# Grid tolerances and coupling gradients (fused backend; the glue is shared)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [GRID[2], GRID[3], GRID[4], GRID[6], MATRIX_CASE, SQUARE_MATRIX_CASE],
                         ids=str)
def test_grid_check_with_coupling_gradients_passes_on_cpu(case, dtype):
    check_against_reference(case, dtype, "cpu")


def test_tightened_bf16_tolerance_catches_a_four_percent_gradient_error():
    def off_by_4_percent(name, g):
        return g * 1.04 if name == "q" else g

    case = GRID[3]
    check_against_reference(case, torch.bfloat16, "cpu", grad_tol=1e-1, perturb=off_by_4_percent)  # old
    _fails(lambda: check_against_reference(case, torch.bfloat16, "cpu", perturb=off_by_4_percent))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_coupling_check_catches_a_detached_coupling_gradient(dtype):
    def detached(name, g):
        return torch.zeros_like(g) if name == "coupling" else g

    _fails(lambda: check_against_reference(MATRIX_CASE, dtype, "cpu", perturb=detached))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_coupling_check_catches_a_transposed_or_scaled_coupling_gradient(dtype):
    def transposed(name, g):
        return g.transpose(-1, -2) if name == "coupling" else g

    def ten_percent_off(name, g):
        return g * 1.1 if name == "coupling" else g

    _fails(lambda: check_against_reference(SQUARE_MATRIX_CASE, dtype, "cpu", perturb=transposed))
    _fails(lambda: check_against_reference(MATRIX_CASE, dtype, "cpu", perturb=ten_percent_off))


# ---------------------------------------------------------------------------
# The sdpa backend at the real gradient scale
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mean", [3.0, 10.0])
def test_sdpa_real_scale_check_passes_on_cpu(dtype, mean):
    sdpa_real_scale_check(dtype, mean, True, "cpu")


def test_sdpa_real_scale_check_passes_on_cpu_under_strict_causality():
    sdpa_real_scale_check(torch.bfloat16, 10.0, "strict", "cpu")


def test_sdpa_real_scale_check_catches_a_missing_centring(monkeypatch):
    # The sdpa backend centres k and w on the mean of the keys left after the
    # outlier split; a zero mean is the uncentred form.
    monkeypatch.setattr(_sdpa, "_rest_means", lambda k, w, rest: (0.0, 0.0))
    _fails(lambda: sdpa_real_scale_check(torch.bfloat16, 10.0, True, "cpu"))


def test_sdpa_fp16_check_without_a_loss_scale_passes_on_cpu():
    sdpa_fp16_without_loss_scale_check("cpu")


def test_sdpa_fp16_check_without_a_loss_scale_catches_a_missing_rescale(monkeypatch):
    def no_rescale(ctx, do):
        return do, torch.ones((), dtype=torch.float32, device=do.device)

    monkeypatch.setattr(_sdpa._ScaleOutputGrad, "backward", staticmethod(no_rescale))
    _fails(lambda: sdpa_fp16_without_loss_scale_check("cpu"))

