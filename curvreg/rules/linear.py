"""Rule for ``nn.Linear``: y = x W^T + b on inputs ``[N, *, d_in]``.

For a 2-D input the ghost norm is exact and free:
    ||g_i(W)||^2 = ||delta_i||^2 ||x_i||^2,   ||g_i(b)||^2 = ||delta_i||^2.
With T positions per example (any number of middle dims, or a group of examples) the per-example
gradient is g_i(W) = sum_t delta_{i,t} x_{i,t}^T and two exact forms exist:
    Gram form         sum_{t,s} <x_t, x_s><delta_t, delta_s>      cost ~ T^2 (d_in + d_out)
    materialized form ||delta_i^T x_i||_F^2                       cost ~ T d_in d_out
The rule picks the cheaper one per call (`use_gram`).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor, nn

from ._base import LayerRule, fold_groups, gram_sq_norm, outer_sq_norm, row_sq_norms


def use_gram(positions: int, d_in: int, d_out: int) -> bool:
    """True when the Gram form costs fewer flops than materializing ``[d_out, d_in]``."""
    return positions * (d_in + d_out) < d_in * d_out


def _positions(layer: nn.Linear, inputs: Sequence, grad_output: Tensor, group: int):
    x = inputs[0]
    x = fold_groups(x.reshape(x.shape[0], -1, layer.in_features), group)  # [G, T, d_in]
    d = fold_groups(grad_output.reshape(grad_output.shape[0], -1, layer.out_features), group)
    return x, d  # [G, T, d_in], [G, T, d_out]


def linear_sq_norms(layer: nn.Linear, inputs: Sequence, grad_output: Tensor,
                    names: Sequence[str], group: int) -> Tensor:
    x = inputs[0]
    if x.dim() == 2 and group == 1:
        d2 = row_sq_norms(grad_output)  # [N]
        scale = row_sq_norms(x) if "weight" in names else 0.0
        return d2 * (scale + (1.0 if "bias" in names else 0.0))
    x, d = _positions(layer, inputs, grad_output, group)
    out = x.new_zeros(x.shape[0])
    if "weight" in names:
        if use_gram(x.shape[1], layer.in_features, layer.out_features):
            out = out + gram_sq_norm(x, d)
        else:
            out = out + outer_sq_norm(x, d)
    if "bias" in names:
        out = out + d.sum(1).pow(2).sum(1)
    return out


def linear_grads(layer: nn.Linear, inputs: Sequence, grad_output: Tensor,
                 names: Sequence[str], group: int) -> Dict[str, Tensor]:
    x, d = _positions(layer, inputs, grad_output, group)
    grads = {}
    if "weight" in names:
        grads["weight"] = torch.bmm(d.transpose(1, 2), x)  # [G, d_out, d_in]
    if "bias" in names:
        grads["bias"] = d.sum(1)  # [G, d_out]
    return grads


LINEAR_RULE = LayerRule(grads=linear_grads, sq_norms=linear_sq_norms)


def transposed_linear_grads(layer, inputs: Sequence, grad_output: Tensor,
                            names: Sequence[str], group: int) -> Dict[str, Tensor]:
    grads = linear_grads(layer, inputs, grad_output, names, group)
    if "weight" in grads:
        grads["weight"] = grads["weight"].transpose(1, 2)  # [G, d_in, d_out], as the parameter
    return grads


TRANSPOSED_LINEAR_RULE = LayerRule(grads=transposed_linear_grads, sq_norms=linear_sq_norms)
