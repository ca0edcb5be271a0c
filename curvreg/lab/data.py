"""CIFAR-10/100: find or download, verify, convert to one cache format, keep on device.

Sources, in order of preference, inside the data directory (``--data-dir``, else ``$CURVREG_DATA``,
else ``~/.cache/curvreg``):
  1. the cache file ``cifar10.npz`` / ``cifar100.npz`` (uint8 HWC arrays, see ``save_npz``);
  2. the official python archive ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``;
  3. its extracted folder ``cifar-10-batches-py/`` / ``cifar-100-python/``;
  4. a download from the official URL (only with ``download=True``), verified by MD5.
Archives and folders are converted once to the npz cache; every write goes to a temporary file
that is renamed into place, so a killed download or conversion never leaves a valid-looking file.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .io import atomic_write


class DataError(RuntimeError):
    """A dataset could not be found or read; the message says what to do."""


class ChecksumError(DataError):
    """A downloaded or supplied archive does not match its published checksum."""


class CorruptArchiveError(DataError):
    """An archive or cache file exists but cannot be read."""


@dataclass(frozen=True)
class Spec:
    name: str
    archive: str
    folder: str
    url: str
    md5: str
    train_files: tuple
    test_files: tuple
    label_key: bytes
    num_classes: int


SPECS: Dict[str, Spec] = {
    "cifar10": Spec("cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    "c58f30108f718f92721af3b95e74349a",
                    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10),
    "cifar100": Spec("cifar100", "cifar-100-python.tar.gz", "cifar-100-python",
                     "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     "eb9058c3a382ffc7106e4002c42a8d85", ("train",), ("test",), b"fine_labels", 100),
}


def default_data_dir() -> Path:
    env = os.environ.get("CURVREG_DATA")
    return Path(env) if env else Path.home() / ".cache" / "curvreg"


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str, progress: bool = False) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its MD5 before the rename."""
    def write(f):
        h = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as r:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                h.update(chunk)
        if h.hexdigest() != md5:
            raise ChecksumError(f"download of {url} has MD5 {h.hexdigest()}, expected {md5}; "
                                "nothing was saved. Retry, or fetch the archive by hand.")
    try:
        atomic_write(dest, write)
    except OSError as e:
        raise DataError(f"could not download {url} ({e}). Without network access, place the "
                        f"official archive at {dest}") from e
    return dest


def _unpickle(raw: bytes, what: str) -> dict:
    try:
        return pickle.loads(raw, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt member
        raise CorruptArchiveError(f"{what} is not a valid CIFAR python batch ({e})") from e


def _arrays_from_batches(spec: Spec, read) -> Dict[str, np.ndarray]:
    """Build the cache arrays from a ``read(member_name) -> bytes`` accessor."""
    out = {}
    for split, files in (("train", spec.train_files), ("test", spec.test_files)):
        batches = [_unpickle(read(f), f) for f in files]
        try:
            data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
            out[f"x_{split}"] = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
            out[f"y_{split}"] = np.concatenate([np.asarray(b[spec.label_key]) for b in batches]).astype(np.int64)
            if spec.name == "cifar100":
                out[f"y_{split}_coarse"] = np.concatenate(
                    [np.asarray(b[b"coarse_labels"]) for b in batches]).astype(np.int64)
        except (KeyError, ValueError) as e:
            raise CorruptArchiveError(f"{spec.name} {split} batches are malformed ({e})") from e
    return out


def _from_archive(spec: Spec, path: Path) -> Dict[str, np.ndarray]:
    try:
        with tarfile.open(path, "r:gz") as tar:
            def read(name):
                member = tar.extractfile(f"{spec.folder}/{name}")
                if member is None:
                    raise CorruptArchiveError(f"{path} has no file {spec.folder}/{name}")
                return member.read()
            return _arrays_from_batches(spec, read)
    except (tarfile.TarError, EOFError, OSError, KeyError) as e:
        raise CorruptArchiveError(f"{path} is not a readable {spec.archive} ({e}); delete it and "
                                  "download it again") from e


def _from_folder(spec: Spec, folder: Path) -> Dict[str, np.ndarray]:
    def read(name):
        p = folder / name
        if not p.is_file():
            raise CorruptArchiveError(f"{folder} is missing {name}")
        return p.read_bytes()
    return _arrays_from_batches(spec, read)


def save_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """The cache format: ``x_*`` uint8 ``[N, 32, 32, 3]`` (HWC, RGB) and ``y_*`` int64 ``[N]``."""
    def write(f):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        f.write(buf.getvalue())
    atomic_write(path, write)


def load_npz(path: Path) -> Dict[str, np.ndarray]:
    """Read and check a cache file (memoized on path, size and mtime; arrays are shared)."""
    st = Path(path).stat()
    return _load_npz(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load_npz(path: str, size: int, mtime_ns: int) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k.startswith(("x_", "y_"))}
    except Exception as e:  # noqa: BLE001 - zip/npy errors of many kinds
        raise CorruptArchiveError(f"{path} is not a readable npz ({e}); delete it to rebuild") from e
    for k in ("x_train", "y_train", "x_test", "y_test"):
        if k not in arrays:
            raise CorruptArchiveError(f"{path} lacks the array '{k}'")
    if arrays["x_train"].shape[1:] != (32, 32, 3) or arrays["x_train"].dtype != np.uint8:
        raise CorruptArchiveError(f"{path}: x_train must be uint8 [N, 32, 32, 3], got "
                                  f"{arrays['x_train'].dtype} {arrays['x_train'].shape}")
    return arrays


def load_arrays(name: str, data_dir: Optional[os.PathLike] = None, *, download_ok: bool = False,
                verify_md5: bool = True) -> Dict[str, np.ndarray]:
    """Arrays of dataset ``name`` ("cifar10" or "cifar100"), converting to the cache as needed."""
    if name not in SPECS:
        raise ValueError(f"unknown dataset '{name}'; choose one of {sorted(SPECS)}")
    spec = SPECS[name]
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    cache = root / f"{name}.npz"
    if cache.is_file():
        return load_npz(cache)
    archive, folder = root / spec.archive, root / spec.folder
    if archive.is_file():
        if verify_md5 and md5sum(archive) != spec.md5:
            raise ChecksumError(f"{archive} has MD5 {md5sum(archive)}, expected {spec.md5}: the "
                                "file is damaged or not the official archive. Replace it.")
        arrays = _from_archive(spec, archive)
    elif folder.is_dir():
        arrays = _from_folder(spec, folder)
    elif download_ok:
        download(spec.url, archive, spec.md5)
        arrays = _from_archive(spec, archive)
    else:
        raise DataError(f"{name} not found in {root}. Put the official {spec.archive} (from "
                        f"{spec.url}) or {name}.npz there, point --data-dir or CURVREG_DATA at "
                        "a directory that holds it, or pass --download.")
    save_npz(cache, arrays)
    return arrays
