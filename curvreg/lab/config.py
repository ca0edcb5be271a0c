"""Training configuration: a typed dataclass, presets named after the paper's settings, and
strict parsing of overrides (unknown fields and wrong types are errors that name the field).

Every field's type, default, help text and bounds are declared once, in ``TrainConfig``; the
choice lists are ``Literal`` types built from the lists the code that implements them keeps
(``curvreg.probe.ESTIMATORS``, ``loader.NORMALIZATIONS``, ``models.MODELS``, ...), and the
command line (``curvreg train --help``) is generated from the same declarations.

Units: ``weight_decay`` is the SGD coefficient lambda (gradient += lambda * theta, i.e. a loss term
lambda/2 ||theta||^2); ``alpha`` multiplies R = mean_i ||grad l_i||^2 of the mean cross-entropy
(see ``curvreg.tape``).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple, Union

from curvreg import batchnorm, probe

from .data import SPECS
from .loader import NORMALIZATIONS
from .models import ACTIVATIONS, MODELS

_FC = dict(lr=0.02, weight_decay=5e-4, alpha=5e-4, epochs=20, batch_size=256)
_CNN = dict(model="allcnn", lr=0.05, weight_decay=5e-4, alpha=5e-4, epochs=100, batch_size=256,
            augment=True, warmup_epochs=2.0)
PRESETS: Dict[str, Dict[str, Any]] = {
    "fc512-cifar10": dict(model="fc512", dataset="cifar10", **_FC),
    "fc4096-cifar10": dict(model="fc4096", dataset="cifar10", **_FC),
    "allcnn-cifar10": dict(dataset="cifar10", **_CNN),
    "allcnn-cifar100": dict(dataset="cifar100", **_CNN),
    # He et al. (2016), section 4.2: batch 128, lr 0.1, weight decay 1e-4, steps at 50% and 75%
    "resnet20-cifar10": dict(model="resnet20", dataset="cifar10", lr=0.1, weight_decay=1e-4,
                             alpha=5e-4, epochs=160, batch_size=128, augment=True, schedule="step",
                             milestones=[80, 120], gamma=0.1),
    "resnet18-cifar10": dict(model="resnet18", dataset="cifar10", lr=0.1, weight_decay=5e-4,
                             alpha=5e-4, epochs=200, batch_size=128, augment=True, warmup_epochs=1.0),
}

# The Literal types' value lists (names evaluated by typing.get_type_hints).
PRESET_NAMES = tuple(PRESETS)
MODEL_NAMES = tuple(MODELS)
DATASETS = tuple(SPECS)
SCHEDULES = ("constant", "step", "cosine")  # implemented by train.lr_at
METHODS = ("sgd", "sam", "gnp")              # implemented by train.sam_gradient / gnp_gradient
DEVICES = ("auto", "cpu", "cuda")


def _field(default, help: str, *, lo: Optional[float] = None, factory=None):
    """A config field: its default, one line of ``--help`` text and an optional lower bound."""
    meta = {"help": help, "min": lo}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    preset: Optional[Literal[PRESET_NAMES]] = _field(None, "named setting (its fields, then the other flags)")
    model: Literal[MODEL_NAMES] = _field("fc512", "model from the registry")
    dataset: Literal[DATASETS] = _field("cifar10", "dataset")
    activation: Literal[ACTIVATIONS] = _field("relu", "hidden activation")
    width: float = _field(1.0, "channel multiplier (allcnn, resnet*)", lo=0)
    dropout: float = _field(0.0, "all-conv dropout after the stride-2 convs", lo=0)
    epochs: int = _field(20, "number of epochs", lo=1)
    batch_size: int = _field(256, "global batch size", lo=1)
    lr: float = _field(0.02, "peak learning rate", lo=0)
    momentum: float = _field(0.9, "SGD momentum", lo=0)
    nesterov: bool = _field(False, "Nesterov momentum")
    weight_decay: float = _field(5e-4, "L2 coefficient (SGD weight_decay)", lo=0)
    alpha: float = _field(5e-4, "curvature coefficient on mean_i ||grad l_i||^2", lo=0)
    alpha_warmup_epochs: float = _field(0.0, "linear warm-up of alpha from 0", lo=0)
    schedule: Literal[SCHEDULES] = _field("cosine", "learning-rate schedule")
    warmup_epochs: float = _field(0.0, "linear lr warm-up epochs", lo=0)
    milestones: List[int] = _field(None, "epochs at which the step schedule multiplies the lr by "
                                   "gamma", factory=list)
    gamma: float = _field(0.1, "step schedule factor", lo=0)
    method: Literal[METHODS] = _field("sgd", "optimizer wrapper: plain SGD, SAM (Foret et al.) or "
                                      "GNP (Zhao et al. 2022)")
    rho: float = _field(0.05, "SAM/GNP radius", lo=0)
    gnp_beta: float = _field(0.8, "GNP mixing weight (lambda / r in Zhao et al.)")
    curvature_estimator: Literal[probe.ESTIMATORS] = _field(
        "exact", "how the penalty is computed (see curvreg.probe)")
    num_probes: int = _field(1, "probes per step for the probe estimators", lo=1)
    probe_distribution: Literal[probe.DISTRIBUTIONS] = _field("rademacher", "probe distribution")
    batch_norm: Literal[batchnorm.MODES] = _field(
        "unbiased", "training-mode BatchNorm in the penalty: the true norms, estimated without "
        "bias, or the exact norms with the batch statistics held constant (curvreg.batchnorm)")
    group_size: int = _field(1, "penalize the squared gradient norm of each group of m consecutive "
                             "examples (1: per example, the paper's; the batch size: the "
                             "full-batch gradient norm)", lo=1)
    normalization: Literal[NORMALIZATIONS] = _field("standardize", "input normalization")
    zca_eps: float = _field(0.1, "ZCA regularizer", lo=0)
    augment: bool = _field(False, "random crop + flip")
    val_size: int = _field(5000, "held-out validation examples", lo=0)
    split_seed: int = _field(0, "seed of the train/validation split")
    train_subset: Optional[int] = _field(None, "use the first N training examples", lo=1)
    coarse_labels: bool = _field(False, "CIFAR-100 coarse labels")
    fisher_eval_size: int = _field(1024, "training examples for the per-epoch Fisher trace", lo=1)
    seed: int = _field(0, "random seed")
    device: Literal[DEVICES] = _field("auto", "device")
    bf16: bool = _field(False, "bf16 autocast (CPU or GPU; the penalty's rule arithmetic stays float32)")
    data_dir: Optional[str] = _field(None, "directory with cifar10.npz or the official archives "
                                     "(default: $CURVREG_DATA, else ~/.cache/curvreg)")
    download: bool = _field(False, "download the dataset if missing")


class ConfigError(ValueError):
    """A configuration field is unknown or has a bad value; the message names it."""


def field_types() -> Dict[str, Any]:
    """Each field's resolved type (``Literal[...]``, ``Optional[int]``, ``List[int]``, ...)."""
    return typing.get_type_hints(TrainConfig)


def choices(typ) -> Tuple:
    """The values a ``Literal`` (or ``Optional[Literal]``) type allows; () for other types."""
    if typing.get_origin(typ) is Union:
        return next((choices(a) for a in typing.get_args(typ) if choices(a)), ())
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else ()


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """``value`` checked against (and, int -> float, converted to) ``typ``."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(name, value, next(a for a in args if a is not type(None)))
    if value is None:
        raise ConfigError(f"field '{name}' may not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"field '{name}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"field '{name}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise ConfigError(f"field '{name}' must be {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field's type and bound in place (errors name the field); returns ``cfg``."""
    types = field_types()
    for f in dataclasses.fields(cfg):
        value = _coerce(f.name, getattr(cfg, f.name), types[f.name])
        lo = f.metadata["min"]
        if lo is not None and value is not None and value < lo:
            raise ConfigError(f"field '{f.name}' must be >= {lo}, got {value}")
        setattr(cfg, f.name, value)
    if cfg.batch_size % cfg.group_size:
        raise ConfigError(f"field 'group_size' ({cfg.group_size}) must divide batch_size "
                          f"({cfg.batch_size})")
    return cfg


def make_config(overrides: Mapping[str, Any]) -> TrainConfig:
    """Defaults, then the preset named in ``overrides`` (if any), then the other overrides."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
    preset = _coerce("preset", overrides.get("preset"), field_types()["preset"])
    values = {**(PRESETS[preset] if preset is not None else {}), **overrides}
    return validate(TrainConfig(**values))


def load_config_file(path) -> Dict[str, Any]:
    """A YAML or JSON mapping of config fields."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config fields")
    return data
