"""``curvreg sweep SPEC``: a grid of training runs, resumable, on local processes or Ray.

A spec (YAML or JSON) holds::

    base: {preset: fc512-cifar10, epochs: 1, train_subset: 2000}    # any config fields
    grid: {lr: [0.01, 0.05], weight_decay: [0.0, 0.0005], alpha: [0.0, 0.1]}   # Cartesian product
    extra: [{lr: 0.2, alpha: 0.0}]                                   # optional explicit points
    max_attempts: 3                                                  # optional retry limit

Each point is a full ``TrainConfig``; its hash (over every field except where the data lives)
names the run. Results go to a SQLite store (``curvreg.lab.store``) and run directories
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
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .config import ConfigError, load_config_file, make_config
from .store import Store

SPEC_KEYS = ("base", "grid", "extra", "max_attempts")
NOT_HASHED = ("data_dir", "download")  # where the data lives does not change a result
# Config fields added after sweep stores were committed. At their default they are left out of
# the hash, so every committed store and run directory keeps its hash.
HASHED_UNLESS_DEFAULT = {"probe_distribution": "rademacher", "batch_norm": "unbiased", "group_size": 1}


# ------------------------------------------------------------------------ spec
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


def identity(cfg: dict) -> dict:
    """The fields of a run config that determine its result (what the hash covers)."""
    return {k: v for k, v in cfg.items() if k not in NOT_HASHED
            and not (k in HASHED_UNLESS_DEFAULT and v == HASHED_UNLESS_DEFAULT[k])}


def config_hash(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------ one run
def read_outcome(run_dir: Path):
    """(summary or None, metrics list) stored in a run directory."""
    summary, metrics = None, []
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    if (run_dir / "metrics.jsonl").is_file():
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return summary, metrics


def execute(config: dict, run_dir: Path, threads: int) -> dict:
    """Train (or resume) one run in this process; returns the outcome for the store."""
    import torch
    from .train import resume, train
    torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    if (run_dir / "checkpoint.pt").is_file() and (run_dir / "config.json").is_file():
        summary = resume(run_dir, progress=False, epochs=config["epochs"])
    else:
        summary = train(config, run_dir, progress=False)
    _, metrics = read_outcome(run_dir)
    return {"status": summary["status"], "summary": summary, "metrics": metrics,
            "host": socket.gethostname()}


def worker_main(argv: List[str]) -> int:
    """Child process entry: ``python -m curvreg.lab.sweep RUN_DIR THREADS``."""
    import fcntl
    run_dir, threads = Path(argv[0]), int(argv[1])
    with open(run_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{run_dir} is locked by another live worker", file=sys.stderr)
            return 4
        config = json.loads((run_dir / "request.json").read_text())
        start = time.perf_counter()
        out = execute(config, run_dir, threads)
        (run_dir / "timing.json").write_text(json.dumps({"execute_seconds": time.perf_counter() - start}))
    return {"done": 0, "diverged": 3}.get(out["status"], 1)


# ------------------------------------------------------------------------ backends
class LocalBackend:
    """Child processes on this machine, ``workers`` at a time.

    A child is a fork of the driver (torch is already imported, so a run starts in
    milliseconds), or a fresh interpreter where fork is unavailable.
    """

    def __init__(self, workers: int, threads: int):
        self.workers, self.threads = workers, threads
        self.procs: Dict[str, tuple] = {}

    def free(self) -> int:
        return self.workers - len(self.procs)

    def submit(self, h: str, config: dict, run_dir: Path) -> int:
        from .data import _atomic_write
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(run_dir / "request.json", lambda f: f.write(json.dumps(config).encode()))
        if hasattr(os, "fork"):
            pid = _fork_worker(run_dir, self.threads)
            self.procs[h] = (pid, None, run_dir)
            return pid
        log = open(run_dir / "worker.log", "ab")
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        proc = subprocess.Popen([sys.executable, "-m", "curvreg.lab.sweep", str(run_dir),
                                 str(self.threads)], stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.procs[h] = (proc.pid, proc, run_dir)
        return proc.pid

    def _exit_code(self, pid: int, proc) -> Optional[int]:
        if proc is not None:
            return proc.poll()
        done, status = os.waitpid(pid, os.WNOHANG)
        return None if done == 0 else os.waitstatus_to_exitcode(status)

    def poll(self) -> List[tuple]:
        finished = []
        for h, (pid, proc, run_dir) in list(self.procs.items()):
            rc = self._exit_code(pid, proc)
            if rc is None:
                continue
            del self.procs[h]
            summary, metrics = read_outcome(run_dir)
            if rc in (0, 3) and summary is not None:
                timing = (json.loads((run_dir / "timing.json").read_text())
                          if (run_dir / "timing.json").is_file() else {})
                finished.append((h, {"status": summary["status"], "summary": summary,
                                     "metrics": metrics, **timing}))
            else:
                why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
                finished.append((h, {"status": "failed", "summary": None, "metrics": metrics,
                                     "error": f"worker {why}; log tail:\n{_tail(run_dir / 'worker.log')}"}))
        return finished

    def shutdown(self) -> None:
        for pid, proc, _ in self.procs.values():
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.procs.clear()


def _fork_worker(run_dir: Path, threads: int) -> int:
    """Fork a child that runs ``worker_main`` with its output in ``worker.log``."""
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(run_dir / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # also if sys.std* were replaced
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        _die_with_parent()
        if os.getppid() != parent:  # the driver died before the death signal was armed
            os._exit(1)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        code = worker_main([str(run_dir), str(threads)])
    except BaseException:  # noqa: BLE001 - the traceback goes to worker.log; exit code says failed
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class RayBackend:
    """One Ray task per run on an existing cluster (or a local instance)."""

    def __init__(self, workers: int, threads: int, address: Optional[str] = None):
        try:
            import ray
        except ImportError as e:
            raise ConfigError("--backend ray needs the ray package: pip install 'ray>=2.9'") from e
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.task = ray.remote(num_cpus=threads, max_retries=0)(_ray_task)
        self.workers, self.threads = workers, threads
        self.pending: Dict[object, str] = {}

    def free(self) -> int:
        return self.workers - len(self.pending)

    def submit(self, h: str, config: dict, run_dir: Path) -> Optional[int]:
        ref = self.task.remote(config, str(run_dir), self.threads)
        self.pending[ref] = h
        return None

    def poll(self) -> List[tuple]:
        if not self.pending:
            return []
        ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        finished = []
        for ref in ready:
            h = self.pending.pop(ref)
            try:
                finished.append((h, self.ray.get(ref)))
            except self.ray.exceptions.RayError as e:
                finished.append((h, {"status": "failed", "summary": None, "metrics": [],
                                     "error": f"ray task failed: {str(e)[-2000:]}"}))
        return finished

    def shutdown(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()


def _ray_task(config: dict, run_dir: str, threads: int) -> dict:
    import traceback
    try:
        start = time.perf_counter()
        out = execute(config, Path(run_dir), threads)
        return {**out, "execute_seconds": time.perf_counter() - start}
    except Exception:  # noqa: BLE001 - reported to the driver as a failed attempt
        summary, metrics = read_outcome(Path(run_dir))
        return {"status": "failed", "summary": None, "metrics": metrics,
                "error": traceback.format_exc()[-4000:], "host": socket.gethostname()}


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the sweep driver dies (Linux only)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------ driver
def default_db(spec_path) -> Path:
    return Path("sweeps") / Path(spec_path).stem / "sweep.db"


def run_sweep(spec_path, *, workers: int = 1, backend: str = "local", db=None,
              address: Optional[str] = None, progress: Optional[bool] = None,
              threads: Optional[int] = None, poll_seconds: float = 0.5) -> Dict[str, int]:
    """Run (or resume) every point of the spec; returns the final status counts of its points.

    ``threads`` per run defaults to cores // workers (at least 1), so workers x threads <= cores.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend must be 'local' or 'ray', got {backend!r}")
    spec = load_spec(spec_path)
    points = expand(spec)
    check_data(points)
    db = Path(db) if db else default_db(spec_path)
    runs_dir = db.parent / "runs"
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    store = Store(db)
    store.acquire_driver()
    try:
        hashes = [config_hash(c) for c in points]
        added = store.add([(h, c, runs_dir / h) for h, c in zip(hashes, points)])
        requeued = store.requeue_running()
        store.set_meta("spec", spec)
        print(f"sweep {db}: {len(points)} points ({added} new, {requeued} resumed after a kill), "
              f"{backend} backend, {workers} worker(s) x {threads} thread(s)", flush=True)
        runner = (LocalBackend(workers, threads) if backend == "local"
                  else RayBackend(workers, threads, address))
        try:
            _drive(store, runner, hashes, spec["max_attempts"], progress, poll_seconds)
        finally:
            runner.shutdown()
        return store.counts(hashes)
    finally:
        store.release_driver()
        store.close()


def check_data(points: List[dict]) -> None:
    """Load each dataset the points need once, before any run: a missing or corrupt dataset is
    one clear error (DataError, exit 2) instead of every point failing max_attempts times."""
    from .data import load_arrays
    for name, data_dir, download in sorted({(c["dataset"], c.get("data_dir"), bool(c.get("download")))
                                            for c in points}, key=str):
        load_arrays(name, data_dir, download_ok=download)


def _drive(store: Store, runner, hashes, max_attempts, progress, poll_seconds) -> None:
    from .train import _bar
    counts = store.counts(hashes)
    settled = lambda c: c["done"] + c["diverged"]  # noqa: E731
    enabled = sys.stderr.isatty() if progress is None else progress
    bar = _bar(len(hashes), "runs", enabled)
    bar.update(settled(counts))
    best = _best(store)
    running = 0
    stats = {"run_seconds": 0.0, "execute_seconds": 0.0, "driver_busy": 0.0}
    wall = time.perf_counter()
    while True:
        busy = time.perf_counter()
        while runner.free() > 0:
            row = store.claim(hashes, max_attempts)
            if row is None:
                break
            pid = runner.submit(row["hash"], json.loads(row["config"]), Path(row["run_dir"]))
            store.set_pid(row["hash"], pid)
            running += 1
        if running == 0:
            break
        for h, out in runner.poll():
            running -= 1
            seconds = store.finish(h, out["status"], out.get("summary"), out.get("metrics", []),
                                   out.get("error"), out.get("host"))
            if "execute_seconds" in out:
                stats["run_seconds"] += seconds
                stats["execute_seconds"] += out["execute_seconds"]
            acc = (out.get("summary") or {}).get("val_acc")
            if acc is not None and (best is None or acc > best):
                best = acc
            if out["status"] in ("done", "diverged"):
                bar.update(1)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(best_val=f"{best:.4f}" if best is not None else "-")
            else:
                c = store.counts(hashes)
                why = (out.get("error") or "").strip().splitlines()[-1:] if out["status"] == "failed" else []
                print(f"[{settled(c)}/{len(hashes)}] {h} {out['status']}"
                      + (f" val_acc {acc:.4f}" if acc is not None else "")
                      + (f" (best {best:.4f})" if best is not None else "")
                      + (f": {why[0][:300]}" if why else ""), flush=True)
        stats["driver_busy"] += time.perf_counter() - busy
        time.sleep(poll_seconds)
    bar.close()
    _print_overhead(stats, time.perf_counter() - wall)


def _print_overhead(stats: dict, wall: float) -> None:
    """Runner overhead: per-run time outside the training function (process start, polling
    latency, store writes) as a share of all run time, and the driver's busy share of the wall."""
    if stats["run_seconds"] > 0:
        per_run = 1 - stats["execute_seconds"] / stats["run_seconds"]
        print(f"runner overhead: {100 * per_run:.1f}% of run time outside training (process start, "
              f"polling, store); driver busy {100 * stats['driver_busy'] / max(wall, 1e-9):.2f}% "
              "of the wall clock", flush=True)


def _best(store: Store) -> Optional[float]:
    accs = [r["summary"]["val_acc"] for r in store.runs()
            if r["summary"] and r["summary"].get("val_acc") is not None]
    return max(accs) if accs else None


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
