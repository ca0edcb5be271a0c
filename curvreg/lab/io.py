"""Files the toolkit writes and reads: atomic writes, JSON, run directories, progress bars.

Every file a run or a sweep leaves is written to a temporary file beside it and renamed into
place, so a kill at any moment leaves the old file or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Tuple


def atomic_write(path: Path, write: Callable) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def write_jsonl(path: Path, rows: List[dict]) -> None:
    """One key-sorted JSON object per line, written atomically."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    atomic_write(path, lambda f: f.write(text.encode()))


def read_run(run_dir: Path) -> Tuple[Optional[dict], List[dict]]:
    """(summary or None, per-epoch metrics) stored in a run directory."""
    run_dir = Path(run_dir)
    summary, metrics = None, []
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    if (run_dir / "metrics.jsonl").is_file():
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return summary, metrics


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file ("" if it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _NullBar:
    def update(self, n):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar, or an object with the same ``update``/``close`` that shows nothing."""
    if not enabled:
        return _NullBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False)
