"""The CUDA build registers a CUDA kernel for every op (runs without a GPU).

CI builds the extension with BARRIER_OPS_CUDA=1 on a machine without a GPU and
sets BARRIER_OPS_EXPECT_CUDA=1; elsewhere this test is skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

OPS = ["token_margins", "margin_barrier_loss", "token_margins_backward", "support_token_argmin"]


@pytest.mark.skipif(os.environ.get("BARRIER_OPS_EXPECT_CUDA") != "1",
                    reason="set BARRIER_OPS_EXPECT_CUDA=1 where the CUDA build is expected")
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    import barrier_ops  # noqa: F401  (loads the extension)

    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"barrier_ops::{op}", "CUDA"), (
        f"barrier_ops::{op} has no CUDA kernel: was the extension built with BARRIER_OPS_CUDA=1?"
    )
