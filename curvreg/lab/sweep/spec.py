"""A sweep spec: base config, grid, explicit extra points and a retry limit; its points."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import List

from ..config import ConfigError, load_config_file, make_config
from ..runid import config_hash

SPEC_KEYS = ("base", "grid", "extra", "max_attempts")


def load_spec(path) -> dict:
    """Read and check a sweep spec; errors name the key at fault."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {path} does not exist")
    spec = load_config_file(path)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown spec key(s) {unknown}; allowed: {list(SPEC_KEYS)}")
    base, grid, extra = spec.get("base") or {}, spec.get("grid") or {}, spec.get("extra") or []
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: 'base' must be a mapping of config fields")
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: 'grid' must map config fields to lists of values")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{path}: grid field '{k}' must be a non-empty list, got {v!r}")
    if not isinstance(extra, list) or not all(isinstance(e, dict) for e in extra):
        raise ConfigError(f"{path}: 'extra' must be a list of mappings of config fields")
    if not grid and not extra:
        raise ConfigError(f"{path}: the spec has no points: 'grid' is empty and there is no 'extra'")
    attempts = spec.get("max_attempts", 3)
    if not isinstance(attempts, int) or attempts < 1:
        raise ConfigError(f"{path}: 'max_attempts' must be an int >= 1, got {attempts!r}")
    return {"base": base, "grid": grid, "extra": extra, "max_attempts": attempts}


def expand(spec: dict) -> List[dict]:
    """The full config dicts of every point: base x grid product, then extras (deduplicated)."""
    keys = list(spec["grid"])
    combos = ([dict(zip(keys, vals)) for vals in itertools.product(*(spec["grid"][k] for k in keys))]
              if keys else [])  # no grid: only the extra points (not the bare base)
    points, seen = [], set()
    for i, over in enumerate(combos + spec["extra"]):
        try:
            cfg = dataclasses.asdict(make_config({**spec["base"], **over}))
        except ConfigError as e:
            where = f"grid point {over}" if i < len(combos) else f"extra point {over}"
            raise ConfigError(f"{where}: {e}") from e
        h = config_hash(cfg)
        if h not in seen:
            seen.add(h)
            points.append(cfg)
    return points


def check_data(points: List[dict]) -> None:
    """Load each dataset the points need once, before any run: a missing or corrupt dataset is
    one clear error (DataError, exit 2) instead of every point failing max_attempts times."""
    from ..data import load_arrays
    for name, data_dir, download in sorted({(c["dataset"], c.get("data_dir"), bool(c.get("download")))
                                            for c in points}, key=str):
        load_arrays(name, data_dir, download_ok=download)


def default_db(spec_path) -> Path:
    """``<spec's folder>/<spec name>/sweep.db``: the same store from any working directory."""
    spec_path = Path(spec_path).resolve()
    return spec_path.parent / spec_path.stem / "sweep.db"
