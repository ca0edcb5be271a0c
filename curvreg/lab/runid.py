"""A run's identity: the config fields that determine its result, and the hash that names it.

The hash names run directories and sweep-store rows, so it must not change for a committed
store: fields added to ``TrainConfig`` after stores were committed are left out of the identity
while they hold their default (``HASHED_UNLESS_DEFAULT``), and where the data lives is never
part of it (``NOT_HASHED``).
"""
from __future__ import annotations

import hashlib
import json

NOT_HASHED = ("data_dir", "download")  # where the data lives does not change a result
HASHED_UNLESS_DEFAULT = {"probe_distribution": "rademacher", "batch_norm": "unbiased", "group_size": 1}


def identity(cfg: dict) -> dict:
    """The fields of a run config that determine its result (what the hash covers)."""
    return {k: v for k, v in cfg.items() if k not in NOT_HASHED
            and not (k in HASHED_UNLESS_DEFAULT and v == HASHED_UNLESS_DEFAULT[k])}


def config_hash(cfg: dict) -> str:
    """16 hex digits of the SHA-1 of the identity as key-sorted JSON."""
    return hashlib.sha1(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:16]
