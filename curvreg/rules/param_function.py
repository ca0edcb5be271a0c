"""Rule for a function of parameters alone met with the batch (``curvreg.ops.ParamFunction``):
P = f(theta) has no example dimension, and the tape replaces it where it meets batched data by
its expansion to the batch, whose gradient row i is d l_i / d P. Example i's gradient of the
parameters is then the vector-Jacobian product (dP/dtheta)^T (d l_i / d P), one
``autograd.grad`` per example (or group) through P's graph, differentiable under create_graph.
The functions are small (a position-bias MLP on a [2w - 1, 2w - 1] table), so the loop is cheap.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor

from ._base import LayerRule, sum_groups


def param_function_grads(layer, inputs: Sequence, grad_output: Tensor, names: Sequence[str],
                         group: int) -> Dict[str, Tensor]:
    out = layer.output
    params = [layer._parameters[k] for k in names]
    rows = sum_groups(grad_output, group)
    create = torch.is_grad_enabled()
    per_row = [torch.autograd.grad(out, params, grad_outputs=r.reshape(out.shape),
                                   retain_graph=True, create_graph=create, allow_unused=True)
               for r in rows]
    return {k: torch.stack([g[j] if g[j] is not None else torch.zeros_like(params[j])
                            for g in per_row])
            for j, k in enumerate(names)}


PARAM_FUNCTION_RULE = LayerRule(grads=param_function_grads)
