"""The CPU benchmark's FLOP count (benchmarks/bench_cpu.py; derivation in docs/benchmarks.md)."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_barrier_flops_is_attention_with_value_width_2d_plus_1(bench):
    # T^2 (10 d + 3) per (b, h): 643 T^2 at d = 64.
    assert bench.barrier_flops(1, 1, 1024, 64) == 1024**2 * 643
    assert bench.barrier_flops(2, 3, 512, 32) == 6 * 512**2 * (10 * 32 + 3)
    assert bench.barrier_flops(1, 1, 256, 64) == bench.attention_flops(1, 1, 256, 64, dv=129)


def test_attention_flops_causal_halves_each_gemm(bench):
    # Five T x T GEMMs of inner width d or dv, 2 T^2 n each, halved by causality.
    d, T = 64, 2048
    assert bench.attention_flops(1, 1, T, d) == T * T * 7 * d
    assert bench.attention_flops(1, 4, T, d, dv=32) == 4 * T * T * (4 * d + 3 * 32)


def test_flop_ratio_barrier_over_attention_at_d64(bench):
    ratio = bench.barrier_flops(1, 4, 4096, 64) / bench.attention_flops(1, 4, 4096, 64)
    assert ratio == pytest.approx(643 / 448)
    assert round(ratio, 2) == 1.44


def test_roofline_fields_from_timings(bench):
    row = {"T": 1024, "B": 1, "H": 4, "d": 64,
           "fused": {"fwd_bwd_s": 0.05}, "attention": {"fwd_bwd_s": 0.04}}
    bench._add_roofline(row, ["fused", "attention"], sgemm=100.0)
    assert row["fused"]["fwd_bwd_gflops"] == pytest.approx(4 * 1024**2 * 643 / 0.05 / 1e9)
    assert row["fused"]["pct_of_sgemm"] == pytest.approx(row["fused"]["fwd_bwd_gflops"])
    assert row["fused_over_attention_time"] == pytest.approx(1.25)
    assert row["barrier_over_attention_flops"] == pytest.approx(643 / 448)
