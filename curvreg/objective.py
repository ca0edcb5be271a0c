"""The regularized objective of one batch, in one call.

    objective = mean_i l_i + alpha * mean_g ||grad l_g||^2

with l_i the per-example losses and g the examples (``group_size=1``, the paper's penalty) or
groups of ``group_size`` consecutive examples, l_g the mean loss of the group. The penalty comes from a
``GradNormTape`` over the forward; its gradient is the exact total derivative (double backprop).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .exact import promote_one
from .tape import GradNormTape


class Objective(NamedTuple):
    value: torch.Tensor               # scalar, differentiable: call .backward() on it
    losses: torch.Tensor              # [N] per-example losses
    sq_norms: Optional[torch.Tensor]  # [N / group_size] squared gradient norms; None if alpha == 0
    output: torch.Tensor              # the model's output
    tape: Optional[GradNormTape]      # the tape that recorded the forward (its .methods); None if alpha == 0


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy; bf16/fp16 outputs are upcast to float32 (float64 stays)."""
    return F.cross_entropy(promote_one(output), target, reduction="none")


def penalized_objective(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float, *,
                        loss_fn: Callable = cross_entropy, autocast: Optional[torch.dtype] = None,
                        **tape_options) -> Objective:
    """Forward ``model`` on ``x`` and return the penalized objective and its parts.

    ``loss_fn(output, y)`` must return one loss per example. ``autocast`` (e.g. torch.bfloat16)
    runs the forward under ``torch.autocast``; the tape keeps its rule arithmetic in float32.
    ``tape_options`` go to ``GradNormTape`` (estimator, batch_norm, group_size, generator, ...).
    With ``alpha == 0`` no tape is opened and ``sq_norms`` is None (a plain step's cost).
    """
    cast = torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None)
    if alpha == 0:
        with cast:
            out = model(x)
        losses = loss_fn(out, y)
        return Objective(losses.mean(), losses, None, out, None)
    with GradNormTape(model, **tape_options) as tape, cast:
        out = model(x)
    losses = loss_fn(out, y)
    sq = tape.per_example_sq_grad_norms(losses)
    return Objective(losses.mean() + alpha * sq.mean(), losses, sq, out, tape)
