"""experiments.trace_vs_exact loads run checkpoints with ``weights_only=True``: tensors and plain data load,
anything that would run code on unpickling is refused."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

pytest.importorskip("yaml")

from barrier_ops.experiments.config import load_config  # noqa: E402
from barrier_ops.experiments.model import CharGPT  # noqa: E402
from barrier_ops.experiments.trace_vs_exact import load_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but a call on unpickling all the same


def _checkpoint(run_dir, extra=None):
    cfg = load_config(os.path.join(ROOT, "configs", "chargpt", "cpu_demo.yaml"))
    vocab = list("abcdefgh")
    model = CharGPT(len(vocab), cfg.model)
    ckpt = {"model": model.state_dict(), "vocab": vocab, "config": cfg.to_dict()}  # what train.py saves
    if extra is not None:
        ckpt["extra"] = extra
    torch.save(ckpt, os.path.join(run_dir, "model.pt"))
    return model


def test_load_run_reads_a_training_checkpoint(tmp_path):
    model = _checkpoint(tmp_path)
    loaded, cfg = load_run(str(tmp_path))
    assert not loaded.training
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name


def test_load_run_refuses_a_checkpoint_that_runs_code(tmp_path):
    _checkpoint(tmp_path, extra=_RunsCode())
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_run(str(tmp_path))
