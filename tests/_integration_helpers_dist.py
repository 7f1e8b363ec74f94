"""Worker processes for tests/test_distributed.py (importable by torch.multiprocessing spawn)."""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import barrier_ops
import _integration_helpers as H

WEIGHT = 0.3


def batch(B=4, T=12, vocab=64, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def padded_batch(B=4, T=12, vocab=64, seed=6, lengths=(12, 5, 9, 3)):
    idx, _ = batch(B, T, vocab, seed)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return idx, mask, idx.masked_fill(mask == 0, -100)


def single_process_grads(mode):
    """What every distributed run must reproduce: one process, the whole batch."""
    if mode == "hf":
        model = H.tiny_llama()
        barrier_ops.attach(model, WEIGHT, coupling="weights")
        idx, mask, labels = padded_batch()
        num_items = int(labels[:, 1:].ne(-100).sum())
        model(input_ids=idx, attention_mask=mask, labels=labels, num_items_in_batch=num_items).loss.backward()
    else:
        model = H.tiny_nanogpt()
        barrier_ops.attach(model, WEIGHT, coupling="weights")
        idx, targets = batch()
        model(idx, targets)[1].backward()
    return H.grads(model)


def _rank_step(mode, rank, world):
    half = slice(2 * rank, 2 * rank + 2)
    if mode == "hf":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = H.tiny_llama()
        barrier_ops.attach(model, WEIGHT, coupling="weights")
        ddp = DDP(model)
        idx, mask, labels = padded_batch()
        # Trainer's rule with average_tokens_across_devices: num_items_in_batch counts every
        # rank's labels and the loss is multiplied by the world size (DDP averages gradients).
        num_items = int(labels[:, 1:].ne(-100).sum())
        out = ddp(input_ids=idx[half], attention_mask=mask[half], labels=labels[half], num_items_in_batch=num_items)
        (out.loss * world).backward()
        return H.grads(model)
    idx, targets = batch()
    model = H.tiny_nanogpt()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        barrier_ops.attach(model, WEIGHT, coupling="weights")
        ddp = DDP(model)  # keep a reference: a collected DDP takes its gradient all-reduce with it
        ddp(idx[half], targets[half])[1].backward()
        return H.grads(model)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        barrier_ops.attach(model, WEIGHT, coupling="weights")
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        model(idx[half], targets[half])[1].backward()
        return {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    raise ValueError(mode)


COLLECTIVE_TIMEOUT_S = 120  # a rank waiting on a partner that died or hangs errors after this


def worker(rank, world, init_method, modes, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pairs on the loopback device only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    try:
        for mode in modes:
            try:
                results[mode] = _rank_step(mode, rank, world)
            except Exception:  # reported to the test as a failure of this mode (the other modes still run)
                results[mode] = traceback.format_exc()
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def hang(rank):
    """A worker that never finishes (tests the spawn deadline)."""
    time.sleep(600)
