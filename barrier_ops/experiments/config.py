"""Experiment configuration: nested dataclasses loaded from YAML with strict, explicit errors."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the offending key."""


@dataclass
class DataConfig:
    path: Optional[str] = None  # None = built-in KJV corpus; else a WikiText-2 raw dir or train/valid/test .txt dir
    split: List[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])  # used for single-file corpora only


@dataclass
class ModelConfig:
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False


COUPLING_ALIASES = {"exact": "weights"}  # the experiment configs' old name for attach's coupling="weights"


@dataclass
class BarrierConfig:
    coupling: str = "weights"  # "weights": A_h = W_Q^h W_O^h of the layer (old name "exact"); "identity": A_h = I
    combine_heads: bool = True  # layer margin 1 - sum_h kappa_h (trace of the layer's diagonal block)
    eps: float = 0.01
    target_margin: Optional[float] = None  # None: the paper's barrier -log m; m0 > eps: the hinge psi_m0 (docs/math.md)
    # Share f of the query rows drawn per layer and training step (docs/sampling.md); 1 = every row.
    # Training only: evaluation measures every token's margin.
    query_fraction: float = 1.0

    def __post_init__(self):
        self.coupling = COUPLING_ALIASES.get(self.coupling, self.coupling)


@dataclass
class TrainConfig:
    lam: float = 0.0  # lambda_m; 0 = plain CE ("ce" mode), > 0 = CE + lambda_m * mean barrier ("barrier" mode)
    seed: int = 0
    steps: int = 500
    epochs: Optional[float] = None  # if set, overrides steps: epochs * len(train) / (batch_size * block_size)
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 16
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # bf16 autocast, used on CUDA only
    threads: int = 2  # torch.set_num_threads on CPU
    progress: bool = True


@dataclass
class EvalConfig:
    sigmas: List[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    # sigma = r * RMS(token embedding weights) of the model evaluated (its own scale), reported as "r<r>"
    rel_sigmas: List[float] = field(default_factory=list)
    # character substitution: each input character replaced, with probability p, by a uniformly drawn other
    # character of the vocabulary (targets stay clean); evaluated from the checkpoint after training, "s<p>"
    sub_rates: List[float] = field(default_factory=list)
    draws: int = 3
    batches: int = 32
    batch_size: int = 32
    split: str = "val"


@dataclass
class GridEntry:
    """One variant of a v2 sweep: a barrier (target margin or none) over several lambdas."""

    variant: str = "paper"  # a label for tables and plots: "ce", "paper", "target2", ...
    target_margin: Optional[float] = None
    lambdas: List[float] = field(default_factory=list)


@dataclass
class SweepConfig:
    lambdas: List[float] = field(default_factory=lambda: [0.0, 0.005, 0.01, 0.02, 0.05, 0.1])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    # v2: when set, the runs are the (variant, lambda) pairs of the grid (lambda 0 = CE) x seeds; `lambdas` is unused
    grid: List[GridEntry] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    name: str = "chargpt"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    barrier: BarrierConfig = field(default_factory=BarrierConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    @property
    def mode(self) -> str:
        return "barrier" if self.train.lam > 0 else "ce"

    @property
    def variant(self) -> str:
        """"ce" (lambda 0), "paper" (-log m) or "target<m0>" (the target-margin hinge)."""
        return variant_name(self.train.lam, self.barrier.target_margin)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def variant_name(lam: float, target_margin: Optional[float]) -> str:
    if lam == 0:
        return "ce"
    return "paper" if target_margin is None else f"target{target_margin:g}"


_YAML_ALIASES = {("train", "lambda"): "lam"}  # `lambda` is a Python keyword


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = getattr(typ, "__origin__", None)
    if typ is Any:
        return value
    if origin is list:
        (inner,) = typ.__args__
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if dataclasses.is_dataclass(inner):
            return [_build(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is not None and type(None) in getattr(typ, "__args__", ()):  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typ.__args__ if a is not type(None)]
        return _coerce(value, inner, where)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, str):  # PyYAML reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {typ}")


def _build(cls, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    types = typing.get_type_hints(cls)
    for key, value in raw.items():
        name = _YAML_ALIASES.get((where, key), key)
        if name not in hints:
            yaml_names = {v: k for (w, k), v in _YAML_ALIASES.items() if w == where}
            known = sorted(yaml_names.get(k, k) for k in hints)
            raise ConfigError(f"unknown config key '{where + '.' if where else ''}{key}'; known keys: {known}")
        typ = types[name]
        full = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, key)
        else:
            kwargs[name] = _coerce(value, typ, full)
    return cls(**kwargs)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    m, t, b, e = cfg.model, cfg.train, cfg.barrier, cfg.eval
    checks = [
        (m.n_layer >= 1, "model.n_layer must be >= 1"),
        (m.n_head >= 1 and m.n_embd % m.n_head == 0, "model.n_embd must be a positive multiple of model.n_head"),
        (m.block_size >= 2, "model.block_size must be >= 2"),
        (0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (b.coupling in ("weights", "identity"),
         f"barrier.coupling must be 'weights' (A_h = W_Q^h W_O^h; old name 'exact') or 'identity', got {b.coupling!r}"),
        (b.eps > 0, "barrier.eps must be > 0"),
        (b.target_margin is None or b.target_margin > b.eps,
         f"barrier.target_margin must be null (the paper's barrier) or > barrier.eps, got {b.target_margin}"),
        (isinstance(b.query_fraction, (int, float)) and not isinstance(b.query_fraction, bool)
         and 0 < b.query_fraction <= 1,
         f"barrier.query_fraction must be a number in (0, 1], got {b.query_fraction!r}"),
        (all(r > 0 for r in e.rel_sigmas), "eval.rel_sigmas must be > 0"),
        (all(0 < p < 1 for p in e.sub_rates), f"eval.sub_rates must be in (0, 1), got {e.sub_rates}"),
        (all(g.lambdas and all(lam >= 0 for lam in g.lambdas) for g in cfg.sweep.grid),
         "every sweep.grid entry needs lambdas >= 0"),
        (all(g.target_margin is None or g.target_margin > b.eps for g in cfg.sweep.grid),
         "sweep.grid target_margin must be null or > barrier.eps"),
        (t.lam >= 0, f"train.lambda must be >= 0, got {t.lam}"),
        (t.steps >= 1, "train.steps must be >= 1"),
        (t.epochs is None or t.epochs > 0, "train.epochs must be > 0 when set"),
        (t.batch_size >= 1 and t.eval_interval >= 1 and t.eval_batches >= 1, "train batch/eval sizes must be >= 1"),
        (t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}"),
        (all(s >= 0 for s in e.sigmas), "eval.sigmas must be >= 0"),
        (e.draws >= 1 and e.batches >= 1, "eval.draws and eval.batches must be >= 1"),
        (e.split in ("val", "test"), "eval.split must be 'val' or 'test'"),
        (len(cfg.data.split) == 3 and all(x > 0 for x in cfg.data.split), "data.split must be 3 positive fractions"),
        (all(lam >= 0 for lam in cfg.sweep.lambdas) and len(cfg.sweep.seeds) >= 1, "sweep.lambdas >= 0, >= 1 seed"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return cfg


def from_dict(raw: dict) -> ExperimentConfig:
    return validate(_build(ExperimentConfig, raw, ""))


def load_config(path: str, overrides: Optional[dict] = None) -> ExperimentConfig:
    """Load a YAML config; ``overrides`` maps dotted keys (``"train.lambda"``) to values."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the experiments need PyYAML: pip install 'barrier-ops[experiments]'") from exc
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r}: top level must be a mapping, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        node = raw.setdefault(section, {}) if key else raw
        if key and not isinstance(node, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        node[key or section] = value
    return from_dict(raw)
