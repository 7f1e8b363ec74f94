"""The barrier's options as one validated value: :class:`BarrierOptions`.

The public entry points (the ops' Python functions and :func:`barrier_ops.attach`)
build it once from their keywords; everything below them (the handle, the
layer state, the composite, the reduction, :func:`barrier_ops.barriers.penalty`)
receives the object and reads the fields it uses. A new option is one field
here (with its check in ``__post_init__``) plus its use: no signature in
between changes. The C++ op schemas are the one exception: an option the op
itself must see is also a schema argument.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

from . import _checks

__all__ = ["BarrierOptions", "check_query_fraction", "ceil_fraction"]


def check_query_fraction(query_fraction) -> float:
    """A real number f in (0, 1]: the share of query rows a sampled barrier computes."""
    f = _checks._real_number(query_fraction, "query_fraction")
    if not (0.0 < f <= 1.0):  # NaN fails too
        raise ValueError(f"query_fraction must be in (0, 1], got {query_fraction!r}")
    return f


# f * n in floating point can land just above an integer that the exact
# product equals (0.1 * 30 = 3.0000000000000004): shrink by a relative 2^-40
# (far above double rounding, far below any real fraction's excess) before
# the ceiling, so ceil(f * n) is the integer the user means.
_CEIL_SLACK = 1.0 - 2.0 ** -40


def ceil_fraction(f: float, n: int) -> int:
    """``ceil(f * n)`` robust to the rounding of ``f * n`` (see _CEIL_SLACK)."""
    return int(math.ceil(f * n * _CEIL_SLACK))


@dataclass(frozen=True)
class BarrierOptions:
    """What the barrier computes, validated once (frozen, hashable).

    Fields (the keywords of :func:`barrier_ops.margin_barrier_loss` and
    :func:`barrier_ops.attach` of the same names):
        eps: where psi turns from ``-log m`` to its quadratic extension (> 0).
        target_margin: None (the paper's barrier) or a finite ``m0 > eps``.
        causal: True, False or "strict"; None (attach only) means each
            layer's own causality.
        backend: "auto", "fused" or "sdpa".
        combine_heads: barrier on the layer margin ``1 - sum_h kappa_h``.
        query_fraction: the share ``f`` in (0, 1] of query rows drawn per call
            (docs/sampling.md); 1 computes every row.

    Invalid values raise ValueError/TypeError naming the field. Checks that
    need the inputs (eps against the margins' dtype) run where the inputs are.
    """

    eps: float = 1e-2
    target_margin: Optional[float] = None
    causal: Optional[Union[bool, str]] = True
    backend: str = "auto"
    combine_heads: bool = False
    query_fraction: float = 1.0

    def __post_init__(self):
        from .backends import BACKEND_NAMES  # backends imports the compiled ops

        eps = _checks.check_eps(self.eps)
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "target_margin", _checks.check_target_margin(self.target_margin, eps))
        if self.causal is not None:
            _checks.check_causal(self.causal)
        if not isinstance(self.backend, str) or self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {self.backend!r}")
        if not isinstance(self.combine_heads, bool):
            raise TypeError(f"combine_heads must be a bool, got {type(self.combine_heads).__name__}")
        object.__setattr__(self, "query_fraction", check_query_fraction(self.query_fraction))

    @property
    def sampled(self) -> bool:
        """Whether a call computes a random subset of the query rows (query_fraction < 1)."""
        return self.query_fraction < 1.0

    def causal_mode(self, layer_causal: Optional[Union[bool, str]] = None) -> str:
        """The op's spelling of causality: this option's, or ``layer_causal`` when it is None."""
        causal = layer_causal if self.causal is None else self.causal
        return _checks.check_causal(causal)

    def replace(self, **changes) -> "BarrierOptions":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
