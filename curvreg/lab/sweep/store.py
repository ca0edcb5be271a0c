"""SQLite results store of a sweep: one file, WAL mode, one row per run plus per-epoch metrics.

Tables:
    runs(hash PK, config JSON, status, attempts, created, started, finished, seconds, host, pid,
         run_dir, summary JSON, error)
    metrics(hash, epoch, data JSON)          -- one row per finished epoch of each run
    meta(key PK, value)                      -- the spec

status is one of pending, running, done, failed, diverged. ``run_dir`` is informational: the
driver always runs a point in ``<store folder>/runs/<hash>`` (rows added by older versions hold
that path relative to the working directory they were started from, newer ones ``runs/<hash>``). Every change is one transaction, so a
kill at any moment leaves either the old or the new row, never a torn one.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

STATUSES = ("pending", "running", "done", "failed", "diverged")
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    hash TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, created REAL, started REAL, finished REAL,
    seconds REAL, host TEXT, pid INTEGER, run_dir TEXT, summary TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS metrics (
    hash TEXT NOT NULL, epoch INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (hash, epoch));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class StoreError(RuntimeError):
    pass


class Store:
    """A sweep's SQLite file. Safe to open from several processes (WAL, busy timeout)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a usable sweep database ({e}); pass another "
                             "--db or move the file away") from e
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tx(self):
        return _Transaction(self.db)

    def set_meta(self, key: str, value) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    # ---------------------------------------------------------------- runs
    def add(self, points: Sequence[tuple]) -> int:
        """Insert (hash, config dict, run_dir) as pending unless present; returns how many were new."""
        now = time.time()
        with self._tx():
            before = self.db.total_changes
            self.db.executemany(
                "INSERT OR IGNORE INTO runs (hash, config, created, run_dir) VALUES (?, ?, ?, ?)",
                [(h, json.dumps(c, sort_keys=True), now, str(d)) for h, c, d in points])
            return self.db.total_changes - before

    def requeue_running(self) -> int:
        """Runs left ``running`` by a killed driver go back to ``pending`` (they resume)."""
        with self._tx():
            return self.db.execute("UPDATE runs SET status='pending', pid=NULL "
                                   "WHERE status='running'").rowcount

    def requeue_failed(self, hashes: Sequence[str]) -> int:
        """Failed runs among ``hashes`` go back to ``pending`` with a fresh attempt count."""
        with self._tx():
            return self.db.executemany("UPDATE runs SET status='pending', attempts=0, pid=NULL "
                                       "WHERE status='failed' AND hash=?",
                                       [(h,) for h in hashes]).rowcount

    def claim(self, hashes: Sequence[str], max_attempts: int) -> Optional[sqlite3.Row]:
        """Mark the first claimable run among ``hashes`` (in order) as running and return it."""
        order = {h: i for i, h in enumerate(hashes)}
        with self._tx():
            rows = self.db.execute(
                "SELECT * FROM runs WHERE status='pending' OR (status='failed' AND attempts < ?)",
                (max_attempts,)).fetchall()
            rows = sorted((r for r in rows if r["hash"] in order), key=lambda r: order[r["hash"]])
            if not rows:
                return None
            h = rows[0]["hash"]
            self.db.execute("UPDATE runs SET status='running', attempts=attempts+1, started=?, "
                            "host=?, pid=NULL, error=NULL WHERE hash=?",
                            (time.time(), socket.gethostname(), h))
            return self.db.execute("SELECT * FROM runs WHERE hash=?", (h,)).fetchone()

    def set_pid(self, h: str, pid: Optional[int], host: Optional[str] = None) -> None:
        with self._tx():
            self.db.execute("UPDATE runs SET pid=?, host=COALESCE(?, host) WHERE hash=?", (pid, host, h))

    def finish(self, h: str, status: str, summary: Optional[dict], metrics: List[dict],
               error: Optional[str] = None, host: Optional[str] = None) -> float:
        """Record the outcome; returns the run's seconds from claim to now."""
        if status not in ("done", "failed", "diverged"):
            raise ValueError(f"bad final status {status!r}")
        now = time.time()
        with self._tx():
            self.db.execute("DELETE FROM metrics WHERE hash=?", (h,))
            self.db.executemany("INSERT INTO metrics VALUES (?, ?, ?)",
                                [(h, m["epoch"], json.dumps(m, sort_keys=True)) for m in metrics])
            self.db.execute("UPDATE runs SET status=?, finished=?, seconds=?-started, summary=?, "
                            "error=?, pid=NULL, host=COALESCE(?, host) WHERE hash=?",
                            (status, now, now, json.dumps(summary) if summary else None, error,
                             host, h))
            row = self.db.execute("SELECT seconds FROM runs WHERE hash=?", (h,)).fetchone()
        return (row[0] if row else None) or 0.0

    # ---------------------------------------------------------------- reading
    def counts(self, hashes: Optional[Sequence[str]] = None) -> Dict[str, int]:
        rows = self.db.execute("SELECT hash, status FROM runs").fetchall()
        keep = set(hashes) if hashes is not None else None
        out = {s: 0 for s in STATUSES}
        for r in rows:
            if keep is None or r["hash"] in keep:
                out[r["status"]] += 1
        return out

    def runs(self) -> List[dict]:
        out = []
        for r in self.db.execute("SELECT * FROM runs ORDER BY created, hash").fetchall():
            d = dict(r)
            d["config"] = json.loads(d["config"])
            d["summary"] = json.loads(d["summary"]) if d["summary"] else None
            out.append(d)
        return out

    def metrics(self, h: str) -> List[dict]:
        rows = self.db.execute("SELECT data FROM metrics WHERE hash=? ORDER BY epoch", (h,))
        return [json.loads(r[0]) for r in rows.fetchall()]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class StoreLocked(StoreError):
    """Another live sweep driver holds the store."""


@contextlib.contextmanager
def driver_lock(path):
    """Hold an exclusive flock on ``<store>.lock`` while one sweep drives the store; a second
    driver (on any host sharing a filesystem with working flock) gets ``StoreLocked``. The
    kernel releases the lock when its holder dies, so a killed driver never blocks a restart,
    and a reused PID cannot fake one."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another process"
            raise StoreLocked(f"another sweep ({who}) is driving {path}; wait for it or stop it "
                              "first") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
