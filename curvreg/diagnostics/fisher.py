"""Fisher traces via the tape (no Hessian needed).

Empirical Fisher:  tr(F_bar) = mean_i ||grad l(x_i, y_i)||^2         (exact; the penalty R)
Fisher (eq. 6):    tr(F) = mean_i E_{y ~ p(.|x_i)} ||grad -log p(y|x_i)||^2
either estimated by sampling ``num_samples`` labels per example from the model's softmax (the
standard error is over the per-sample means), or computed exactly with ``labels="all"`` as
mean_i sum_c p(c|x_i) ||grad -log p(c|x_i)||^2, at the cost of one pass per class. Prefer the
exact sum near interpolation: there p(.|x) is nearly one-hot and the rare off-label draws that
carry most of the expectation are seldom sampled, so the Monte Carlo error bar understates the
error.

Training-mode BatchNorm (``batch_norm=``, as in ``GradNormTape``): ``"frozen"`` gives the exact
traces with each batch's statistics held constant; ``"unbiased"`` the true per-example norms
(statistics coupling included), estimated without bias, so the result carries a standard error
(``num_draws`` independent estimates, each with ``num_probes`` probes per batch). Either way the
statistics are those of each batch as given, so the value depends on how the examples are
batched.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tape import GradNormTape
from .common import check_per_example, materialize, model_mode, trainable_params
from .trace import TraceEstimate


def _sq_norms(model, x, targets_fn, loss_fn, **tape_options) -> Tensor:
    with GradNormTape(model, **tape_options) as tape:
        out = model(x)
    losses = check_per_example(loss_fn(out, targets_fn(out)), x.shape[0])
    return tape.per_example_sq_grad_norms(losses, create_graph=False)


def empirical_fisher_trace(model: nn.Module, loss_fn: Callable, batches: Iterable, *,
                           mode: Optional[str] = None, batch_norm: Optional[str] = None,
                           num_probes: int = 4, num_draws: int = 8,
                           generator: Optional[torch.Generator] = None):
    """mean_i ||grad l_i||^2 over every example in ``batches``: exact (a float), or for
    ``batch_norm="unbiased"`` a ``TraceEstimate`` over ``num_draws`` independent estimates."""
    batches = materialize(batches)
    trainable_params(model)
    n = sum(x.shape[0] for x, _ in batches)
    opts = {"batch_norm": batch_norm}
    if batch_norm == "unbiased":
        if num_draws < 2:
            raise ValueError(f"num_draws must be >= 2 for an error bar, got {num_draws}")
        opts.update(num_probes=num_probes, generator=generator)
    draws = num_draws if batch_norm == "unbiased" else 1
    with model_mode(model, mode):
        values = [sum(_sq_norms(model, x, lambda _o, y=y: y, loss_fn, **opts).sum().item()
                      for x, y in batches) / n for _ in range(draws)]
    if batch_norm != "unbiased":
        return values[0]
    s = torch.tensor(values, dtype=torch.float64)
    return TraceEstimate(s.mean().item(), (s.std() / math.sqrt(draws)).item(), draws)


def fisher_trace(model: nn.Module, batches: Iterable, *, num_samples: int = 8,
                 generator: Optional[torch.Generator] = None, mode: Optional[str] = None,
                 labels: str = "sample", batch_norm: Optional[str] = None,
                 num_probes: int = 4) -> TraceEstimate:
    """tr(F) with labels from softmax(model(x)); targets in batches are unused.

    ``labels="sample"``: Monte Carlo over ``num_samples`` draws, with a standard error (which,
    under ``batch_norm="unbiased"``, covers the probes too: each draw has its own).
    ``labels="all"``: the exact probability-weighted sum over every class (stderr 0;
    ``num_probes`` of the result is the number of classes); not with ``"unbiased"``.
    """
    if labels == "all":
        if batch_norm == "unbiased":
            raise ValueError("labels='all' is exact and has no error bar; with "
                             "batch_norm='unbiased' use labels='sample'")
        return _fisher_all_labels(model, batches, mode, batch_norm)
    if labels != "sample":
        raise ValueError(f"labels must be 'sample' or 'all', got {labels!r}")
    opts = {"batch_norm": batch_norm}
    if batch_norm == "unbiased":
        opts.update(num_probes=num_probes, generator=generator)
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for an error bar, got {num_samples}")
    batches = materialize(batches)
    trainable_params(model)
    n = sum(x.shape[0] for x, _ in batches)
    ce = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731

    def sample(out):
        probs = F.softmax(out.detach().double(), 1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(out.device)

    with model_mode(model, mode):
        per_sample = [sum(_sq_norms(model, x, sample, ce, **opts).sum().item() for x, _ in batches) / n
                      for _ in range(num_samples)]
    s = torch.tensor(per_sample, dtype=torch.float64)
    return TraceEstimate(s.mean().item(), (s.std() / math.sqrt(num_samples)).item(), num_samples)


def _fisher_all_labels(model, batches, mode, batch_norm) -> TraceEstimate:
    batches = materialize(batches)
    trainable_params(model)
    n = sum(x.shape[0] for x, _ in batches)
    total, classes = 0.0, 0
    with model_mode(model, mode):
        for x, _ in batches:
            with torch.no_grad():
                probs = F.softmax(model(x).double(), 1)
            classes = probs.shape[1]
            for c in range(classes):
                sq = _sq_norms(model, x, lambda o, c=c: torch.full((o.shape[0],), c, device=o.device),
                               lambda o, t: F.cross_entropy(o, t, reduction="none"),
                               batch_norm=batch_norm)
                total += (probs[:, c] * sq.double()).sum().item()
    return TraceEstimate(total / n, 0.0, classes)
