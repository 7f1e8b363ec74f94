"""The barrier functions on the margins: the one place that defines psi.

``psi`` is the paper's smooth log-barrier; ``target_margin`` turns it into a
hinge (docs/math.md, "The barrier" and "Target margin"). Both are
plain ATen expressions, so autograd derives their gradients and torch.compile
fuses them. To add a barrier variant, add it here and select it in
:func:`penalty` (from a field of :class:`barrier_ops.options.BarrierOptions`);
the ops and the integrations call :func:`penalty`, which calls :func:`barrier`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["psi", "barrier", "penalty"]


def psi(m: torch.Tensor, eps: float) -> torch.Tensor:
    """Smooth log-barrier: ``-log m`` for ``m >= eps``, its C2 quadratic extension below.

    Below ``eps``: ``-log eps - (m - eps)/eps + (m - eps)^2 / (2 eps^2)``, which
    matches value, slope and curvature at ``eps`` and is finite for every real
    ``m``, so a margin past the degeneracy boundary gives a large, finite loss
    whose gradient pushes it back.
    """
    t = (m - eps) / eps
    quadratic = (0.5 * t - 1.0) * t - math.log(eps)
    above = m >= eps
    # The inner where keeps the untaken log branch finite (and its gradient 0);
    # clamp(m, min=eps) would also zero the slope AT eps, where -1/eps is due.
    return torch.where(above, -torch.log(torch.where(above, m, torch.full_like(m, eps))), quadratic)


def barrier(m: torch.Tensor, eps: float, target_margin: Optional[float] = None) -> torch.Tensor:
    """The per-token penalty: ``psi(m)``, or its hinge at ``target_margin`` when given.

    With a target ``m0 > eps`` the penalty is the Bregman divergence of psi from
    ``m0`` below it and 0 above: ``psi(m) - psi(m0) - psi'(m0) (m - m0)`` for
    ``m < m0``, i.e. ``-log(m/m0) + m/m0 - 1`` on ``[eps, m0)``. Convex, >= 0,
    C1 at ``m0``; tokens at or above the target cost nothing.
    """
    value = psi(m, eps)
    if target_margin is None:
        return value
    m0 = float(target_margin)
    # psi(m0) = -log m0 and psi'(m0) = -1/m0, since m0 > eps.
    hinge = value + math.log(m0) + (m - m0) / m0
    # ~(m >= m0), not m < m0: a NaN margin takes the hinge branch and stays
    # NaN, instead of reading as "at the target" with a zero penalty.
    return torch.where(m >= m0, torch.zeros_like(hinge), hinge)


def penalty(m: torch.Tensor, options) -> torch.Tensor:
    """The per-token penalty the options ask for (:class:`barrier_ops.options.BarrierOptions`)."""
    return barrier(m, options.eps, options.target_margin)
