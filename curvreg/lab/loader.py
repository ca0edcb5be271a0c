"""Whole-dataset tensors on the training device, with batch-wise augmentation.

Images stay uint8-derived float tensors ``[N, 3, 32, 32]`` on the device; an epoch is a random
permutation drawn from a seeded ``torch.Generator``; crop (pad 4) and flip act on a whole batch
at once, with no per-image Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

NORMALIZATIONS = ("standardize", "zca", "none")


@dataclass
class Splits:
    """Normalized tensors for train / val / test and the number of classes."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


def split_indices(n: int, val_size: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed-seed held-out validation split of ``n`` training examples: (train_idx, val_idx)."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def zca_matrix(x: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """ZCA whitening W = U (S + eps)^-1/2 U^T of flattened ``x`` ``[N, D]``; returns (mean, W)."""
    x = x.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / x.shape[0]
    s, u = torch.linalg.eigh(cov)
    w = (u * (s.clamp_min(0) + eps).rsqrt()) @ u.T
    return mean.float(), w.float()


def prepare(arrays: Dict[str, np.ndarray], *, val_size: int = 5000, split_seed: int = 0,
            train_subset: Optional[int] = None, normalization: str = "standardize",
            zca_eps: float = 0.1, coarse: bool = False, device="cpu") -> Splits:
    """Split, normalize with training-split statistics, and move to ``device``."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization '{normalization}'; choose one of {NORMALIZATIONS}")
    key = "_coarse" if coarse else ""
    if coarse and "y_train_coarse" not in arrays:
        raise ValueError("coarse labels exist only for CIFAR-100")
    x = torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2).float().div_(255)
    y = torch.from_numpy(arrays[f"y_train{key}"]).long()
    xt = torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2).float().div_(255)
    yt = torch.from_numpy(arrays[f"y_test{key}"]).long()
    tr, va = split_indices(len(x), val_size, split_seed)
    if train_subset is not None:
        if train_subset < 1:
            raise ValueError(f"train_subset must be >= 1, got {train_subset}")
        tr = tr[:train_subset]
    xtr, xva = x[tr], x[va]
    if normalization == "standardize":
        mean = xtr.mean((0, 2, 3), keepdim=True)
        std = xtr.std((0, 2, 3), keepdim=True)
        fn = lambda a: (a - mean) / std  # noqa: E731
    elif normalization == "zca":
        mean, w = zca_matrix(xtr.flatten(1), zca_eps)
        fn = lambda a: ((a.flatten(1) - mean) @ w).reshape(a.shape)  # noqa: E731
    else:
        fn = lambda a: a  # noqa: E731
    num_classes = int(max(y.max(), yt.max())) + 1
    to = lambda a: a.to(device)  # noqa: E731
    return Splits(to(fn(xtr)), to(y[tr]), to(fn(xva)), to(y[va]), to(fn(xt)), to(yt), num_classes)


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, for a whole batch."""
    n, c, h, w = x.shape
    dev, width = x.device, w + 2 * pad
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    flip = torch.rand(n, generator=generator).to(dev) < 0.5
    cols = dx[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)   # [n, w]
    rows = dy[:, None] + torch.arange(h, device=dev)        # [n, h]
    idx = (rows[:, :, None] * width + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, -1).gather(2, idx).reshape(n, c, h, w)


def epoch_batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator, *,
                  shuffle: bool = True, do_augment: bool = False, drop_last: bool = False,
                  ) -> Iterator[Tuple[Tensor, Tensor]]:
    """Batches of one epoch; all randomness comes from ``generator``."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else torch.arange(n, device=x.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        xb = x[idx]
        yield (augment(xb, generator) if do_augment else xb), y[idx]
