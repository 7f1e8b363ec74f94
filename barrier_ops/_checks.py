"""Argument validation shared by the public API, the fake kernels and the reference.

Every check raises ValueError (wrong shape or value) or TypeError (wrong dtype or
type) and names the argument and what was expected. The C++ ops repeat these
checks with TORCH_CHECK_VALUE/TORCH_CHECK_TYPE so that direct `torch.ops` calls
fail just as clearly.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


# Integer masks follow the Hugging Face attention_mask convention: nonzero = real token.
INT_MASK_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def as_bool_mask(key_padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An integer mask (nonzero = real token, as HF's attention_mask) as bool; others as they are.

    Float masks are not converted: an additive mask (0 / -inf) read as
    "nonzero = real" would invert it, so they fail the check with a hint.
    """
    if isinstance(key_padding_mask, torch.Tensor) and key_padding_mask.dtype in INT_MASK_DTYPES:
        return key_padding_mask != 0
    return key_padding_mask


def _check_mask(
    key_padding_mask: Optional[torch.Tensor], B: int, T: int, device: torch.device, owner: str,
    allow_int: bool = True,
) -> None:
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(
            f"key_padding_mask must be None or a torch.Tensor, got {type(key_padding_mask).__name__}"
        )
    if key_padding_mask.dtype != torch.bool and not (
        allow_int and key_padding_mask.dtype in INT_MASK_DTYPES
    ):
        accepted = (
            " or an integer tensor (nonzero = real token, as HF's attention_mask)" if allow_int else ""
        )
        hint = (
            "; for an additive float mask (0 = real, -inf = padded) pass mask == 0"
            if key_padding_mask.is_floating_point() else ""
        )
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = real token){accepted}, "
            f"got {key_padding_mask.dtype}{hint}"
        )
    if tuple(key_padding_mask.shape) != (B, T):
        raise ValueError(
            f"key_padding_mask must have shape [B, T]=[{B}, {T}], got {_shape(key_padding_mask)}"
        )
    if key_padding_mask.device != device:
        raise ValueError(
            f"key_padding_mask must be on {owner}'s device {device}, got {key_padding_mask.device}"
        )


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coupling: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
) -> None:
    """Shapes, dtypes and devices of an attention layer's q, k, v, coupling and mask.

    Under an active torch.autocast for the inputs' device, the ops' autocast
    kernels cast q, k, v and the coupling to one dtype first, so mixed float
    dtypes are accepted here and checked again after the cast.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (SDPA layout [B, H, T, d]), got shape {_shape(t)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}"
            )
    # The ops register autocast kernels for CPU and CUDA only.
    autocast = q.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(q.device.type)
    if not autocast and (k.dtype != q.dtype or v.dtype != q.dtype):
        raise TypeError(
            f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    B, H, T, d = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"q, k and v must share the batch size B, got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
        )
    if k.shape[2] != T or v.shape[2] != T:
        hint = ""
        if k.shape[1] == q.shape[1] == v.shape[1]:
            # [B, T, H, d] projections not yet transposed share dim 1 (T) and
            # differ in dim 2 (H vs Hkv). With H == Hkv that layout cannot be
            # told apart from SDPA's: it is read as H=T heads of H tokens.
            hint = (
                "; they share dim 1 instead: if they are in the [B, T, H, d] layout of a "
                "projection, pass q.transpose(1, 2) etc. (SDPA layout [B, H, T, d])"
            )
        raise ValueError(
            f"q, k and v must share the sequence length T (dim 2), got q {_shape(q)}, k {_shape(k)}, "
            f"v {_shape(v)}{hint}"
        )
    if k.shape[3] != d:
        raise ValueError(
            f"k must have the head dim d of q (dim 3), got q {_shape(q)} and k {_shape(k)}"
        )
    if v.shape[1] != k.shape[1]:
        raise ValueError(
            f"k and v must have the same number of kv heads (dim 1), got k {_shape(k)} and v {_shape(v)}"
        )
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"the number of query heads H={H} (q dim 1) must be a multiple of the kv heads Hkv={Hkv} (k dim 1)"
        )
    if d == 0:
        raise ValueError("the head dim d must be at least 1")
    dv = v.shape[3]
    if coupling is None:
        if dv != d:
            raise ValueError(
                f"coupling=None means A_h = I and needs v's head dim dv == d, got d={d}, dv={dv}; "
                "pass a [H] or [H, d, dv] coupling"
            )
    else:
        if not isinstance(coupling, torch.Tensor):
            raise TypeError(
                f"coupling must be None or a torch.Tensor, got {type(coupling).__name__}"
            )
        if coupling.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"coupling must be float32, float64, bfloat16 or float16, got {coupling.dtype}"
            )
        if not autocast and coupling.dtype != q.dtype:
            raise TypeError(
                f"coupling must have the dtype of q ({q.dtype}), got {coupling.dtype}"
            )
        if coupling.device != q.device:
            raise ValueError(
                f"coupling must be on q's device {q.device}, got {coupling.device}"
            )
        if tuple(coupling.shape) not in ((H,), (H, d, dv)):
            raise ValueError(
                f"coupling must have shape [H]=[{H}] (per-head scalar) or [H, d, dv]=[{H}, {d}, {dv}], "
                f"got {_shape(coupling)}"
            )
        if coupling.dim() == 1 and dv != d:
            raise ValueError(
                f"a per-head scalar coupling [H] means A_h = a_h * I and needs v's head dim dv == d, "
                f"got d={d}, dv={dv}; pass an [H, d, dv] coupling"
            )
    _check_mask(key_padding_mask, B, T, q.device, "q")


def _real_number(value, name: str) -> float:
    """A Python or NumPy real number as a float (bools are not numbers here).

    Under ``torch.compile(dynamic=True)`` a float argument arrives as a
    ``torch.SymFloat``: it is returned as it is, so that the checks below stay
    symbolic (guards) instead of specialising or breaking the graph.
    """
    if isinstance(value, torch.SymFloat):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _finite(x) -> bool:
    # Comparisons, not math.isfinite: they also work on a symbolic float
    # (torch.compile dynamic=True), and NaN fails both.
    return -math.inf < x < math.inf


def resolve_scale(scale: Optional[float], d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    scale = _real_number(scale, "scale")
    if not (scale > 0.0 and _finite(scale)):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    return scale


def check_eps(eps: float) -> float:
    eps = _real_number(eps, "eps")
    if not (eps > 0.0 and _finite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    return eps


# Below eps the barrier is quadratic, psi(m) ~ (m / eps)^2 / 2 for m << -eps.
# eps must leave room in the margins' dtype: the penalty of a margin as low as
# _MARGIN_FLOOR, summed over _TOKEN_CEILING positions, stays finite when
# eps >= min_eps(dtype) (float32: 1.2e-9; float64: 1.7e-144).
_MARGIN_FLOOR = 1e6
_TOKEN_CEILING = 1e9


def min_eps(margin_dtype: torch.dtype) -> float:
    """The smallest eps whose quadratic barrier stays finite in ``margin_dtype`` (see above)."""
    # sqrt(max) first: 2 * max overflows.
    return _MARGIN_FLOOR * math.sqrt(_TOKEN_CEILING / 2.0) / math.sqrt(torch.finfo(margin_dtype).max)


def check_eps_for_dtype(eps: float, input_dtype: torch.dtype) -> float:
    """check_eps, and eps large enough for the margins' dtype (float32, or float64 inputs)."""
    eps = check_eps(eps)
    acc = margin_dtype(input_dtype)
    floor = min_eps(acc)
    if eps < floor:
        raise ValueError(
            f"eps={eps} is too small for {str(acc).replace('torch.', '')} margins: below eps the "
            f"barrier grows like (m / eps)^2 / 2 and would overflow to inf (a NaN loss at weight "
            f"0); use eps >= {floor:.2g} (finite for margins down to -{_MARGIN_FLOOR:.0e} over "
            f"{_TOKEN_CEILING:.0e} positions){'' if acc == torch.float64 else ', or float64 inputs'}"
        )
    return eps


def check_target_margin(target_margin: Optional[float], eps: float) -> Optional[float]:
    """None (the paper's barrier) or a finite target margin m0 > eps."""
    if target_margin is None:
        return None
    m0 = _real_number(target_margin, "target_margin")
    if not (_finite(m0) and m0 > eps):
        raise ValueError(
            f"target_margin must be None or a finite number > eps={eps}, got {m0}"
        )
    return m0


# The public causal argument -> the op schemas' spelling.
CAUSAL_MODES = {True: "inclusive", False: "none", "strict": "strict"}


def check_causal(causal: Union[bool, str]) -> str:
    """``True`` (s <= t), ``"strict"`` (s < t) or ``False`` (all keys) -> the op's string."""
    if isinstance(causal, bool) or (isinstance(causal, str) and causal == "strict"):
        return CAUSAL_MODES[causal]
    raise ValueError(f"causal must be True, False or 'strict', got {causal!r}")


def check_causal_mode(causal: str) -> str:
    """The op schemas' spelling: "inclusive", "strict" or "none"."""
    if causal not in CAUSAL_MODES.values():
        raise ValueError(
            f"causal must be one of {tuple(CAUSAL_MODES.values())} at the op level, got {causal!r}"
        )
    return causal


def check_weight(weight: float) -> float:
    weight = _real_number(weight, "weight")
    if not (weight >= 0.0 and _finite(weight)):
        raise ValueError(f"weight must be a finite number >= 0, got {weight}")
    return weight


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    return reduction


def check_margins_and_mask(
    margins: torch.Tensor, key_padding_mask: Optional[torch.Tensor]
) -> None:
    if not isinstance(margins, torch.Tensor):
        raise TypeError(f"margins must be a torch.Tensor, got {type(margins).__name__}")
    if not margins.is_floating_point():
        raise TypeError(f"margins must be a floating-point tensor, got {margins.dtype}")
    if margins.dim() not in (2, 3):
        raise ValueError(
            f"margins must be [B, T] or [B, H, T], got shape {_shape(margins)}"
        )
    # The compiled op (and its fake kernel) takes bool masks; the public
    # wrapper converts integer masks first.
    _check_mask(key_padding_mask, margins.shape[0], margins.shape[-1], margins.device, "margins",
                allow_int=False)


def margin_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Margins and losses are float32, or float64 for float64 inputs."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def _concrete_on_cpu(t: torch.Tensor) -> bool:
    """A CPU tensor with real values (not traced: compile, opcheck's fake and functional passes)."""
    from torch._subclasses.fake_tensor import is_fake

    return (
        t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)
        and not torch._is_functional_tensor(t)
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def check_query_positions(
    query_positions: torch.Tensor, B: int, T: int, device: torch.device
) -> torch.Tensor:
    """A row set: int64 [B, R] on q's device, each entry a position in [0, T) or -1 (empty slot).

    The values are checked on CPU in eager mode only (elsewhere the check would
    cost a device sync or a graph break): there, and on every backend, an entry
    outside [0, T) is an empty slot, so a bad value never reads out of bounds.
    Returns the row set with such entries set to -1.
    """
    if not isinstance(query_positions, torch.Tensor):
        raise TypeError(
            f"query_positions must be None or a torch.Tensor, got {type(query_positions).__name__}"
        )
    if query_positions.dtype != torch.int64:
        raise TypeError(f"query_positions must be an int64 tensor, got {query_positions.dtype}")
    if query_positions.dim() != 2 or query_positions.shape[0] != B:
        raise ValueError(
            f"query_positions must have shape [B, R] with B={B}, got {_shape(query_positions)}"
        )
    if query_positions.device != device:
        raise ValueError(
            f"query_positions must be on q's device {device}, got {query_positions.device}"
        )
    in_range = (query_positions >= 0) & (query_positions < T)
    if _concrete_on_cpu(query_positions):
        if not bool((in_range | (query_positions == -1)).all()):
            raise ValueError(
                f"query_positions must hold positions in [0, T={T}) or -1 (empty slot), got values "
                f"from {int(query_positions.min())} to {int(query_positions.max())}"
            )
    return torch.where(in_range, query_positions, torch.full_like(query_positions, -1))
