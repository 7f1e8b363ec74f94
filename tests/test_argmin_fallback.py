"""support_token_argmin's ATen kernel (CUDA tensors in a build without CUDA
kernels) against the fused CPU kernel, which has the same contract."""

import pytest
import torch

import barrier_ops  # noqa: F401  (registers the ops)
from barrier_ops.ops import support_token_argmin_aten

_ops = torch.ops.barrier_ops


def _margins(shape, dtype, generator):
    # Few distinct values, so ties are common; NaN and +inf sprinkled in.
    m = torch.randint(0, 4, shape, generator=generator).to(dtype)
    u = torch.rand(shape, generator=generator)
    m[u < 0.15] = float("nan")
    m[(u >= 0.15) & (u < 0.3)] = float("inf")
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5), (4, 1), (2, 2, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_aten_kernel_matches_the_fused_cpu_kernel(dtype, shape, masked):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        margins = _margins(shape, dtype, g)
        mask = None
        if masked:
            mask = torch.rand(shape[0], shape[-1], generator=g) < 0.6
            mask[0] = False  # a row with no valid position
        expected = _ops.support_token_argmin(margins, mask)
        got = support_token_argmin_aten(margins, mask)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0, equal_nan=True)
        assert got[1].dtype == margins.dtype


def test_every_build_answers_support_token_argmin_on_cuda_tensors():
    # Compiled CUDA kernel or the ATen fallback: never the dispatcher's
    # "no kernel for CUDA" error in a CPU-only build on a GPU machine.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("barrier_ops::support_token_argmin", "CUDA")


def test_aten_kernel_checks_its_arguments():
    with pytest.raises(ValueError, match="margins"):
        support_token_argmin_aten(torch.zeros(3), None)
