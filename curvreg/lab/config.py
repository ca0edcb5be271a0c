"""Training configuration: a typed dataclass, presets named after the paper's settings, and
strict parsing of overrides (unknown fields and wrong types are errors that name the field).

Units: ``weight_decay`` is the SGD coefficient lambda (gradient += lambda * theta, i.e. a loss term
lambda/2 ||theta||^2); ``alpha`` multiplies R = mean_i ||grad l_i||^2 of the mean cross-entropy
(see ``curvreg.tape``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .models import MODELS

CHOICES = {
    "model": tuple(MODELS),
    "dataset": ("cifar10", "cifar100"),
    "activation": ("relu", "gelu", "tanh"),
    "schedule": ("constant", "step", "cosine"),
    "method": ("sgd", "sam", "gnp"),
    "normalization": ("standardize", "zca", "none"),
    "device": ("auto", "cpu", "cuda"),
    "curvature_estimator": ("exact", "probe", "hybrid"),
    "probe_distribution": ("rademacher", "gaussian", "kronecker"),
    "batch_norm": ("unbiased", "frozen"),
}


@dataclass
class TrainConfig:
    preset: Optional[str] = None
    model: str = "fc512"
    dataset: str = "cifar10"
    activation: str = "relu"
    width: float = 1.0                 # all-conv channel multiplier
    dropout: float = 0.0               # all-conv dropout after the stride-2 convs
    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.02
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    alpha: float = 5e-4
    alpha_warmup_epochs: float = 0.0   # linear ramp of alpha from 0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0         # linear lr warm-up
    milestones: List[int] = field(default_factory=list)  # step schedule epochs
    gamma: float = 0.1
    method: str = "sgd"                # sgd | sam (Foret et al.) | gnp (Zhao et al. 2022)
    rho: float = 0.05                  # SAM / GNP perturbation radius
    gnp_beta: float = 0.8              # GNP mixing weight (lambda / r in Zhao et al.)
    curvature_estimator: str = "exact"
    num_probes: int = 1
    probe_distribution: str = "rademacher"  # rademacher | gaussian | kronecker (see curvreg.probe)
    batch_norm: str = "unbiased"       # training-mode BatchNorm in the penalty (curvreg.batchnorm)
    group_size: int = 1                # m: penalty on the gradient norms of groups of m examples
    normalization: str = "standardize"
    zca_eps: float = 0.1
    augment: bool = False
    val_size: int = 5000
    split_seed: int = 0
    train_subset: Optional[int] = None
    coarse_labels: bool = False
    fisher_eval_size: int = 1024       # training examples for the per-epoch Fisher trace
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    data_dir: Optional[str] = None
    download: bool = False


HELP = {  # one line per field for ``curvreg train --help`` (choices are appended from CHOICES)
    "preset": "named setting (its fields, then the other flags)",
    "model": "model from the registry",
    "dataset": "dataset",
    "activation": "hidden activation",
    "width": "channel multiplier (allcnn, resnet*)",
    "dropout": "all-conv dropout after the stride-2 convs",
    "epochs": "number of epochs",
    "batch_size": "global batch size",
    "lr": "peak learning rate",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "L2 coefficient (SGD weight_decay)",
    "alpha": "curvature coefficient on mean_i ||grad l_i||^2",
    "alpha_warmup_epochs": "linear warm-up of alpha from 0",
    "schedule": "learning-rate schedule",
    "warmup_epochs": "linear lr warm-up epochs",
    "milestones": "epochs at which the step schedule multiplies the lr by gamma",
    "gamma": "step schedule factor",
    "method": "optimizer wrapper: plain SGD, SAM (Foret et al.) or GNP (Zhao et al. 2022)",
    "rho": "SAM/GNP radius",
    "gnp_beta": "GNP mixing weight",
    "curvature_estimator": "how the penalty is computed (see curvreg.probe)",
    "num_probes": "probes per step for the probe estimators",
    "probe_distribution": "probe distribution",
    "group_size": "penalize the squared gradient norm of each group of m consecutive examples "
                  "(1: per example, the paper's; the batch size: the full-batch gradient norm)",
    "batch_norm": "training-mode BatchNorm in the penalty: the true norms, estimated without bias, "
                  "or the exact norms with the batch statistics held constant",
    "normalization": "input normalization",
    "zca_eps": "ZCA regularizer",
    "augment": "random crop + flip",
    "val_size": "held-out validation examples",
    "split_seed": "seed of the train/validation split",
    "train_subset": "use the first N training examples",
    "coarse_labels": "CIFAR-100 coarse labels",
    "fisher_eval_size": "training examples for the per-epoch Fisher trace",
    "seed": "random seed",
    "device": "device",
    "bf16": "bf16 autocast (CPU or GPU; the penalty's rule arithmetic stays float32)",
    "data_dir": "directory with cifar10.npz or the official archives (default: $CURVREG_DATA, "
                "else ~/.cache/curvreg)",
    "download": "download the dataset if missing",
}

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


class ConfigError(ValueError):
    """A configuration field is unknown or has a bad value; the message names it."""


def _check_type(name: str, value: Any, typ: Any) -> Any:
    text = str(typ)
    if value is None:
        if "Optional" in text or "None" in text:
            return None
        raise ConfigError(f"field '{name}' may not be null")
    if "List[int]" in text:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
            raise ConfigError(f"field '{name}' must be a list of ints, got {value!r}")
        return list(value)
    base = {"int": int, "float": float, "bool": bool, "str": str}
    for key, t in base.items():
        if text.replace("Optional[", "").startswith(key):
            if t is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if not isinstance(value, t) or (t is int and isinstance(value, bool)):
                raise ConfigError(f"field '{name}' must be {key}, got {type(value).__name__} {value!r}")
            return value
    return value


def validate(cfg: TrainConfig) -> TrainConfig:
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _check_type(f.name, getattr(cfg, f.name), f.type))
        if f.name in CHOICES and getattr(cfg, f.name) not in CHOICES[f.name]:
            raise ConfigError(f"field '{f.name}' must be one of {list(CHOICES[f.name])}, got "
                              f"{getattr(cfg, f.name)!r}")
    positive = ("epochs", "batch_size", "num_probes", "fisher_eval_size", "group_size")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"field '{name}' must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "weight_decay", "alpha", "rho", "momentum", "alpha_warmup_epochs",
                 "warmup_epochs", "dropout"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"field '{name}' must be >= 0, got {getattr(cfg, name)}")
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset '{cfg.preset}'; choose one of {sorted(PRESETS)}")
    if cfg.batch_size % cfg.group_size:
        raise ConfigError(f"field 'group_size' ({cfg.group_size}) must divide batch_size "
                          f"({cfg.batch_size})")
    return cfg


def make_config(overrides: Mapping[str, Any]) -> TrainConfig:
    """Defaults, then the preset named in ``overrides`` (if any), then the other overrides."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
    preset = overrides.get("preset")
    values: Dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}'; choose one of {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(overrides)
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
