"""Where a sweep's runs execute: child processes of the driver, or Ray tasks.

Both backends implement ``Backend``: the driver asks how many runs it may start (``free``),
starts one (``submit``), collects the outcomes of finished ones (``poll``) and stops the rest
(``shutdown``). An outcome is a dict with ``status`` (done, diverged or failed), ``summary``,
``metrics``, and where known ``error``, ``host`` and ``execute_seconds`` (time inside training).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Tuple

from ..config import ConfigError
from ..exitcodes import Exit
from ..io import atomic_write, read_run, tail


class Backend(Protocol):
    def free(self) -> int: ...
    def submit(self, h: str, config: dict, run_dir: Path) -> Optional[int]: ...
    def poll(self) -> List[Tuple[str, dict]]: ...
    def shutdown(self) -> None: ...


def failed(error: str, metrics: Optional[List[dict]] = None) -> dict:
    """The outcome of an attempt that failed with ``error`` (the epochs it finished, if any)."""
    return {"status": "failed", "summary": None, "metrics": metrics or [], "error": error}


def execute(config: dict, run_dir: Path, threads: int) -> dict:
    """Train (or resume) one run in this process; returns its outcome."""
    import torch
    from ..train import resume, train
    torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    start = time.perf_counter()
    if (run_dir / "checkpoint.pt").is_file() and (run_dir / "config.json").is_file():
        summary = resume(run_dir, progress=False, epochs=config["epochs"])
    else:
        summary = train(config, run_dir, progress=False)
    _, metrics = read_run(run_dir)
    return {"status": summary["status"], "summary": summary, "metrics": metrics,
            "host": socket.gethostname(), "execute_seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------ local processes
class LocalBackend:
    """Forked children of the driver on this machine, ``workers`` at a time.

    A fork starts a run in milliseconds (torch is already imported). The child dies with the
    driver (Linux PR_SET_PDEATHSIG) and holds an exclusive flock on its run directory, so a
    restarted sweep never runs one directory twice. Needs ``os.fork`` (Linux, macOS).
    """

    def __init__(self, workers: int, threads: int):
        if not hasattr(os, "fork"):
            raise ConfigError("the local sweep backend forks its workers and this platform has no "
                              "os.fork; use --backend ray")
        self.workers, self.threads = workers, threads
        self.procs: Dict[str, Tuple[int, Path]] = {}

    def free(self) -> int:
        return self.workers - len(self.procs)

    def submit(self, h: str, config: dict, run_dir: Path) -> int:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "request.json", lambda f: f.write(json.dumps(config).encode()))
        pid = _fork_worker(run_dir, self.threads)
        self.procs[h] = (pid, run_dir)
        return pid

    def poll(self) -> List[Tuple[str, dict]]:
        finished = []
        for h, (pid, run_dir) in list(self.procs.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            rc = os.waitstatus_to_exitcode(status)
            del self.procs[h]
            summary, metrics = read_run(run_dir)
            if rc in (Exit.OK, Exit.DIVERGED) and summary is not None:
                timing = (json.loads((run_dir / "timing.json").read_text())
                          if (run_dir / "timing.json").is_file() else {})
                finished.append((h, {"status": summary["status"], "summary": summary,
                                     "metrics": metrics, **timing}))
            else:
                why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
                finished.append((h, failed(f"worker {why}; log tail:\n{tail(run_dir / 'worker.log')}",
                                           metrics)))
        return finished

    def shutdown(self) -> None:
        for pid, _ in self.procs.values():
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.procs.clear()


def _work(run_dir: Path, threads: int) -> int:
    """The child's job: lock the run directory, run the request, record the time; exit code."""
    import fcntl
    with open(run_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{run_dir} is locked by another live worker", file=sys.stderr)
            return Exit.LOCKED
        out = execute(json.loads((run_dir / "request.json").read_text()), run_dir, threads)
        (run_dir / "timing.json").write_text(json.dumps({"execute_seconds": out["execute_seconds"]}))
    return Exit.DIVERGED if out["status"] == "diverged" else Exit.OK


def _fork_worker(run_dir: Path, threads: int) -> int:
    """Fork a child that runs ``_work`` with its output in ``worker.log``."""
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = Exit.FAILED
    try:
        fd = os.open(run_dir / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # also if sys.std* were replaced
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        _die_with_parent()
        if os.getppid() != parent:  # the driver died before the death signal was armed
            os._exit(Exit.FAILED)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        code = _work(run_dir, threads)
    except BaseException:  # noqa: BLE001 - the traceback goes to worker.log; exit code says failed
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the sweep driver dies (Linux only)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------ Ray
class RayBackend:
    """One Ray task per run on an existing cluster (or a local instance); results come back
    to the driver, which alone writes the store. Run directories must be on a filesystem the
    workers share with the driver."""

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

    def submit(self, h: str, config: dict, run_dir: Path) -> None:
        ref = self.task.remote(config, str(run_dir), self.threads)
        self.pending[ref] = h

    def poll(self) -> List[Tuple[str, dict]]:
        if not self.pending:
            return []
        ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        finished = []
        for ref in ready:
            h = self.pending.pop(ref)
            try:
                finished.append((h, self.ray.get(ref)))
            except self.ray.exceptions.RayError as e:
                finished.append((h, failed(f"ray task failed: {str(e)[-2000:]}")))
        return finished

    def shutdown(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()


def _ray_task(config: dict, run_dir: str, threads: int) -> dict:
    import traceback
    try:
        return execute(config, Path(run_dir), threads)
    except Exception:  # noqa: BLE001 - reported to the driver as a failed attempt
        _, metrics = read_run(Path(run_dir))
        return {**failed(traceback.format_exc()[-4000:], metrics), "host": socket.gethostname()}


BACKENDS = ("local", "ray")  # the --backend names: LocalBackend, RayBackend
