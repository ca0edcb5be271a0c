"""Brute-force oracles for per-example squared gradient norms (for tests and users).

Both compute sq_k = ||d/dtheta mean_{i in group k} l_i||^2 (see ``curvreg.tape``) over every
parameter with ``requires_grad=True``. They are slow and exact, and differentiable when
``create_graph=True`` (the loop) so that double backprop through them is the reference
gradient of the penalty.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .batchnorm import OneExampleLayout

LossFn = Callable[[Tensor, Tensor], Tensor]


def loop_sq_grad_norms(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, *,
                       group_size: int = 1, create_graph: bool = False) -> Tensor:
    """One forward/backward per group of ``group_size`` examples; ``loss_fn`` returns ``[n]``.
    Batch norms run under ``batchnorm.OneExampleLayout`` (PyTorch's CPU batch-norm backward is
    wrong for some gradient layouts on a batch of one), which changes no value."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for start in range(0, inputs.shape[0], group_size):
        sl = slice(start, start + group_size)
        with OneExampleLayout():
            loss = loss_fn(model(inputs[sl]), targets[sl]).mean()
        gs = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        out.append(sum(g.pow(2).sum() for g in gs if g is not None))
    return torch.stack(out)


def vmap_sq_grad_norms(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                       ) -> Tensor:
    """``torch.func.vmap(grad)`` over examples: materializes all N per-example gradients."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    frozen = {k: p for k, p in model.named_parameters() if not p.requires_grad}

    def loss_one(p, x, y):
        out = functional_call(model, {**frozen, **buffers, **p}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, inputs, targets)
    return sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
