"""``curvreg sweep SPEC``: a grid of training runs, resumable, on local processes or Ray.

A spec (YAML or JSON) holds::

    base: {preset: fc512-cifar10, epochs: 1, train_subset: 2000}    # any config fields
    grid: {lr: [0.01, 0.05], weight_decay: [0.0, 0.0005], alpha: [0.0, 0.1]}   # Cartesian product
    extra: [{lr: 0.2, alpha: 0.0}]                                   # optional explicit points
    max_attempts: 3                                                  # optional retry limit

Each point is a full ``TrainConfig``; its hash (over every field except where the data lives)
names the run. Results go to a SQLite store (``store.py``) and run directories
``<db dir>/runs/<hash>/``. Re-running the command resumes: done and diverged runs are kept,
runs left ``running`` by a kill resume from their checkpoint, failed runs are retried up to
``max_attempts`` attempts, and points added to the grid are appended.

Local backend: one child process per run (a fork of the driver), at most ``--workers`` at a
time, each with cores // workers threads. A child dies with the driver (Linux PR_SET_PDEATHSIG) and holds an
exclusive lock on its run directory, so a restarted sweep never runs one directory twice.
Ray backend: each run is a Ray task (``num_cpus`` = threads) on an existing cluster
(``--address``, or a local one); results come back to the driver, which alone writes the store.
Run directories must then be on a filesystem the workers share with the driver.
"""
from .backends import execute
from .driver import run_sweep
from .spec import expand, load_spec

__all__ = ["execute", "expand", "load_spec", "run_sweep"]
