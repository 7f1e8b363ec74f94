"""Where kappa's O(T^2) work runs: the one place that maps a backend name to code.

* ``"fused"``: our compiled kernels (``torch.ops.barrier_ops.kappa``, CPU and CUDA).
* ``"sdpa"``: the spec's attention form through PyTorch's
  ``scaled_dot_product_attention`` (any device torch runs on).
* ``"auto"``: :data:`AUTO` by device type, ``"sdpa"`` for devices not listed.

Every backend is a function ``(q, k, w, scale, causal, key_padding_mask) ->
kappa [B, H, T]`` with q, k, w one slice per query head and padded positions
already zeroed; values at invalid positions may be anything finite (the
caller masks them). To add a backend, add it to :data:`BACKENDS`.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from ._kappa import kappa_fused
from ._sdpa import kappa_sdpa

KappaFn = Callable[..., torch.Tensor]

BACKENDS: Dict[str, KappaFn] = {"fused": kappa_fused, "sdpa": kappa_sdpa}
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)

# backend="auto" by device type. CPU: the fused kernel's fwd+bwd is 1.4-2x
# faster than the attention form's for T = 512..4096 (docs/benchmarks.md).
# CUDA: sdpa until GPU measurements (benchmarks/gpu_check.sh) say otherwise.
AUTO: Dict[str, str] = {"cpu": "fused", "cuda": "sdpa"}

# Device types the fused kernels are compiled for.
FUSED_DEVICES = ("cpu", "cuda")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` on ``device`` (ValueError if it cannot run)."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        return AUTO.get(device.type, "sdpa")
    if backend == "fused" and device.type not in FUSED_DEVICES:
        raise ValueError(
            f"backend='fused' has kernels for {FUSED_DEVICES} only, got a tensor on {device}; "
            "use backend='sdpa' (or 'auto')"
        )
    return backend


def kappa_function(backend: str, device: torch.device) -> KappaFn:
    return BACKENDS[resolve_backend(backend, device)]
