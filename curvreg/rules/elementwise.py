"""Rule for an elementwise scale or shift by a broadcast parameter (``curvreg.ops.ElementwiseAffine``):
y = x * p or y = x + p, with p broadcast over the example dimension and possibly others.

Example i's gradient is the broadcast reduction to p's shape of
    delta_i * x_i   (scale)        or        delta_i   (shift),
materialized: it is as small as p per example (a layer scale, a position-embedding table).
"""
from __future__ import annotations

from typing import Dict, Sequence

from torch import Tensor

from ._base import LayerRule, sum_groups


def elementwise_grads(layer, inputs: Sequence, grad_output: Tensor, names: Sequence[str],
                      group: int) -> Dict[str, Tensor]:
    p = layer.weight
    t = grad_output * inputs[0] if layer.kind == "mul" else grad_output  # [N, *x.shape[1:]]
    padded = (1,) * (t.dim() - p.dim()) + tuple(p.shape)
    dims = tuple(d for d in range(1, t.dim()) if padded[d] == 1 and t.shape[d] != 1)
    if dims:
        t = t.sum(dims, keepdim=True)
    return {"weight": sum_groups(t.reshape(t.shape[0], *p.shape), group)}


ELEMENTWISE_RULE = LayerRule(grads=elementwise_grads)
