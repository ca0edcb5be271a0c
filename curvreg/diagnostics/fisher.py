"""Fisher traces via the tape (no Hessian needed).

Empirical Fisher:  tr(F_bar) = mean_i ||grad l(x_i, y_i)||^2         (exact; the penalty R)
Fisher (eq. 6):    tr(F) = mean_i E_{y ~ p(.|x_i)} ||grad -log p(y|x_i)||^2
either estimated by sampling ``num_samples`` labels per example from the model's softmax (the
standard error is over the per-sample means), or computed exactly with ``labels="all"`` as
mean_i sum_c p(c|x_i) ||grad -log p(c|x_i)||^2, at the cost of one pass per class. Prefer the
exact sum near interpolation: there p(.|x) is nearly one-hot and the rare off-label draws that
carry most of the expectation are seldom sampled, so the Monte Carlo error bar understates the
error.
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
                 labels: str = "sample") -> TraceEstimate:
    """tr(F) with labels from softmax(model(x)); targets in batches are unused.

    ``labels="sample"``: Monte Carlo over ``num_samples`` draws, with a standard error.
    ``labels="all"``: the exact probability-weighted sum over every class (stderr 0;
    ``num_probes`` of the result is the number of classes).
    """
    if labels == "all":
        return _fisher_all_labels(model, batches, mode)
    if labels != "sample":
        raise ValueError(f"labels must be 'sample' or 'all', got {labels!r}")
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


def _fisher_all_labels(model, batches, mode) -> TraceEstimate:
    batches = _materialize(batches)
    _params(model)
    n = sum(x.shape[0] for x, _ in batches)
    total, classes = 0.0, 0
    with model_mode(model, mode):
        for x, _ in batches:
            with torch.no_grad():
                probs = F.softmax(model(x).double(), 1)
            classes = probs.shape[1]
            for c in range(classes):
                sq = _sq_norms(model, x, lambda o, c=c: torch.full((o.shape[0],), c, device=o.device),
                               lambda o, t: F.cross_entropy(o, t, reduction="none"))
                total += (probs[:, c] * sq.double()).sum().item()
    return TraceEstimate(total / n, 0.0, classes)
