"""The sweep driver: claims points from the store, hands them to a backend, records outcomes."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional

from ..config import ConfigError
from ..io import progress_bar
from ..runid import config_hash
from .backends import BACKENDS, Backend, LocalBackend, RayBackend
from .spec import check_data, default_db, expand, load_spec
from .store import Store, driver_lock


def run_sweep(spec_path, *, workers: int = 1, backend: str = "local", db=None,
              address: Optional[str] = None, progress: Optional[bool] = None,
              threads: Optional[int] = None, poll_seconds: float = 0.5,
              retry_failed: bool = False) -> Dict[str, int]:
    """Run (or resume) every point of the spec; returns the final status counts of its points.

    Failed runs are retried until they have used the spec's ``max_attempts``; ``retry_failed``
    gives the failed points of this spec a fresh count (after the cause has been fixed).

    ``threads`` per run defaults to cores // workers (at least 1), so workers x threads <= cores.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {list(BACKENDS)}, got {backend!r}")
    spec = load_spec(spec_path)
    points = expand(spec)
    check_data(points)
    db = Path(db).resolve() if db else default_db(spec_path)
    runs_dir = db.parent / "runs"  # run directories live beside the store, wherever it is run from
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    with driver_lock(db), Store(db) as store:
        hashes = [config_hash(c) for c in points]
        added = store.add([(h, c, Path("runs") / h) for h, c in zip(hashes, points)])
        requeued = store.requeue_running()
        retried = store.requeue_failed(hashes) if retry_failed else 0
        store.set_meta("spec", spec)
        print(f"sweep {db}: {len(points)} points ({added} new, {requeued} resumed after a kill"
              + (f", {retried} failed retried" if retry_failed else "") + "), "
              f"{backend} backend, {workers} worker(s) x {threads} thread(s)", flush=True)
        runner = (LocalBackend(workers, threads) if backend == "local"
                  else RayBackend(workers, threads, address))
        try:
            _drive(store, runner, runs_dir, hashes, spec["max_attempts"], progress, poll_seconds)
        finally:
            runner.shutdown()
        return store.counts(hashes)


STOP_AFTER = 3  # consecutive failed attempts with the same error that stop a sweep


def _drive(store: Store, runner: Backend, runs_dir: Path, hashes, max_attempts, progress,
           poll_seconds) -> None:
    """Claim, submit and record until no point is claimable, or until ``STOP_AFTER``
    consecutive attempts failed with the same last error line (a systematic failure: the
    remaining points stay pending, and the next run of the command resumes them)."""
    counts = store.counts(hashes)
    settled = lambda c: c["done"] + c["diverged"]  # noqa: E731
    enabled = sys.stderr.isatty() if progress is None else progress
    bar = progress_bar(len(hashes), "runs", enabled)
    bar.update(settled(counts))
    say = getattr(bar, "write", None) or (lambda text: print(text, flush=True))
    best = _best(store)
    running, streak, stopping = 0, [], False
    stats = {"run_seconds": 0.0, "execute_seconds": 0.0, "driver_busy": 0.0}
    wall = time.perf_counter()
    while True:
        busy = time.perf_counter()
        while runner.free() > 0 and not stopping:
            row = store.claim(hashes, max_attempts)
            if row is None:
                break
            pid = runner.submit(row["hash"], json.loads(row["config"]), runs_dir / row["hash"])
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
            why = (out.get("error") or "").strip().splitlines()[-1:] if out["status"] == "failed" else []
            streak = streak + why if why else []
            if out["status"] in ("done", "diverged"):
                bar.update(1)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(best_val=f"{best:.4f}" if best is not None else "-")
            if not hasattr(bar, "set_postfix") or why:
                c = store.counts(hashes)
                say(f"[{settled(c)}/{len(hashes)}] {h} {out['status']}"
                    + (f" val_acc {acc:.4f}" if acc is not None else "")
                    + (f" (best {best:.4f})" if best is not None else "")
                    + (f": {why[0][:300]}" if why else ""))
            if len(streak) >= STOP_AFTER and len(set(streak[-STOP_AFTER:])) == 1 and not stopping:
                stopping = True
                say(f"stopping: the last {STOP_AFTER} attempts failed with the same error "
                    f"({streak[-1][:300]}); fix it and run the command again to resume")
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
