"""The CUDA build registers a CUDA kernel for every fused op (runs without a GPU).

token_margins and margin_barrier_loss are CompositeImplicitAutograd over kappa
(or SDPA): they run on every device without a kernel of their own.

CI builds the extension with BARRIER_OPS_CUDA=1 on a machine without a GPU and
sets BARRIER_OPS_EXPECT_CUDA=1; elsewhere this test is skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

OPS = ["kappa", "kappa_backward", "support_token_argmin"]
COMPOSITES = ["token_margins", "margin_barrier_loss"]


@pytest.mark.skipif(os.environ.get("BARRIER_OPS_EXPECT_CUDA") != "1",
                    reason="set BARRIER_OPS_EXPECT_CUDA=1 where the CUDA build is expected")
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    import barrier_ops  # noqa: F401  (loads the extension)

    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"barrier_ops::{op}", "CUDA"), (
        f"barrier_ops::{op} has no CUDA kernel: was the extension built with BARRIER_OPS_CUDA=1?"
    )


@pytest.mark.parametrize("op", COMPOSITES)
def test_composite_ops_need_no_device_kernel(op):
    import barrier_ops  # noqa: F401

    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        f"barrier_ops::{op}", "CompositeImplicitAutograd"
    )
