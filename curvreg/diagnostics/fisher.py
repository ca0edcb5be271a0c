"""Fisher traces via the tape (no Hessian needed).

Empirical Fisher:  tr(F_bar) = mean_i ||grad l(x_i, y_i)||^2         (exact; the penalty R)
Fisher (eq. 6):    tr(F) = mean_i E_{y ~ p(.|x_i)} ||grad -log p(y|x_i)||^2
estimated by sampling ``num_samples`` labels per example from the model's softmax; the standard
error is over the per-sample means.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tape import GradNormTape
from .hessian import _materialize, _params, check_per_example, model_mode
from .trace import TraceEstimate


def _sq_norms(model, x, targets_fn, loss_fn) -> Tensor:
    with GradNormTape(model) as tape:
        out = model(x)
    losses = check_per_example(loss_fn(out, targets_fn(out)), x.shape[0])
    return tape.per_example_sq_grad_norms(losses, create_graph=False)


def empirical_fisher_trace(model: nn.Module, loss_fn: Callable, batches: Iterable, *,
                           mode: Optional[str] = None) -> float:
    """Exact mean_i ||grad l_i||^2 over every example in ``batches``."""
    batches = _materialize(batches)
    _params(model)
    with model_mode(model, mode):
        total = sum(_sq_norms(model, x, lambda _o, y=y: y, loss_fn).sum().item() for x, y in batches)
    return total / sum(x.shape[0] for x, _ in batches)


def fisher_trace(model: nn.Module, batches: Iterable, *, num_samples: int = 8,
                 generator: Optional[torch.Generator] = None, mode: Optional[str] = None,
                 ) -> TraceEstimate:
    """Monte Carlo tr(F) with labels drawn from softmax(model(x)); targets in batches are unused."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for an error bar, got {num_samples}")
    batches = _materialize(batches)
    _params(model)
    n = sum(x.shape[0] for x, _ in batches)
    ce = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731

    def sample(out):
        probs = F.softmax(out.detach().double(), 1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(out.device)

    with model_mode(model, mode):
        per_sample = [sum(_sq_norms(model, x, sample, ce).sum().item() for x, _ in batches) / n
                      for _ in range(num_samples)]
    s = torch.tensor(per_sample, dtype=torch.float64)
    return TraceEstimate(s.mean().item(), (s.std() / math.sqrt(num_samples)).item(), num_samples)
