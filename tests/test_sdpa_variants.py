"""The sdpa backend's value-split variants (SDPA_VALUE_SPLIT): same kappa, other kernels.

V' = [k | w | g | outlier weights | rest weight] is 2d + 6 wide. "whole" hands
it to one SDPA call; "equal" cuts it into parts as wide as q' (FlashAttention's
rule on CUDA, the CPU flash kernel's everywhere); "narrow" into parts of at
most 128 columns (cuDNN's and the memory-efficient kernel's fast path on
CUDA). Every part shares q', k' and so the softmax weights: kappa and its
gradients must not depend on the split. Checked here on CPU for every dtype,
causality, padding and row sets, with the CPU layouts and with the CUDA
layouts (forced; CPU then runs them on its math path, still exact). Which
kernel each layout reaches on CUDA is measured by benchmarks/gpu_check.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from barrier_ops import _sdpa
from _cases import assert_close
from test_sdpa_rows import CAUSAL, DTYPES, gather_rows, problem, row_positions, scale_grad, valid_rows
from barrier_ops import reference as ref

SPLITS = ["equal", "narrow"]
REF_CAUSAL = {"inclusive": True, "strict": "strict", "none": False}

# max|split - whole| / max|whole|, values and each gradient. Measured on CPU
# (torch 2.15) over test_split_gives_the_kappa_of_the_whole_value, worst of
# kappa, dq, dk, dv: float64 3.8e-15, float32 2.2e-6, bf16 1.3e-2, fp16 1.6e-3
# (each part is its own kernel call, blocked and rounded over other widths).
# A uniform 2% error in one part's gradient fails in every dtype but bf16
# (test_the_split_comparison_catches_an_error_in_one_part).
SPLIT_TOL = {
    torch.float64: 1e-12,
    torch.float32: 5e-6,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}


@pytest.fixture
def split_mode(monkeypatch):
    def use(mode, device_type=None):
        monkeypatch.setattr(_sdpa, "SDPA_VALUE_SPLIT", mode)
        if device_type is not None:  # lay V' out as on that device type
            parts = _sdpa.value_parts
            monkeypatch.setattr(_sdpa, "value_parts",
                                lambda _device_type, qk, v, split="whole": parts(device_type, qk, v, split))
    return use


def kappa_and_grads(dtype, causal, masked, rows, seed=0, T=45, d=8):
    (q, k, v), mask = problem(dtype, T=T, d=d, masked=masked, seed=seed, key_mean=2.0, sink=6.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    positions = row_positions(2, T, 17, empty=2, seed=seed) if rows else None
    query = q if positions is None else gather_rows(q, positions)
    kappa = _sdpa.kappa_sdpa(query, k, v.to(acc), 1 / math.sqrt(d), causal, mask, positions)
    valid = ref.valid_positions(2, T, REF_CAUSAL[causal], mask, q.device)
    live = (valid if positions is None else valid_rows(valid, positions))[:, None, :]
    kappa = torch.where(live, kappa, torch.zeros_like(kappa))
    beta = torch.randn(kappa.shape, generator=torch.Generator().manual_seed(seed + 9), dtype=kappa.dtype)
    return [kappa.detach()] + list(torch.autograd.grad((kappa * beta).sum(), (q, k, v)))


def assert_same(got, want, tol):
    for name, a, b in zip(("kappa", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, tol, name)


@pytest.mark.parametrize("layout", ["cpu", "cuda"])
@pytest.mark.parametrize("rows", [False, True], ids=["all-rows", "row-set"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", SPLITS)
def test_split_gives_the_kappa_of_the_whole_value(split, dtype, causal, masked, rows, layout,
                                                   split_mode):
    split_mode("whole", layout)
    want = kappa_and_grads(dtype, causal, masked, rows)
    split_mode(split, layout)
    got = kappa_and_grads(dtype, causal, masked, rows)
    assert_same(got, want, SPLIT_TOL[dtype])


@pytest.mark.parametrize("split", SPLITS)
def test_split_with_d_64_and_a_sink_in_bf16(split, split_mode):
    # The real width: d = 64 makes V' 134 wide, in two or three parts.
    split_mode("whole")
    want = kappa_and_grads(torch.bfloat16, "inclusive", True, True, T=70, d=64)
    split_mode(split)
    got = kappa_and_grads(torch.bfloat16, "inclusive", True, True, T=70, d=64)
    assert_same(got, want, SPLIT_TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_the_split_comparison_catches_an_error_in_one_part(dtype, split_mode, monkeypatch):
    split_mode("whole")
    want = kappa_and_grads(dtype, "inclusive", True, True)
    split_mode("equal")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def second_part_off(query, key, value, **kw):
        calls.append(value.shape[-1])
        out = sdpa(query, key, value, **kw)
        return scale_grad(out, 1.02) if len(calls) == 2 else out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", second_part_off)
    got = kappa_and_grads(dtype, "inclusive", True, True)
    assert len(calls) >= 2
    with pytest.raises(AssertionError):
        assert_same(got, want, SPLIT_TOL[dtype])


# ---------------------------------------------------------------------------
# The layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("split", ["whole"] + SPLITS)
@pytest.mark.parametrize("qk", [1, 8, 9, 64, 65, 128, 129, 256])
@pytest.mark.parametrize("v", [4, 22, 134, 262])
def test_parts_cover_the_value_once(device_type, split, qk, v):
    qk_width, parts = _sdpa.value_parts(device_type, qk, v, split)
    assert qk_width >= qk
    assert parts[0][0] == 0 and parts[-1][1] == v
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])), parts
    assert all(end > first and width >= end - first for first, end, width in parts), parts
    if device_type == "cuda":
        assert qk_width % 8 == 0 and all(width % 8 == 0 for *_, width in parts)
    else:  # the CPU flash kernel: one width for q', k' and every part
        assert all(width == qk_width for *_, width in parts)
    if split == "whole":
        assert len(parts) == 1
    if split == "equal":
        assert all(width == qk_width for *_, width in parts)
    if split == "narrow" and device_type == "cuda":
        assert all(width <= _sdpa.NARROW_WIDTH for *_, width in parts)


# The CUDA layouts docs/ops.md reads its kernel table from: (q' width, part widths).
CUDA_LAYOUTS = [
    # d, 16-bit (hi/lo keys), key padding column, split -> (q', parts)
    (64, True, False, "whole", (128, (136,))),
    (64, True, False, "equal", (128, (128, 128))),
    (64, True, False, "narrow", (128, (128, 8))),
    (64, True, True, "whole", (136, (136,))),
    (64, True, True, "equal", (136, (136,))),
    (64, True, True, "narrow", (136, (128, 8))),
    (64, False, False, "whole", (64, (136,))),
    (64, False, False, "equal", (64, (64, 64, 64))),
    (64, False, False, "narrow", (64, (128, 8))),
    (128, True, False, "whole", (256, (264,))),
    (128, True, False, "equal", (256, (256, 256))),
    (128, True, False, "narrow", (256, (128, 128, 8))),
    (128, True, True, "equal", (264, (264,))),
    (128, False, False, "narrow", (128, (128, 128, 8))),
]


@pytest.mark.parametrize("d, half, masked, split, expected", CUDA_LAYOUTS)
def test_cuda_layouts(d, half, masked, split, expected):
    got = _sdpa.value_layout(torch.device("cuda"), d, masked, split_keys=half, split=split)
    assert got == (expected[0], expected[1][0] if split == "whole" else expected[1])


@pytest.mark.parametrize("split", ["whole"] + SPLITS)
@pytest.mark.parametrize("rows", [False, True], ids=["all-rows", "row-set"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_cpu_part_reaches_the_cpu_flash_kernel(dtype, masked, rows, split, split_mode,
                                                     monkeypatch):
    # Which kernel runs is part of the result: a part wider than q' would send
    # SDPA on CPU to its T x T math path (SDPBackend 0 math, 1 flash).
    split_mode(split)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def spy(query, key, value, **kw):
        calls.append((value.shape[-1], torch._fused_sdp_choice(query, key, value, **kw)))
        return sdpa(query, key, value, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        (q, k, v), mask = problem(dtype, T=40, d=64, masked=masked)
        positions = row_positions(2, 40, 9) if rows else None
        query = q if positions is None else gather_rows(q, positions)
        _sdpa.kappa_sdpa(query, k, v.float(), 0.125, "inclusive", mask, positions)
    expected_calls = {"whole": 1, "equal": 3 if dtype == torch.float32 else 2, "narrow": 2}[split]
    assert len(calls) == expected_calls, calls
    assert all(choice == 1 for _, choice in calls), calls


def test_auto_is_whole_until_a_gpu_measures_the_split(monkeypatch):
    monkeypatch.setattr(_sdpa, "SDPA_VALUE_SPLIT", "auto")
    assert _sdpa.value_split(torch.device("cpu")) == "whole"
    assert _sdpa.value_split(torch.device("cuda")) == "whole"
    assert _sdpa.value_split(torch.device("meta")) == "whole"


def test_an_unknown_split_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_sdpa, "SDPA_VALUE_SPLIT", "halves")
    (q, k, v), _ = problem(torch.float32, T=5)
    with pytest.raises(ValueError, match="SDPA_VALUE_SPLIT.*'halves'"):
        _sdpa.kappa_sdpa(q, k, v, 0.3, "inclusive", None)
    with pytest.raises(ValueError, match="split must be one of"):
        _sdpa.value_parts("cpu", 8, 22, "halves")


def test_the_environment_variable_sets_the_split():
    env = dict(os.environ, BARRIER_OPS_SDPA_VALUE_SPLIT="narrow")
    out = subprocess.run(
        [sys.executable, "-c", "from barrier_ops import _sdpa; print(_sdpa.SDPA_VALUE_SPLIT)"],
        env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "narrow"
