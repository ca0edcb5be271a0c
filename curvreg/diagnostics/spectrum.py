"""Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric H in R^{D x D} is phi(t) = (1/D) sum_j delta(t - lambda_j).
For a unit probe v, m Lanczos steps from v give a tridiagonal T_m = U diag(theta) U^T, and
v^T f(H) v ~ sum_l w_l f(theta_l) with w_l = U[0, l]^2 (Gauss quadrature, exact for polynomials
of degree < 2m). Averaging over random probes (E[v v^T] = I / D for unit probes) estimates
(1/D) tr f(H) = integral f dphi. Each run gives m nodes and weights that sum to 1; the density
is plotted by broadening each node with a Gaussian of width ``sigma`` (Ghorbani et al. 2019;
Lin, Saad & Yang 2016).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from .lanczos import lanczos_steps, tridiagonal
from .common import LossFn, materialize, model_mode, trainable_params
from .hessian import hessian_vector_product
from .trace import probes


def lanczos(matvec: Callable[[Tensor], Tensor], v0: Tensor, steps: int) -> Tuple[Tensor, Tensor]:
    """(alphas [m], betas [m - 1]) of ``steps`` Lanczos iterations from ``v0`` (m < steps if the
    Krylov space is exhausted early)."""
    for alphas, betas, _ in lanczos_steps(matvec, v0, steps):
        pass
    return (torch.tensor(alphas, dtype=torch.float64),
            torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64))


def gauss_quadrature(alphas: Tensor, betas: Tensor) -> Tuple[Tensor, Tensor]:
    """Nodes (Ritz values, ascending) and weights (first eigenvector components squared)."""
    theta, u = torch.linalg.eigh(tridiagonal(alphas.tolist(), betas.tolist()))
    return theta, u[0] ** 2


@dataclass
class SpectralDensity:
    """SLQ result: ``nodes[r]`` and ``weights[r]`` of run r (each row of weights sums to 1).

    Runs that ended early are padded with weight-0 nodes so every row has the same length.
    """

    nodes: Tensor    # [runs, m]
    weights: Tensor  # [runs, m]
    dim: int

    def moment(self, f: Callable[[Tensor], Tensor]) -> Tuple[float, float]:
        """(estimate, standard error) of (1/D) tr f(H) from the runs."""
        per_run = (self.weights * f(self.nodes)).sum(1)
        se = per_run.std().item() / math.sqrt(len(per_run)) if len(per_run) > 1 else float("nan")
        return per_run.mean().item(), se

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        """Gaussian-broadened density on ``grid``: mean_r sum_l w_rl N(t; theta_rl, sigma^2)."""
        z = (grid.double()[:, None, None] - self.nodes[None]) / sigma
        k = torch.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (k * self.weights[None]).sum(2).mean(1)


def hessian_spectral_density(model: nn.Module, loss_fn: LossFn, batches: Iterable, *,
                             num_runs: int = 10, num_steps: int = 40,
                             generator: Optional[torch.Generator] = None,
                             mode: Optional[str] = None) -> SpectralDensity:
    """SLQ estimate of the Hessian eigenvalue density of the dataset-average loss.

    Costs ``num_runs * num_steps`` exact HVPs. ``trace = dim * density.moment(lambda t: t)``
    is an estimate of tr(H) with the same expectation as Hutchinson's.
    """
    if num_runs < 1 or num_steps < 1:
        raise ValueError(f"num_runs and num_steps must be >= 1, got {num_runs} and {num_steps}")
    batches, params = materialize(batches), trainable_params(model)
    dim = sum(p.numel() for p in params)
    mv = lambda v: hessian_vector_product(model, loss_fn, batches, v)  # noqa: E731
    nodes = torch.zeros(num_runs, min(num_steps, dim), dtype=torch.float64)
    weights = torch.zeros_like(nodes)
    with model_mode(model, mode):
        vs = probes(dim, num_runs, "rademacher", generator, params[0].dtype, params[0].device)
        for r, v in enumerate(vs):
            theta, w = gauss_quadrature(*lanczos(mv, v, min(num_steps, dim)))
            nodes[r, :len(theta)], weights[r, :len(w)] = theta, w
    return SpectralDensity(nodes, weights, dim)
