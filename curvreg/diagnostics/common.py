"""What every diagnostic shares: the loss-function type, checked batches and parameters, and
``model_mode`` (train/eval mode and buffers restored after a measurement)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextmanager
def model_mode(model: nn.Module, mode: Optional[str]):
    """Temporarily put ``model`` in "train" or "eval" mode (None: leave it as it is), and
    restore its buffers afterwards: a measurement must not move the running statistics that a
    training-mode BatchNorm forward updates."""
    if mode not in (None, "train", "eval"):
        raise ValueError(f"mode must be None, 'train' or 'eval', got {mode!r}")
    saved = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    if mode is not None:
        model.train(mode == "train")
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)


def materialize(batches) -> list:
    """``batches`` as a list of (x, y); an error if it holds no example."""
    batches = list(batches)
    if not batches or sum(x.shape[0] for x, _ in batches) == 0:
        raise ValueError("batches is empty: no example to evaluate the loss on")
    return batches


def trainable_params(model) -> List[Tensor]:
    """The parameters with requires_grad (floating point); an error if there is none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True")
    if not params[0].is_floating_point():
        raise TypeError(f"parameters must be floating point, got {params[0].dtype}")
    return params


def check_per_example(losses: Tensor, n: int) -> Tensor:
    """``losses`` if it is a floating ``[n]`` tensor, else a clear error."""
    if not losses.is_floating_point():
        raise TypeError(f"loss_fn must return floating-point losses, got {losses.dtype}")
    if losses.dim() != 1 or losses.shape[0] != n:
        raise ValueError(f"loss_fn must return one loss per example, shape [{n}]; got "
                         f"{tuple(losses.shape)} (use reduction='none')")
    return losses
