"""Multi-process training with the barrier attached: 2 CPU processes, gloo on the loopback
device, rendezvous through a file (no network port to choose).

Each rank runs half of the batch; the gradients every rank ends with must
equal one process running the whole batch:
* nanoGPT + DDP (mean normalisation, equal halves),
* nanoGPT + FSDP2 ``fully_shard`` (coupling="weights" reads the gathered weights),
* Llama (GQA, padded) + DDP with Trainer's ``num_items_in_batch`` rule.
One spawn runs all three to pay the process start-up once.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.torch_version import TorchVersion

import _integration_helpers_dist as D
from _cases import assert_grads_close

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
]

WORLD = 2
# The whole spawn (start-up, three modes, teardown) takes ~12 s on 2 cores; a
# rank stuck in a collective errors after D.COLLECTIVE_TIMEOUT_S, and anything
# else (a dead rank's partner, a deadlock outside gloo) is cut off here.
DEADLINE_S = 300

# FSDP2 became public (torch.distributed.fsdp.fully_shard) in torch 2.6, with
# CPU/gloo support; torch 2.4's private version needs CUDA. This version test is
# the only reason to skip it: on torch >= 2.6 any failure of the run is a failure.
HAS_CPU_FSDP2 = TorchVersion(torch.__version__) >= (2, 6)


def run_workers(fn, args, nprocs, deadline_s, started=None):
    """mp.start_processes(spawn) bounded in time: every child has exited when this returns.

    A child that raises fails the caller with its traceback (torch terminates the
    others); children still running at the deadline are terminated (then killed)
    and the caller fails. started: a list that receives the child processes.
    """
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    if started is not None:
        started.extend(ctx.processes)
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                alive = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
                pytest.fail(f"ranks {alive} still running after {deadline_s} s: terminated", pytrace=False)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("dist")
    modes = ("ddp", "fsdp", "hf") if HAS_CPU_FSDP2 else ("ddp", "hf")
    # Rendezvous through a file in a fresh directory: no port to pick, so no race with
    # another process taking it between the choice and the bind (gloo's own sockets
    # bind port 0 themselves).
    store = f"file://{out / 'store'}"
    run_workers(D.worker, (WORLD, store, modes, str(out)), WORLD, DEADLINE_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _check(results, mode, tol):
    want = D.single_process_grads(mode)
    for rank, per_rank in enumerate(results):
        got = per_rank[mode]
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        assert_grads_close(got, want, tol, f"rank {rank} {mode}")


def test_run_workers_bounds_a_hung_spawn_in_time():
    start, children = time.monotonic(), []
    with pytest.raises(pytest.fail.Exception, match="ranks \\[0, 1\\] still running after 2 s"):
        run_workers(D.hang, (), 2, 2, started=children)
    assert time.monotonic() - start < 20
    assert len(children) == 2
    for p in children:  # terminated by the deadline (SIGTERM), and reaped
        assert not p.is_alive() and p.exitcode == -signal.SIGTERM, p.exitcode


def test_ddp_gradients_equal_single_process(distributed_results):
    _check(distributed_results, "ddp", 1e-10)


@pytest.mark.skipif(not HAS_CPU_FSDP2, reason="FSDP2 on CPU needs torch>=2.6 (public fully_shard)")
def test_fsdp2_gradients_equal_single_process(distributed_results):
    _check(distributed_results, "fsdp", 1e-10)


def test_hf_ddp_with_num_items_in_batch_equals_single_process(distributed_results):
    # The HF loss is float32 (logits are upcast for the cross-entropy).
    _check(distributed_results, "hf", 1e-5)
