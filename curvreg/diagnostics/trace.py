"""Stochastic trace estimators over a matvec, each with its own standard error.

Hutchinson (1989): for probes v with E[v v^T] = I, tr(A) = E[v^T A v]. With K probes the estimate
is the sample mean and its standard error is the sample std / sqrt(K). Rademacher probes (the
default) have the smallest variance among i.i.d. probes, 2 (||A||_F^2 - sum_i A_ii^2) per probe.
Hutch++ (Meyer et al. 2021) spends a third of the matvecs on a sketch of the top subspace and
the rest on Hutchinson for the remainder; it wins when the spectrum decays fast. Hutchinson is
the default because its error bar is an ordinary sample standard error; Hutch++'s error bar
here comes from the Hutchinson part only (the deflated trace is exact given the sketch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]


@dataclass
class TraceEstimate:
    value: float
    stderr: float
    num_probes: int

    def __float__(self) -> float:
        return float(self.value)


def probes(dim: int, k: int, distribution: str, generator: Optional[torch.Generator],
           dtype=torch.float64, device="cpu") -> Tensor:
    """``[k, dim]`` Rademacher or Gaussian probes with E[v v^T] = I."""
    if distribution == "rademacher":
        v = torch.randint(0, 2, (k, dim), generator=generator).to(dtype) * 2 - 1
    elif distribution == "gaussian":
        v = torch.randn(k, dim, generator=generator, dtype=dtype)
    else:
        raise ValueError(f"unknown probe distribution '{distribution}'; use 'rademacher' or 'gaussian'")
    return v.to(device)


def hutchinson_trace(matvec: Optional[Matvec], dim: int, num_probes: int = 100, *,
                     distribution: str = "rademacher", generator: Optional[torch.Generator] = None,
                     dtype=torch.float64, device="cpu",
                     quadratic: Optional[Callable[[Tensor], Tensor]] = None) -> TraceEstimate:
    """tr(A) ~ mean_k v_k^T A v_k, with standard error std_k / sqrt(K).

    ``quadratic(v) = v^T A v``, when given, is used instead of ``v @ matvec(v)``.
    """
    if num_probes < 2:
        raise ValueError(f"num_probes must be >= 2 for an error bar, got {num_probes}")
    form = quadratic or (lambda v: v @ matvec(v))
    vs = probes(dim, num_probes, distribution, generator, dtype, device)
    samples = torch.stack([torch.as_tensor(form(v)) for v in vs]).double()
    return TraceEstimate(samples.mean().item(), (samples.std() / math.sqrt(num_probes)).item(),
                         num_probes)


def hutchpp_trace(matvec: Matvec, dim: int, num_matvecs: int = 99, *,
                  distribution: str = "rademacher", generator: Optional[torch.Generator] = None,
                  dtype=torch.float64, device="cpu") -> TraceEstimate:
    """Hutch++: exact trace on a sketched top subspace Q plus Hutchinson on (I - QQ^T) A (I - QQ^T)."""
    m = num_matvecs // 3
    if m < 1:
        raise ValueError(f"num_matvecs must be >= 3, got {num_matvecs}")
    s = probes(dim, m, distribution, generator, dtype, device)
    q, _ = torch.linalg.qr(torch.stack([matvec(v) for v in s], 1))  # [dim, m]
    top = sum((q[:, j] @ matvec(q[:, j])).item() for j in range(q.shape[1]))
    k = max(2, num_matvecs - 2 * m)
    g = probes(dim, k, distribution, generator, dtype, device)
    g = g - (g @ q) @ q.T
    samples = torch.stack([v @ (a - q @ (q.T @ a)) for v in g for a in [matvec(v)]]).double()
    return TraceEstimate(top + samples.mean().item(), (samples.std() / math.sqrt(k)).item(),
                         2 * m + k)
