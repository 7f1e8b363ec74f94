"""Where kappa's O(T^2) work runs: the one place that maps a backend name to code.

* ``"fused"``: our compiled kernels (``torch.ops.barrier_ops.kappa``, CPU and CUDA).
* ``"sdpa"``: the attention form (docs/math.md) through PyTorch's
  ``scaled_dot_product_attention`` (any device torch runs on).
* ``"auto"``: :data:`AUTO` by device type, ``"sdpa"`` for devices not listed.

Every backend is a function ``(q, k, w, scale, causal, key_padding_mask,
query_positions=None) -> kappa [B, H, R]`` with q, k, w one slice per query
head and padded positions already zeroed; values at invalid positions may be
anything finite (the caller masks them). Without a row set R = T and row r is
position r. With one (``query_positions``, int64 [B, R]: a position in
[0, T) per row, -1 for an empty slot; docs/sampling.md), q holds only those
rows, [B, H, R, d], while k and w keep all T keys; causality compares a key's
index with the row's position, and the work must be O(R T d). To add a
backend, add it to :data:`BACKENDS`.
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
# Accuracy does not decide it with attention sinks (both within 0.03 of the
# reference, docs/ops.md "Accuracy"; sdpa's outlier split costs +10-18% on
# CPU), but 16-bit sdpa loses kappa when every key and value is large (std
# 20: 4.3 in bf16, fused 4e-4): fused should be the CUDA default unless it is
# much slower on the GPU.
AUTO: Dict[str, str] = {"cpu": "fused", "cuda": "sdpa"}

# Device types the fused kernels are compiled for.
FUSED_DEVICES = ("cpu", "cuda")

# Device types this build has fused kernels for: a build without CUDA kernels
# (setup.py builds them only when a GPU is visible or BARRIER_OPS_CUDA=1) has
# none for "cuda". Read once at import, so torch.compile traces a dict lookup.
FUSED_BUILT: Dict[str, bool] = {
    t: torch._C._dispatch_has_kernel_for_dispatch_key("barrier_ops::kappa", t.upper()) for t in FUSED_DEVICES
}


def fused_available(device: torch.device) -> bool:
    """Whether this build of the extension has fused kernels for ``device``."""
    return FUSED_BUILT.get(device.type, False)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` on ``device``.

    ValueError for a device the fused kernels do not support; RuntimeError for
    ``"fused"`` on a device this build has no kernels for. ``"auto"`` falls back
    to ``"sdpa"`` there.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        name = AUTO.get(device.type, "sdpa")
        return name if name != "fused" or fused_available(device) else "sdpa"
    if backend == "fused" and device.type not in FUSED_DEVICES:
        raise ValueError(
            f"backend='fused' has kernels for {FUSED_DEVICES} only, got a tensor on {device}; "
            "use backend='sdpa' (or 'auto')"
        )
    if backend == "fused" and not fused_available(device):
        raise RuntimeError(
            f"backend='fused': this build of barrier_ops has no {device.type.upper()} kernels (it was "
            f"compiled without them). Rebuild with BARRIER_OPS_CUDA=1 python3 -m pip install "
            "--no-build-isolation -e . (needs a CUDA toolkit), or use backend='sdpa' (or 'auto')"
        )
    return backend


def kappa_function(backend: str, device: torch.device) -> KappaFn:
    return BACKENDS[resolve_backend(backend, device)]
