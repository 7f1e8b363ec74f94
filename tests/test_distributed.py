"""Multi-process training with the barrier attached: 2 CPU processes, gloo, 127.0.0.1 only.

Each rank runs half of the batch; the gradients every rank ends with must
equal one process running the whole batch:
* nanoGPT + DDP (mean normalisation, equal halves),
* nanoGPT + FSDP2 ``fully_shard`` (coupling="weights" reads the gathered weights),
* Llama (GQA, padded) + DDP with Trainer's ``num_items_in_batch`` rule.
One spawn runs all three to pay the process start-up once.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _integration_helpers_dist as D

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
]

WORLD = 2


def _has_cpu_fsdp2() -> bool:
    # FSDP2 became public (torch.distributed.fsdp.fully_shard) in torch 2.6,
    # with CPU/gloo support; torch 2.4's private version needs CUDA.
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("dist")
    modes = ("ddp", "fsdp", "hf") if _has_cpu_fsdp2() else ("ddp", "hf")
    mp.start_processes(D.worker, args=(WORLD, _free_port(), modes, str(out)), nprocs=WORLD, join=True,
                       start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _check(results, mode, tol):
    want = D.single_process_grads(mode)
    for rank, per_rank in enumerate(results):
        got = per_rank[mode]
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        assert got.keys() == want.keys()
        for name in want:
            err = (got[name] - want[name]).abs().max() / want[name].abs().max().clamp(min=1e-12)
            assert err < tol, f"rank {rank} {mode} {name}: relative error {err:.3e}"


def test_ddp_gradients_equal_single_process(distributed_results):
    _check(distributed_results, "ddp", 1e-10)


@pytest.mark.skipif(not _has_cpu_fsdp2(), reason="FSDP2 on CPU needs torch>=2.6 (public fully_shard)")
def test_fsdp2_gradients_equal_single_process(distributed_results):
    got = distributed_results[0]["fsdp"]
    if isinstance(got, str) and ("not supported" in got.lower() or "NotImplementedError" in got):
        pytest.skip(f"FSDP2 on CPU/gloo not supported by this torch: {got.splitlines()[-1]}")
    _check(distributed_results, "fsdp", 1e-10)


def test_hf_ddp_with_num_items_in_batch_equals_single_process(distributed_results):
    # The HF loss is float32 (logits are upcast for the cross-entropy).
    _check(distributed_results, "hf", 1e-5)
