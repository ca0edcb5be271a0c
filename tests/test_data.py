"""CIFAR loaders: the real npz, synthetic official archives, and every failure path."""
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from curvreg.lab import data
from curvreg.lab.loader import augment, epoch_batches, prepare, split_indices, zca_matrix

SHARED = Path(os.environ.get("CURVREG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL = SHARED / "cifar10.npz"


@pytest.mark.skipif(not REAL.is_file(), reason="shared CIFAR-10 copy not present")
def test_real_cifar10_npz():
    a = data.load_arrays("cifar10", SHARED)
    assert a["x_train"].shape == (50000, 32, 32, 3) and a["x_test"].shape == (10000, 32, 32, 3)
    assert a["x_train"].dtype == np.uint8
    assert np.bincount(a["y_train"]).tolist() == [5000] * 10
    assert np.bincount(a["y_test"]).tolist() == [1000] * 10
    mean = a["x_train"].reshape(-1, 3).mean(0, dtype=np.float64)
    assert np.allclose(mean, [125.30691805, 122.95039414, 113.86538318], atol=1e-6)
    assert a["y_train"][:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


def _batch(n, rng, fine_key=b"labels", classes=10, coarse=False):
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         fine_key: rng.integers(0, classes, n).tolist()}
    if coarse:
        d[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
    return pickle.dumps(d)


def make_archive(root: Path, name: str, n: int = 6, folder_only: bool = False) -> dict:
    """A small archive in the official CIFAR python format; returns the expected arrays."""
    spec = data.SPECS[name]
    rng = np.random.default_rng(0)
    members = {}
    c100 = name == "cifar100"
    for f in spec.train_files + spec.test_files:
        members[f] = _batch(n, rng, spec.label_key, spec.num_classes, coarse=c100)
    if folder_only:
        (root / spec.folder).mkdir(parents=True)
        for f, raw in members.items():
            (root / spec.folder / f).write_bytes(raw)
    else:
        with tarfile.open(root / spec.archive, "w:gz") as tar:
            for f, raw in members.items():
                info = tarfile.TarInfo(f"{spec.folder}/{f}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return {f: pickle.loads(raw, encoding="bytes") for f, raw in members.items()}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("folder_only", [False, True])
def test_synthetic_official_format(tmp_path, name, folder_only):
    batches = make_archive(tmp_path, name, folder_only=folder_only)
    a = data.load_arrays(name, tmp_path, verify_md5=False)
    spec = data.SPECS[name]
    first = batches[spec.train_files[0]]
    img = np.asarray(first[b"data"][0]).reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(a["x_train"][0], img)
    assert a["y_train"][:6].tolist() == list(first[spec.label_key])
    assert a["x_train"].shape == (6 * len(spec.train_files), 32, 32, 3)
    if name == "cifar100":
        assert a["y_train_coarse"][:6].tolist() == list(first[b"coarse_labels"])
        s = prepare(a, val_size=2, coarse=True)
        assert int(s.y_train.max()) < 20
    assert (tmp_path / f"{name}.npz").is_file()  # converted once into the cache format
    again = data.load_arrays(name, tmp_path)
    assert np.array_equal(again["x_test"], a["x_test"])


def test_checksum_mismatch_for_local_archive(tmp_path):
    make_archive(tmp_path, "cifar10")
    with pytest.raises(data.ChecksumError, match="MD5"):
        data.load_arrays("cifar10", tmp_path)
    assert not (tmp_path / "cifar10.npz").exists()


def test_corrupt_archive_and_cache(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball" * 100)
    with pytest.raises(data.CorruptArchiveError, match="not a readable"):
        data.load_arrays("cifar10", tmp_path, verify_md5=False)
    (tmp_path / "cifar10.npz").write_bytes(b"garbage")
    with pytest.raises(data.CorruptArchiveError, match="delete it"):
        data.load_arrays("cifar10", tmp_path)


def test_missing_data_says_where(tmp_path):
    with pytest.raises(data.DataError, match=f"{tmp_path}.*cifar-10-python.tar.gz.*CURVREG_DATA"):
        data.load_arrays("cifar10", tmp_path)


def test_download_verifies_and_is_atomic(tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "archive.tar.gz"
    data.download(src.as_uri(), dest, md5)
    assert dest.read_bytes() == src.read_bytes()
    dest.unlink()
    with pytest.raises(data.ChecksumError):
        data.download(src.as_uri(), dest, "0" * 32)
    assert not dest.exists() and not list(dest.parent.glob("*.part"))

    class Dying(io.BytesIO):  # the connection drops after the first chunk
        def read(self, n=-1):
            if self.tell() > 0:
                raise ConnectionResetError("connection dropped")
            return super().read(n)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: Dying(src.read_bytes()))
    with pytest.raises(data.DataError, match="could not download"):
        data.download("http://example.invalid/x", dest, md5)
    assert not dest.exists() and not list(dest.parent.glob("*.part"))


def test_split_and_subset_are_fixed():
    tr, va = split_indices(100, 10, seed=0)
    tr2, va2 = split_indices(100, 10, seed=0)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert len(set(tr) | set(va)) == 100 and not set(tr) & set(va)
    assert not np.array_equal(split_indices(100, 10, seed=1)[1], va)
    # train_subset keeps the first N training-split examples; validation and test are untouched,
    # and the normalization statistics come from the subset alone
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8),
              "y_train": np.arange(40) % 10, "x_test": rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8),
              "y_test": np.arange(6) % 10}
    full = prepare(arrays, val_size=8, normalization="none")
    sub = prepare(arrays, val_size=8, train_subset=5, normalization="none")
    tr, va = split_indices(40, 8, 0)
    assert torch.equal(sub.y_train, torch.from_numpy(arrays["y_train"][tr[:5]]))
    assert torch.equal(sub.x_train, full.x_train[:5]) and torch.equal(sub.x_val, full.x_val)
    assert torch.equal(sub.x_test, full.x_test) and torch.equal(sub.y_val, full.y_val)
    std = prepare(arrays, val_size=8, train_subset=5)
    means = std.x_train.mean((0, 2, 3))
    assert torch.allclose(means, torch.zeros(3), atol=1e-5)  # standardized with the subset's mean


def test_augment_is_crop_and_flip():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = augment(x, g)
    assert out.shape == x.shape
    for i in range(2):  # every output row is a (possibly flipped) shifted window of the input
        padded = torch.nn.functional.pad(x[i], (4, 4, 4, 4))
        found = any(torch.equal(out[i], w) for dy in range(9) for dx in range(9)
                    for w in (padded[:, dy:dy + 32, dx:dx + 32], padded[:, dy:dy + 32, dx:dx + 32].flip(2)))
        assert found


def test_epoch_batches_cover_everything_once():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    seen = torch.cat([b for _, b in epoch_batches(x, y, 3, torch.Generator().manual_seed(1))])
    assert sorted(seen.tolist()) == list(range(10))


def test_normalizations():
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (400, 32, 32, 3), dtype=np.uint8),
              "y_train": rng.integers(0, 10, 400), "x_test": rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8),
              "y_test": rng.integers(0, 10, 50)}
    s = prepare(arrays, val_size=100, normalization="standardize")
    assert torch.allclose(s.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(s.x_train.std((0, 2, 3)), torch.ones(3), atol=1e-4)
    x = torch.randn(4000, 8) @ torch.randn(8, 8)
    mean, w = zca_matrix(x, eps=1e-9)
    white = (x - mean) @ w
    assert torch.allclose(torch.cov(white.T.double()), torch.eye(8, dtype=torch.double), atol=1e-3)
    assert torch.allclose(w, w.T, atol=1e-5)  # ZCA, not PCA: the symmetric whitening matrix
    with pytest.raises(ValueError, match="unknown normalization"):
        prepare(arrays, normalization="pca")
