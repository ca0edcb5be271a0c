"""The gradients of SAM (Foret et al. 2021) and GNP (Zhao, Zhang, Hu 2022), from any closure.

With g = grad L(theta) and the ascent step e = rho * g / ||g|| (one norm over all parameters),
    SAM:  grad L(theta + e)
    GNP:  (1 - beta) grad L(theta) + beta grad L(theta + e)      (beta = lambda / r in the paper)
GNP is the first-order form of penalizing ||grad L||, and SAM is GNP with beta = 1.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


@torch.no_grad()
def _shift(params, eps, sign: float) -> None:
    for p, e in zip(params, eps):
        if e is not None:
            p.add_(e, alpha=sign)


def perturbed_gradient(params: Sequence[torch.Tensor], closure: Callable[[], T], rho: float,
                       beta: float = 1.0) -> T:
    """Leave ``(1 - beta) grad L(theta) + beta grad L(theta + e)`` in each ``p.grad``.

    ``closure()`` must zero the gradients, compute the objective at the current parameters and
    backpropagate it into ``p.grad`` (all-reduced, under data parallelism, so that ``e`` is the
    global ascent step). It is called twice; the first call's return value is returned (the
    losses and outputs at theta). The parameters are restored exactly (copied back) before the
    return.
    """
    params = list(params)
    first = closure()
    g = [None if p.grad is None else p.grad.detach().clone() for p in params]
    norm = torch.sqrt(sum(x.pow(2).sum() for x in g if x is not None))
    eps = [None if x is None else x * (rho / (norm + 1e-12)) for x in g]
    saved = [p.detach().clone() for p in params]
    _shift(params, eps, 1.0)
    try:
        closure()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    with torch.no_grad():
        for p, a in zip(params, g):
            if a is not None and p.grad is not None and beta != 1.0:
                p.grad.mul_(beta).add_(a, alpha=1.0 - beta)
    return first
