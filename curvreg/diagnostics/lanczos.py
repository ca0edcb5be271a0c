"""Lanczos tridiagonalization with full reorthogonalization, shared by eigenvalues and SLQ.

For symmetric A and unit q_1, m steps build an orthonormal Q_m and T_m = Q_m^T A Q_m
(tridiagonal: alphas on the diagonal, betas beside it). Ritz values of T_m approximate A's
extreme eigenvalues; the residual of a Ritz pair (theta, Q_m s) is |beta_m * s[-1]|.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Tuple

import torch
from torch import Tensor


def lanczos_steps(matvec: Callable[[Tensor], Tensor], v0: Tensor, max_steps: int,
                  ) -> Iterator[Tuple[List[float], List[float], float]]:
    """Yields (alphas, betas, beta_next) after each step; stops early on an invariant subspace.

    The basis is one preallocated ``[max_steps, D]`` matrix, so a step costs one matvec plus
    O(m D) for the (twice-applied, Kahan) Gram-Schmidt against the earlier vectors.
    """
    q = v0.new_zeros(max_steps, v0.numel())
    q[0] = v0 / v0.norm()
    alphas: List[float] = []
    betas: List[float] = []
    for m in range(max_steps):
        w = matvec(q[m])
        alphas.append((w @ q[m]).item())
        basis = q[:m + 1]
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)
        beta = w.norm().item()
        yield alphas, betas, beta
        if m + 1 == max_steps or beta <= 1e-10 * max(1.0, abs(alphas[-1])):
            return
        betas.append(beta)
        q[m + 1] = w / beta


def tridiagonal(alphas: List[float], betas: List[float]) -> Tensor:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        b = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return t
