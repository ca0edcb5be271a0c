"""Hessian-vector products of the dataset-average loss, its trace and top eigenvalues.

L(theta) = (1/M) sum over all M examples in ``batches`` of l_i; each batch contributes
(n_b / M) * HVP of its own mean loss. Parameters are flattened in ``model.parameters()`` order
(only those with ``requires_grad``). Nothing here changes train/eval mode unless ``mode`` is
given, and then the previous modes are restored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
from torch import Tensor, nn

from .lanczos import lanczos_steps, tridiagonal
from .quadratic import layers_if_supported, sequential_quadratic_form
from .common import LossFn, check_per_example, materialize, model_mode, trainable_params
from .trace import TraceEstimate, hutchinson_trace, hutchpp_trace

def batch_mean_loss(model, loss_fn: LossFn, x, y) -> Tensor:
    return check_per_example(loss_fn(model(x), y), x.shape[0]).mean()


def hessian_vector_product(model: nn.Module, loss_fn: LossFn, batches: Iterable, vec: Tensor,
                           ) -> Tensor:
    """Exact H v for the flattened parameter vector ``vec`` (double backprop, batch by batch)."""
    params, batches = trainable_params(model), materialize(batches)
    total = sum(x.shape[0] for x, _ in batches)
    chunks = list(vec.split([p.numel() for p in params]))
    out = torch.zeros_like(vec)
    for x, y in batches:
        g = torch.autograd.grad(batch_mean_loss(model, loss_fn, x, y), params, create_graph=True)
        dot = sum((gi * c.view_as(gi)).sum() for gi, c in zip(g, chunks))
        hv = torch.autograd.grad(dot, params)
        out += torch.cat([h.reshape(-1) for h in hv]) * (x.shape[0] / total)
    return out


def hessian_quadratic_form(model: nn.Module, loss_fn: LossFn, batches: Iterable, vec: Tensor,
                           ) -> Tensor:
    """Exact v^T H v of the dataset-average loss.

    For a Sequential of Linear/Conv/elementwise activations/pooling/eval BatchNorm it uses
    second-order forward propagation (``curvreg.diagnostics.quadratic``, ~1.7x a forward +
    backward); otherwise ``vec . hessian_vector_product`` (~3x).
    """
    params, batches = trainable_params(model), materialize(batches)
    layers = layers_if_supported(model)
    if layers is None:
        return vec @ hessian_vector_product(model, loss_fn, batches, vec)
    by_id = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    v = dict(zip([by_id[id(p)] for p in params], vec.split([p.numel() for p in params])))
    v = {k: c.view_as(p) for (k, c), p in zip(v.items(), params)}
    names = {id(m): {local: by_id[id(p)] for local, p in m.named_parameters(recurse=False)
                     if id(p) in by_id} for m in layers}
    total = sum(x.shape[0] for x, _ in batches)
    out = vec.new_zeros(())
    for x, y in batches:
        out = out + sequential_quadratic_form(layers, names, lambda o, t: check_per_example(
            loss_fn(o, t), o.shape[0]), x, y, v) / total
    return out


def hessian_trace(model: nn.Module, loss_fn: LossFn, batches: Iterable, *, num_probes: int = 100,
                  generator: Optional[torch.Generator] = None, distribution: str = "rademacher",
                  method: str = "hutchinson", mode: Optional[str] = None) -> TraceEstimate:
    """tr(H) of the dataset-average loss with a standard error (Hutchinson by default)."""
    batches = materialize(batches)
    params = trainable_params(model)
    dim = sum(p.numel() for p in params)
    with model_mode(model, mode):
        mv = lambda v: hessian_vector_product(model, loss_fn, batches, v)  # noqa: E731
        kw = dict(distribution=distribution, generator=generator, dtype=params[0].dtype,
                  device=params[0].device)
        if method == "hutchinson":
            return hutchinson_trace(mv, dim, num_probes, **kw, quadratic=lambda v: (
                hessian_quadratic_form(model, loss_fn, batches, v)))
        if method == "hutch++":
            return hutchpp_trace(mv, dim, num_probes, **kw)
        raise ValueError(f"unknown method '{method}'; use 'hutchinson' or 'hutch++'")


@dataclass
class EigenResult:
    eigenvalues: List[float]   # descending
    residuals: List[float]     # ||H u - lambda u|| for each Ritz pair
    iterations: int
    converged: bool            # every residual <= tol * max(1, |lambda|)


def top_hessian_eigenvalues(model: nn.Module, loss_fn: LossFn, batches: Iterable, k: int = 1, *,
                            tol: float = 1e-6, max_iter: int = 100,
                            generator: Optional[torch.Generator] = None,
                            mode: Optional[str] = None) -> EigenResult:
    """The k largest (algebraic) Hessian eigenvalues by Lanczos with full reorthogonalization.

    Stops when every wanted Ritz pair has residual <= tol * max(1, |lambda|).
    """
    batches, params = materialize(batches), trainable_params(model)
    dim = sum(p.numel() for p in params)
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, {dim}], got {k}")
    with model_mode(model, mode):
        mv = lambda v: hessian_vector_product(model, loss_fn, batches, v)  # noqa: E731
        v = torch.randn(dim, generator=generator, dtype=torch.float64).to(params[0])
        for alphas, betas, beta in lanczos_steps(mv, v, min(max_iter, dim)):
            evals, evecs = torch.linalg.eigh(tridiagonal(alphas, betas))
            m = len(alphas)
            top = range(m - 1, max(m - 1 - k, -1), -1)
            res = [abs(beta * evecs[-1, j].item()) for j in top]
            done = all(r <= tol * max(1.0, abs(evals[j].item())) for r, j in zip(res, top))
            if m >= k and done:
                break
        if m < k:
            raise RuntimeError(f"the Krylov space has dimension {m} < k={k}; try another generator")
        return EigenResult([evals[j].item() for j in top], res, m, done)
